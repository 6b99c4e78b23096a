"""The ``evaluate``, ``report`` and ``launch`` sections, the seed spans that keep confirmation
fresh, identity hashing and :class:`HarnessConfig`, the whole configuration."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field, field_validator, model_validator

from harness.config._base import _KeysError, _Strict
from harness.config.sections import (
    DataConfig,
    EvalConfig,
    MetricsConfig,
    ModelConfig,
    TrackingConfig,
    TrainConfig,
    check_prompts,
)
from harness.config.sweep import ParamSpec, SweepConfig


class EvaluateConfig(_Strict):
    """The ``evaluate`` stage: the chosen points and the base model re-scored on fresh seeds.

    The best of many noisy points overstates its own score (selection bias); the same point
    re-scored on seeds the sweep never used (optionally on held-out prompts) does not.
    """

    top_k: int = Field(
        5,
        ge=1,
        description="Most points re-scored: the sweep's best point by sweep.weights (when set) "
        "and its Pareto front, ranked by the sweep's objective sum (see harness.sweep.select). "
        "Their adapters are never removed by sweep.keep_adapters (at the top_k the sweep ran "
        "with: raising it afterwards needs sweep.keep_adapters: all).",
    )
    prompts: list[str] | None = Field(
        None,
        min_length=1,
        description="Held-out prompt templates ({token}, {class_name}); default: the sweep's "
        "evaluation prompts.",
    )

    @field_validator("prompts")
    @classmethod
    def _known_placeholders(cls, value: list[str] | None) -> list[str] | None:
        if value is None:
            return None
        return check_prompts(value)

    images_per_prompt: int | None = Field(
        None, ge=1, description="Default: eval.images_per_prompt."
    )
    seed: int | None = Field(
        None,
        description="First confirmation seed; default: the first seed after every seed the "
        "sweep uses. Confirmation seeds never overlap the sweep's.",
    )
    dir: str = Field("runs/evaluate", description="Confirmation images and results table.")
    protocol: Literal["sweep", "dreambench"] = Field(
        "sweep",
        description="sweep: the sweep's prompts and eval.images_per_prompt; dreambench: the "
        "DreamBooth paper's protocol (data.source dreambench): each subject's own DreamBench "
        "prompt list (25 prompts, live subjects and objects differ) and 4 images per prompt "
        "unless evaluate.images_per_prompt says otherwise.",
    )

    def images_per_prompt_for(self, sweep_images: int) -> int:
        """Confirmation images per prompt: the configured count, else the protocol's (the
        paper's 4 for dreambench, the sweep's ``eval.images_per_prompt`` otherwise)."""
        if self.images_per_prompt is not None:
            return self.images_per_prompt
        return DREAMBENCH_IMAGES_PER_PROMPT if self.protocol == "dreambench" else sweep_images


DREAMBENCH_IMAGES_PER_PROMPT = 4  # DreamBooth (Ruiz et al. 2023): 4 images x 25 prompts


class ReportConfig(_Strict):
    """The ``report`` stage: the comparison report ``<dir>/index.html`` and ``<dir>/summary.md``.

    Report-only settings: no other stage reads them, so changing one reruns only the report.
    """

    dir: str = Field("reports", min_length=1, description="Folder of index.html and summary.md.")
    title: str | None = Field(
        None, min_length=1, description="Report title; default: 'DreamBooth sweep <study>'."
    )
    top_k: int = Field(
        5,
        ge=2,
        description="Confirmed points in the paired comparison: the best one and up to "
        "top_k - 1 others, best first.",
    )
    image_size: int = Field(128, ge=16, le=1024, description="Image grid cell size in pixels.")
    embed_images: bool = Field(
        True,
        description="Embed images in index.html as data URIs (one self-contained file); false: "
        "image files beside it in <dir>/grids/.",
    )
    bootstrap_samples: int = Field(
        2000, ge=100, description="Resamples of the paired bootstrap over prompts."
    )
    seed: int = Field(0, description="Seed of the paired bootstrap (the report is deterministic).")


def seed_spans(cfg: HarnessConfig) -> tuple[range, range]:
    """``(sweep seeds, confirmation seeds)``.

    The sweep uses ``eval.seed`` onwards: ``eval.images_per_prompt`` seeds per prompt, the
    proxy's ``sweep.proxy.images_per_prompt`` and PRES's ``eval.prior_preservation_images``.
    The confirmation uses as many (images per prompt, PRES) from ``evaluate.seed``, by default
    right after the sweep's last seed, so the two never overlap unless a user's seed makes them.
    """
    ev = cfg.eval
    count = max(
        ev.images_per_prompt, cfg.sweep.proxy.images_per_prompt, ev.prior_preservation_images
    )
    swept = range(ev.seed, ev.seed + count)
    fresh_count = max(
        cfg.evaluate.images_per_prompt_for(ev.images_per_prompt), ev.prior_preservation_images
    )
    start = swept.stop if cfg.evaluate.seed is None else cfg.evaluate.seed
    return swept, range(start, start + fresh_count)


# Class images draw their noise from a stream of their own: PRES generates train.class_prompt
# at the same size, so a class image and a PRES image with one seed would start from the same
# noise, and PRES would score a training target of prior preservation, not the kept prior.
CLASS_IMAGE_SEED_BASE = 1_000_000_000


def class_image_seeds(cfg: HarnessConfig) -> range:
    """Seeds of the prior-preservation class images (image ``i``: ``CLASS_IMAGE_SEED_BASE +
    train.seed + i``), far from every evaluation seed (:func:`seed_spans`)."""
    start = CLASS_IMAGE_SEED_BASE + cfg.train.seed
    return range(start, start + cfg.train.num_class_images)


def _overlap(a: range, b: range) -> bool:
    return a.start < b.stop and b.start < a.stop


def class_seed_overlap(cfg: HarnessConfig) -> tuple[str, str] | None:
    """``(key, message)`` when the sweep's or the confirmation's seeds fall among the class
    images' seeds (only with prior preservation), or None."""
    if not cfg.train.prior_preservation:
        return None
    classes = class_image_seeds(cfg)
    swept, fresh = seed_spans(cfg)
    for key, span in (("eval.seed", swept), ("evaluate.seed", fresh)):
        if _overlap(span, classes):
            return key, (
                f"{key} gives seeds {span.start}..{span.stop - 1}, among the class images' "
                f"seeds {classes.start}..{classes.stop - 1} (train.seed + "
                f"{CLASS_IMAGE_SEED_BASE}): PRES would regenerate training targets; use a "
                f"{key} below {classes.start - len(span) + 1}"
            )
    return None


