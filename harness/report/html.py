"""``index.html``: one self-contained page (inline CSS, no script, plots as PNG data URIs,
images embedded or beside it), readable offline.

Every number sits in an element naming its column: ``<span data-col="confirm.dino">0.821</span>``
inside a row ``<tr data-key="21">`` (the row's key, e.g. its point), so a test or a script reads
the table back exactly as shown.
"""

from __future__ import annotations

import base64
import html
import os
import re
from pathlib import Path

from harness.report.model import Figure, Report, Section, Table

__all__ = ["CSS", "data_uri", "render_html"]

CSS = """
body { font-family: system-ui, sans-serif; margin: 0; color: #1d2733; background: #fafbfc; }
header, main { max-width: 76rem; margin: 0 auto; padding: 0 1.5rem; }
header { padding-top: 1.2rem; }
h1 { font-size: 1.6rem; margin-bottom: 0.4rem; }
h2 { font-size: 1.25rem; border-bottom: 1px solid #d6dbe1; padding-bottom: 0.2rem; }
dl.facts { display: grid; grid-template-columns: max-content 1fr; gap: 0.15rem 1rem; }
dl.facts dt { font-weight: 600; }
dl.facts dd { margin: 0; }
nav a { margin-right: 0.8rem; }
section { margin: 1.6rem 0 2.2rem; }
.scroll { overflow-x: auto; }
table { border-collapse: collapse; margin: 0.6rem 0 1rem; font-size: 0.88rem; }
caption { text-align: left; font-weight: 600; padding: 0.2rem 0; }
th, td { border: 1px solid #d6dbe1; padding: 0.2rem 0.45rem; vertical-align: top; }
th { background: #eef1f4; text-align: left; }
td.num { text-align: right; white-space: nowrap; font-variant-numeric: tabular-nums; }
.ci { color: #5b6776; font-size: 0.8rem; }
td.real { background: #fde2e4; font-weight: 600; }
td.noise { color: #5b6776; }
figure { margin: 0.8rem 0 1.2rem; }
figure img { max-width: 100%; border: 1px solid #d6dbe1; background: #fff; }
figcaption { font-size: 0.85rem; color: #5b6776; }
code { background: #eef1f4; padding: 0 0.2rem; border-radius: 3px; }
details summary { cursor: pointer; font-weight: 600; margin: 0.4rem 0; }
"""


def _esc(text: object) -> str:
    return html.escape(str(text), quote=True)


def _inline(text: str) -> str:
    """Escaped text with ``backticked`` words as code."""
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", _esc(text))


def data_uri(data: bytes, mime: str = "image/png") -> str:
    """``data:<mime>;base64,...``."""
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def _cell(table: Table, row: dict[str, object], column: str) -> str:
    kind, text = table.kind(column), table.cell(row, column)
    body = f'<span data-col="{_esc(column)}">{_esc(text)}</span>'
    interval = table.interval(row, column)
    if interval is not None:
        lo, hi = interval
        body += (
            f' <span class="ci">[<span data-col="{_esc(column)}_lo">{_esc(lo)}</span>, '
            f'<span data-col="{_esc(column)}_hi">{_esc(hi)}</span>]</span>'
        )
    classes = ["num"] if kind != "text" else []
    if column.startswith("verdict.") and text in ("real", "noise"):
        classes.append(text)
    attr = f' class="{" ".join(classes)}"' if classes else ""
    return f"<td{attr}>{body}</td>"


def table_html(table: Table) -> str:
    """One ``<table>``: a header of labels, one ``<tr data-key=...>`` per row."""
    head = "".join(f'<th data-col="{_esc(c)}">{_esc(table.label(c))}</th>' for c in table.columns)
    rows = []
    for row in table.records():
        key = f' data-key="{_esc(table.cell(row, table.key))}"' if table.key else ""
        cells = "".join(_cell(table, row, c) for c in table.columns)
        rows.append(f"<tr{key}>{cells}</tr>")
    caption = f"<caption>{_inline(table.caption)}</caption>" if table.caption else ""
    body = (
        f'<div class="scroll"><table>{caption}<thead><tr>{head}</tr></thead>'
        f"<tbody>{''.join(rows)}</tbody></table></div>"
    )
    if table.collapsed:
        summary = _inline(table.caption or "table")
        return f"<details><summary>{summary} ({len(rows)} rows)</summary>{body}</details>"
    return body


def _relative(path: Path, out_dir: Path) -> str:
    return Path(os.path.relpath(path.resolve(), out_dir.resolve())).as_posix()


def figure_html(figure: Figure, out_dir: Path, embed_images: bool) -> str:
    """A ``<figure>``: inline PNG, or an image file embedded (``embed_images``) or linked
    relative to ``out_dir``; a grid's manifest is linked beside it."""
    if figure.png is not None:
        src = data_uri(figure.png)
    elif figure.path is not None and embed_images:
        src = data_uri(figure.path.read_bytes())
    elif figure.path is not None:
        src = _relative(figure.path, out_dir)
    else:
        return ""
    parts = [_esc(figure.title)]
    if figure.kind:
        parts.append(f"({_esc(figure.kind)})")
    if figure.manifest is not None:
        parts.append(f'<a href="{_esc(_relative(figure.manifest, out_dir))}">manifest</a>')
    return (
        f'<figure><img src="{_esc(src)}" alt="{_esc(figure.title)}">'
        f"<figcaption>{' '.join(parts)}</figcaption></figure>"
    )


def section_html(section: Section, out_dir: Path, embed_images: bool) -> str:
    """One ``<section id=...>`` with its heading, paragraphs, tables and figures."""
    body = [f"<h2>{_esc(section.title)}</h2>"]
    body += [f"<p>{_inline(p)}</p>" for p in section.paragraphs]
    body += [figure_html(f, out_dir, embed_images) for f in section.figures]
    body += [table_html(t) for t in section.tables]
    return f'<section id="{_esc(section.id)}">{"".join(body)}</section>'


def render_html(report: Report, out_dir: Path, embed_images: bool = True) -> str:
    """The whole page; file paths are made relative to ``out_dir`` (the page's folder)."""
    facts = "".join(f"<dt>{_esc(k)}</dt><dd>{_inline(v)}</dd>" for k, v in report.header.items())
    nav = "".join(f'<a href="#{_esc(s.id)}">{_esc(s.title)}</a>' for s in report.sections)
    sections = "".join(section_html(s, out_dir, embed_images) for s in report.sections)
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{_esc(report.title)}</title><style>{CSS}</style></head><body>"
        f'<header id="header"><h1>{_esc(report.title)}</h1><dl class="facts">{facts}</dl>'
        f"<nav>{nav}</nav></header><main>{sections}</main></body></html>\n"
    )
