"""The tidy results table: one row per evaluated point, written as parquet and CSV.

Columns: ``point`` (trial number in the points study), ``run_trial``, ``run_key``, every
parameter (``train.*`` and ``eval.*``), the objective values (``objective.<name>``), every score
with its bootstrap interval (``score.<metric>``, ``score.<metric>_lo``, ``score.<metric>_hi``),
``pareto`` (on the study's Pareto front, or the best point of a single-objective sweep), and the
paths of the adapter and the images.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import optuna
import pandas as pd
from optuna.trial import TrialState

__all__ = ["points_frame", "write_results"]

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


def points_frame(study: optuna.Study, objectives: list[str]) -> pd.DataFrame:
    """All completed points of ``study`` as a DataFrame (stable column order)."""
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
        rows.append(row)
    return pd.DataFrame(rows)


def write_results(
    study: optuna.Study, out_dir: Path, objectives: list[str]
) -> tuple[Path, Path, list[dict[str, Any]]]:
    """Write ``results.csv``, ``results.parquet`` and ``summary.json``; return the Pareto rows."""
    out_dir.mkdir(parents=True, exist_ok=True)
    frame = points_frame(study, objectives)
    csv_path, parquet_path = out_dir / RESULTS_CSV, out_dir / RESULTS_PARQUET
    frame.to_csv(csv_path, index=False)
    frame.to_parquet(parquet_path, index=False)
    pareto: list[dict[str, Any]] = []
    if not frame.empty:
        front = frame[frame["pareto"]]
        if objectives:
            front = front.sort_values(f"objective.{objectives[0]}", ascending=False)
        pareto = json.loads(front.to_json(orient="records"))
    (out_dir / SUMMARY_JSON).write_text(
        json.dumps({"points": len(frame), "pareto": pareto}, indent=2, sort_keys=True) + "\n",
        encoding="utf-8",
    )
    return csv_path, parquet_path, pareto
