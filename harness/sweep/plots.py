"""Plot data of a sweep for DVC (``dvc plots show``, ``dvc plots diff``).

Three JSON files (lists of flat records with the same keys, as DVC reads them; JSON rather than
CSV keeps numbers and booleans typed for Vega-Lite) in ``<sweep.dir>/plots/``, rewritten with
the results table after every run and at the end of the sweep:

Only full-fidelity points are plotted (adaptive evaluation's cheap rungs are in the results
table, with their ``fidelity``):

``pareto.json``
    every evaluated point: ``subject_score`` (``sweep.subject_metric``, named in
    ``subject_metric``) versus ``prompt_score`` (``sweep.prompt_metric``), ``pareto`` marking
    the study's front, with ``point``, ``run_trial``, ``run_key``, ``checkpoint_step`` and
    ``setting_id``.
``steps.json``
    one record per training run and checkpoint step: the ``score`` of its best inference
    setting, the score the sweep ranks points by (the mean of the objectives' ``score.*``
    columns, i.e. the weighted score with ``sweep.weights``), with that setting's
    ``setting_id``, ``subject_score`` and ``prompt_score``.
``loss.json``
    the training loss per run (``run_key``) and ``step``, from each run's ``train_log.jsonl``
    (the trainer's own record, so every worker's and every resumed run's steps are there). Runs
    longer than :data:`MAX_LOSS_POINTS` steps are averaged over equal buckets of steps, each
    record at its bucket's last step.

``dvc.yaml`` declares the plots; the templates in ``.dvc/plots/`` colour by ``run_key`` (one
colour per training configuration) and keep revisions apart by shape or dash, which DVC's
built-in templates cannot (they colour by file or revision).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import optuna
import pandas as pd

from harness.outputs import temporary_beside
from harness.sweep._base import run_folder

if TYPE_CHECKING:
    from harness.config import HarnessConfig
    from harness.sweep.study import Studies

__all__ = [
    "LOSS_FILE",
    "MAX_LOSS_POINTS",
    "PARETO_FILE",
    "STEPS_FILE",
    "loss_records",
    "pareto_records",
    "plots_dir",
    "step_records",
    "write_plots",
]

PLOTS_DIR = "plots"
PARETO_FILE = "pareto.json"
STEPS_FILE = "steps.json"
LOSS_FILE = "loss.json"
MAX_LOSS_POINTS = 500  # per run; beyond it, losses are bucket means
_POINT = ["point", "run_trial", "run_key", "checkpoint_step", "setting_id"]


def plots_dir(out_dir: Path) -> Path:
    """``<sweep.dir>/plots``."""
    return out_dir / PLOTS_DIR


def _records(frame: pd.DataFrame) -> list[dict[str, Any]]:
    """Plain records: Python numbers at full precision, missing values as None."""
    plain = frame.astype(object).where(frame.notna(), None)
    return [
        {k: v.item() if isinstance(v, np.generic) else v for k, v in row.items()}
        for row in plain.to_dict(orient="records")
    ]


def pareto_records(
    frame: pd.DataFrame, subject_metric: str, prompt_metric: str
) -> list[dict[str, Any]]:
    """Every point of a results frame: subject versus prompt score, the front marked."""
    if frame.empty:
        return []
    points = frame[_POINT].assign(
        subject_metric=subject_metric,
        subject_score=frame[f"score.{subject_metric}"],
        prompt_metric=prompt_metric,
        prompt_score=frame[f"score.{prompt_metric}"],
        pareto=frame["pareto"].astype(bool),
    )
    return _records(points)


def step_records(
    frame: pd.DataFrame, objectives: list[str], subject_metric: str, prompt_metric: str
) -> list[dict[str, Any]]:
    """Per run and checkpoint step, the best inference setting by the objectives' mean."""
    if frame.empty:
        return []
    scored = frame.assign(
        score=frame[[f"score.{o}" for o in objectives]].astype(float).mean(axis=1),
        subject_score=frame[f"score.{subject_metric}"],
        prompt_score=frame[f"score.{prompt_metric}"],
    ).dropna(subset=["score"])
    if scored.empty:
        return []
    best = scored.loc[scored.groupby(["run_key", "checkpoint_step"])["score"].idxmax()]
    best = best.sort_values(["run_key", "checkpoint_step"])
    columns = ["run_trial", "run_key", "checkpoint_step", "setting_id", "score"]
    return _records(best[[*columns, "subject_score", "prompt_score"]])


def _read_log(path: Path) -> list[tuple[int, float | None]]:
    """``(step, loss)`` of a ``train_log.jsonl``; a line being written right now is skipped."""
    out: list[tuple[int, float | None]] = []
    if not path.is_file():
        return out
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
            step, loss = int(record["step"]), record.get("loss")
        except (ValueError, KeyError, TypeError):
            continue
        finite = isinstance(loss, int | float) and math.isfinite(loss)
        out.append((step, float(loss) if finite else None))
    return sorted(dict(out).items())


def _bucketed(steps: list[tuple[int, float | None]]) -> Iterable[tuple[int, float | None]]:
    """At most :data:`MAX_LOSS_POINTS` records: means over equal buckets of steps."""
    size = max(1, math.ceil(len(steps) / MAX_LOSS_POINTS))
    for start in range(0, len(steps), size):
        bucket = steps[start : start + size]
        losses = [loss for _, loss in bucket if loss is not None]
        yield bucket[-1][0], (sum(losses) / len(losses) if losses else None)


def loss_records(studies: Studies, sweep_dir: Path) -> list[dict[str, Any]]:
    """The loss curve of every training run of ``S.runs`` that has a training log in its
    folder under ``sweep_dir`` (``<root>/<sweep.dir>``; one per run key: a retried run shares
    its folder and log with the run it retries)."""
    latest: dict[str, optuna.trial.FrozenTrial] = {}
    for trial in studies.runs.get_trials(deepcopy=False):
        key = trial.user_attrs.get("run_key")
        if key and (key not in latest or trial.number > latest[key].number):
            latest[key] = trial
    out: list[dict[str, Any]] = []
    for key, trial in sorted(latest.items()):
        log = run_folder(sweep_dir, studies.name, key) / "train_log.jsonl"
        for step, loss in _bucketed(_read_log(log)):
            out.append({"run_trial": trial.number, "run_key": key, "step": step, "loss": loss})
    return out


def _write_json(path: Path, records: list[dict[str, Any]]) -> None:
    """Replace ``path`` in one step: ``dvc plots show`` during a sweep never reads half a file."""
    tmp = temporary_beside(path)
    tmp.write_text(json.dumps(records, indent=1) + "\n", encoding="utf-8")
    tmp.replace(path)


def write_plots(
    cfg: HarnessConfig, frame: pd.DataFrame, studies: Studies, out_dir: Path
) -> list[Path]:
    """Write the three plot files of a results frame and the studies' runs into
    ``<out_dir>/plots`` (``out_dir``: ``<root>/<sweep.dir>``); return their paths."""
    from harness.sweep.results import full_fidelity
    from harness.sweep.study import objective_names

    sweep, frame = cfg.sweep, full_fidelity(frame)
    folder = plots_dir(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    files = {
        PARETO_FILE: pareto_records(frame, sweep.subject_metric, sweep.prompt_metric),
        STEPS_FILE: step_records(
            frame, objective_names(cfg), sweep.subject_metric, sweep.prompt_metric
        ),
        LOSS_FILE: loss_records(studies, out_dir),
    }
    for name, records in files.items():
        _write_json(folder / name, records)
    return [folder / name for name in files]
