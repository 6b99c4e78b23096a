"""One typed, immutable configuration for the whole harness.

``params.yaml`` is the single source of truth. It names a preset from ``experiments/`` and may
override any key of it::

    preset: tiny-cpu
    train:
      rank: 8

The preset is deep-merged under the overrides, the result is validated strictly (unknown keys,
wrong types and impossible values are errors) and every error names the file that supplied the
offending key and its dotted path, e.g. ``experiments/preset/sd15-lora.yaml: train.rank: must
be >= 1, got 0``. Nothing loads a model before this succeeds.

Example:
    >>> from harness.config import load_config
    >>> cfg = load_config("params.yaml")          # doctest: +SKIP
    >>> cfg.train.rank                              # doctest: +SKIP
    4
"""

from __future__ import annotations

import contextlib
import difflib
import itertools
import math
import re
import string
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import UnionType
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)

from harness.compose import record_origin
from harness.errors import HarnessError

__all__ = [
    "INFERENCE_DIMENSIONS",
    "VALIDATION_KEYS",
    "ConfigError",
    "DataConfig",
    "EvalConfig",
    "EvaluateConfig",
    "HarnessConfig",
    "InferenceGrid",
    "InferenceSetting",
    "MetricsConfig",
    "ModelConfig",
    "ParamSpec",
    "ReportConfig",
    "SweepConfig",
    "TrackingConfig",
    "TrainConfig",
    "available_presets",
    "class_image_seeds",
    "load_config",
    "load_yaml",
    "seed_overlap",
    "seed_spans",
    "validate_config",
]

DEFAULT_PARAMS = "params.yaml"


class ConfigError(HarnessError, ValueError):
    """A configuration problem; its message names the file and the key path of each error."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("\n".join(problems))


class _KeysError(ValueError):
    """A section-level check that names the keys it is about (dotted, relative to the section).

    The error is still reported at the section, but blamed on the file that set those keys last,
    not on whichever file happened to set some unrelated key of the same section.
    """

    def __init__(self, keys: tuple[str, ...], message: str) -> None:
        self.keys = keys
        super().__init__(message)


def _yaml_bool_word(value: Any, false_word: str, allowed: tuple[str, ...]) -> Any:
    """Give back the documented word for a YAML 1.1 boolean read from an unquoted word.

    YAML 1.1 reads an unquoted ``off`` or ``no`` as ``False``, so ``mode: off`` or
    ``-S train.mixed_precision=no`` arrive as ``False``; that is mapped to ``false_word``.
    ``True`` (an unquoted ``on``/``yes``/``true``) has no meaning here and stays an error that
    names the allowed values.
    """
    if value is False:
        return false_word
    if value is True:
        words = [repr(a) for a in allowed]
        listed = f"{', '.join(words[:-1])} or {words[-1]}" if len(words) > 1 else words[0]
        raise ValueError(
            f"must be one of {listed}, got True (YAML reads an unquoted on/yes/true as true)"
        )
    return value


class _Strict(BaseModel):
    """Base of every config section: immutable, no unknown keys, no silent type coercion."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


# --------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------


class ModelConfig(_Strict):
    """Which base model to fine-tune, and where it runs."""

    pretrained: str = Field(
        "tiny://sd15",
        description="Hub id ('stable-diffusion-v1-5/stable-diffusion-v1-5'), local diffusers "
        "folder, single-file .safetensors checkpoint, or tiny://sd15 | tiny://sdxl.",
        min_length=1,
    )
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit).")
    variant: str | None = Field(None, description="Weight variant on the hub, e.g. 'fp16'.")
    single_file_config: str | None = Field(
        None,
        description="For a single-file checkpoint: hub id or local diffusers folder that "
        "supplies the component configs (scheduler, tokenizer). Default: inferred.",
    )
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    cache_dir: str | None = Field(None, description="Hugging Face cache dir (default: HF_HOME).")


SUBJECT_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"
SubjectName = Annotated[str, Field(min_length=1, pattern=SUBJECT_PATTERN)]


def _subjects_kind(value: Any) -> str:
    return "<list>" if isinstance(value, list | tuple) else "<all>"


# A list of subject names or ``all``; like ``sweep.evaluation``, the value's type picks the
# member, so a bad name is reported once, against the list (tags stay out of key paths).
Subjects = Annotated[
    Annotated[list[SubjectName], Tag("<list>")] | Annotated[Literal["all"], Tag("<all>")],
    Discriminator(_subjects_kind),
]


PROMPT_FIELDS = ("token", "class_name")
# DreamBench's prompt lists use ``{0}``/``{1}`` (generate.format_prompt fills both forms).
GENERATION_FIELDS = (*PROMPT_FIELDS, "0", "1", "")


