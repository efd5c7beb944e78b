"""Plain-text tables for terminals and logs (`opt-study query`, the analysis recipes)."""

from __future__ import annotations

import math


def format_table(names: list[str], rows: list[dict], total: int) -> str:
    """A plain-text table: a header, a rule, one line per row (floats to 6 significant digits),
    and ``(k of n rows)`` when rows were left out."""
    cells = [[_cell(r.get(n)) for n in names] for r in rows]
    widths = [max([len(n)] + [len(c[i]) for c in cells]) for i, n in enumerate(names)]
    line = lambda vals: "  ".join(v.rjust(w) for v, w in zip(vals, widths))  # noqa: E731
    out = [line(names), "  ".join("-" * w for w in widths), *(line(c) for c in cells)]
    out.append(f"({len(rows)} of {total} rows)" if len(rows) < total else f"({total} rows)")
    return "\n".join(out)


def _cell(v) -> str:
    if v is None:
        return "NULL"
    if isinstance(v, float):
        return f"{v:.6g}" if math.isfinite(v) else str(v)
    return str(v)