def seed_overlap(cfg: HarnessConfig) -> str | None:
    """Why the confirmation seeds overlap the sweep's (a message naming the keys), or None."""
    swept, fresh = seed_spans(cfg)
    if not _overlap(swept, fresh):
        return None
    return (
        f"evaluate.seed={cfg.evaluate.seed} gives confirmation seeds {fresh.start}..{fresh.stop - 1}, "
        f"which overlap the sweep's seeds {swept.start}..{swept.stop - 1} (eval.seed and its "
        f"images per prompt, proxy and PRES seeds); use evaluate.seed >= {swept.stop} or "
        f"<= {swept.start - len(fresh)}, or leave it unset"
    )


class SlurmConfig(_Strict):
    """The sbatch array of ``harness sweep launch --slurm`` (one array task per worker)."""

    partition: str | None = None
    account: str | None = None
    time: str = Field("04:00:00", description="Wall time per worker (sbatch --time).")
    gpus_per_task: int = Field(1, ge=0, description="0: no GPU request (CPU workers).")
    cpus_per_task: int = Field(8, ge=1)
    mem: str | None = Field(None, description="e.g. 64G (sbatch --mem).")
    setup: list[str] = Field(
        default_factory=list,
        description="Shell lines run before the worker, e.g. 'module load cuda' or "
        "'source .venv/bin/activate'.",
    )
    extra_args: list[str] = Field(
        default_factory=list, description="More #SBATCH lines, e.g. '--qos=high'."
    )
    python: str | None = Field(
        None, description="Python of the workers; default: the interpreter that launches."
    )


class LaunchConfig(_Strict):
    """``harness sweep launch``: how many workers, and the engines' settings."""

    workers: int = Field(2, ge=1, description="Workers of --slurm and --clearml-queue.")
    slurm: SlurmConfig = Field(default_factory=SlurmConfig)  # type: ignore[arg-type]


# train keys that only say what to look at while training (validation images): they never
# change the weights, so no identity (study, run key, checkpoint hash) includes them.
VALIDATION_KEYS = frozenset({"validation_steps", "validation_prompts", "validation_seed"})

# Keys added after studies, run keys and checkpoints existed. At these values they are left
# out of every identity (study names, run keys, checkpoint config hashes: identity_dump), so
# adding a key renames no study and resumes every checkpoint; any other value is part of the
# identity like every other key.
LATER_DEFAULTS: dict[str, dict[str, Any]] = {
    "data": {"subjects": None, "token_seed": 0},
    "train": {
        "snr_gamma": None,
        "noise_offset": 0.0,
        "random_flip": 0.0,
        "optimizer": "adamw",
        "use_dora": False,
        "text_encoder_alpha": None,
        "ema_decay": None,
        "validation_steps": None,
        "validation_prompts": [
            "a photo of {token} {class_name}",
            "a {token} {class_name} on the beach",
        ],
        "validation_seed": 0,
    },
    "inference": {"scheduler": None},  # sweep.inference
    "metrics": {"lpips_weights": None},
}