def check_template(template: str, allowed: Sequence[str] = PROMPT_FIELDS) -> str:
    """``template`` when its placeholders are all ``allowed`` and its braces balance.

    Checked at validation, so a typo (``{clas}``) stops everything before a model loads, instead
    of a caption with a literal ``{clas}`` in it or a sweep whose every run fails at evaluation.
    """
    names = ", ".join(f"{{{name}}}" for name in allowed if name)
    try:
        fields = [field for _, field, _, _ in string.Formatter().parse(template)]
    except ValueError as exc:
        raise ValueError(f"template {template!r}: {exc} (braces go round {names})") from None
    for field in fields:
        name = None if field is None else re.split(r"[.\[]", field, maxsplit=1)[0]
        if name is not None and name not in allowed:
            raise ValueError(f"template {template!r}: unknown placeholder {{{name}}}; use {names}")
    return template


def check_prompts(templates: list[str]) -> list[str]:
    """:func:`check_template` for a list of generation prompts (``{0}``/``{1}`` allowed too)."""
    return [check_template(template, GENERATION_FIELDS) for template in templates]


class DataConfig(_Strict):
    """The subject dataset: where photos come from and how they are prepared."""

    subject: str = Field("sample", min_length=1, pattern=SUBJECT_PATTERN)
    subjects: Subjects | None = Field(
        None,
        description="Several subjects (folder or dreambench sources): every training "
        "configuration is trained once per subject and each point scored by the mean over "
        "subjects; 'all': every subject folder of the source. Replaces data.subject.",
    )
    source: Literal["sample", "folder", "dreambench"] = Field(
        "sample",
        description="sample: generated by the project; folder: raw_dir/<subject>; "
        "dreambench: dreambench_dir/<subject> (a DreamBench-style folder, read in place).",
    )
    raw_dir: str = "data/raw"
    prepared_dir: str = "data/prepared"
    dreambench_dir: str | None = None
    class_name: str | None = Field(
        None, description="Class noun; for dreambench read from prompts_and_classes.txt."
    )
    token: str = Field(
        "sks",
        min_length=1,
        pattern=r"^\S+$",
        description="The identifier in captions and prompts ({token}). auto (recommended for "
        "new subjects): the prepare stage picks a rare one-piece token of the model's "
        "tokenizer that is no common word (sks is a rifle) and records it in manifest.json.",
    )
    token_seed: int = Field(
        0, ge=0, description="Which rare token data.token: auto picks (same seed, same token)."
    )
    caption_template: str = "a photo of {token} {class_name}"
    missing_caption: Literal["template", "reject"] = Field(
        "template",
        description="A photo without a caption when others have one (captions.txt or sidecar "
        ".txt files): template: caption it with caption_template, with a warning (kohya's "
        "behaviour); reject: reject it as 'missing caption'.",
    )
    resolution: int = Field(64, ge=8)
    min_side: int = Field(64, ge=1)
    upscale_small: bool = False
    crop: Literal["center", "none"] = "center"
    background: str = Field("#ffffff", pattern=r"^#[0-9a-fA-F]{6}$")
    grayscale: bool = False
    val_fraction: float = Field(0.2, ge=0.0, lt=1.0)
    min_images: int = Field(3, ge=1)
    dedupe_threshold: int = Field(
        4, ge=0, le=64, description="Max perceptual-hash Hamming distance of near-duplicates."
    )
    split_seed: int = 0
    reference: Literal["all", "val"] = Field(
        "all",
        description="Real reference photos for the metrics: all photos (DreamBooth paper "
        "protocol, few photos) or only the held-out validation split.",
    )
    sample_images: int = Field(12, ge=1, description="Photos drawn for the sample subject.")
    max_image_pixels: int = Field(
        89_478_485, ge=1, description="Decompression-bomb guard (Pillow's default)."
    )

    @field_validator("resolution")
    @classmethod
    def _multiple_of_8(cls, value: int) -> int:
        if value % 8:
            raise ValueError(f"must be a multiple of 8, got {value}")
        return value

    @field_validator("subjects")
    @classmethod
    def _distinct_subjects(cls, value: list[str] | str | None) -> list[str] | str | None:
        if isinstance(value, list):
            if not value:
                raise ValueError("must name at least one subject (or be 'all')")
            repeated = sorted({s for s in value if value.count(s) > 1})
            if repeated:
                raise ValueError(f"names a subject twice: {', '.join(repeated)}")
        return value

    @field_validator("caption_template")
    @classmethod
    def _template_has_token(cls, value: str) -> str:
        if "{token}" not in value:
            raise ValueError(f"must contain '{{token}}', got {value!r}")
        return check_template(value)

    @model_validator(mode="after")
    def _split_leaves_training_images(self) -> DataConfig:
        n_val = validation_count(self.min_images, self.val_fraction)
        if self.min_images - n_val < 1:
            raise _KeysError(
                ("val_fraction", "min_images"),
                f"val_fraction={self.val_fraction} leaves no training image when only "
                f"min_images={self.min_images} photos remain",
            )
        if self.reference == "val" and self.val_fraction == 0:
            raise _KeysError(
                ("reference", "val_fraction"),
                "reference 'val' needs val_fraction > 0 (no photo is held out)",
            )
        if self.subjects is not None:
            _check_subjects(self)
        if self.source == "dreambench" and not self.dreambench_dir:
            raise _KeysError(
                ("source", "dreambench_dir"), "source 'dreambench' needs data.dreambench_dir"
            )
        return self


