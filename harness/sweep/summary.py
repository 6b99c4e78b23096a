"""The sweep summary: what a sweep produced, as one :class:`SweepSummary` record.

It holds the run and point counts, the results frame, the Pareto rows and the reference scores
(base model, real photos); :func:`summarize` builds it from the studies. The recorder's sinks
publish it: the results table and ``<sweep.dir>/metrics.json`` (the evaluate stage writes
``reports/metrics.json``), and the tracker's ``summary`` task with the leaderboard and the figures made here (Pareto front, importances,
parallel coordinates).
"""

from __future__ import annotations

import contextlib
import json
import logging
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
import pandas as pd
from optuna.trial import FrozenTrial, TrialState

from harness.config import HarnessConfig
from harness.errors import HarnessError, counted
from harness.outputs import read_json_object
from harness.sweep._files import replaced_together
from harness.sweep.environment import study_provenance
from harness.sweep.results import (
    SUMMARY_JSON,
    full_fidelity,
    pareto_rows,
    points_frame,
    results_paths,
)
from harness.sweep.study import (
    Studies,
    fail_reason,
    given_up_runs,
    objective_names,
    retried_runs,
)

__all__ = [
    "SweepSummary",
    "figures",
    "leaderboard",
    "param_importances",
    "results_study",
    "summarize",
    "write_metrics",
]

logger = logging.getLogger(__name__)
# In sweep.dir (runs/sweep/metrics.json), beside the results table. The git-tracked
# reports/metrics.json that `dvc exp show` reads belongs to the evaluate stage
# (harness.sweep.confirm), whose confirmation scores are not selection-biased.
METRICS_FILE = "metrics.json"


def results_study(sweep_dir: Path, error: type[HarnessError]) -> str | None:
    """The study whose points ``sweep_dir``'s results tables hold: the one ``summary.json``
    (written with them) names, or for tables of an older harness ``metrics.json``'s.

    Raises:
        HarnessError: ``error``, naming the file, when one of them is damaged.
    """
    for name in (SUMMARY_JSON, METRICS_FILE):
        study = read_json_object(sweep_dir / name, "harness sweep", error).get("study")
        if study is not None:
            return str(study)
    return None


@dataclass
class SweepSummary:
    """What a sweep has produced so far (all workers), and where its results are."""

    study_name: str
    storage: str
    runs_total: int
    runs_completed: int
    runs_pruned: int
    runs_failed: int
    runs_interrupted: int
    points: int
    pareto: list[dict[str, Any]]
    results_csv: Path
    results_parquet: Path
    frame: pd.DataFrame = field(repr=False)
    points_study: optuna.Study = field(repr=False)
    references: dict[str, dict[str, float]] = field(default_factory=dict)
    started_runs_this_call: int = 0
    objectives: list[str] = field(default_factory=list)  # their ``score.<name>`` columns
    runs_skipped: int = 0  # trials that trained nothing: duplicates, budget spent meanwhile
    runs_open: int = 0  # running now in some worker, or queued to run first
    # Adaptive evaluation: points scored with the full protocol (the others stopped at a cheap
    # rung), images generated for all points, and what the full protocol for every point
    # would have generated. Equal counts for an exhaustive sweep.
    points_full: int = 0
    images: int = 0
    images_exhaustive: int = 0
    # The packages and model weights the study was started with (harness.sweep.environment).
    provenance: dict[str, dict[str, str]] = field(default_factory=dict)

    @property
    def subjects(self) -> int:
        """How many subjects each point's scores are the mean of (1: one subject)."""
        column = self.frame.get("subjects") if not self.frame.empty else None
        if column is None or not column.notna().any():
            return 1
        return int(column.max())

    def describe(self) -> str:
        """One human sentence on runs versus evaluated points."""
        open_ = f", {self.runs_open} running or queued" if self.runs_open else ""
        interrupted = (
            f"; {counted(self.runs_interrupted, 'interrupted attempt')} retried"
            if self.runs_interrupted
            else ""
        )
        skipped = f"; {self.runs_skipped} duplicate draws skipped" if self.runs_skipped else ""
        adaptive = ""
        if self.points_full < self.points:
            share = self.images / max(self.images_exhaustive, 1)
            adaptive = (
                f", {self.points_full} of them with the full protocol ({self.images} of "
                f"{self.images_exhaustive} images, {share:.0%})"
            )
        subjects = self.subjects
        if subjects > 1:
            skipped += f"; each run trained on {subjects} subjects, every score their mean"
        return (
            f"{counted(self.runs_total, 'training run')} ({self.runs_completed} completed, "
            f"{self.runs_pruned} pruned, {self.runs_failed} failed{open_}) -> "
            f"{counted(self.points, 'evaluated point')} "
            f"({self.points / max(self.runs_completed, 1):.1f} per completed run)"
            f"{adaptive}{interrupted}{skipped}"
        )


