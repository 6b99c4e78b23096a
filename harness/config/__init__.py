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

The package, in the order its modules import each other:

    _base.py     the strict base model and ConfigError
    sections.py  model, data, train, eval (InferenceSetting), metrics, tracking
    sweep.py     sweep: search space, inference grid, proxy, adaptive evaluation
    schema.py    evaluate, report, launch, seed spans, identity_dump, HarnessConfig
    loading.py   YAML, merging with the origin of every key, load_config, -S overrides

Example:
    >>> from harness.config import load_config
    >>> cfg = load_config("params.yaml")          # doctest: +SKIP
    >>> cfg.train.rank                              # doctest: +SKIP
    4
"""

from __future__ import annotations

from harness.config._base import ConfigError
from harness.config.loading import (
    DEFAULT_PARAMS,
    available_presets,
    combine_overrides,
    load_config,
    load_yaml,
    parse_override,
    validate_config,
)
from harness.config.schema import (
    TINY_VERSION,
    VALIDATION_KEYS,
    EvaluateConfig,
    HarnessConfig,
    LaunchConfig,
    ReportConfig,
    class_image_seeds,
    identity_dump,
    seed_overlap,
    seed_spans,
)
from harness.config.sections import (
    INFERENCE_DIMENSIONS,
    DataConfig,
    EvalConfig,
    InferenceSetting,
    MetricsConfig,
    ModelConfig,
    Scheduler,
    TrackingConfig,
    TrainConfig,
    validation_count,
)
from harness.config.sweep import (
    SEARCH_CONDITIONS,
    SEARCHABLE_TRAIN_PARAMS,
    AdaptiveEvaluation,
    InferenceGrid,
    ParamSpec,
    Rung,
    SweepConfig,
)

__all__ = [
    "DEFAULT_PARAMS",
    "INFERENCE_DIMENSIONS",
    "SEARCHABLE_TRAIN_PARAMS",
    "SEARCH_CONDITIONS",
    "TINY_VERSION",
    "VALIDATION_KEYS",
    "AdaptiveEvaluation",
    "ConfigError",
    "DataConfig",
    "EvalConfig",
    "EvaluateConfig",
    "HarnessConfig",
    "InferenceGrid",
    "InferenceSetting",
    "LaunchConfig",
    "MetricsConfig",
    "ModelConfig",
    "ParamSpec",
    "ReportConfig",
    "Rung",
    "Scheduler",
    "SweepConfig",
    "TrackingConfig",
    "TrainConfig",
    "available_presets",
    "class_image_seeds",
    "combine_overrides",
    "identity_dump",
    "load_config",
    "load_yaml",
    "parse_override",
    "seed_overlap",
    "seed_spans",
    "validate_config",
    "validation_count",
]
