"""The search space: training parameters sampled per run, plus the evaluated dimensions.

Two kinds of dimensions exist:

* **training parameters** (``sweep.space``): sampled by the Optuna sampler once per training run;
* **evaluated dimensions**: the checkpoint step (``checkpoint_step``) and the inference setting
  (``eval.<dimension>``: guidance, LoRA scales, inference steps). They are not sampled: every
  surviving run evaluates all its checkpoints under every inference setting of
  ``sweep.inference``, on one loaded pipeline.

Every evaluated point is recorded with *all* dimensions as parameters, with fixed, documented
distributions, so that Optuna's Pareto front and parameter importances cover steps and scales.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import optuna
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)

from harness.config import (
    INFERENCE_DIMENSIONS,
    HarnessConfig,
    InferenceSetting,
    ParamSpec,
    SweepConfig,
)

__all__ = [
    "CHECKPOINT_STEP",
    "EVAL_PREFIX",
    "TRAIN_PREFIX",
    "evaluated_distributions",
    "grid_search_space",
    "inference_settings",
    "max_possible_steps",
    "point_params",
    "sample_training_params",
    "search_space_size",
    "training_distributions",
    "with_training_params",
]

# Inference dimensions carry this prefix in the study, training parameters ``train.``; the
# checkpoint step is a parameter of its own (it is neither an ``eval`` nor a ``train`` setting).
EVAL_PREFIX = "eval."
TRAIN_PREFIX = "train."
CHECKPOINT_STEP = "checkpoint_step"


def _distribution(spec: ParamSpec | float | int | bool | str) -> BaseDistribution:
    if not isinstance(spec, ParamSpec):
        return CategoricalDistribution([spec])
    if spec.choices is not None:
        return CategoricalDistribution(list(spec.choices))
    assert spec.low is not None and spec.high is not None  # guaranteed by ParamSpec
    if all(isinstance(v, int) and not isinstance(v, bool) for v in (spec.low, spec.high)) and (
        spec.step is None or isinstance(spec.step, int)
    ):
        return IntDistribution(
            int(spec.low), int(spec.high), log=spec.log, step=int(spec.step or 1)
        )
    return FloatDistribution(float(spec.low), float(spec.high), log=spec.log, step=spec.step)


def training_distributions(sweep: SweepConfig) -> dict[str, BaseDistribution]:
    """Optuna distributions of the searched training parameters (``train.<name>``)."""
    return {TRAIN_PREFIX + name: _distribution(spec) for name, spec in sorted(sweep.space.items())}


def evaluated_distributions(cfg: HarnessConfig) -> dict[str, BaseDistribution]:
    """Distributions of the evaluated dimensions: checkpoint step and inference settings."""
    grid = cfg.sweep.inference
    out: dict[str, BaseDistribution] = {
        CHECKPOINT_STEP: IntDistribution(1, max_possible_steps(cfg))
    }
    for name in INFERENCE_DIMENSIONS:
        values = getattr(grid, name)
        out[EVAL_PREFIX + name] = (
            IntDistribution(min(values), max(values))
            if all(isinstance(v, int) for v in values)
            else _span(values)
        )
    return out


def _span(values: list[float]) -> FloatDistribution:
    low, high = float(min(values)), float(max(values))
    # A single value still needs a valid (non-empty) range for Optuna's importance tools.
    return FloatDistribution(low, high if high > low else low + 1e-9)


def max_possible_steps(cfg: HarnessConfig) -> int:
    """The largest ``train.max_steps`` any run of the sweep can have (the top of a searched
    ``max_steps``)."""
    spec = cfg.sweep.space.get("max_steps")
    if spec is None:
        return cfg.train.max_steps
    if isinstance(spec, ParamSpec):
        values = spec.choices if spec.choices is not None else [spec.high]
        return max(int(v) for v in values if v is not None)
    return int(spec)


def sample_training_params(trial: optuna.Trial, sweep: SweepConfig) -> dict[str, Any]:
    """Ask the trial for every training parameter; returns ``{name: value}`` without prefix."""
    out: dict[str, Any] = {}
    for name, dist in training_distributions(sweep).items():
        out[name.removeprefix(TRAIN_PREFIX)] = _suggest(trial, name, dist)
    return out


def _suggest(trial: optuna.Trial, name: str, dist: BaseDistribution) -> Any:
    if isinstance(dist, CategoricalDistribution):
        return trial.suggest_categorical(name, dist.choices)
    if isinstance(dist, IntDistribution):
        return trial.suggest_int(name, dist.low, dist.high, step=dist.step, log=dist.log)
    assert isinstance(dist, FloatDistribution)
    return trial.suggest_float(name, dist.low, dist.high, step=dist.step, log=dist.log)


def search_space_size(sweep: SweepConfig) -> int | None:
    """How many distinct training configurations the space holds (None: unbounded).

    Finite when every dimension is a list of choices, an integer range or a stepped float
    range: a budget larger than that could only retrain configurations that already ran.
    """
    size = 1
    for dist in training_distributions(sweep).values():
        if isinstance(dist, CategoricalDistribution):
            size *= len(dist.choices)
        elif isinstance(dist, IntDistribution) and not dist.log:
            size *= (dist.high - dist.low) // dist.step + 1
        elif isinstance(dist, FloatDistribution) and dist.step is not None:
            size *= round((dist.high - dist.low) / dist.step) + 1
        else:
            return None
    return size


def grid_search_space(sweep: SweepConfig) -> dict[str, list[Any]]:
    """The grid sampler's search space (every parameter has ``choices`` or is fixed)."""
    space: dict[str, list[Any]] = {}
    for name, dist in training_distributions(sweep).items():
        assert isinstance(dist, CategoricalDistribution)  # validated by SweepConfig
        space[name] = list(dist.choices)
    return space


def with_training_params(cfg: HarnessConfig, params: Mapping[str, Any]) -> HarnessConfig:
    """A validated copy of ``cfg`` with sampled ``train.*`` values applied.

    Checkpoint steps beyond a sampled ``max_steps`` are dropped and ``max_steps`` itself is
    always a checkpoint, so every run is evaluated at its end.
    """
    from harness.config import validate_config

    data = cfg.to_dict()
    data["train"].update(params)
    max_steps = int(data["train"]["max_steps"])
    steps = sorted({s for s in data["train"]["checkpoint_steps"] if s <= max_steps} | {max_steps})
    data["train"]["checkpoint_steps"] = steps
    if data["train"]["lr_warmup_steps"] > max_steps:
        data["train"]["lr_warmup_steps"] = max_steps
    return validate_config(data, default_source="sweep.space")


def inference_settings(cfg: HarnessConfig) -> list[InferenceSetting]:
    """Every inference setting of ``sweep.inference`` with ``eval.scheduler`` (stable order)."""
    return cfg.sweep.inference.settings(cfg.eval.scheduler)


def point_params(
    training: Mapping[str, Any], checkpoint_step: int, setting: InferenceSetting
) -> dict[str, Any]:
    """All parameters of one evaluated point: ``train.*`` (searched), ``checkpoint_step`` and
    ``eval.*`` (the inference setting's dimensions)."""
    params: dict[str, Any] = {TRAIN_PREFIX + k: v for k, v in training.items()}
    params[CHECKPOINT_STEP] = checkpoint_step
    params.update({EVAL_PREFIX + k: v for k, v in setting.dimensions().items()})
    return params