def summarize(
    cfg: HarnessConfig,
    root: Path,
    studies: Studies,
    references: dict[str, dict[str, float]] | None = None,
) -> SweepSummary:
    """Count runs and points of the studies and build the results frame (writes nothing)."""
    trials = studies.runs.get_trials(deepcopy=False)
    skipped = [t for t in trials if "duplicate_of" in t.user_attrs or "not_run" in t.user_attrs]
    # A run stopped and queued again is one run with several attempts: only its last counts.
    attempts = retried_runs(trials) - {t.number for t in skipped}
    runs = [t for t in trials if t.number not in attempts and t not in skipped]
    given_up = given_up_runs(studies.runs)
    failed = [t for t in runs if t.state == TrialState.FAIL]
    objectives = objective_names(cfg)
    frame = points_frame(studies.points, objectives, root)
    csv_path, parquet_path = results_paths(root / cfg.sweep.dir)
    return SweepSummary(
        study_name=studies.name or cfg.sweep.study_name,
        storage=studies.storage_url,
        runs_total=len(runs),
        runs_completed=sum(t.state == TrialState.COMPLETE for t in runs),
        runs_pruned=sum(t.state == TrialState.PRUNED for t in runs),
        runs_failed=sum(fail_reason(t, given_up) is not None for t in failed),
        # Attempts retried, and failed runs of no known reason (a study from before retries
        # were recorded): stopped, not failed.
        runs_interrupted=len(attempts) + sum(fail_reason(t, given_up) is None for t in failed),
        runs_open=sum(t.state in (TrialState.RUNNING, TrialState.WAITING) for t in runs),
        runs_skipped=len(skipped),
        points=len(frame),
        **_image_counts(frame),
        pareto=pareto_rows(frame, objectives),
        results_csv=csv_path,
        results_parquet=parquet_path,
        frame=frame,
        points_study=studies.points,
        references=dict(references or {}),
        objectives=objectives,
        provenance=study_provenance(studies.runs),
    )


def _image_counts(frame: pd.DataFrame) -> dict[str, int]:
    """``points_full``, ``images`` and ``images_exhaustive`` of a results frame.

    A promoted point's ``n_images`` counts its rungs' images too (it reused them), so the sum
    of ``n_images`` is what was generated; ``n_images / fidelity`` is a point's full protocol.
    """
    if frame.empty:
        return {"points_full": 0, "images": 0, "images_exhaustive": 0}
    full = len(full_fidelity(frame))
    n_images = frame["n_images"].astype(float)
    fidelity = frame["fidelity"].astype(float) if "fidelity" in frame else 1.0
    return {
        "points_full": full,
        "images": round(float(n_images.sum())),
        "images_exhaustive": round(float((n_images / fidelity).sum())),
    }


def leaderboard(frame: pd.DataFrame, objectives: list[str], top: int = 20) -> pd.DataFrame:
    """The ``top`` full-fidelity points by mean objective (their ``score.<objective>``
    columns), Pareto points flagged."""
    frame = full_fidelity(frame)
    if frame.empty:
        return frame
    cols = [f"score.{o}" for o in objectives]
    ranked = frame.assign(mean_objective=frame[cols].mean(axis=1))
    ranked = ranked.sort_values("mean_objective", ascending=False).head(top)
    keep = [c for c in ranked.columns if not c.endswith(("adapter", "images_dir"))]
    return ranked[keep].reset_index(drop=True)


