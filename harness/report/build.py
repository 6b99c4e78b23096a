"""Assemble, write and track the report.

:func:`build_report` reads the inputs (failing first, with one :class:`ReportError` line, when
the evaluate output is missing) and builds every section; :func:`write_report` writes
``<report.dir>/index.html`` and ``summary.md``; :func:`track_report` attaches both to a tracker
run ``<sweep.study_name>/report`` (a ``summary`` task) with the leaderboard table.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from harness.config import HarnessConfig
from harness.errors import counted
from harness.outputs import temporary_beside
from harness.report.data import ReportInputs, load_inputs
from harness.report.figures import label
from harness.report.html import render_html
from harness.report.markdown import render_markdown
from harness.report.model import Figure, Report
from harness.report.prompts import paired_section, prompts_section
from harness.report.sections import (
    cost_section,
    grids_section,
    importance_section,
    leaderboard_section,
    pareto_section,
    steps_section,
)
from harness.report.subjects import dreambench_section, subjects_section
from harness.sweep.study import objective_names

if TYPE_CHECKING:
    from harness.tracking import Tracker

__all__ = [
    "GRIDS_DIR",
    "REPORT_HTML",
    "SUMMARY_MD",
    "ReportFiles",
    "build_report",
    "track_report",
    "write_report",
]

REPORT_HTML = "index.html"
SUMMARY_MD = "summary.md"
GRIDS_DIR = "grids"  # image files beside index.html (report.embed_images: false) and manifests


@dataclass
class ReportFiles:
    """The written report."""

    html: Path
    markdown: Path
    report: Report


def report_dir(cfg: HarnessConfig, root: Path) -> Path:
    """``<root>/<report.dir>``."""
    return root / cfg.report.dir


def _subjects(cfg: HarnessConfig, root: Path) -> str:
    """``dog``, or for ``data.subjects`` ``4 subjects (mean): backpack, cat2, dog, teapot``."""
    from harness.data.subjects import is_multi_subject, subject_names

    if not is_multi_subject(cfg.data):
        return cfg.data.subject
    names = subject_names(cfg.data, root)
    return f"{len(names)} subjects (scores: the mean over them): {', '.join(names)}"


def header(
    cfg: HarnessConfig, inputs: ReportInputs, generated: datetime, root: Path
) -> dict[str, str]:
    """The facts at the top: study, preset, subject, model, objectives, counts, seeds, date."""
    counts = inputs.sweep_metrics
    seeds = inputs.references.get("seeds") or []
    facts = {
        "study": inputs.study,
        "preset": cfg.preset,
        "subject": _subjects(cfg, root),
        "model": cfg.model.pretrained,
        "objectives": ", ".join(label(o) for o in objective_names(cfg)) + " (maximised)",
        "sweep": _sweep_counts(counts, len(inputs.sweep)),
        "confirmed": f"{len(inputs.evaluate)} points on fresh seeds "
        + (f"{seeds[0]}..{seeds[-1]}" if seeds else "(not recorded)"),
        "generated": generated.strftime("%Y-%m-%d %H:%M UTC"),
    }
    return facts


def _sweep_counts(counts: dict[str, Any], full: int) -> str:
    """``4 training runs -> 32 evaluated points``, and how many of them have the full
    protocol when adaptive evaluation stopped others at a rung (the report ranks only those)."""
    points = int(counts.get("points", full))
    runs = counts.get("runs")
    runs_text = counted(runs, "training run") if isinstance(runs, int) else "? training runs"
    text = f"{runs_text} -> {counted(points, 'evaluated point')}"
    return f"{text} ({full} with the full protocol)" if points > full else text


def build_report(cfg: HarnessConfig, root: Path, generated: datetime | None = None) -> Report:
    """Every section of the report from the sweep's and the evaluate stage's outputs.

    Raises:
        ReportError: the evaluate output (or the sweep's table) is missing.
    """
    inputs = load_inputs(cfg, root)
    optional = [dreambench_section(cfg, inputs), subjects_section(cfg, inputs)]
    sections = [
        leaderboard_section(cfg, inputs),
        *(section for section in optional if section is not None),
        pareto_section(cfg, inputs),
        steps_section(cfg, inputs),
        importance_section(cfg, root, inputs),
        grids_section(cfg, root, report_dir(cfg, root) / GRIDS_DIR),
        prompts_section(cfg, inputs),
        paired_section(cfg, inputs),
        cost_section(cfg, root, inputs),
    ]
    title = cfg.report.title or f"DreamBooth sweep {inputs.study}"
    facts = header(cfg, inputs, generated or datetime.now(UTC), root)
    return Report(title, facts, sections, leaderboard=sections[0].tables[0].shown())


def _beside(figure: Figure, folder: Path) -> Figure:
    """``figure`` with its image and manifest inside ``folder`` (copied when outside it)."""

    def local(path: Path | None) -> Path | None:
        if path is None or not path.is_file() or folder.resolve() in path.resolve().parents:
            return path
        folder.mkdir(parents=True, exist_ok=True)
        target = folder / path.name
        shutil.copy2(path, target)
        return target

    return Figure(figure.title, figure.png, local(figure.path), local(figure.manifest), figure.kind)


def _write_text(path: Path, text: str) -> None:
    """Replace ``path`` in one step (a reader never sees half a report)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_beside(path)
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def write_report(cfg: HarnessConfig, root: Path, report: Report) -> ReportFiles:
    """Write ``index.html`` and ``summary.md`` into ``<report.dir>``; image files that live
    elsewhere are copied into ``<report.dir>/grids`` first, so every link stays inside it."""
    out = report_dir(cfg, root)
    for section in report.sections:
        section.figures = [_beside(f, out / GRIDS_DIR) for f in section.figures]
    html_path, md_path = out / REPORT_HTML, out / SUMMARY_MD
    _write_text(html_path, render_html(report, out, embed_images=cfg.report.embed_images))
    _write_text(md_path, render_markdown(report))
    return ReportFiles(html_path, md_path, report)


def track_report(cfg: HarnessConfig, tracker: Tracker, files: ReportFiles) -> None:
    """A ``summary`` run ``<sweep.study_name>/report``: the leaderboard table and the two
    report files as artifacts (nothing with ``tracking.mode: off``)."""
    name = cfg.sweep.study_name
    with tracker.start_run(
        f"{name}/report",
        config=cfg.to_dict(),
        tags=[f"sweep:{name}", "report"],
        kind="summary",
        project=f"{cfg.tracking.project}/{name}",
    ) as run:
        run.log_table("leaderboard", "confirmed points", files.report.leaderboard)
        run.upload_artifact(REPORT_HTML, files.html)
        run.upload_artifact(SUMMARY_MD, files.markdown)