def _check_subjects(cfg: DataConfig) -> None:
    """``data.subjects`` comes from a source that has several subjects."""
    if cfg.source == "sample":
        raise _KeysError(
            ("subjects", "source"),
            "data.subjects needs source 'folder' (raw_dir/<subject>) or 'dreambench': the "
            "sample source makes one subject",
        )


def validation_count(n_images: int, val_fraction: float) -> int:
    """Number of validation photos for ``n_images`` photos (the split rule, used everywhere).

    ``round-half-up(n * val_fraction)``, at least one when ``val_fraction > 0``. It is never
    clamped to keep a training image: a split that leaves none is a config error instead.
    """
    if val_fraction <= 0:
        return 0
    return max(1, math.floor(n_images * val_fraction + 0.5))


class TrainConfig(_Strict):
    """DreamBooth LoRA training."""

    rank: int = Field(4, ge=1)
    alpha: float | None = Field(None, gt=0, description="LoRA alpha; default: equal to rank.")
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    target_modules: list[str] = Field(
        default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"], min_length=1
    )
    train_text_encoder: bool = False
    text_encoder_rank: int | None = Field(None, ge=1)
    text_encoder_target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "out_proj"], min_length=1
    )
    learning_rate: float = Field(1e-4, gt=0)
    text_encoder_lr: float = Field(5e-5, gt=0)
    max_steps: int = Field(20, ge=1)
    checkpoint_steps: list[int] = Field(default_factory=lambda: [10, 20])
    batch_size: int = Field(1, ge=1)
    gradient_accumulation_steps: int = Field(1, ge=1)
    lr_scheduler: Literal["constant", "constant_with_warmup", "linear", "cosine"] = "constant"
    lr_warmup_steps: int = Field(0, ge=0)
    adam_weight_decay: float = Field(1e-2, ge=0)
    max_grad_norm: float = Field(1.0, gt=0)
    prior_preservation: bool = False
    prior_loss_weight: float = Field(1.0, ge=0)
    num_class_images: int = Field(8, ge=1)
    class_prompt: str = "a photo of {class_name}"
    class_inference_steps: int = Field(25, ge=1, description="Steps to generate class images.")
    class_guidance_scale: float = Field(7.5, ge=0.0)
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    gradient_checkpointing: bool = False
    snr_gamma: float | None = Field(
        None,
        gt=0,
        description="Min-SNR-gamma loss weighting (Hang et al. 2023; 5.0 is the paper's and "
        "kohya's usual value): each sample's loss times min(SNR, gamma) / SNR (v-prediction: "
        "/ (SNR + 1)). None: plain MSE.",
    )
    noise_offset: float = Field(
        0.0,
        ge=0.0,
        description="Offset noise: adds noise_offset x N(0, 1) per sample and channel to the "
        "training noise (diffusers' --noise_offset, kohya's; ~0.05 lets images get darker "
        "and brighter). 0: off.",
    )
    random_flip: float = Field(
        0.0,
        ge=0.0,
        le=1.0,
        description="Probability of mirroring a training photo horizontally (both "
        "orientations are encoded once and cached). Off by default: it mirrors asymmetric "
        "subjects (text, a logo, a one-sided marking).",
    )
    optimizer: Literal["adamw", "adamw8bit", "prodigy"] = Field(
        "adamw",
        description="adamw: torch AdamW. adamw8bit: bitsandbytes' 8-bit AdamW (CUDA only; the "
        "'cuda' extra). prodigy: Prodigy (Mishchenko & Defazio 2023), which estimates its own "
        "step size: learning_rate and text_encoder_lr are ignored (lr multiplier 1.0).",
    )
    use_dora: bool = Field(
        False,
        description="DoRA (Liu et al. 2024; peft's use_dora): LoRA plus a learned magnitude "
        "per output channel, for the UNet and text-encoder adapters. Not with export_kohya.",
    )
    text_encoder_alpha: float | None = Field(
        None,
        gt=0,
        description="LoRA alpha of the text-encoder adapters; default: alpha x "
        "text_encoder_rank / rank (the UNet's alpha/rank scale).",
    )
    ema_decay: float | None = Field(
        None,
        gt=0,
        lt=1,
        description="EMA of the adapter weights (fp32, after every optimizer step, from the "
        "initial weights, no warmup): checkpoints' adapters hold the average. None: off.",
    )
    seed: int = 0
    validation_steps: int | None = Field(
        None,
        ge=1,
        description="Validation images every N optimizer steps and after the last one "
        "(run_dir/validation/step-N/, and the tracker), generated with the eval settings "
        "without changing the training trajectory. None: off.",
    )
    validation_prompts: list[str] = Field(
        default_factory=lambda: [
            "a photo of {token} {class_name}",
            "a {token} {class_name} on the beach",
        ],
        min_length=1,
        description="Validation prompt templates ({token}, {class_name}); one image each.",
    )
    validation_seed: int = Field(0, ge=0, description="The seed of every validation image.")
    export_kohya: bool = False
    output_dir: str = "runs/train"

    @field_validator("validation_prompts")
    @classmethod
    def _known_placeholders(cls, value: list[str]) -> list[str]:
        return check_prompts(value)

    @field_validator("class_prompt")
    @classmethod
    def _class_prompt_placeholders(cls, value: str) -> str:
        return check_template(value)

    @field_validator("mixed_precision", mode="before")
    @classmethod
    def _unquoted_no(cls, value: Any) -> Any:
        allowed = get_args(cls.model_fields["mixed_precision"].annotation)
        return _yaml_bool_word(value, "no", allowed)

    @model_validator(mode="after")
    def _steps_consistent(self) -> TrainConfig:
        bad = [s for s in self.checkpoint_steps if not 1 <= s <= self.max_steps]
        if bad:
            raise _KeysError(
                ("checkpoint_steps", "max_steps"),
                f"checkpoint_steps {bad} outside 1..max_steps={self.max_steps}",
            )
        if self.checkpoint_steps != sorted(set(self.checkpoint_steps)):
            raise _KeysError(
                ("checkpoint_steps",),
                f"checkpoint_steps must be increasing, got {self.checkpoint_steps}",
            )
        if self.lr_warmup_steps > self.max_steps:
            raise _KeysError(
                ("lr_warmup_steps", "max_steps"),
                f"lr_warmup_steps={self.lr_warmup_steps} exceeds max_steps={self.max_steps}",
            )
        return self

    @model_validator(mode="after")
    def _dora_not_kohya(self) -> TrainConfig:
        if self.use_dora and self.export_kohya:
            # diffusers' loader drops kohya DoRA keys (dora_scale) with a warning: a file that
            # loads as plain LoRA would silently not be the trained adapter.
            raise _KeysError(
                ("use_dora", "export_kohya"),
                "use_dora cannot be exported with export_kohya (diffusers' loader ignores kohya "
                "DoRA tensors); use the diffusers-format file or set export_kohya: false",
            )
        return self