# Settings that change no trained weight, image or score, only memory, a file format or where
# this machine keeps the hub's files: every identity hashes them at these values whatever they
# are set to, so a worker on a smaller GPU that turns gradient checkpointing on, or on a node
# with its own model cache folder, joins the same study and resumes the same checkpoints
# (tests/train/test_lora_trainer.py checks the weights are the same). Hashed, not dropped:
# the names of existing studies, runs and checkpoints stay what they were.
RESULT_NEUTRAL: dict[str, dict[str, Any]] = {
    "model": {"cache_dir": None},
    "train": {"gradient_checkpointing": False, "export_kohya": False},
}


# The version of the tiny:// models (harness.models.tiny builds them from code: no hub revision
# names their weights). Bump it when their configs change: their caches are then rebuilt, and
# from version 4 on it is part of every identity (identity_dump), so no study, run or checkpoint
# of the old weights is resumed with the new ones; version 3's identities keep their names. It
# lives here so that hashing a config needs no torch.
TINY_VERSION = 3
_FIRST_HASHED_TINY_VERSION = 4


def identity_dump(
    section: str, model: BaseModel, exclude: set[str] | frozenset[str] = frozenset()
) -> dict[str, Any]:
    """``model.model_dump(mode="json")`` of config ``section`` for an identity hash: without
    ``exclude``, the :data:`RESULT_NEUTRAL` keys at their listed value, without the
    :data:`LATER_DEFAULTS` keys that are at their old default and, for a ``tiny://`` model,
    with its :data:`TINY_VERSION`."""
    data = model.model_dump(mode="json", exclude=set(exclude))
    tiny = section == "model" and str(getattr(model, "pretrained", "")).startswith("tiny://")
    if tiny and TINY_VERSION >= _FIRST_HASHED_TINY_VERSION:
        data["tiny_version"] = TINY_VERSION
    for key, value in RESULT_NEUTRAL.get(section, {}).items():
        if key in data:
            data[key] = value
    for key, default in LATER_DEFAULTS.get(section, {}).items():
        if key in data and data[key] == default:
            del data[key]
    return data


class HarnessConfig(_Strict):
    """The whole resolved configuration."""

    preset: str
    seed: int = 0
    model: ModelConfig = Field(default_factory=ModelConfig)  # type: ignore[arg-type]
    data: DataConfig = Field(default_factory=DataConfig)  # type: ignore[arg-type]
    train: TrainConfig = Field(default_factory=TrainConfig)  # type: ignore[arg-type]
    eval: EvalConfig = Field(default_factory=EvalConfig)  # type: ignore[arg-type]
    metrics: MetricsConfig = Field(default_factory=MetricsConfig)  # type: ignore[arg-type]
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)  # type: ignore[arg-type]
    sweep: SweepConfig = Field(default_factory=SweepConfig)  # type: ignore[arg-type]
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)  # type: ignore[arg-type]
    report: ReportConfig = Field(default_factory=ReportConfig)  # type: ignore[arg-type]
    launch: LaunchConfig = Field(default_factory=LaunchConfig)  # type: ignore[arg-type]

    @model_validator(mode="after")
    def _fresh_confirmation_seeds(self) -> HarnessConfig:
        problem = seed_overlap(self)
        if problem:
            raise _KeysError(("evaluate.seed", "eval.seed"), problem)
        among_classes = class_seed_overlap(self)
        if among_classes:
            raise _KeysError((among_classes[0], "train.seed"), among_classes[1])
        if self.evaluate.protocol == "dreambench":
            if self.data.source != "dreambench":
                raise _KeysError(
                    ("evaluate.protocol", "data.source"),
                    "evaluate.protocol 'dreambench' needs data.source 'dreambench' (its "
                    f"prompt lists), got {self.data.source!r}",
                )
            if self.evaluate.prompts is not None:
                raise _KeysError(
                    ("evaluate.protocol", "evaluate.prompts"),
                    "evaluate.protocol 'dreambench' uses the dataset's prompts; leave "
                    "evaluate.prompts unset",
                )
        return self

    @model_validator(mode="after")
    def _searched_dora_exportable(self) -> HarnessConfig:
        spec = self.sweep.space.get("use_dora")
        values = (spec.choices or []) if isinstance(spec, ParamSpec) else [spec]
        if self.train.export_kohya and True in values:
            raise _KeysError(
                ("sweep.space.use_dora", "train.export_kohya"),
                "sweep.space.use_dora can be true, which train.export_kohya does not support "
                "(diffusers' loader ignores kohya DoRA tensors); set export_kohya: false",
            )
        return self

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-compatible dict of the resolved configuration."""
        return self.model_dump(mode="json")
