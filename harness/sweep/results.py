"""The tidy results table: one row per evaluated point, written as parquet and CSV.

Columns: ``point`` (trial number in the points study), ``run_trial``, ``run_key``, every
parameter (``train.*`` and ``eval.*``), the objective values (``objective.<name>``), every score
with its bootstrap interval (``score.<metric>``, ``score.<metric>_lo``, ``score.<metric>_hi``),
``pareto`` (on the study's Pareto front, or the best point of a single-objective sweep), and the
paths of the adapter and the images.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import optuna
import pandas as pd
from optuna.trial import TrialState

from harness.sweep.study import objective_names

if TYPE_CHECKING:
    from harness.config import HarnessConfig
    from harness.sweep.study import Studies

__all__ = [
    "pareto_rows",
    "points_frame",
    "remove_unkept_adapters",
    "results_paths",
    "write_results",
]

RESULTS_CSV = "results.csv"
RESULTS_PARQUET = "results.parquet"
SUMMARY_JSON = "summary.json"


def _front(study: optuna.Study) -> set[int]:
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not complete:
        return set()
    if len(study.directions) > 1:
        return {t.number for t in study.best_trials}
    return {study.best_trial.number}


def points_frame(
    study: optuna.Study, objectives: list[str], root: Path | None = None
) -> pd.DataFrame:
    """All completed points of ``study`` as a DataFrame (stable column order).

    With ``root`` (the project root the adapter paths are relative to), a point whose adapter
    was removed (``sweep.keep_adapters``) gets ``adapter`` None and ``adapter_removed`` True,
    so no row points at a deleted checkpoint.
    """
    front = _front(study)
    rows: list[dict[str, Any]] = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        attrs = trial.user_attrs
        row: dict[str, Any] = {
            "point": trial.number,
            "run_trial": attrs.get("run_trial"),
            "run_key": attrs.get("run_key"),
        }
        row.update(dict(sorted(trial.params.items())))
        assert trial.values is not None
        row.update({f"objective.{n}": v for n, v in zip(objectives, trial.values, strict=True)})
        row.update({f"score.{k}": v for k, v in sorted(attrs.get("scores", {}).items())})
        row["pareto"] = trial.number in front
        for key in ("setting_id", "scheduler", "n_images", "adapter", "images_dir"):
            row[key] = attrs.get(key)
        if root is not None:
            row["adapter_removed"] = bool(row["adapter"]) and not (root / row["adapter"]).is_dir()
            if row["adapter_removed"]:
                row["adapter"] = None
        rows.append(row)
    return pd.DataFrame(rows)


def pareto_rows(frame: pd.DataFrame, objectives: list[str]) -> list[dict[str, Any]]:
    """The Pareto points of a results frame as plain dicts, best first objective first."""
    if frame.empty:
        return []
    front = frame[frame["pareto"]]
    if objectives:
        front = front.sort_values(f"objective.{objectives[0]}", ascending=False)
    return list(json.loads(front.to_json(orient="records")))


def results_paths(out_dir: Path) -> tuple[Path, Path]:
    """``(results.csv, results.parquet)`` in ``sweep.dir``."""
    return out_dir / RESULTS_CSV, out_dir / RESULTS_PARQUET


def write_results(
    frame: pd.DataFrame, out_dir: Path, objectives: list[str]
) -> tuple[Path, Path, list[dict[str, Any]]]:
    """Write ``results.csv``, ``results.parquet`` and ``summary.json`` (point count and Pareto
    rows) of a :func:`points_frame`; return the two table paths and the Pareto rows."""
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path, parquet_path = results_paths(out_dir)
    frame.to_csv(csv_path, index=False)
    frame.to_parquet(parquet_path, index=False)
    pareto = pareto_rows(frame, objectives)
    (out_dir / SUMMARY_JSON).write_text(
        json.dumps({"points": len(frame), "pareto": pareto}, indent=2, sort_keys=True) + "\n",
        encoding="utf-8",
    )
    return csv_path, parquet_path, pareto


def remove_unkept_adapters(cfg: HarnessConfig, root: Path, studies: Studies) -> None:
    """Delete checkpoints of finished runs that ``sweep.keep_adapters`` does not keep (before
    the final results table is written, so that its rows mark them removed)."""
    if cfg.sweep.keep_adapters == "all":
        return
    objectives = objective_names(cfg)
    front = pareto_rows(points_frame(studies.points, objectives), objectives)
    keep_points = front if cfg.sweep.keep_adapters == "pareto" else front[:1]
    keep = {(root / p["adapter"]).resolve() for p in keep_points if p["adapter"]}
    for trial in studies.runs.get_trials(
        deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)
    ):
        run_dir = trial.user_attrs.get("run_dir")
        if not run_dir:
            continue
        for ckpt in sorted((Path(run_dir) / "checkpoints").glob("step-*")):
            if ckpt.resolve() not in keep and ckpt.is_dir():
                shutil.rmtree(ckpt, ignore_errors=True)
