"""The tidy results table: one row per evaluated point, written as parquet and CSV.

Columns, left to right:

``point``, ``run_trial``, ``run_key``
    the trial number in the points study, the training run's trial number in ``S.runs`` and
    its stable key (:func:`harness.sweep.runner.run_key`).
``train.<field>``
    every training setting of the run that changes results: the searched ones (``sweep.space``)
    from the trial's parameters, the fixed ones from the run's config, leaving out what
    :func:`harness.sweep.study.train_settings` leaves out (output folders). Rows of two
    configurations therefore never look alike. Lists (``checkpoint_steps``,
    ``target_modules``, ...) are JSON strings, so the table stays flat in CSV and parquet and
    equal strings mean equal lists; ``checkpoint_steps`` is the run's effective list (steps past
    a sampled ``max_steps`` dropped, ``max_steps`` added).
``checkpoint_step``
    the training step of the evaluated checkpoint.
``eval.<dimension>``
    the inference setting (guidance, LoRA scales, inference steps).
``score.<metric>``, ``score.<metric>_lo``, ``score.<metric>_hi``
    every score with its bootstrap interval. The study's objectives are scores already
    (``score.dino``, ``score.clip_t``); an objective that is not one gets a score column of its
    own: ``score.weighted`` in a sweep with ``sweep.weights``. ``score.div`` is the paper's
    DIV (mean pairwise LPIPS, with ``metrics.lpips_weights``), ``score.div_dino`` the
    DINO-based diversity; a point scored before DIV was LPIPS has its DINO value under
    ``score.div_dino`` (:func:`harness.sweep.per_image.legacy_div`).
``seconds.<phase>``
    wall seconds: ``seconds.train`` (the run's training, proxy evaluations excluded; shared by
    the run's points), ``seconds.proxy`` (the proxy evaluation at the point's checkpoint),
    ``seconds.generate`` (the point's share of its checkpoint's generation) and
    ``seconds.score`` (its scoring); a backend that does not split the two gives
    ``seconds.evaluate``.
``fidelity``
    the share of the full protocol's images behind the point's scores: 1 for the full
    protocol, less for a point that adaptive evaluation (``sweep.evaluation``) stopped at a
    cheap rung. Such points are the study's PRUNED trials; :func:`full_fidelity` leaves them
    out, as the Pareto front, the report and the evaluate stage do.
``pareto``
    on the study's Pareto front (full-fidelity points only), or the best point of a
    single-objective sweep.
``setting_id``, ``scheduler``, ``n_images``, ``adapter``, ``images_dir``, ``adapter_removed``
    the inference setting's id and scheduler, the number of scored images, the paths of the
    adapter and the images, and whether ``sweep.keep_adapters`` removed the adapter.
``subjects``
    a multi-subject sweep (``data.subjects``) only: how many subjects the point's scores are
    the mean of. Its ``score.<metric>_lo``/``_hi`` are then the 95% interval across subjects,
    and ``adapter`` is the configuration's checkpoint folder (one adapter per subject, see
    :mod:`harness.sweep.subjects`).

A multi-subject sweep also writes ``subjects.{csv,parquet}`` (:func:`subject_frame`): the same
columns plus ``subject``, one row per (point, subject) with that subject's own scores, adapter
and images, and the point's aggregated row with ``subject`` ``mean``.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import optuna
import pandas as pd
from optuna.trial import TrialState

from harness.config import INFERENCE_DIMENSIONS
from harness.sweep._files import replaced_together
from harness.sweep.per_image import legacy_div
from harness.sweep.space import CHECKPOINT_STEP, EVAL_PREFIX, TRAIN_PREFIX
from harness.sweep.study import objective_names

if TYPE_CHECKING:
    from harness.config import HarnessConfig
    from harness.sweep.study import Studies

__all__ = [
    "MEAN_SUBJECT",
    "full_fidelity",
    "pareto_rows",
    "points_frame",
    "remove_unkept_adapters",
    "results_paths",
    "subject_frame",
    "write_results",
    "write_subject_results",
]

RESULTS_CSV = "results.csv"
RESULTS_PARQUET = "results.parquet"
SUMMARY_JSON = "summary.json"
SUBJECTS_CSV = "subjects.csv"
SUBJECTS_PARQUET = "subjects.parquet"
MEAN_SUBJECT = "mean"  # the ``subject`` of a point's aggregated row in subjects.parquet


def _front(study: optuna.Study) -> set[int]:
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not complete:
        return set()
    if len(study.directions) > 1:
        return {t.number for t in study.best_trials}
    return {study.best_trial.number}


def full_fidelity(frame: pd.DataFrame) -> pd.DataFrame:
    """The rows of a results frame measured with the full protocol (``fidelity`` 1; a table
    without the column, written before adaptive evaluation, has only those)."""
    if frame.empty or "fidelity" not in frame.columns:
        return frame
    return frame[frame["fidelity"].astype(float) >= 1.0 - 1e-9]


def points_frame(
    study: optuna.Study, objectives: list[str], root: Path | None = None
) -> pd.DataFrame:
    """All evaluated points of ``study`` as a DataFrame (columns in the module's order): the
    completed ones, and those adaptive evaluation stopped at a rung (``fidelity`` < 1).

    With ``root`` (the project root the adapter paths are relative to), a point whose adapter
    was removed (``sweep.keep_adapters``) gets ``adapter`` None and ``adapter_removed`` True,
    so no row points at a deleted checkpoint.
    """
    front = _front(study)
    rows: list[dict[str, Any]] = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)):
        attrs = trial.user_attrs
        if trial.state == TrialState.PRUNED and "fidelity" not in attrs:
            continue  # not a point of this harness's
        row: dict[str, Any] = {
            "point": trial.number,
            "run_trial": attrs.get("run_trial"),
            "run_key": attrs.get("run_key"),
        }
        row.update(_parameters(trial))
        row.update(_scores(trial, objectives))
        row.update({f"seconds.{k}": v for k, v in attrs.get("seconds", {}).items()})
        row["fidelity"] = float(attrs.get("fidelity", 1.0))
        row["pareto"] = trial.number in front
        for key in _POINT_ATTRS:
            row[key] = attrs.get(key)
        if "subjects" in attrs:
            row["subjects"] = len(attrs["subjects"])
        if root is not None:
            row["adapter_removed"] = bool(row["adapter"]) and not (root / row["adapter"]).is_dir()
            if row["adapter_removed"]:
                row["adapter"] = None
        rows.append(row)
    frame = pd.DataFrame(rows)
    if not frame.empty:
        # Every inference dimension has its column, even where no point has it (a sweep of
        # runs without text-encoder LoRA has no text-encoder scale): one schema for readers.
        for name in INFERENCE_DIMENSIONS:
            if EVAL_PREFIX + name not in frame.columns:
                frame[EVAL_PREFIX + name] = float("nan")
    return frame[sorted(frame.columns, key=_column_order)]


_LEADING = ("point", "run_trial", "run_key")
_POINT_ATTRS = ("setting_id", "scheduler", "n_images", "adapter", "images_dir")
_TRAILING = (*_POINT_ATTRS, "adapter_removed", "subjects")


def _column_order(column: str) -> tuple[int, int, str]:
    """Sort key: identity, ``train.*``, ``checkpoint_step``, ``eval.*``, ``score.*``,
    ``seconds.*``, ``pareto``, then the setting and the paths."""
    if column in _LEADING:
        return 0, _LEADING.index(column), ""
    prefixes = (TRAIN_PREFIX, CHECKPOINT_STEP, EVAL_PREFIX, "score.", "seconds.")
    for group, prefix in enumerate(prefixes, 1):
        if column.startswith(prefix):
            return group, 0, column
    if column in ("fidelity", "pareto"):
        return 6, ("fidelity", "pareto").index(column), ""
    return 7, _TRAILING.index(column) if column in _TRAILING else len(_TRAILING), column


def _parameters(trial: optuna.trial.FrozenTrial) -> dict[str, Any]:
    """``train.*`` (the run's fixed settings, then the trial's searched ones over them),
    ``checkpoint_step`` and ``eval.*``; lists and mappings as JSON strings."""
    params: dict[str, Any] = {
        TRAIN_PREFIX + k: v for k, v in trial.user_attrs.get("train", {}).items()
    }
    params.update(trial.params)
    return {
        k: json.dumps(v) if isinstance(v, list | tuple | dict) else v for k, v in params.items()
    }


def _scores(trial: optuna.trial.FrozenTrial, objectives: list[str]) -> dict[str, Any]:
    """``score.*`` of the point, plus each objective that is not a score (``weighted``)."""
    scores = legacy_div(trial.user_attrs.get("scores", {}))
    assert trial.values is not None
    for name, value in zip(objectives, trial.values, strict=True):
        scores.setdefault(name, value)
    return {f"score.{k}": v for k, v in scores.items()}


def pareto_rows(frame: pd.DataFrame, objectives: list[str]) -> list[dict[str, Any]]:
    """The Pareto points of a results frame as plain dicts, best first objective first."""
    if frame.empty:
        return []
    front = frame[frame["pareto"]]
    if objectives:
        front = front.sort_values(f"score.{objectives[0]}", ascending=False)
    return list(json.loads(front.to_json(orient="records")))


def results_paths(out_dir: Path) -> tuple[Path, Path]:
    """``(results.csv, results.parquet)`` in ``sweep.dir``."""
    return out_dir / RESULTS_CSV, out_dir / RESULTS_PARQUET


def write_results(
    frame: pd.DataFrame,
    out_dir: Path,
    objectives: list[str],
    study: str | None = None,
    provenance: Mapping[str, Any] | None = None,
) -> tuple[Path, Path, list[dict[str, Any]]]:
    """Write ``results.csv``, ``results.parquet`` and ``summary.json`` (point count, Pareto
    rows, the ``study`` the points are of and its ``provenance``: the package versions it was
    started with, ``environment``, and its model weights, ``model``) of a
    :func:`points_frame`; return the two table paths and the Pareto rows."""
    csv_path, parquet_path = results_paths(out_dir)
    pareto = pareto_rows(frame, objectives)
    content: dict[str, Any] = {"points": len(frame), "pareto": pareto}
    if study is not None:
        # Replaced with the tables: the one record of whose points they hold. The sweep's
        # metrics.json is written only when a sweep ends, so after an interrupted sweep of
        # another configuration it names the previous study while the tables are the new one's.
        content["study"] = study
    content.update(provenance or {})
    summary = json.dumps(content, indent=2, sort_keys=True)
    with replaced_together(csv_path, parquet_path, out_dir / SUMMARY_JSON) as (csv, pq, js):
        frame.to_csv(csv, index=False)
        frame.to_parquet(pq, index=False)
        js.write_text(summary + "\n", encoding="utf-8")
    return csv_path, parquet_path, pareto


def remove_unkept_adapters(cfg: HarnessConfig, root: Path, studies: Studies) -> None:
    """Delete checkpoints of finished runs that ``sweep.keep_adapters`` does not keep (before
    the final results table is written, so that its rows mark them removed).

    The points the ``evaluate`` stage re-scores (:func:`harness.sweep.select.select_points`,
    at most ``evaluate.top_k``) always keep theirs: ``best`` keeps exactly those, ``pareto``
    also every point of the study's Pareto front.
    """
    from harness.sweep._base import run_folder
    from harness.sweep.select import select_points

    if cfg.sweep.keep_adapters == "all":
        return
    frame = points_frame(studies.points, objective_names(cfg))
    keep_points = [] if frame.empty else [select_points(cfg, frame)]
    if cfg.sweep.keep_adapters == "pareto" and not frame.empty:
        keep_points.append(frame[frame["pareto"]])
    keep = {(root / a).resolve() for rows in keep_points for a in rows["adapter"] if a}
    for trial in studies.runs.get_trials(
        deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)
    ):
        key = trial.user_attrs.get("run_key")
        if not key:
            continue
        # This root's folder of the run, whichever copy of the project trained it.
        run_dir = run_folder(root / cfg.sweep.dir, studies.name, key)
        for ckpt in sorted((run_dir / "checkpoints").glob("step-*")):
            if ckpt.resolve() not in keep and ckpt.is_dir():
                _remove_checkpoint(ckpt)


def _remove_checkpoint(ckpt: Path) -> None:
    """Delete a checkpoint folder; a multi-subject one with every subject's adapter in it."""
    from harness.sweep.subjects import SUBJECTS_FILE, subject_adapters

    if (ckpt / SUBJECTS_FILE).is_file():
        for adapter in subject_adapters(ckpt).values():
            shutil.rmtree(adapter, ignore_errors=True)
    shutil.rmtree(ckpt, ignore_errors=True)


def subject_frame(study: optuna.Study, frame: pd.DataFrame) -> pd.DataFrame:
    """A multi-subject sweep's per-subject table from its results ``frame``
    (:func:`points_frame` of ``study``): per point, its aggregated row (``subject``
    :data:`MEAN_SUBJECT`) and one row per subject with that subject's scores, adapter, images
    and image count. Empty when no point has per-subject scores."""
    if frame.empty:
        return pd.DataFrame()
    trials = {t.number: t for t in study.get_trials(deepcopy=False)}
    rows: list[dict[str, Any]] = []
    for row in frame.to_dict(orient="records"):
        subjects = trials[int(row["point"])].user_attrs.get("subjects")
        if not subjects:
            continue
        rows.append({**row, "subject": MEAN_SUBJECT})
        plain = {k: v for k, v in row.items() if not k.startswith("score.")}
        for name, record in subjects.items():
            rows.append(
                {
                    **plain,
                    "subject": name,
                    **{f"score.{m}": v for m, v in legacy_div(record.get("scores", {})).items()},
                    "adapter": record.get("adapter"),
                    "images_dir": record.get("images_dir"),
                    "n_images": record.get("n_images"),
                    "subjects": 1,
                }
            )
    if not rows:
        return pd.DataFrame()
    table = pd.DataFrame(rows)
    order = sorted((c for c in table.columns if c != "subject"), key=_column_order)
    return table[[*order[:3], "subject", *order[3:]]]


def write_subject_results(study: optuna.Study, frame: pd.DataFrame, out_dir: Path) -> Path | None:
    """Write ``subjects.{csv,parquet}`` (:func:`subject_frame`) in ``out_dir`` for a
    multi-subject sweep; return the parquet path, or None (one subject: nothing written)."""
    table = subject_frame(study, frame)
    if table.empty:
        return None
    with replaced_together(out_dir / SUBJECTS_CSV, out_dir / SUBJECTS_PARQUET) as (csv, pq):
        table.to_csv(csv, index=False)
        table.to_parquet(pq, index=False)
    return out_dir / SUBJECTS_PARQUET