Scheduler = Literal["ddim", "dpmsolver++", "unipc", "euler", "euler_a", "pndm", "ddpm"]


class InferenceSetting(_Strict):
    """One inference setting: the one definition used by ``eval`` (its single setting),
    ``sweep.inference`` (a grid of them), the search space, generation and the results table.

    Its numeric fields (:data:`INFERENCE_DIMENSIONS`) are the swept inference dimensions; the
    scheduler is ``eval.scheduler``, or one of ``sweep.inference.scheduler``'s when a sweep
    searches it.
    """

    guidance_scale: float = Field(default=7.5, ge=0.0)
    lora_scale: float = Field(default=1.0, ge=0.0, description="UNet LoRA scale.")
    text_encoder_lora_scale: float = Field(default=1.0, ge=0.0)
    num_inference_steps: int = Field(default=25, ge=1)
    scheduler: Scheduler = "dpmsolver++"

    @property
    def id(self) -> str:
        """A short, stable, filesystem-safe name, e.g. ``g7.5-u1-t1-n25-dpmsolver++``."""
        return (
            f"g{self.guidance_scale:g}-u{self.lora_scale:g}-t{self.text_encoder_lora_scale:g}"
            f"-n{self.num_inference_steps}-{self.scheduler}"
        )

    def dimensions(self) -> dict[str, float | int]:
        """The swept values by name (:data:`INFERENCE_DIMENSIONS` order)."""
        return {name: getattr(self, name) for name in INFERENCE_DIMENSIONS}


# The swept inference dimensions: every numeric field of InferenceSetting, in one order.
INFERENCE_DIMENSIONS = (
    "guidance_scale",
    "lora_scale",
    "text_encoder_lora_scale",
    "num_inference_steps",
)


class EvalConfig(InferenceSetting):
    """Generation for evaluation: prompts x seeds, under the inference setting whose fields it
    inherits (guidance, LoRA scales, steps, scheduler)."""

    prompts: list[str] = Field(
        default_factory=lambda: [
            "a photo of {token} {class_name}",
            "a {token} {class_name} on the beach",
            "a {token} {class_name} in the snow",
            "a red {token} {class_name}",
        ],
        min_length=1,
    )

    @field_validator("prompts")
    @classmethod
    def _known_placeholders(cls, value: list[str]) -> list[str]:
        return check_prompts(value)

    prompt_source: Literal["config", "dataset"] = Field(
        "config",
        description="config: eval.prompts; dataset: the prompts shipped with the subject "
        "(DreamBench's 25 object or live-subject prompts).",
    )
    images_per_prompt: int = Field(4, ge=1)
    seed: int = 0
    resolution: int | None = Field(None, ge=8, description="Default: data.resolution.")
    batch_size: int = Field(4, ge=1)
    prior_preservation_images: int = Field(
        0,
        ge=0,
        description="Images of the bare class prompt (train.class_prompt) per setting for PRES "
        "(DINO vs the subject, lower is better); 0 = not measured.",
    )
    fuse_lora: bool = Field(
        False,
        description="Fuse the scaled LoRA into the base weights for each inference setting (no "
        "LoRA branch in the denoising loop); the base weights are restored exactly afterwards. "
        "`harness bench --generation` measures whether it is faster on your hardware.",
    )
    compile: bool = Field(
        False,
        description="Regional torch.compile of the denoiser's repeated transformer blocks while "
        "generating (training stays eager); compiles on first use and again when a new adapter "
        "changes the blocks. `harness bench --generation` measures it.",
    )
    channels_last: bool = Field(
        False,
        description="Run the UNet and the VAE in the channels-last (NHWC) memory layout while "
        "generating, the layout tensor cores' convolutions prefer (diffusers' speed-up guide); "
        "the weights are put back in the default layout afterwards. `harness bench "
        "--generation` measures it.",
    )

    @property
    def setting(self) -> InferenceSetting:
        """The single inference setting this section configures (``harness generate``, the
        proxy evaluation and the baseline)."""
        return InferenceSetting.model_validate({**self.dimensions(), "scheduler": self.scheduler})


