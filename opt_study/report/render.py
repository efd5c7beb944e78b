"""HTML pieces of the report: number formats, tables, figure tags and the page template."""

from __future__ import annotations

import html
import math
from importlib import resources
from pathlib import Path
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


def table(rows: list[dict], columns: list[tuple[str, str]], ci: bool = False) -> str:
    """An HTML table of ``rows`` with ``columns`` = [(key, header)]. With ``ci``, a key ``k``
    whose ``k_ci`` is in the row is shown as ``mean ± half-width``."""
    if not rows:
        return '<p class="note">(no rows)</p>'
    head = "".join(f'<th class="{_cls(rows, k)}">{html.escape(h)}</th>' for k, h in columns)
    body = []
    for r in rows:
        cells = []
        for k, _ in columns:
            v = fmt_ci(r.get(k), r.get(f"{k}_ci")) if ci and f"{k}_ci" in r else fmt(r.get(k))
            cells.append(f'<td class="{_cls(rows, k)}">{html.escape(v)}</td>')
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><tr>{head}</tr>\n" + "\n".join(body) + "</table>"


def _cls(rows: list[dict], key: str) -> str:
    v = next((r.get(key) for r in rows if r.get(key) is not None), None)
    return "text" if isinstance(v, str) else "num"


def image(path: Path, alt: str) -> str:
    """An ``<img>`` for a PNG beside the page (relative link, so the folder can be moved)."""
    return f'<p><img src="{html.escape(path.name)}" alt="{html.escape(alt)}"></p>'


def note(text: str, warn: bool = False) -> str:
    return f'<p class="note{" warn" if warn else ""}">{html.escape(text)}</p>'


def section(sid: str, title: str, parts: list[str]) -> str:
    return f'<section id="{sid}"><h2>{html.escape(title)}</h2>\n' + "\n".join(parts) + "\n</section>"


def page(title: str, subtitle: str, sections: list[tuple[str, str]], body: str) -> str:
    """The whole page from ``template.html`` (shipped as package data)."""
    tpl = Template(resources.files("opt_study.report").joinpath("template.html").read_text("utf-8"))
    nav = "".join(f'<a href="#{sid}">{html.escape(t)}</a>' for sid, t in sections)
    return tpl.substitute(title=html.escape(title), subtitle=html.escape(subtitle), nav=nav, body=body)
