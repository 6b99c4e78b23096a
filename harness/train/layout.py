"""The file names of a checkpoint folder (:mod:`harness.train.state` describes the folder).

A module of its own without torch: the records of a run (:mod:`harness.train.records`), and
with them the report and ``harness sweep status``, name these files without importing torch.
"""

from __future__ import annotations

__all__ = [
    "ADAPTER_WEIGHTS",
    "CHECKPOINT_JSON",
    "EMA_TENSORS",
    "KOHYA_WEIGHTS",
    "STATE_DIR",
    "STATE_JSON",
    "STATE_TENSORS",
]

CHECKPOINT_JSON = "checkpoint.json"
STATE_DIR = "state"
STATE_TENSORS = ("lora.safetensors", "optimizer.safetensors", "rng.safetensors")
STATE_JSON = ("optimizer.json", "trainer.json")
EMA_TENSORS = "ema.safetensors"
ADAPTER_WEIGHTS = "pytorch_lora_weights.safetensors"  # diffusers' name (load_lora_weights)
KOHYA_WEIGHTS = "kohya_lora.safetensors"  # with train.export_kohya
