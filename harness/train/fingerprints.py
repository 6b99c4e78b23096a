"""What identifies a training run: the config hash and the data hash in every checkpoint.

A run resumes only from checkpoints whose two hashes equal its own, so a changed learning rate
or a replaced photo never continues someone else's trajectory.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from harness.config import HarnessConfig, identity_dump
from harness.train.tensorfiles import content_hash, file_sha256

__all__ = ["config_hash", "data_hash"]

# Keys that do not change the training trajectory (so changing them keeps resume possible).
_NOT_HASHED = {"checkpoint_steps", "output_dir", "export_kohya"}


def config_hash(cfg: HarnessConfig) -> str:
    """Hash of everything in the config that affects the trained weights."""
    train = identity_dump("train", cfg.train, _NOT_HASHED)
    model = {k: v for k, v in cfg.model.model_dump(mode="json").items() if k != "device"}
    data = cfg.data.model_dump(mode="json")
    return content_hash(
        {
            "model": model,
            "train": train,
            "data": {k: data[k] for k in ("resolution", "token", "class_name")},
        }
    )[:16]


def data_hash(instance: Sequence[tuple[Path, str]], class_images: Sequence[Path]) -> str:
    """Hash of the instance images' bytes with their captions and of the class images' bytes."""
    return content_hash(
        [[file_sha256(Path(p)), c] for p, c in instance]
        + [file_sha256(Path(p)) for p in class_images]
    )[:16]
