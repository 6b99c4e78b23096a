"""SDXL micro-conditioning: each training photo's ``add_time_ids`` from its real geometry.

SDXL's UNet is conditioned on ``(original_h, original_w, crop_top, crop_left, target_h,
target_w)`` (Podell et al. 2023, section 2.2). diffusers' ``train_dreambooth_lora_sdxl.py``
records, per photo, the upright size before any resizing, and the top-left corner of the
``resolution`` x ``resolution`` crop *in the pixel space of the resized photo* (the photo
resized so that the crop is ``resolution`` wide); the target is ``(resolution, resolution)``.
This module computes the same numbers from what the prepare stage records in
``manifest.json`` (``upright_size``, ``crop_box`` in upright pixels, prepared ``size``) and the
trainer's own final centre crop of the prepared image (:func:`~harness.train.cache.
load_image_tensor`), so they describe exactly the pixels that were VAE-encoded.

A mirrored photo (``train.random_flip``) is the mirror image of the same crop: its crop starts
``resized_width - crop_left - resolution`` from the left (the crop's right margin), which is
where diffusers' script, flipping before it crops, measures it too. Class images are the base
model's own samples at the target size: ``(res, res, 0, 0, res, res)``.

A photo that is not in a prepared manifest (an ad-hoc image handed to ``train_lora``) is
described by its own pixel size, cropped as the trainer crops it (centred square).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from PIL import Image

__all__ = [
    "PhotoGeometry",
    "TimeIds",
    "class_time_ids",
    "geometries",
    "photo_geometry",
    "time_ids",
]

TimeIds = tuple[int, int, int, int, int, int]  # (orig_h, orig_w, top, left, target_h, target_w)


@dataclass(frozen=True)
class PhotoGeometry:
    """Where a prepared image's pixels come from in the upright original photo."""

    upright_size: tuple[int, int]  # (width, height) of the original, EXIF-rotated upright
    crop_box: tuple[int, int, int, int]  # (left, top, right, bottom) in upright pixels
    size: tuple[int, int]  # (width, height) of the prepared image (the crop, resized)


def class_time_ids(resolution: int) -> TimeIds:
    """The time ids of a class image (generated at the target size, never cropped)."""
    return (resolution, resolution, 0, 0, resolution, resolution)


def time_ids(geometry: PhotoGeometry, resolution: int, flip: bool = False) -> TimeIds:
    """``add_time_ids`` of the ``resolution``-square training crop of ``geometry``'s photo
    (``flip``: of its mirror image); coordinates are rounded to whole resized pixels."""
    width, height = geometry.upright_size
    left, top, right, bottom = geometry.crop_box
    pw, ph = geometry.size
    side = min(pw, ph)  # the trainer's final centre square of the prepared image
    sx, sy = (right - left) / pw, (bottom - top) / ph  # upright pixels per prepared pixel
    scale_x, scale_y = resolution / (side * sx), resolution / (side * sy)
    crop_left = round((left + (pw - side) // 2 * sx) * scale_x)
    crop_top = round((top + (ph - side) // 2 * sy) * scale_y)
    if flip:
        crop_left = max(0, round(width * scale_x) - crop_left - resolution)
    return (height, width, crop_top, crop_left, resolution, resolution)


def photo_geometry(path: Path) -> PhotoGeometry:
    """The geometry the prepare stage recorded for ``path`` (``<subject>/<split>/<file>`` with
    ``<subject>/manifest.json``), else the image's own: its whole frame, as it is on disk."""
    path = Path(path)
    record = _manifest_records(str(path.parent.parent.resolve())).get(
        f"{path.parent.name}/{path.name}"
    )
    if record is not None:
        return record
    with Image.open(path) as img:
        w, h = img.size
    return PhotoGeometry((w, h), (0, 0, w, h), (w, h))


def geometries(paths: Sequence[Path]) -> list[PhotoGeometry]:
    """:func:`photo_geometry` of each path (manifests are read once per call)."""
    _manifest_records.cache_clear()  # a re-prepared subject is read afresh
    try:
        return [photo_geometry(p) for p in paths]
    finally:
        _manifest_records.cache_clear()


@lru_cache(maxsize=8)
def _manifest_records(folder: str) -> dict[str, PhotoGeometry]:
    """``file -> geometry`` of the prepared manifest in ``folder`` ({} without a usable one)."""
    try:
        manifest = json.loads((Path(folder) / "manifest.json").read_text("utf-8"))
        out = {}
        for rec in manifest.get("images", []):
            box = rec["crop_box"]
            out[str(rec["file"])] = PhotoGeometry(
                (int(rec["upright_size"][0]), int(rec["upright_size"][1])),
                (int(box[0]), int(box[1]), int(box[2]), int(box[3])),
                (int(rec["size"][0]), int(rec["size"][1])),
            )
        return out
    except (OSError, ValueError, KeyError, TypeError, IndexError, AttributeError):
        return {}  # not a prepared subject (or an older manifest): the image's own frame
