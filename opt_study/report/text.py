"""Tables as text for terminals, logs and pipes (`opt-study query --format`, `validate`, the
analysis recipes): a plain table fitted to a width, Markdown, CSV, and JSON lines."""

from __future__ import annotations

import csv
import datetime
import decimal
import io
import json
import math

FORMATS = ("table", "csv", "json", "markdown")
MIN_WIDTH = 6  # a column is never cut narrower than this (a cut cell ends in "…")
# Columns that hold Unix seconds (Parquet's time_unix, the trial records' started/ended): shown
# as UTC date and time in tables, kept as numbers in CSV and JSON.
TIME_COLUMNS = ("time_unix", "started", "ended")


def render(fmt: str, names: list[str], rows: list[dict], total: int, width: int | None = None) -> str:
    """``rows`` (dicts keyed by ``names``) in one of FORMATS; ``total`` is the row count before
    any limit (table and markdown say how many were left out); ``width`` fits the table."""
    if fmt == "table":
        return format_table(names, rows, total, width=width)
    if fmt == "markdown":
        return format_markdown(names, rows, total)
    if fmt == "csv":
        return format_csv(names, rows)
    if fmt == "json":
        return format_json_lines(names, rows)
    raise ValueError(f"unknown format {fmt!r} (allowed: {', '.join(FORMATS)})")


def format_table(
    names: list[str], rows: list[dict], total: int, width: int | None = None, align_left: tuple[str, ...] = ()
) -> str:
    """A plain-text table: a header, a rule, one line per row (floats to 6 significant digits,
    Unix times as UTC), and ``(k of n rows)`` when rows were left out. With ``width``, the widest
    columns are cut (their cells end in "…") until a line fits in it. Text columns and those in
    ``align_left`` are left-aligned, the rest (numbers) right-aligned."""
    text = {n for n in names if any(isinstance(r.get(n), str) for r in rows)}
    align_left = (*align_left, *(n for n in names if n in text and n not in TIME_COLUMNS))
    cells = [[_cell(n, r.get(n)) for n in names] for r in rows]
    widths = [max([len(n)] + [len(c[i]) for c in cells]) for i, n in enumerate(names)]
    if width is not None:
        widths = fit_widths(widths, width, gap=2)

    def line(vals):
        return "  ".join(
            (_cut(v, w).ljust(w) if n in align_left else _cut(v, w).rjust(w)) for n, v, w in zip(names, vals, widths)
        ).rstrip()

    out = [line(names), "  ".join("-" * w for w in widths), *(line(c) for c in cells)]
    out.append(f"({len(rows)} of {total} rows)" if len(rows) < total else f"({total} rows)")
    return "\n".join(out)


def fit_widths(widths: list[int], width: int, gap: int) -> list[int]:
    """Column widths whose line (with ``gap`` between columns) fits ``width``: the widest column
    loses a character at a time, none below MIN_WIDTH (a table of many columns may still overflow)."""
    widths = list(widths)
    while sum(widths) + gap * (len(widths) - 1) > width:
        i = max(range(len(widths)), key=widths.__getitem__)
        if widths[i] <= MIN_WIDTH:
            break
        widths[i] -= 1
    return widths


def format_markdown(names: list[str], rows: list[dict], total: int) -> str:
    """A GitHub-flavoured Markdown table (cells as in the plain table, ``|`` escaped)."""

    def line(vals):
        return "| " + " | ".join(v.replace("|", "\\|") for v in vals) + " |"

    out = [line(names), "|" + "|".join("---" for _ in names) + "|"]
    out += [line([_cell(n, r.get(n)) for n in names]) for r in rows]
    if len(rows) < total:
        out.append(f"\n({len(rows)} of {total} rows)")
    return "\n".join(out)


def format_csv(names: list[str], rows: list[dict]) -> str:
    """CSV with a header; values as Python writes them (full precision), NULL as an empty cell."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(names)
    for r in rows:
        w.writerow(["" if r.get(n) is None else _plain(r.get(n)) for n in names])
    return buf.getvalue().rstrip("\n")


def format_json_lines(names: list[str], rows: list[dict]) -> str:
    """One JSON object per row (JSON lines); NaN and inf become null (JSON has neither)."""
    return "\n".join(json.dumps({n: _json_value(r.get(n)) for n in names}, default=str) for r in rows)


def _cell(name: str, v) -> str:
    v = float(v) if isinstance(v, decimal.Decimal) else v  # DuckDB's numeric literals are DECIMAL
    if v is None:
        return "NULL"
    if isinstance(v, (int, float)) and not isinstance(v, bool) and name in TIME_COLUMNS and math.isfinite(v):
        return datetime.datetime.fromtimestamp(v, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S")
    if isinstance(v, float):
        return f"{v:.6g}" if math.isfinite(v) else str(v)
    return str(v)


def _cut(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def _plain(v):
    return v if isinstance(v, (int, float, str)) else json.dumps(v, default=str) if isinstance(v, (list, dict)) else v


def _json_value(v):
    if isinstance(v, decimal.Decimal):
        v = float(v)
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v
