"""Parameter importances for the report: which settings matter for a *high* value of each
objective (:func:`harness.sweep.summary.param_importances`, PED-ANOVA with the objectives
negated, since every objective is maximised).

They come from the sweep's points study when it can be opened read-only (by the name the sweep
recorded; nothing is created), else from an in-memory study rebuilt from the results table
(every varying ``train.*``, ``checkpoint_step`` and ``eval.*`` column as a parameter, its
observed range as the distribution).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
import pandas as pd

from harness.config import HarnessConfig
from harness.sweep.space import CHECKPOINT_STEP, EVAL_PREFIX, TRAIN_PREFIX

__all__ = ["Importances", "importances", "study_from_table"]

logger = logging.getLogger(__name__)


@dataclass
class Importances:
    """``{objective: {parameter: importance}}``, where they came from, and the parameters left
    out because they never vary (PED-ANOVA can give a constant a spurious share)."""

    values: dict[str, dict[str, float]]
    source: str
    constant: list[str] = field(default_factory=list)
    problem: str = ""


def _points_study(cfg: HarnessConfig, root: Path, name: str) -> tuple[optuna.Study | None, str]:
    """The points study ``name``, loaded (never created), or ``(None, why not)``."""
    from sqlalchemy.exc import SQLAlchemyError

    from harness.sweep.study import safe_storage_url, storage_url

    url = storage_url(cfg, root)
    shown = safe_storage_url(url)
    if url.startswith("sqlite:///"):
        path = Path(url.removeprefix("sqlite:///"))
        if path.resolve().is_relative_to(root.resolve()):
            shown = path.resolve().relative_to(root.resolve()).as_posix()
        if not path.is_file():
            return None, f"no study file {shown}"
    try:
        if name not in optuna.get_all_study_names(url):
            return None, f"no study {name!r} in {shown}"
        return optuna.load_study(study_name=name, storage=url), ""
    except (SQLAlchemyError, ImportError, ValueError, KeyError) as exc:
        return None, f"{shown}: {type(exc).__name__}"


def _is_parameter(column: str) -> bool:
    return column == CHECKPOINT_STEP or column.startswith((TRAIN_PREFIX, EVAL_PREFIX))


def _plain(value: Any) -> Any:
    return value.item() if hasattr(value, "item") else value


def _distribution(values: pd.Series) -> optuna.distributions.BaseDistribution | None:
    """The observed range of a varying column, or None for a constant one."""
    present = [_plain(v) for v in values]
    if len({repr(v) for v in present}) < 2:
        return None
    numbers = [v for v in present if isinstance(v, int | float) and not isinstance(v, bool)]
    if any(v != v for v in numbers):  # NaN: no range to draw from
        return None
    if len(numbers) == len(present):
        if all(isinstance(v, int) for v in numbers):
            return optuna.distributions.IntDistribution(int(min(numbers)), int(max(numbers)))
        return optuna.distributions.FloatDistribution(float(min(numbers)), float(max(numbers)))
    return optuna.distributions.CategoricalDistribution(
        sorted({repr(v): v for v in present}.values(), key=repr)
    )


def study_from_table(frame: pd.DataFrame, objectives: list[str]) -> optuna.Study:
    """An in-memory points study from a results table (rows with every objective scored)."""
    scores = [f"score.{o}" for o in objectives]
    scored = frame.dropna(subset=[c for c in scores if c in frame]).reset_index(drop=True)
    dists = {
        c: d
        for c in scored.columns
        if _is_parameter(c) and (d := _distribution(scored[c])) is not None
    }
    optuna_log = logging.getLogger("optuna")
    level = optuna_log.level
    optuna_log.setLevel(logging.WARNING)  # not "a new study created in memory"
    try:
        study = optuna.create_study(directions=["maximize"] * len(objectives))
    finally:
        optuna_log.setLevel(level)
    for row in scored.to_dict(orient="records"):
        study.add_trial(
            optuna.trial.create_trial(
                params={c: _plain(row[c]) for c in dists},
                distributions=dists,
                values=[float(row[c]) for c in scores],
            )
        )
    return study


def _constant(frame: pd.DataFrame, params: set[str]) -> list[str]:
    return sorted(p for p in params if p in frame and frame[p].astype(str).nunique() <= 1)


def importances(
    cfg: HarnessConfig, root: Path, study_name: str, frame: pd.DataFrame, objectives: list[str]
) -> Importances:
    """The importances of the points study ``study_name`` (or of the table when that study
    cannot be opened), without the parameters that never vary."""
    from harness.sweep.summary import param_importances

    study, why = _points_study(cfg, root, study_name)
    source = f"the points study {study_name}"
    if study is None:
        study, source = study_from_table(frame, objectives), f"the results table ({why})"
    try:
        values = param_importances(study, objectives)
    except (ValueError, RuntimeError, ZeroDivisionError) as exc:
        logger.warning("no parameter importances: %s", exc)
        return Importances({}, source, problem=f"not computed: {exc}")
    constant = _constant(frame, {p for v in values.values() for p in v})
    kept = {o: {p: i for p, i in v.items() if p not in constant} for o, v in values.items()}
    return Importances(kept, source, constant)
