"""HTML pieces of the report: number formats, tables, figure tags and the page template."""

from __future__ import annotations

import base64
import html
import io
import math
from importlib import resources
from string import Template


def fmt(v, digits: int = 4) -> str:
    """A cell: ``–`` for missing/NaN, ``∞`` for infinities, ``digits`` significant figures."""
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        if math.isnan(v):
            return "–"
        if math.isinf(v):
            return "∞" if v > 0 else "−∞"
        return f"{v:.{digits}g}"
    return str(v)


def fmt_ci(mean, half) -> str:
    """``mean ± half`` (the half-width of a confidence interval); just the mean without one."""
    if half is None or (isinstance(half, float) and math.isnan(half)):
        return fmt(mean, 3)
    return f"{fmt(mean, 3)} ± {fmt(half, 2)}"


def plural(n: int, word: str) -> str:
    """``1 trial``, ``3 trials``."""
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def table(rows: list[dict], columns: list[tuple[str, str]], ci: bool = False, empty: str = "") -> str:
    """An HTML table of ``rows`` with ``columns`` = [(key, header)], in a box that scrolls
    sideways when the table is wider than the page. With ``ci``, a key ``k`` whose ``k_ci`` is
    in the row is shown as ``mean ± half-width``. No rows: the sentence ``empty`` (or nothing)."""
    if not rows:
        return note(empty) if empty else ""
    head = "".join(f'<th class="{_cls(rows, k)}">{html.escape(h)}</th>' for k, h in columns)
    body = []
    for r in rows:
        cells = []
        for k, _ in columns:
            v = fmt_ci(r.get(k), r.get(f"{k}_ci")) if ci and f"{k}_ci" in r else fmt(r.get(k))
            cells.append(f'<td class="{_cls(rows, k)}">{html.escape(v)}</td>')
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f'<div class="scroll"><table><tr>{head}</tr>\n' + "\n".join(body) + "</table></div>"


def _cls(rows: list[dict], key: str) -> str:
    v = next((r.get(key) for r in rows if r.get(key) is not None), None)
    return "text" if isinstance(v, str) else "num"


def figure(fig, alt: str, dpi: int = 100) -> str:
    """An ``<img>`` holding the figure itself, a PNG as a ``data:`` URI: the page is one
    self-contained file, so it renders wherever it is opened: from disk, mailed, or inside
    MLflow's artifact viewer, which shows an HTML artifact from a ``blob:`` URL where no
    relative link can resolve."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    data = base64.b64encode(buf.getvalue()).decode("ascii")
    return f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(alt)}"></figure>'


def note(text: str, warn: bool = False) -> str:
    return f'<p class="note{" warn" if warn else ""}">{html.escape(text)}</p>'


def section(sid: str, title: str, parts: list[str]) -> str:
    return f'<section id="{sid}"><h2>{html.escape(title)}</h2>\n' + "\n".join(parts) + "\n</section>"


def page(title: str, subtitle: str, sections: list[tuple[str, str]], body: str) -> str:
    """The whole page from ``template.html`` (shipped as package data)."""
    tpl = Template(resources.files("opt_study.report").joinpath("template.html").read_text("utf-8"))
    nav = "".join(f'<a href="#{sid}">{html.escape(t)}</a>' for sid, t in sections)
    return tpl.substitute(title=html.escape(title), subtitle=html.escape(subtitle), nav=nav, body=body)
