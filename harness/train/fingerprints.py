"""What identifies a training run: the config hash and the data hash in every checkpoint.

A run resumes only from checkpoints whose two hashes equal its own, so a changed learning rate
or a replaced photo never continues someone else's trajectory.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from harness.config import VALIDATION_KEYS, HarnessConfig, identity_dump
from harness.train.microcond import TimeIds, class_time_ids
from harness.train.tensorfiles import content_hash, file_sha256

__all__ = ["config_hash", "data_hash", "hashed_time_ids"]

# Keys that do not change the training trajectory (so changing them keeps resume possible).
_NOT_HASHED = {"checkpoint_steps", "output_dir", "export_kohya", *VALIDATION_KEYS}


def config_hash(cfg: HarnessConfig) -> str:
    """Hash of everything in the config that affects the trained weights."""
    train = identity_dump("train", cfg.train, _NOT_HASHED)
    data = cfg.data.model_dump(mode="json")
    return content_hash(
        {
            "model": identity_dump("model", cfg.model, {"device"}),
            "train": train,
            "data": {k: data[k] for k in ("resolution", "token", "class_name")},
        }
    )[:16]


def data_hash(
    instance: Sequence[tuple[Path, str]],
    class_images: Sequence[Path],
    time_ids: Sequence[Sequence[TimeIds]] | None = None,
) -> str:
    """Hash of the instance images' bytes with their captions, of the class images' bytes and,
    when given, of the SDXL micro-conditioning (see :func:`hashed_time_ids`)."""
    payload: list[object] = [[file_sha256(Path(p)), c] for p, c in instance]
    payload += [file_sha256(Path(p)) for p in class_images]
    if time_ids is not None:  # appended: a hash without them is what it always was
        payload.append({"time_ids": [[list(t) for t in ids] for ids in time_ids]})
    return content_hash(payload)[:16]


def hashed_time_ids(
    family: str, resolution: int, time_ids: Sequence[Sequence[TimeIds]]
) -> Sequence[Sequence[TimeIds]] | None:
    """The micro-conditioning a run's data hash must cover: none for SD 1.x (its UNet has no
    time ids) and none when every photo's ids are the constant ``(res, res, 0, 0, res, res)``
    the trainer used before it read each photo's geometry, so those checkpoints resume; any
    other ids change the trajectory, so a checkpoint trained without them is not resumed."""
    constant = class_time_ids(resolution)
    if family != "sdxl" or all(t == constant for ids in time_ids for t in ids):
        return None
    return time_ids
