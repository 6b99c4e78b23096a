"""``summary.md``: the report's text and tables as Markdown (figures are in ``index.html``).

The numbers are :func:`~harness.report.model.format_value` 's, as in the HTML page.
"""

from __future__ import annotations

from harness.report.model import Report, Section, Table

__all__ = ["render_markdown", "table_markdown"]


def _cell_text(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def table_markdown(table: Table) -> list[str]:
    """A pipe table; an interval follows its value as ``0.821 [0.820, 0.822]``."""
    lines = [f"**{table.caption}**", ""] if table.caption else []
    lines.append("| " + " | ".join(_cell_text(table.label(c)) for c in table.columns) + " |")
    lines.append("|" + "|".join("---" for _ in table.columns) + "|")
    for row in table.records():
        cells = []
        for column in table.columns:
            text = table.cell(row, column)
            interval = table.interval(row, column)
            if interval is not None:
                text += f" [{interval[0]}, {interval[1]}]"
            cells.append(_cell_text(text))
        lines.append("| " + " | ".join(cells) + " |")
    return [*lines, ""]


def _section(section: Section) -> list[str]:
    lines = [f"## {section.title}", ""]
    for paragraph in section.paragraphs:
        lines += [paragraph, ""]
    for figure in section.figures:
        lines += [f"*Figure: {figure.title} (in index.html)*", ""]
    for table in section.tables:
        lines += table_markdown(table)
    return lines


def render_markdown(report: Report) -> str:
    """The whole summary: title, header facts, then every section in order."""
    lines = [f"# {report.title}", ""]
    lines += [f"- **{key}**: {value}" for key, value in report.header.items()]
    lines.append("")
    for section in report.sections:
        lines += _section(section)
    return "\n".join(lines).rstrip() + "\n"
