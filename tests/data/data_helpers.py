"""Photo writers shared by the data-stage tests (imported by name: pytest puts this folder on sys.path)."""

from __future__ import annotations

import io
import struct
import zlib
from typing import Any

from PIL import Image, ImageDraw

ORIENTATION = 0x0112


def photo(seed: int, size: tuple[int, int] = (96, 80), mode: str = "RGB") -> Image.Image:
    """A distinct picture per seed (so pHash never calls two of them duplicates)."""
    im = Image.new("RGB", size, ((seed * 67) % 256, (seed * 131) % 256, (seed * 29) % 256))
    d = ImageDraw.Draw(im)
    w, h = size
    for k in range(4):
        x, y = ((seed + 1) * (k + 3) * 37) % w, ((seed + 2) * (k + 5) * 53) % h
        color = ((seed * 90 + k * 60) % 256, (k * 100 + 50) % 256, (seed * 40 + k * 80) % 256)
        d.rectangle([x - w // 5, y - h // 5, x + w // 5, y + h // 5], fill=color)
    d.ellipse(
        [w // 4, h // 4, w // 4 + (seed % 5 + 2) * 6, h // 4 + (seed % 3 + 2) * 8],
        fill=(255, 255, 255),
    )
    return im.convert(mode) if mode != "RGB" else im


def encode(im: Image.Image, fmt: str, **params: Any) -> bytes:
    """Encode to bytes (HEIF needs pillow-heif's opener registered; done by the harness)."""
    if fmt == "HEIF":
        import pillow_heif

        pillow_heif.register_heif_opener()
    buf = io.BytesIO()
    im.save(buf, format=fmt, **params)
    return buf.getvalue()


def exif_bytes(orientation: int) -> bytes:
    exif = Image.Exif()
    exif[ORIENTATION] = orientation
    return exif.tobytes()


def png16_rgb(width: int, height: int, value: int) -> bytes:
    """A 16-bit-per-channel RGB PNG written by hand (Pillow cannot write one)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    row = b"\x00" + struct.pack(">HHH", value, value, value) * width
    ihdr = struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(row * height))
        + chunk(b"IEND", b"")
    )