class MetricsConfig(_Strict):
    """Scoring models and protocol options (passed to the standalone ``metrics`` package)."""

    dino_model: str = Field("timm/vit_small_patch16_224.dino", min_length=1)
    clip_model: str = Field("ViT-B-32", min_length=1)
    clip_pretrained: str | None = "openai"
    identifier_policy: Literal["remove", "keep", "replace_with_class"] = "remove"
    batch_size: int = Field(16, ge=1)
    bootstrap_samples: int = Field(1000, ge=0)
    lpips_weights: str | None = Field(
        None,
        min_length=1,
        description="LPIPS weights of DIV (the paper's: mean LPIPS among images of a prompt): "
        "a .safetensors file from `python -m metrics lpips-convert`, or tiny (random, for "
        "tests); null: DIV not measured (div_dino, the DINO-based diversity, still is).",
    )


class TrackingConfig(_Strict):
    """Experiment tracking (ClearML)."""

    mode: Literal["auto", "online", "offline", "off"] = Field(
        "auto", description="auto: online when a server is configured, else offline."
    )
    project: str = Field("dreambooth-sweep", min_length=1)
    strict: bool = Field(False, description="Unreachable server: error instead of offline.")
    offline_dir: str = "runs/clearml"
    connect_timeout_s: float = Field(3.0, gt=0, le=60)

    @field_validator("mode", mode="before")
    @classmethod
    def _unquoted_off(cls, value: Any) -> Any:
        return _yaml_bool_word(value, "off", get_args(cls.model_fields["mode"].annotation))


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


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


class DuplicateKeyError(yaml.YAMLError):
    """A mapping that names a key twice (PyYAML would silently keep the last one)."""

    def __init__(self, key: str, line: int, first: int) -> None:
        super().__init__(f"duplicate key {key!r} at line {line} (first at line {first})")
        self.key, self.line, self.first = key, line, first


