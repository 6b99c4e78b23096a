"""The ``sweep`` section: the search space (:class:`ParamSpec`, conditional parameters), the
inference grid, the checkpoint proxy and adaptive evaluation."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import (
    Discriminator,
    Field,
    Tag,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)

from harness.config._base import _KeysError, _Strict
from harness.config.sections import INFERENCE_DIMENSIONS, InferenceSetting, Scheduler, TrainConfig


class ParamSpec(_Strict):
    """One searched parameter: ``choices`` (categorical/grid) or a ``low``..``high`` range."""

    choices: list[float | int | bool | str | None] | None = Field(None, min_length=1)
    low: float | int | None = None
    high: float | int | None = None
    log: bool = False
    step: float | int | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _one_kind(self) -> ParamSpec:
        has_range = self.low is not None or self.high is not None
        if self.choices is not None and has_range:
            # Mostly a merge, not a typo: Hydra (experiments/*.yaml, `dvc exp run -S`) merges
            # a mapping into the preset's entry key by key, so choices over a range keep both.
            raise ValueError(
                "'choices' and a 'low'/'high' range: give one kind (experiments/ files and "
                "`dvc exp run -S` merge a mapping into the preset's entry key by key: write "
                "'low: null, high: null' beside choices, or 'choices: null' beside a range)"
            )
        if self.choices is None and not has_range:
            raise ValueError("give either 'choices' or both 'low' and 'high'")
        if self.choices is not None:
            no_repeats(self.choices)
        if has_range:
            if self.low is None or self.high is None:
                raise ValueError("a range needs both 'low' and 'high'")
            if self.low > self.high:
                raise ValueError(f"low={self.low} is above high={self.high}")
            if self.log and self.low <= 0:
                raise ValueError(f"a log range needs low > 0, got {self.low}")
        return self


# Training parameters a sweep may search (each is a ``train.*`` key).
SEARCHABLE_TRAIN_PARAMS = (
    "learning_rate",
    "text_encoder_lr",
    "rank",
    "alpha",
    "dropout",
    "train_text_encoder",
    "prior_loss_weight",
    "prior_preservation",
    "text_encoder_rank",
    "lr_scheduler",
    "lr_warmup_steps",
    "max_steps",
    "snr_gamma",
    "noise_offset",
    "random_flip",
    "optimizer",
    "use_dora",
    "text_encoder_alpha",
    "ema_decay",
)


@dataclass(frozen=True)
class SearchCondition:
    """A searched parameter that only matters for some values of another (its parent)."""

    parent: str
    active: Callable[[Any], bool]
    when: str  # for messages: "<parent> ..." in words


def _not_constant(value: Any) -> bool:
    return value != "constant"  # diffusers' "constant" schedule ignores num_warmup_steps


def _not_prodigy(value: Any) -> bool:
    return value != "prodigy"  # Prodigy estimates its own step size (train.optimizer)


_TEXT_ENCODER = SearchCondition("train_text_encoder", bool, "train_text_encoder is true")
_LEARNING_RATE = SearchCondition("optimizer", _not_prodigy, "optimizer is not prodigy")

# Conditional search space: a child is sampled (and recorded) only when every parent's value
# (sampled, or the fixed train setting) makes it matter. Otherwise the run keeps the child's
# fixed value, so two proposals that differ only in an unused parameter are one run. No parent
# is itself a child, so sampling the parents first is an order that works.
SEARCH_CONDITIONS: dict[str, tuple[SearchCondition, ...]] = {
    "learning_rate": (_LEARNING_RATE,),
    "text_encoder_lr": (_TEXT_ENCODER, _LEARNING_RATE),
    "text_encoder_rank": (_TEXT_ENCODER,),
    "text_encoder_alpha": (_TEXT_ENCODER,),
    "prior_loss_weight": (
        SearchCondition("prior_preservation", bool, "prior_preservation is true"),
    ),
    "lr_warmup_steps": (
        SearchCondition("lr_scheduler", _not_constant, "lr_scheduler is not constant"),
    ),
}


def no_repeats(values: list[Any]) -> list[Any]:
    """``values`` unless one is listed twice: each grid value or choice is one point of the
    search, so a repeat is a typo (it was dropped without a word)."""
    seen: set[tuple[bool, Any]] = set()
    for value in values:
        key = (isinstance(value, bool), value)  # True is not a repeat of 1
        if key in seen:
            raise ValueError(f"{value!r} is listed twice in {values}; give each value once")
        seen.add(key)
    return values


class InferenceGrid(_Strict):
    """Inference settings evaluated on every surviving checkpoint (their Cartesian product)."""

    guidance_scale: list[float] = Field(default_factory=lambda: [7.5], min_length=1)
    lora_scale: list[float] = Field(default_factory=lambda: [1.0], min_length=1)
    text_encoder_lora_scale: list[float] = Field(default_factory=lambda: [1.0], min_length=1)
    num_inference_steps: list[int] = Field(default_factory=lambda: [25], min_length=1)
    scheduler: list[Scheduler] | None = Field(
        None,
        min_length=1,
        description="Inference schedulers evaluated as a dimension (e.g. [ddim, "
        "dpmsolver++]); None: eval.scheduler alone, not a dimension.",
    )

    @field_validator(*INFERENCE_DIMENSIONS, "scheduler")
    @classmethod
    def _distinct(cls, values: list[Any] | None) -> list[Any] | None:
        return None if values is None else no_repeats(values)

    @field_validator("guidance_scale", "lora_scale", "text_encoder_lora_scale")
    @classmethod
    def _non_negative(cls, values: list[float]) -> list[float]:
        if any(v < 0 for v in values):
            raise ValueError(f"values must be >= 0, got {values}")
        return values

    @field_validator("num_inference_steps")
    @classmethod
    def _positive(cls, values: list[int]) -> list[int]:
        if any(v < 1 for v in values):
            raise ValueError(f"values must be >= 1, got {values}")
        return values

    def settings(self, scheduler: Scheduler) -> list[InferenceSetting]:
        """Every setting of the grid (Cartesian product of the dimensions, stable order);
        ``scheduler`` (``eval.scheduler``) unless the grid sweeps schedulers."""
        axes = [getattr(self, name) for name in INFERENCE_DIMENSIONS]
        return [
            InferenceSetting(
                **dict(zip(INFERENCE_DIMENSIONS, values, strict=True)), scheduler=sched
            )
            for sched in (self.scheduler or [scheduler])
            for values in itertools.product(*axes)
        ]


if tuple(InferenceGrid.model_fields) != (*INFERENCE_DIMENSIONS, "scheduler"):  # pragma: no cover
    raise TypeError("InferenceGrid must list the INFERENCE_DIMENSIONS, in order, then scheduler")


class ProxyConfig(_Strict):
    """The cheap evaluation reported at checkpoint steps for pruning."""

    prompts: int = Field(2, ge=1, description="First N evaluation prompts.")
    images_per_prompt: int = Field(1, ge=1)


class Rung(_Strict):
    """One cheap evaluation of adaptive evaluation: the first prompts and seeds of the full
    protocol (so its images are the full protocol's own, reused on promotion)."""

    prompts: int = Field(ge=1, description="First N evaluation prompts.")
    images_per_prompt: int = Field(1, ge=1, description="First N evaluation seeds.")


class AdaptiveEvaluation(_Strict):
    """Successive halving over a run's points (checkpoint x inference setting).

    Every point gets ``rungs[0]``; the best ``keep_fraction`` of them (by ``rank_by``, at least
    ``min_keep``) get ``rungs[1]``, and so on; the survivors of the last rung get the full
    protocol (all prompts, ``eval.images_per_prompt`` seeds). Only those are full-fidelity
    points: the Pareto front, the report and the evaluate stage use them alone. A rung that
    asks for more prompts or seeds than the protocol has gets what there is; a rung that is the
    whole protocol (e.g. after ``-S eval.images_per_prompt=1``) ends the halving: its points are
    full-fidelity points (logged).
    """

    rungs: list[Rung] = Field(min_length=1, description="Cheap evaluations, cheapest first.")
    keep_fraction: float = Field(
        gt=0, le=1, description="Fraction of a rung's points promoted to the next one."
    )
    min_keep: int = Field(1, ge=1, description="Points of a run promoted at least, per rung.")
    rank_by: Literal["auto", "pareto", "weighted"] = Field(
        "auto",
        description="Promotion order: Pareto rank (ties by the weighted objective), or the "
        "weighted objective alone; auto: weighted when sweep.weights is set, else pareto.",
    )

    @field_validator("rungs")
    @classmethod
    def _growing(cls, rungs: list[Rung]) -> list[Rung]:
        for i, (a, b) in enumerate(itertools.pairwise(rungs), 1):
            if b.prompts < a.prompts or b.images_per_prompt < a.images_per_prompt or b == a:
                raise ValueError(
                    f"rung {i} ({b.prompts} prompts x {b.images_per_prompt}) must hold rung "
                    f"{i - 1} ({a.prompts} x {a.images_per_prompt}) and more: each rung "
                    "reuses the images of the one before"
                )
        return rungs


def _evaluation_kind(value: Any) -> str:
    return "<adaptive>" if isinstance(value, Mapping | AdaptiveEvaluation) else "<exhaustive>"


# ``exhaustive`` or the adaptive mapping; the discriminator picks the member from the value's
# type, so a bad mapping is reported against AdaptiveEvaluation alone (not once per member).
# The tags in ``<...>`` are left out of the key paths of error messages.
Evaluation = Annotated[
    Annotated[Literal["exhaustive"], Tag("<exhaustive>")]
    | Annotated[AdaptiveEvaluation, Tag("<adaptive>")],
    Discriminator(_evaluation_kind),
]


def _space_entry_kind(value: Any) -> str:
    return "<spec>" if isinstance(value, Mapping | ParamSpec) else "<fixed>"


# A searched parameter (a mapping: ParamSpec) or a fixed value; as with ``Evaluation``, a bad
# mapping is reported against ParamSpec alone, not also as "expected float/int/bool/str".
SpaceEntry = Annotated[
    Annotated[ParamSpec, Tag("<spec>")] | Annotated[float | int | bool | str, Tag("<fixed>")],
    Discriminator(_space_entry_kind),
]


def _check_train_values(name: str, spec: ParamSpec | float | int | bool | str) -> None:
    """Every value a searched parameter can take must be a valid ``train.<name>``, so a typo
    (``optimizer: {choices: [prodgy]}``) fails now, naming the key, not in some later run."""
    field = TrainConfig.model_fields[name]
    adapter: TypeAdapter[Any] = TypeAdapter(Annotated[field.annotation, field])  # type: ignore[arg-type]
    if not isinstance(spec, ParamSpec):
        values: list[Any] = [spec]
    elif spec.choices is not None:
        values = list(spec.choices)
    else:
        values = [spec.low, spec.high]
    for value in values:
        try:
            adapter.validate_python(value)
        except ValidationError as exc:
            reason = exc.errors()[0]["msg"]
            raise _KeysError(
                (name,), f"{name}={value!r} is not a valid train.{name} ({reason})"
            ) from None


class SweepConfig(_Strict):
    """Optuna sweep: search space, objectives, sampler, pruning, budget and storage."""

    study_name: str = Field("dreambooth", min_length=1, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    storage: str | None = Field(
        None,
        description="Optuna storage URL; default: sqlite file under sweep.dir (kept outside "
        "DVC outputs). PostgreSQL URLs work for clusters.",
    )
    dir: str = Field("runs/sweep", description="Run folders, study file and results table.")
    sampler: Literal["tpe", "nsgaii", "random", "grid"] = "tpe"
    seed: int = 0
    n_trials: int | None = Field(4, ge=1, description="Training runs (budget).")
    timeout_s: float | None = Field(None, gt=0, description="Wall-time budget in seconds.")
    subject_metric: Literal["dino", "clip_i"] = "dino"
    prompt_metric: Literal["clip_t"] = "clip_t"
    weights: dict[str, float] | None = Field(
        None,
        description="Single weighted objective instead of the Pareto front, e.g. "
        "{dino: 0.7, clip_t: 0.3}.",
    )
    pruner: Literal["median", "successive_halving", "none"] = "median"
    pruner_warmup_steps: int = Field(0, ge=0)
    proxy: ProxyConfig = Field(default_factory=ProxyConfig)  # type: ignore[arg-type]
    space: dict[str, SpaceEntry] = Field(default_factory=dict)
    inference: InferenceGrid = Field(default_factory=InferenceGrid)  # type: ignore[arg-type]
    evaluation: Evaluation = Field(
        "exhaustive",
        description="exhaustive: every point gets the full protocol; or {rungs, keep_fraction}: "
        "adaptive (successive halving over each run's points).",
    )
    keep_adapters: Literal["pareto", "best", "all"] = "pareto"
    heartbeat_interval_s: int = Field(
        60, ge=1, description="Run heartbeat; a worker silent for grace_period_s is stale."
    )
    grace_period_s: int | None = Field(None, ge=1, description="Default: 2 x heartbeat.")
    storage_retry_s: float = Field(
        120.0,
        ge=0,
        description="How long a briefly unreachable database is retried (with backoff) before "
        "the sweep stops with a clear error; nothing finished is lost.",
    )
    max_failures_in_a_row: int | None = Field(
        3,
        ge=1,
        description="A worker stops when this many of its runs in a row failed with an "
        "unexpected error (a bug or a broken setup; NaN loss and out-of-memory runs do not "
        "count); null: never. A user error (a missing file, a full disk) stops it at once.",
    )

    @field_validator("space")
    @classmethod
    def _known_params(cls, space: dict[str, Any]) -> dict[str, Any]:
        unknown = sorted(set(space) - set(SEARCHABLE_TRAIN_PARAMS))
        if unknown:
            raise _KeysError(
                tuple(unknown),
                f"unknown search parameter(s) {unknown}; searchable: "
                + ", ".join(SEARCHABLE_TRAIN_PARAMS),
            )
        for name, spec in space.items():
            _check_train_values(name, spec)
        return space

    @field_validator("weights")
    @classmethod
    def _weights_known(cls, weights: dict[str, float] | None) -> dict[str, float] | None:
        if weights is not None:
            bad = sorted(set(weights) - {"dino", "clip_i", "clip_t"})
            if bad or not weights:
                raise ValueError(f"weights keys must be among dino, clip_i, clip_t, got {bad}")
            negative = {k: w for k, w in weights.items() if w < 0}
            if negative:
                # The weighted objective is maximised: a negative weight rewards a worse score.
                raise ValueError(f"weights must be >= 0, got {negative}")
            if not any(w > 0 for w in weights.values()):
                raise ValueError(f"at least one weight must be above 0, got {weights}")
        return weights

    @model_validator(mode="after")
    def _grid_needs_choices(self) -> SweepConfig:
        if self.sampler == "grid":
            ranged = [
                k for k, v in self.space.items() if isinstance(v, ParamSpec) and v.choices is None
            ]
            if ranged:
                raise _KeysError(
                    ("sampler", *(f"space.{k}" for k in ranged)),
                    f"the grid sampler needs 'choices' for {ranged}, not ranges",
                )
        if self.n_trials is None and self.timeout_s is None:
            raise _KeysError(("n_trials", "timeout_s"), "give a budget: n_trials and/or timeout_s")
        if self.grace_period_s is not None and self.grace_period_s <= self.heartbeat_interval_s:
            # A live worker beats once per interval: a shorter grace declares it dead between
            # two beats, and its run is retried by another worker while it still trains.
            raise _KeysError(
                ("grace_period_s", "heartbeat_interval_s"),
                f"sweep.grace_period_s ({self.grace_period_s} s) must be longer than "
                f"sweep.heartbeat_interval_s ({self.heartbeat_interval_s} s); twice it is safe",
            )
        return self
