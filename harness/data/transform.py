"""Geometry: square crop on the shorter side, minimum-size policy, resize, PNG encoding."""

from __future__ import annotations

import io
from typing import Literal

from PIL import Image

__all__ = ["TooSmallError", "crop_box", "encode_png", "output_size", "resize", "size_check"]

Box = tuple[int, int, int, int]


class TooSmallError(Exception):
    """The photo's shorter side is below ``min_side`` and upscaling is off."""


def size_check(size: tuple[int, int], min_side: int, upscale_small: bool) -> str | None:
    """Reject (raise) or warn (return a note) for photos whose shorter side is below ``min_side``.

    Raises:
        TooSmallError: naming the size, when ``upscale_small`` is False.
    """
    width, height = size
    short = min(width, height)
    if short >= min_side:
        return None
    text = f"{width}x{height}: shorter side {short} px < min_side {min_side}"
    if not upscale_small:
        raise TooSmallError(f"too small ({text})")
    return f"upscaled a small photo ({text}); expect blur"


def crop_box(size: tuple[int, int], crop: Literal["center", "none"]) -> Box:
    """Crop box ``(left, top, right, bottom)`` in upright pixel coordinates.

    ``center``: the largest centred square (the subject is usually centred in DreamBench-style
    photos). ``none``: the whole photo.
    """
    width, height = size
    if crop == "none":
        return 0, 0, width, height
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    return left, top, left + side, top + side


def output_size(box: Box, resolution: int) -> tuple[int, int]:
    """Output size for a crop box: the shorter side becomes ``resolution``, aspect kept.

    For a square box that is ``(resolution, resolution)``; with ``crop="none"`` the trainer's
    own transform does the final crop.
    """
    width, height = box[2] - box[0], box[3] - box[1]
    if width <= height:
        return resolution, max(1, round(height * resolution / width))
    return max(1, round(width * resolution / height)), resolution


def resize(im: Image.Image, box: Box, size: tuple[int, int]) -> Image.Image:
    """Crop and resize in one resampling pass (Lanczos; ``reducing_gap`` speeds big photos)."""
    return im.resize(size, Image.Resampling.LANCZOS, box=box, reducing_gap=3.0)


def encode_png(im: Image.Image) -> bytes:
    """PNG bytes with no metadata chunks (no time, text, EXIF or ICC): byte-stable output."""
    clean = Image.frombytes(im.mode, im.size, im.tobytes())  # a fresh image has empty .info
    buf = io.BytesIO()
    clean.save(buf, format="PNG", compress_level=6)
    return buf.getvalue()