class _YamlLoader(yaml.SafeLoader):
    """Safe loader that also reads ``1e-4`` as a float (YAML 1.1 would give a string) and
    refuses a key given twice in one mapping, as DVC's own YAML reader does: PyYAML keeps the
    last, so a second ``train:`` block appended to params.yaml replaced the whole section."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if isinstance(key, str | int | float | bool) and key in seen:
                raise DuplicateKeyError(str(key), line, seen[key])
            seen.setdefault(key, line)
        return super().construct_mapping(node, deep=deep)


_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+][0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping (safe loader); errors name the file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError([f"{path}: file not found"]) from None
    except UnicodeDecodeError as exc:
        raise ConfigError([f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})"]) from None
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read: {(exc.strerror or str(exc)).lower()}"]) from None
    try:
        data = yaml.load(text, Loader=_YamlLoader)  # noqa: S506 - _YamlLoader is a SafeLoader
    except DuplicateKeyError as exc:
        raise ConfigError(
            [
                f"{path}:{exc.line}: duplicate key {exc.key!r} (first at line {exc.first}); merge the two"
            ]
        ) from None
    except yaml.YAMLError as exc:
        raise ConfigError([_yaml_problem(path, text, exc)]) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError([f"{path}: top level must be a mapping, got {type(data).__name__}"])
    return data


def _yaml_problem(path: Path, text: str, exc: yaml.YAMLError) -> str:
    """One line ``<file>:<line>:<col>: invalid YAML: <problem>`` (1-based, as editors count).

    PyYAML's own text spans several lines and names ``<unicode string>`` (it parsed a string,
    not the file), so each line would print as its own ``error:`` with no usable position.
    """
    where, problem = "", str(exc)
    if isinstance(exc, yaml.MarkedYAMLError) and exc.problem_mark is not None:
        mark = exc.problem_mark
        where = f":{mark.line + 1}:{mark.column + 1}"
        problem = exc.problem or exc.context or "syntax error"
        if exc.problem and exc.context and exc.context_mark is not None:
            # "expected ']'" at the end of the file is only clear with where the list began.
            start = exc.context_mark
            problem += f" ({exc.context} at line {start.line + 1}, column {start.column + 1})"
    elif isinstance(exc, yaml.reader.ReaderError):
        # A character the YAML reader refuses carries an offset into the text, not a mark.
        lines = text[: exc.position].split("\n")
        where = f":{len(lines)}:{len(lines[-1]) + 1}"
        char = f"#x{exc.character:04x}" if isinstance(exc.character, int) else repr(exc.character)
        problem = f"unacceptable character {char}: {exc.reason}"
    return f"{path}{where}: invalid YAML: {' '.join(problem.split())}"


def available_presets(root: str | Path = ".") -> list[str]:
    """Names of the presets in ``<root>/experiments/preset``."""
    from harness.compose import available_presets as names

    return names(root)


# Mappings whose values are whole specs ("*" matches any key): a later file replaces such a value
# as a unit instead of merging keys into it, so a ``{choices: [...]}`` entry in params.yaml does not
# inherit the preset's ``low``/``high`` and a user's ``weights`` do not keep the preset's keys.
ATOMIC_PATHS: tuple[tuple[str, ...], ...] = (
    ("sweep", "space", "*"),
    ("sweep", "weights"),
    ("sweep", "evaluation"),
)


class _Dotted(dict[str, Any]):
    """A mapping that :func:`parse_override` built from the dots of a key (``sweep.weights`` of
    ``-S sweep.weights.dino=0.7``), not one the user wrote as a value (``-S 'sweep.weights={dino:
    0.7}'``): :func:`_merge` merges it even at an :data:`ATOMIC_PATHS` path, so a dotted key
    sets one leaf, as Hydra's and ``dvc exp run -S`` do. Never left in a merged config
    (:func:`_undotted`): yaml.safe_dump cannot write a dict subclass."""


class _Whole(dict[str, Any]):
    """A mapping that replaces the config's mapping as a whole wherever it is merged: what
    ``-S`` sets after deleting the key (``-S '~sweep.space.dropout' -S
    '+sweep.space.dropout={choices:[0.0]}'``), as Hydra's and ``dvc exp run -S``'s ``~``/``+``."""


class _Deleted:
    """The value of ``-S '~key'``: :func:`_merge` keeps it, :func:`_undotted` drops the key."""

    def __repr__(self) -> str:
        return "<deleted>"


_DELETED = _Deleted()


def _undotted(value: Any) -> Any:
    """``value`` with every mapping a plain ``dict`` (no :class:`_Dotted` or :class:`_Whole`
    marker left) and every key deleted by ``-S '~key'`` gone."""
    if isinstance(value, dict):
        return {key: _undotted(sub) for key, sub in value.items() if sub is not _DELETED}
    return value


def _is_atomic(path: tuple[str, ...]) -> bool:
    return any(
        len(pattern) == len(path) and all(p in ("*", k) for p, k in zip(pattern, path, strict=True))
        for pattern in ATOMIC_PATHS
    )


def _merge(
    base: Mapping[str, Any],
    override: Mapping[str, Any],
    origin: dict[tuple[str, ...], str],
    source: str,
    prefix: tuple[str, ...] = (),
) -> dict[str, Any]:
    """Deep-merge ``override`` into a copy of ``base``, recording which file set each key.

    Mappings merge key by key, except at :data:`ATOMIC_PATHS` where only a :class:`_Dotted`
    one (from a dotted ``-S`` key) merges; anything else (lists included) is replaced; a
    :class:`_Whole` one always replaces. A ``_Dotted`` or ``_Whole`` base stays one, so
    :func:`combine_overrides` keeps the marks for the config.
    """
    out: dict[str, Any] = type(base)(base) if isinstance(base, _Dotted | _Whole) else dict(base)
    for key, value in override.items():
        path = (*prefix, str(key))
        here = out.get(key)
        if here is _DELETED and isinstance(value, Mapping):
            value = _Whole(_undotted(value))  # set after a deletion: no old key survives
        if (
            isinstance(value, Mapping)
            and isinstance(here, Mapping)
            and not isinstance(value, _Whole)
            and (isinstance(value, _Dotted) or not _is_atomic(path))
        ):
            out[key] = _merge(here, value, origin, source, path)
        else:
            out[key] = value
            for known in [p for p in origin if p[: len(path)] == path]:
                del origin[known]
            record_origin(origin, value, source, path)
    return out


def _source_of(
    loc: tuple[str, ...],
    origin: Mapping[tuple[str, ...], str],
    default: str,
    keys: tuple[str, ...] = (),
) -> str:
    """The file to blame for an error at ``loc``.

    The latest-applied source among the keys at or under ``loc`` (for a section-level check,
    the keys it names in ``keys``, dotted and relative to ``loc``, when any file set them):
    ``origin`` is in application order, so the last hit has the highest priority. An error
    below anything a file set (a missing key, a union member) goes to the nearest parent a file
    set; with no file at all, ``default``.
    """
    named = [(*loc, *key.split(".")) for key in keys]
    for targets in (named, [loc]):
        hits = [src for path, src in origin.items() if any(path[: len(t)] == t for t in targets)]
        if hits:
            return hits[-1]
    for n in range(len(loc) - 1, 0, -1):
        if loc[:n] in origin:
            return origin[loc[:n]]
    return default


def _describe(err: Mapping[str, Any], siblings: list[str]) -> str:
    """Turn one pydantic error into a short human sentence."""
    kind, ctx, got = err["type"], err.get("ctx") or {}, err.get("input")
    bounds = {
        "greater_than_equal": (">=", "ge"),
        "greater_than": (">", "gt"),
        "less_than_equal": ("<=", "le"),
        "less_than": ("<", "lt"),
    }
    if kind in bounds:
        op, key = bounds[kind]
        return f"must be {op} {ctx[key]}, got {got!r}"
    if kind == "extra_forbidden":
        name = str(err["loc"][-1])
        close = difflib.get_close_matches(name, siblings, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        return f"unknown key{hint}; allowed: {', '.join(sorted(siblings))}"
    if kind == "missing":
        return "required key is missing"
    if kind == "literal_error":
        return f"must be one of {ctx.get('expected')}, got {got!r}"
    if kind.endswith("_type") or kind.endswith("_parsing"):
        expected = kind.removesuffix("_type").removesuffix("_parsing")
        return f"expected {expected}, got {type(got).__name__} {got!r}"
    if kind == "value_error":
        return str(ctx.get("error", err["msg"]))
    return f"{err['msg']}, got {got!r}"


def _fields_at(loc: tuple[str, ...]) -> list[str]:
    """Allowed keys of the section that contains ``loc[-1]``."""
    model: type[BaseModel] = HarnessConfig
    parts = iter(loc[:-1])
    for part in parts:
        field = model.model_fields.get(part)
        found = _model_in(field.annotation) if field else None
        if found is None:
            return []
        # ``sweep.space.<name>``, ``sweep.evaluation.rungs.<index>``: after a dict or list
        # field the next part is a key or an index into it, not a field of the item's model.
        if field is not None and _is_container(field.annotation) and next(parts, None) is None:
            return []
        model = found
    return list(model.model_fields)


def _is_container(annotation: Any) -> bool:
    """Whether an annotation is a dict or list (or an optional / annotated one)."""
    origin = get_origin(annotation)
    if origin in (dict, list, tuple):
        return True
    if origin is Annotated:
        return _is_container(get_args(annotation)[0])
    if origin in (Union, UnionType):  # ``list[X] | None``
        return any(_is_container(member) for member in get_args(annotation))
    return False


def _model_in(annotation: Any) -> type[BaseModel] | None:
    """The config section an annotation holds: itself, or the section member of a union
    (``sweep.evaluation``)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in get_args(annotation):
        found = _model_in(arg)
        if found is not None:
            return found
    return None


