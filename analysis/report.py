"""Reports: sections of text, tables and figures written as one self-contained HTML page (images
embedded as data URIs, no scripts, no links out) and a Markdown twin (PNG files beside it).

Formatting only; `analysis.sections` builds the sections from results a user already has.
"""

from __future__ import annotations

import base64
import html
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from infinisim.analysis.figures import Figure
from infinisim.core.errors import InfinisimError
from infinisim.core.files import write_bytes_atomic, write_text_atomic

CSS = """body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;max-width:1000px;margin:2em auto;
padding:0 1em;color:#222;line-height:1.45} h1{font-size:1.6em} h2{font-size:1.25em;margin-top:2em;
border-bottom:1px solid #ddd} .wide{overflow-x:auto} figure{margin:1em 0} figure img{max-width:100%}
figcaption{font-size:.85em;color:#555} code{background:#f3f3f3;padding:0 .25em;border-radius:3px;font-size:.9em}
table{border-collapse:collapse;font-size:.78em;margin:.6em 0} td,th{border:1px solid #ccc;padding:.2em .4em;
text-align:left;vertical-align:top} td{white-space:nowrap} th{background:#f6f6f6;font-weight:600}
td.num{text-align:right} .toc{font-size:.9em}"""


@dataclass
class Section:
    title: str
    text: str = ""  # paragraphs separated by blank lines; `code` spans allowed
    figure: Figure | None = None
    table: pd.DataFrame | None = None


def cell_text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float | np.floating):
        return "" if np.isnan(value) else f"{value:.4g}"
    return str(value)


def markdown_table(table: pd.DataFrame) -> str:
    head = "| " + " | ".join(map(str, table.columns)) + " |"
    rule = "|" + "|".join("---" for _ in table.columns) + "|"
    body = ["| " + " | ".join(cell_text(v).replace("|", "\\|") for v in row) + " |" for row in table.itertuples(False)]
    return "\n".join([head, rule, *body])


CODE = re.compile(r"`([^`]+)`")


def _inline(text: str) -> str:
    return CODE.sub(r"<code>\1</code>", html.escape(text))


def _html_text(text: str) -> str:
    return "".join(f"<p>{_inline(p.strip())}</p>" for p in text.split("\n\n") if p.strip())


def _html_table(table: pd.DataFrame) -> str:
    table = table.loc[:, table.notna().any()]  # a column empty in every row says nothing
    head = "".join(f"<th>{html.escape(str(c)).replace('_', ' ')}</th>" for c in table.columns)  # headers wrap

    def cell(value: Any) -> str:
        numeric = isinstance(value, int | float | np.integer | np.floating) and not isinstance(value, bool)
        return f'<td class="num">{cell_text(value)}</td>' if numeric else f"<td>{_inline(cell_text(value))}</td>"

    rows = "".join("<tr>" + "".join(cell(v) for v in row) + "</tr>" for row in table.itertuples(False))
    return f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>"


def _provenance(sections: Sequence[Section]) -> list[tuple[int, str | None]]:
    """Per figure: its number, and the command that made it, or None where an earlier figure (whose
    caption shows it) was made by the same command: a long command is printed once."""
    out, first = [], {}
    for s in sections:
        if s.figure is not None:
            n = len(out) + 1
            out.append((n, None if s.figure.ran in first else s.figure.ran))
            first.setdefault(s.figure.ran, n)
    return out


def render_html(title: str, intro: str, sections: Sequence[Section]) -> str:
    toc = "".join(f'<li><a href="#s{i}">{html.escape(s.title)}</a></li>' for i, s in enumerate(sections))
    parts = [f"<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
             f"<style>{CSS}</style></head><body><h1>{html.escape(title)}</h1>{_html_text(intro)}"
             f"<ul class=\"toc\">{toc}</ul>"]
    numbers = iter(_provenance(sections))
    firsts: dict[str, int] = {}
    for i, s in enumerate(sections):
        parts.append(f'<h2 id="s{i}">{html.escape(s.title)}</h2>{_html_text(s.text)}')
        if s.figure is not None:
            n, ran = next(numbers)
            firsts.setdefault(s.figure.ran, n)
            made = f"<code>{html.escape(ran)}</code>" if ran else f"the same command as figure {firsts[s.figure.ran]}"
            data = base64.b64encode(s.figure.png).decode()
            parts.append(f'<figure><img alt="{html.escape(s.figure.title)}" src="data:image/png;base64,{data}">'
                         f"<figcaption>Figure {n}: {html.escape(s.figure.title)}. Made by: {made}"
                         f"</figcaption></figure>")
        if s.table is not None:
            parts.append(f'<div class="wide">{_html_table(s.table)}</div>')
    parts.append("</body></html>")
    return "\n".join(parts)


def render_markdown(title: str, intro: str, sections: Sequence[Section], figure_dir: str) -> str:
    parts = [f"# {title}", intro.strip()]
    numbers = iter(_provenance(sections))
    firsts: dict[str, int] = {}
    for s in sections:
        parts.append(f"## {s.title}")
        if s.text.strip():
            parts.append(s.text.strip())
        if s.figure is not None:
            n, ran = next(numbers)
            firsts.setdefault(s.figure.ran, n)
            made = f"`{ran}`" if ran else f"the same command as figure {firsts[s.figure.ran]}"
            parts.append(f"![{s.figure.title}]({figure_dir}/{s.figure.name}.png)\n\n"
                         f"*Figure {n}: {s.figure.title}. Made by:* {made}")
        if s.table is not None:
            parts.append(markdown_table(s.table))
    return "\n\n".join(parts) + "\n"


def write_report(sections: Sequence[Section], out_dir: str | Path, title: str, intro: str = "") -> tuple[Path, Path]:
    """report.html (self-contained), report.md and figures/*.png in `out_dir`; each file written atomically."""
    if not sections:
        raise InfinisimError("nothing to report: give a plan, a validation, traces or simulation results")
    out = Path(out_dir)
    (out / "figures").mkdir(parents=True, exist_ok=True)
    names = [s.figure.name for s in sections if s.figure is not None]
    if len(names) != len(set(names)):
        raise InfinisimError(f"two figures share a name: {sorted(n for n in names if names.count(n) > 1)[0]}")
    for s in sections:
        if s.figure is not None:
            write_bytes_atomic(out / "figures" / f"{s.figure.name}.png", s.figure.png)
    md = write_text_atomic(out / "report.md", render_markdown(title, intro, sections, "figures"))
    page = write_text_atomic(out / "report.html", render_html(title, intro, sections))
    return page, md


