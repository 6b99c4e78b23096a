"""DreamBooth LoRA training for SD 1.x and SDXL, on accelerate.

The same call trains in one process (the sweep) or data-parallel in every process of
``accelerate launch --multi_gpu --num_processes N -m harness train`` (see
:mod:`harness.train.distributed`).

Example:
    >>> from harness.train import train_lora                      # doctest: +SKIP
    >>> result = train_lora(cfg, model, [(Path("a.png"), "a photo of sks dog")], Path("runs/t1"))
    >>> result.status, [c.step for c in result.checkpoints]        # doctest: +SKIP
    ('completed', [10, 20])
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

# The names below load on first use (PEP 562): `harness.train.records` and friends stay light,
# so a stage that only reads records (the report, `harness sweep status`) never imports torch.
_EXPORTS = {
    "CacheStats": "cache",
    "ensure_class_images": "cache",
    "model_identity": "cache",
    "config_hash": "fingerprints",
    "class_prompt_for": "inputs",
    "train_lora": "loop",
    "ADAPTER": "lora",
    "WEIGHTS_NAME": "lora",
    "CheckpointInfo": "records",
    "NonFiniteLossError": "records",
    "TrainingError": "records",
    "TrainingOOMError": "records",
    "TrainResult": "records",
    "TrainStatus": "records",
}

if TYPE_CHECKING:
    from harness.train.cache import CacheStats, ensure_class_images, model_identity
    from harness.train.fingerprints import config_hash
    from harness.train.inputs import class_prompt_for
    from harness.train.loop import train_lora
    from harness.train.lora import ADAPTER, WEIGHTS_NAME
    from harness.train.records import (
        CheckpointInfo,
        NonFiniteLossError,
        TrainingError,
        TrainingOOMError,
        TrainResult,
        TrainStatus,
    )


def __getattr__(name: str) -> Any:
    from harness._lazy import load_export

    return load_export(__name__, _EXPORTS, name)


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
