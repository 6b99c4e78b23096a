"""The comparison report: ``<report.dir>/index.html`` (one self-contained page, readable
offline) and ``summary.md``, from the sweep's and the evaluate stage's outputs.

Sections (each an ``<section id=...>``): ``leaderboard`` (confirmed points: sweep and
confirmation scores with 95% intervals, shrinkage, settings), ``pareto`` (subject versus prompt
fidelity over every sweep point, base model and real-photo ceiling), ``steps`` (score versus
checkpoint step per training configuration), ``importance`` (parameter importance for a high
value of each objective), ``grids`` (image grids of :mod:`harness.report.grids`, when it
exists), ``prompts`` (per-prompt scores: where the subject fails), ``paired`` (the best point
against the next ones: paired-bootstrap differences, real or noise) and ``cost`` (PRES, DIV and
training cost).

The modules: :mod:`~harness.report.data` (reading the inputs), :mod:`~harness.report.stats`
(the paired bootstrap), :mod:`~harness.report.importance`, :mod:`~harness.report.figures`
(matplotlib, Agg, PNG), :mod:`~harness.report.sections` and :mod:`~harness.report.prompts`
(one function per section), :mod:`~harness.report.model` (the objects and the number format),
:mod:`~harness.report.html`, :mod:`~harness.report.markdown` (renderers) and
:mod:`~harness.report.build` (assemble, write, track).
"""

from harness.report.build import (
    REPORT_HTML,
    SUMMARY_MD,
    ReportFiles,
    build_report,
    track_report,
    write_report,
)
from harness.report.data import ReportError, ReportInputs, load_inputs
from harness.report.model import Figure, Report, Section, Table, format_value

__all__ = [
    "REPORT_HTML",
    "SUMMARY_MD",
    "Figure",
    "Report",
    "ReportError",
    "ReportFiles",
    "ReportInputs",
    "Section",
    "Table",
    "build_report",
    "format_value",
    "load_inputs",
    "track_report",
    "write_report",
]
