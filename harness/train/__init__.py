"""DreamBooth LoRA training for SD 1.x and SDXL.

Example:
    >>> from harness.train import train_lora                      # doctest: +SKIP
    >>> result = train_lora(cfg, model, [(Path("a.png"), "a photo of sks dog")], Path("runs/t1"))
    >>> result.status, [c.step for c in result.checkpoints]        # doctest: +SKIP
    ('completed', [10, 20])
"""

from __future__ import annotations

from harness.train.cache import CacheStats, ensure_class_images, model_identity
from harness.train.loop import class_prompt_for, config_hash, train_lora
from harness.train.lora import ADAPTER, WEIGHTS_NAME
from harness.train.types import (
    CheckpointInfo,
    NonFiniteLossError,
    TrainingError,
    TrainingOOMError,
    TrainResult,
    TrainStatus,
)

__all__ = [
    "ADAPTER",
    "WEIGHTS_NAME",
    "CacheStats",
    "CheckpointInfo",
    "NonFiniteLossError",
    "TrainResult",
    "TrainStatus",
    "TrainingError",
    "TrainingOOMError",
    "class_prompt_for",
    "config_hash",
    "ensure_class_images",
    "model_identity",
    "train_lora",
]