def validate_config(
    data: Mapping[str, Any],
    origin: Mapping[tuple[str, ...], str] | None = None,
    default_source: str = DEFAULT_PARAMS,
) -> HarnessConfig:
    """Validate a merged config mapping; raise :class:`ConfigError` naming file and key path."""
    try:
        return HarnessConfig.model_validate(dict(data))
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            loc = tuple(str(p) for p in err["loc"] if not str(p).startswith("<"))
            cause = (err.get("ctx") or {}).get("error")
            keys = cause.keys if isinstance(cause, _KeysError) else ()
            src = _source_of(loc, origin or {}, default_source, keys)
            where = ".".join(loc) if loc else ", ".join(keys) or "(top level)"
            problems.append(f"{src}: {where}: {_describe(err, _fields_at(loc))}")
        raise ConfigError(problems) from None


def load_config(
    params: str | Path = DEFAULT_PARAMS,
    overrides: Mapping[str, Any] | None = None,
    root: str | Path | None = None,
) -> HarnessConfig:
    """Load ``params.yaml``, then validate strictly.

    A composed ``params.yaml`` (every section, as ``dvc exp run`` or ``harness config compose``
    writes it) is the whole config and is used as is. A hand-written one with only ``preset:``
    and a few keys is merged over the composition of ``experiments/`` with that preset. ``-S
    preset=<name>`` recomposes from ``experiments/`` (params.yaml is then not read), as ``dvc exp
    run -S preset=<name>`` does. Other overrides apply last.

    Args:
        params: path of the params file.
        overrides: extra nested overrides applied last (e.g. from ``-S`` style CLI options).
        root: project root holding ``experiments/``; defaults to the params file's folder.

    Raises:
        ConfigError: with one line per problem, each naming the file and the dotted key path.
    """
    from harness.compose import compose, is_composed

    params = Path(params)
    root = Path(root) if root is not None else params.parent
    user = load_yaml(params)
    switching = bool(overrides) and "preset" in (overrides or {})
    preset, source = (overrides or {}).get("preset"), "command line"
    if not switching:
        preset, source = user.get("preset"), str(params)
    if preset is _DELETED:
        raise ConfigError([f"{source}: ~preset: a preset cannot be deleted; -S preset=<name>"])
    if preset is not None and not isinstance(preset, str):
        raise ConfigError([f"{source}: preset: expected str, got {type(preset).__name__}"])
    composition = compose(root, preset, source)
    merged, origin = composition.data, composition.origin
    if not (switching and is_composed(user)):
        # A partial params.yaml keeps its overrides across a preset switch; a composed one
        # belongs to the preset it was composed with.
        user = {k: v for k, v in user.items() if not (switching and k == "preset")}
        merged, origin = _apply_params(merged, origin, user, str(params))
    if overrides:
        merged = _undotted(_merge(merged, overrides, origin, "command line"))
    return validate_config(merged, origin, str(params))