def subject_breakdown(
    study: optuna.Study, frame: pd.DataFrame, metric: str, top: int = 20
) -> pd.DataFrame:
    """A multi-subject sweep's per-subject view of its :func:`leaderboard`'s points: one row
    per point (``point``, ``mean``, then each subject's ``metric``); empty for one subject."""
    from harness.sweep.results import MEAN_SUBJECT, subject_frame

    board = leaderboard(frame, [metric], top)
    table = subject_frame(study, frame)
    if board.empty or table.empty or f"score.{metric}" not in table:
        return pd.DataFrame()
    wide = table.pivot_table(index="point", columns="subject", values=f"score.{metric}")
    ordered = wide.reindex(board["point"])
    subjects = [c for c in ordered.columns if c != MEAN_SUBJECT]
    return ordered[[MEAN_SUBJECT, *subjects]].reset_index()


def _objective(index: int) -> Callable[[FrozenTrial], float]:
    return lambda trial: trial.values[index]


def _maximised(index: int) -> Callable[[FrozenTrial], float]:
    """PED-ANOVA ranks parameters for reaching *low* target values; every objective here is
    maximised, so its target is the negated objective."""
    return lambda trial: -trial.values[index]


@contextlib.contextmanager
def _direction_handled() -> Iterator[None]:
    """Optuna warns on every explicit target that PED-ANOVA looks for low values; ours are
    negated maxima (see :func:`_maximised`), so the warning is answered and silenced."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*computes the importances of params to achieve")
        yield


def param_importances(study: optuna.Study, objectives: list[str]) -> dict[str, dict[str, float]]:
    """``{objective: {parameter: importance}}``: which parameters matter for a *high* value of
    each objective (PED-ANOVA on the points study, most important first)."""
    evaluator = optuna.importance.PedAnovaImportanceEvaluator()
    out: dict[str, dict[str, float]] = {}
    with _direction_handled():
        for index, name in enumerate(objectives):
            out[name] = optuna.importance.get_param_importances(
                study, evaluator=evaluator, target=_maximised(index)
            )
    return out


def figures(study: optuna.Study, objectives: list[str]) -> dict[str, Any]:
    """Plotly figures of the points study (empty when it has too few points)."""
    from optuna import visualization as vis

    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    if len(complete) < 2:
        return {}
    out: dict[str, Any] = {}
    evaluator = optuna.importance.PedAnovaImportanceEvaluator()
    if len(objectives) > 1:
        out["pareto front"] = vis.plot_pareto_front(study, target_names=objectives)
    for index, name in enumerate(objectives):
        try:
            with _direction_handled():
                out[f"importance {name}"] = vis.plot_param_importances(
                    study, target=_maximised(index), target_name=name, evaluator=evaluator
                )
        except (ValueError, RuntimeError) as exc:  # e.g. every parameter constant
            logger.warning("no importance plot for %s: %s", name, exc)
        out[f"parallel coordinates {name}"] = vis.plot_parallel_coordinate(
            study, target=_objective(index), target_name=name
        )
    return out


def write_metrics(cfg: HarnessConfig, root: Path, summary: SweepSummary) -> Path:
    """``<sweep.dir>/metrics.json``: run/point counts, best objectives, baseline and real
    ceiling (the sweep's own scores; ``reports/metrics.json`` is the evaluate stage's)."""
    frame = full_fidelity(summary.frame)
    best = {
        o: float(frame[f"score.{o}"].max()) if not frame.empty else None
        for o in objective_names(cfg)
    }
    data = {
        "study": summary.study_name,
        "runs": summary.runs_total,
        "runs_completed": summary.runs_completed,
        "runs_pruned": summary.runs_pruned,
        "runs_failed": summary.runs_failed,
        "runs_interrupted": summary.runs_interrupted,
        "points": summary.points,
        "points_full": summary.points_full,
        "images": summary.images,
        "images_exhaustive": summary.images_exhaustive,
        "pareto_points": len(summary.pareto),
        "best": best,
        # Only a sweep across subjects says how many (a one-subject metrics file is unchanged).
        **({"subjects": summary.subjects} if summary.subjects > 1 else {}),
        **summary.references,
    }
    path = root / cfg.sweep.dir / METRICS_FILE
    with replaced_together(path) as (temporary,):
        temporary.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return path
