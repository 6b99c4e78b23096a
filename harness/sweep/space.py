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

import itertools
import math
from collections.abc import Mapping, Sequence
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
    SEARCH_CONDITIONS,
    HarnessConfig,
    InferenceSetting,
    ParamSpec,
    SweepConfig,
    TrainConfig,
)

__all__ = [
    "CHECKPOINT_STEP",
    "EVAL_PREFIX",
    "NO_TEXT_ENCODER_SCALE",
    "SCHEDULER",
    "TEXT_ENCODER_SCALE",
    "TRAIN_PREFIX",
    "active_training_params",
    "evaluated_distributions",
    "grid_search_space",
    "inference_settings",
    "is_active",
    "max_possible_steps",
    "never_sampled",
    "point_params",
    "run_budget",
    "run_inference_settings",
    "sample_training_params",
    "sampling_order",
    "search_space_size",
    "training_distributions",
    "with_training_params",
]

# Inference dimensions carry this prefix in the study, training parameters ``train.``; the
# checkpoint step is a parameter of its own (it is neither an ``eval`` nor a ``train`` setting).
EVAL_PREFIX = "eval."
TRAIN_PREFIX = "train."
CHECKPOINT_STEP = "checkpoint_step"
SCHEDULER = "scheduler"


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


def sampling_order(sweep: SweepConfig) -> list[str]:
    """The searched training parameters (no prefix), every parent before its children, else
    alphabetical (the order Optuna has always been asked in)."""
    names = sorted(sweep.space)
    parents = {c.parent for n in names for c in SEARCH_CONDITIONS.get(n, ())}
    return [n for n in names if n in parents] + [n for n in names if n not in parents]


def is_active(name: str, values: Mapping[str, Any], train: TrainConfig) -> bool:
    """Does training parameter ``name`` matter, given the values sampled so far (``values``,
    no prefix) and, for unsampled parents, the fixed ``train`` settings?"""
    for cond in SEARCH_CONDITIONS.get(name, ()):
        parent = values[cond.parent] if cond.parent in values else getattr(train, cond.parent)
        if not cond.active(parent):
            return False
    return True


def never_sampled(cfg: HarnessConfig) -> list[str]:
    """Why searched parameters will never be sampled: their parent is a fixed ``train``
    setting that keeps them unused (e.g. ``text_encoder_lr`` without text-encoder training).
    Not a config error: the same config trains one run (``harness train``) as it should."""
    out = []
    for name in sampling_order(cfg.sweep):
        for cond in SEARCH_CONDITIONS.get(name, ()):
            if cond.parent not in cfg.sweep.space and not cond.active(
                getattr(cfg.train, cond.parent)
            ):
                value = getattr(cfg.train, cond.parent)
                out.append(
                    f"sweep.space.{name} is never sampled: it is used only when {cond.when}, "
                    f"and train.{cond.parent} is {value!r} (not searched)"
                )
    return out


def active_training_params(params: Mapping[str, Any], train: TrainConfig) -> dict[str, Any]:
    """``params`` (no prefix) without the children their parents leave unused."""
    return {k: v for k, v in params.items() if is_active(k, params, train)}


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
    if grid.scheduler is not None:  # a dimension only when swept: older studies keep theirs
        out[EVAL_PREFIX + SCHEDULER] = CategoricalDistribution(list(grid.scheduler))
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


def sample_training_params(trial: optuna.Trial, cfg: HarnessConfig) -> dict[str, Any]:
    """Ask the trial for every training parameter that matters (define-by-run: a child of
    :data:`~harness.config.SEARCH_CONDITIONS` only when its parent's value makes it matter);
    returns ``{name: value}`` without prefix."""
    dists = training_distributions(cfg.sweep)
    out: dict[str, Any] = {}
    for name in sampling_order(cfg.sweep):
        if is_active(name, out, cfg.train):
            out[name] = _suggest(trial, TRAIN_PREFIX + name, dists[TRAIN_PREFIX + name])
    return out


def _suggest(trial: optuna.Trial, name: str, dist: BaseDistribution) -> Any:
    if isinstance(dist, CategoricalDistribution):
        return trial.suggest_categorical(name, dist.choices)
    if isinstance(dist, IntDistribution):
        return trial.suggest_int(name, dist.low, dist.high, step=dist.step, log=dist.log)
    assert isinstance(dist, FloatDistribution)
    return trial.suggest_float(name, dist.low, dist.high, step=dist.step, log=dist.log)


def searched_values(sweep: SweepConfig, name: str) -> list[Any] | None:
    """Every value the sweep may give ``train.<name>`` (None: not searched, or a range)."""
    dist = training_distributions(sweep).get(TRAIN_PREFIX + name)
    return None if dist is None else _values(dist)


def _values(dist: BaseDistribution) -> list[Any] | None:
    """Every value of a finite distribution (None: unbounded)."""
    if isinstance(dist, CategoricalDistribution):
        return list(dist.choices)
    if isinstance(dist, IntDistribution) and not dist.log:
        return list(range(dist.low, dist.high + 1, dist.step))
    if isinstance(dist, FloatDistribution) and dist.step is not None:
        n = round((dist.high - dist.low) / dist.step) + 1
        return [dist.low + i * dist.step for i in range(n)]
    return None