_MISSING = object()


def _value_at(data: Any, path: tuple[str, ...]) -> Any:
    for key in path:
        if not isinstance(data, Mapping) or key not in data:
            return _MISSING
        data = data[key]
    return data


def _apply_params(
    base: dict[str, Any],
    origin: dict[tuple[str, ...], str],
    user: dict[str, Any],
    label: str,
) -> tuple[dict[str, Any], dict[tuple[str, ...], str]]:
    """``params.yaml`` applied to the composition of ``experiments/``: ``(config, origin)``.

    A composed params.yaml replaces the composition (a key deleted from it stays deleted); its
    keys that still equal the composition keep their experiments/ file as origin, so an error
    in a preset's value names the preset. A partial one is merged over the composition.
    """
    from harness.compose import is_composed

    if not is_composed(user):
        return _merge(base, user, origin, label), origin
    mine: dict[tuple[str, ...], str] = {}
    record_origin(mine, user, label, ())
    same = {
        path: src
        for path, src in origin.items()
        if path in mine and _identical(_value_at(user, path), _value_at(base, path))
    }
    # Differing keys come last: in `origin` the last hit is the highest-priority source.
    return dict(user), {**same, **{p: label for p in mine if p not in same}}


def _identical(a: Any, b: Any) -> bool:
    """Equal and of the same types throughout: ``4.0 == 4`` and ``0 == False`` in Python, but a
    params.yaml value of another type is the user's edit, not the preset's value."""
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        return a.keys() == b.keys() and all(_identical(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_identical(x, y) for x, y in zip(a, b, strict=True))
    return type(a) is type(b) and a == b


def _override_value(item: str, raw: str) -> Any:
    """The value of ``-S`` ``item``: a mapping or list (``{...}``, ``[...]``) as Hydra's override
    grammar reads it, so that ``harness -S`` means what ``dvc exp run -S`` means (YAML reads
    ``{dino:0.7}`` as the key ``dino:0.7``, Hydra as ``{"dino": 0.7}``); anything else, or a
    value that grammar refuses (a prompt with unquoted braces), as YAML."""
    if raw.lstrip()[:1] in ("{", "["):
        from hydra.core.override_parser.overrides_parser import OverridesParser
        from hydra.errors import HydraException

        with contextlib.suppress(HydraException):
            return OverridesParser.create().parse_override(f"value={raw}").value()
    try:
        return yaml.load(raw, Loader=_YamlLoader)  # noqa: S506 - _YamlLoader is a SafeLoader
    except yaml.YAMLError as exc:
        problem = " ".join(str(getattr(exc, "problem", None) or exc).split())
        raise ConfigError([f"command line: {item!r}: invalid YAML value ({problem})"]) from None


def parse_override(item: str) -> dict[str, Any]:
    """Turn ``train.rank=8`` into ``{"train": {"rank": 8}}`` (the value: :func:`_override_value`).

    Hydra's prefixes, as ``dvc exp run -S`` takes them: ``~key`` deletes the key (a
    ``sweep.space`` entry: no longer searched; a setting: back to its default), ``+key=value``
    and ``++key=value`` set it as ``key=value`` does.
    """
    if item.startswith("~"):
        if "=" in item:
            raise ConfigError([f"command line: {item!r}: write ~KEY, without a value"])
        key, value = item[1:], _DELETED
    elif "=" not in item:
        raise ConfigError([f"command line: {item!r}: expected KEY=VALUE"])
    else:
        key, raw = item.lstrip("+").split("=", 1)
        value = _override_value(item, raw)
    parts = [p for p in key.strip().split(".") if p]
    if not parts:
        raise ConfigError([f"command line: {item!r}: empty key"])
    # The mappings made from the dots are marked: below an atomic path (``sweep.weights.dino``)
    # they set one key, where a mapping written as the value replaces the whole entry.
    out: dict[str, Any] = {parts[-1]: value}
    for part in reversed(parts[:-1]):
        out = {part: _Dotted(out)}
    return out


def combine_overrides(items: Sequence[str]) -> dict[str, Any]:
    """Several ``-S`` items as one ``overrides`` mapping for :func:`load_config`, each applied
    after the ones before as :func:`load_config` applies them to the config: a later mapping
    written whole (``sweep.weights={dino: 1}``) replaces what an earlier dotted key set there,
    and dotted keys of one mapping (``sweep.weights.dino=.7``, ``sweep.weights.clip_t=.3``)
    combine and still merge into the preset's mapping."""
    combined: dict[str, Any] = {}
    for item in items:
        combined = _merge(combined, parse_override(item), {}, "command line")
    return combined
