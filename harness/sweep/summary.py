"""After a sweep: the leaderboard, Pareto front, importances and parallel coordinates.

They go to one ``summary`` tracker task per sweep (so ClearML shows the trials side by side) and
the headline numbers to ``sweep.dir/metrics.json`` for ``dvc metrics show``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import optuna
import pandas as pd
from optuna.trial import FrozenTrial

from harness.config import HarnessConfig
from harness.sweep.runner import SweepSummary
from harness.sweep.study import objective_names

__all__ = ["figures", "leaderboard", "param_importances", "publish_summary", "write_metrics"]

logger = logging.getLogger(__name__)
METRICS_JSON = "metrics.json"


def leaderboard(frame: pd.DataFrame, objectives: list[str], top: int = 20) -> pd.DataFrame:
    """The ``top`` points by mean objective, Pareto points flagged."""
    if frame.empty:
        return frame
    cols = [f"objective.{o}" for o in objectives]
    ranked = frame.assign(mean_objective=frame[cols].mean(axis=1))
    ranked = ranked.sort_values("mean_objective", ascending=False).head(top)
    keep = [c for c in ranked.columns if not c.endswith(("adapter", "images_dir"))]
    return ranked[keep].reset_index(drop=True)


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


def write_metrics(
    cfg: HarnessConfig,
    root: Path,
    summary: SweepSummary,
    references: dict[str, dict[str, float]] | None = None,
) -> Path:
    """``metrics.json``: run/point counts, best objectives, baseline and real ceiling."""
    frame = pd.read_parquet(summary.results_parquet)
    best = {
        o: float(frame[f"objective.{o}"].max()) if not frame.empty else None
        for o in objective_names(cfg)
    }
    data = {
        "runs": summary.runs_total,
        "runs_completed": summary.runs_completed,
        "runs_pruned": summary.runs_pruned,
        "runs_failed": summary.runs_failed,
        "runs_interrupted": summary.runs_interrupted,
        "points": summary.points,
        "pareto_points": len(summary.pareto),
        "best": best,
        **(references or {}),
    }
    path = root / cfg.sweep.dir / METRICS_JSON
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return path


def publish_summary(
    cfg: HarnessConfig,
    root: Path,
    summary: SweepSummary,
    tracker: Any,
    references: dict[str, dict[str, float]] | None = None,
) -> None:
    """Write ``metrics.json`` and send the summary task to the tracker."""
    write_metrics(cfg, root, summary, references)
    objectives = objective_names(cfg)
    frame = pd.read_parquet(summary.results_parquet)
    study = optuna.load_study(study_name=cfg.sweep.study_name, storage=summary.storage)
    config = cfg.to_dict()
    with tracker.start_run(
        f"{cfg.sweep.study_name}/summary",
        config=config,
        tags=[f"sweep:{cfg.sweep.study_name}", "summary"],
        kind="summary",
        project=f"{cfg.tracking.project}/{cfg.sweep.study_name}",
    ) as run:
        run.log_table("leaderboard", "top points", leaderboard(frame, objectives))
        for title, fig in figures(study, objectives).items():
            run.log_plotly(title, "sweep", fig)
        run.log_scalars(
            {"runs": summary.runs_total, "points": summary.points, "pareto": len(summary.pareto)},
            0,
            title="sweep",
        )
        for kind, scores in (references or {}).items():
            run.log_scalars(scores, 0, title=kind)
        run.upload_artifact("results", summary.results_parquet)