# Enumerating a conditional space's configurations is exact but costs its product; beyond
# this, the plain product is the (upper-bound) size.
_ENUMERATE_AT_MOST = 100_000


def search_space_size(cfg: HarnessConfig) -> int | None:
    """How many distinct training configurations the space holds (None: unbounded).

    Finite when every dimension is a list of choices, an integer range or a stepped float
    range: a budget larger than that could only retrain configurations that already ran.
    Configurations that differ only in a parameter their parent leaves unused are one.
    """
    axes: dict[str, list[Any]] = {}
    for name, dist in training_distributions(cfg.sweep).items():
        values = _values(dist)
        if values is None:
            return None
        axes[name.removeprefix(TRAIN_PREFIX)] = values
    product = math.prod(len(v) for v in axes.values())
    merging = set(SEARCH_CONDITIONS) | {"lr_warmup_steps"}
    if product > _ENUMERATE_AT_MOST or not set(axes) & merging:
        return product
    distinct = {
        tuple(sorted(_run_params(dict(zip(axes, combo, strict=True)), cfg.train).items()))
        for combo in itertools.product(*axes.values())
    }
    return len(distinct)


def _run_params(params: dict[str, Any], train: TrainConfig) -> dict[str, Any]:
    """The sampled ``params`` as the run trains them: the active ones, the warm-up clamped to
    the run's steps as :func:`with_training_params` clamps it (two grid cells can be one run)."""
    active = active_training_params(params, train)
    if "lr_warmup_steps" in active:
        max_steps = active.get("max_steps", train.max_steps)
        active["lr_warmup_steps"] = warmup_within(active["lr_warmup_steps"], max_steps)
    return active


def warmup_within(warmup_steps: int, max_steps: int) -> int:
    """A warm-up longer than the run is the whole run (the scheduler's own bound)."""
    return min(int(warmup_steps), int(max_steps))


def run_budget(cfg: HarnessConfig) -> int | None:
    """The runs ``cfg`` allows: ``sweep.n_trials``, capped at the space's size when that is
    smaller (None: no run-count budget, only ``sweep.timeout_s``)."""
    size, limit = search_space_size(cfg), cfg.sweep.n_trials
    if size is not None and (limit is None or size < limit):
        return size
    return limit


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
    data["train"]["lr_warmup_steps"] = warmup_within(data["train"]["lr_warmup_steps"], max_steps)
    return validate_config(data, default_source="sweep.space")


def inference_settings(cfg: HarnessConfig) -> list[InferenceSetting]:
    """Every inference setting of ``sweep.inference`` with ``eval.scheduler`` (stable order)."""
    return cfg.sweep.inference.settings(cfg.eval.scheduler)


# The text-encoder LoRA scale of a run that trains no text-encoder adapter: a value that
# changes nothing (there is nothing to scale), kept so the setting stays an InferenceSetting.
TEXT_ENCODER_SCALE = "text_encoder_lora_scale"
NO_TEXT_ENCODER_SCALE = 1.0


def run_inference_settings(
    run_cfg: HarnessConfig, settings: Sequence[InferenceSetting]
) -> list[InferenceSetting]:
    """The settings one run's checkpoints are evaluated under: ``settings``, or for a run that
    trains no text-encoder adapter one per value of the other dimensions (order kept).

    Such a run's images do not depend on ``text_encoder_lora_scale``: scoring them once per
    value made identical images distinct points, each taking its own Pareto and
    ``evaluate.top_k`` slot. Its points do not have the parameter (see :func:`point_params`).
    """
    if run_cfg.train.train_text_encoder:
        return list(settings)
    kept: dict[str, InferenceSetting] = {}
    for setting in settings:
        one = setting.model_copy(update={TEXT_ENCODER_SCALE: NO_TEXT_ENCODER_SCALE})
        kept.setdefault(one.id, one)  # the first of each, in the grid's order
    return list(kept.values())


def point_params(
    training: Mapping[str, Any],
    checkpoint_step: int,
    setting: InferenceSetting,
    swept_scheduler: bool = False,
    text_encoder_adapter: bool = True,
) -> dict[str, Any]:
    """All parameters of one evaluated point: ``train.*`` (searched and used),
    ``checkpoint_step`` and ``eval.*`` (the inference setting's dimensions, and its scheduler
    when ``sweep.inference.scheduler`` sweeps it). Without a ``text_encoder_adapter`` (the run's
    ``train.train_text_encoder`` false, searched or fixed) there is no
    ``eval.text_encoder_lora_scale``: like a conditional training parameter its parent left
    unused, it is absent (NaN in the results table), not a value that was never applied."""
    params: dict[str, Any] = {TRAIN_PREFIX + k: v for k, v in training.items()}
    params[CHECKPOINT_STEP] = checkpoint_step
    dimensions = setting.dimensions()
    if not text_encoder_adapter:
        del dimensions[TEXT_ENCODER_SCALE]
    params.update({EVAL_PREFIX + k: v for k, v in dimensions.items()})
    if swept_scheduler:
        params[EVAL_PREFIX + SCHEDULER] = setting.scheduler
    return params
