"""Optuna studies of a sweep: storage, samplers, pruners, and the refusal of mismatched resumes.

A sweep named ``S`` keeps three studies in one storage:

``S.runs``
    one trial per training run; the sampler proposes the training parameters here. Its values
    are those of the run's representative evaluated point (see :mod:`harness.sweep.runner`).
``S.proxy``
    single-objective twin of each run trial, holding the cheap proxy score reported at every
    checkpoint step; the pruner reads it. (Optuna cannot prune multi-objective trials, so
    pruning lives here, for single- and multi-objective sweeps alike.)
``S``
    every evaluated point (training parameters x checkpoint step x inference setting) as its
    own completed trial with all parameters and scores: the Pareto front, importances and
    the results table come from here.

Runs use Optuna's heartbeat: a worker killed hard leaves its run stale, and the next worker
marks it failed and re-queues the same parameters (``RetryHeartbeatStaleTrialCallback``); the trainer
then resumes from the run's last checkpoint.
"""

from __future__ import annotations

import json
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from optuna.distributions import distribution_to_json
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback

from harness.config import HarnessConfig
from harness.errors import HarnessError
from harness.sweep.space import evaluated_distributions, grid_search_space, training_distributions

__all__ = [
    "Studies",
    "SweepError",
    "directions",
    "make_pruner",
    "make_sampler",
    "objective_names",
    "open_studies",
    "storage_url",
    "study_signature",
]

logger = logging.getLogger(__name__)
SIGNATURE_ATTR = "harness_signature"


class SweepError(HarnessError):
    """A sweep cannot start or continue (e.g. a resume with a different search space)."""


@dataclass
class Studies:
    """The three studies of one sweep."""

    points: optuna.Study
    runs: optuna.Study
    proxy: optuna.Study
    storage_url: str


def objective_names(cfg: HarnessConfig) -> list[str]:
    """Metric names of the objectives: ``[subject, prompt]`` or ``["weighted"]``."""
    if cfg.sweep.weights:
        return ["weighted"]
    return [cfg.sweep.subject_metric, cfg.sweep.prompt_metric]


def directions(cfg: HarnessConfig) -> list[optuna.study.StudyDirection]:
    """All objectives are maximised."""
    return [optuna.study.StudyDirection.MAXIMIZE] * len(objective_names(cfg))


def storage_url(cfg: HarnessConfig, root: Path) -> str:
    """``sweep.storage`` or a SQLite file in ``sweep.dir`` (not a DVC output, so never deleted)."""
    if cfg.sweep.storage:
        return cfg.sweep.storage
    folder = (root / cfg.sweep.dir).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{folder / 'study.db'}"


def _storage(url: str, cfg: HarnessConfig) -> RDBStorage:
    interval = cfg.sweep.heartbeat_interval_s
    with warnings.catch_warnings():
        # Heartbeats are "experimental" in Optuna since 2.8; the warning says nothing actionable.
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return _heartbeat_storage(url, interval, cfg)


def _heartbeat_storage(url: str, interval: int, cfg: HarnessConfig) -> RDBStorage:
    return RDBStorage(
        url,
        heartbeat_interval=interval,
        grace_period=cfg.sweep.grace_period_s or 2 * interval,
        heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=2),
        engine_kwargs=_engine_kwargs(url),
    )


def _engine_kwargs(url: str) -> dict[str, Any] | None:
    return None if url.startswith("sqlite") else {"pool_pre_ping": True}


def make_sampler(cfg: HarnessConfig, resumed_runs: int = 0) -> optuna.samplers.BaseSampler:
    """The configured sampler for training parameters, seeded.

    ``resumed_runs`` offsets the seed: a resumed sweep must not replay the first call's random
    draws (a reseeded random sampler would propose the same configurations again).
    """
    sweep = cfg.sweep
    seed = sweep.seed + resumed_runs
    if sweep.sampler == "grid":
        return optuna.samplers.GridSampler(grid_search_space(sweep), seed=seed)
    if sweep.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if sweep.sampler == "nsgaii":
        return optuna.samplers.NSGAIISampler(seed=seed, population_size=4)
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=4, multivariate=True)


def make_pruner(cfg: HarnessConfig) -> optuna.pruners.BasePruner:
    """The pruner applied to proxy scores at checkpoint steps."""
    sweep = cfg.sweep
    if sweep.pruner == "none":
        return optuna.pruners.NopPruner()
    if sweep.pruner == "successive_halving":
        return optuna.pruners.SuccessiveHalvingPruner()
    return optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=sweep.pruner_warmup_steps)


def study_signature(cfg: HarnessConfig) -> dict[str, Any]:
    """What must not change when a sweep resumes: objectives, space, evaluation protocol."""
    dists = {**training_distributions(cfg.sweep), **evaluated_distributions(cfg)}
    return {
        "objectives": objective_names(cfg),
        "directions": [d.name.lower() for d in directions(cfg)],
        "weights": cfg.sweep.weights,
        "space": {name: json.loads(distribution_to_json(d)) for name, d in sorted(dists.items())},
        "inference": cfg.sweep.inference.model_dump(mode="json"),
        "eval": {
            "prompts": list(cfg.eval.prompts),
            "prompt_source": cfg.eval.prompt_source,
            "images_per_prompt": cfg.eval.images_per_prompt,
            "scheduler": cfg.eval.scheduler,
        },
        "metrics": cfg.metrics.model_dump(mode="json", exclude={"batch_size"}),
        "model": cfg.model.pretrained,
        "subject": cfg.data.subject,
    }


def _differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    return [
        f"{key}: study has {json.dumps(old.get(key))}, config has {json.dumps(new.get(key))}"
        for key in sorted(set(old) | set(new))
        if old.get(key) != new.get(key)
    ]


def open_studies(cfg: HarnessConfig, root: Path) -> Studies:
    """Create or load the sweep's studies; refuse a resume whose signature differs.

    Raises:
        SweepError: when an existing study was made with other objectives, search space or
            evaluation protocol (the message lists every difference).
    """
    url = storage_url(cfg, root)
    storage = _storage(url, cfg)
    # Heartbeats belong to the optimised runs study only; the others are written by ask/tell.
    plain = RDBStorage(url, engine_kwargs=_engine_kwargs(url))
    name = cfg.sweep.study_name
    signature = study_signature(cfg)
    runs = optuna.create_study(
        study_name=f"{name}.runs",
        storage=storage,
        directions=directions(cfg),
        load_if_exists=True,
    )
    runs.sampler = make_sampler(cfg, resumed_runs=len(runs.get_trials(deepcopy=False)))
    stored = runs.user_attrs.get(SIGNATURE_ATTR)
    if stored is None:
        runs.set_user_attr(SIGNATURE_ATTR, signature)
    elif stored != signature:
        raise SweepError(
            f"sweep.study_name: study {name!r} in {_safe_url(url)} was created with a different "
            "configuration; use a new sweep.study_name (or restore the old config) to continue:\n  "
            + "\n  ".join(_differences(stored, signature))
        )
    points = optuna.create_study(
        study_name=name, storage=plain, directions=directions(cfg), load_if_exists=True
    )
    proxy = optuna.create_study(
        study_name=f"{name}.proxy",
        storage=plain,
        direction="maximize",
        pruner=make_pruner(cfg),
        load_if_exists=True,
    )
    return Studies(points=points, runs=runs, proxy=proxy, storage_url=url)


def _safe_url(url: str) -> str:
    """The storage URL with any password masked (it goes into messages and logs)."""
    from harness.tracking import redact_text

    return redact_text(url)
