"""Decoding one photo into an upright, 8-bit sRGB ``RGB`` image, or a clear rejection reason.

Accepted containers: JPEG (and the MPO variant phones write), PNG, WebP, HEIC/HEIF (through
pillow-heif) and AVIF (Pillow's own plugin). The file *content* decides the decoder, not the
suffix, so a PNG named ``.jpg`` works and a text file named ``.jpg`` is rejected as text.

Normalisation, in order, and why:

1. EXIF orientation is applied (``ImageOps.exif_transpose``) so every later step sees the photo
   as a person would; HEIF rotation is applied by libheif itself and only recorded.
2. An embedded ICC profile on RGB/CMYK data is converted to sRGB (phone HEICs are often
   Display P3; CMYK JPEGs are meaningless without it). Failure falls back to a plain convert.
3. 16-bit data is scaled, not clipped, to 8 bits (Pillow's ``convert("L")`` clips ``I;16``).
4. Transparency (RGBA, LA, palette or colour-key) is flattened onto a configurable background:
   the model never sees alpha, and black-under-alpha would teach it a black halo.
5. Optional grayscale unification of the whole set.
"""

from __future__ import annotations

import io
import re
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageCms, ImageOps, UnidentifiedImageError, features

__all__ = [
    "SUPPORTED_SUFFIXES",
    "DecodeError",
    "DecodedImage",
    "avif_support",
    "decode_image",
    "heif_support",
    "parse_color",
    "to_rgb8",
]

#: File suffixes treated as photos (lower case). Anything else in a subject folder is reported.
SUPPORTED_SUFFIXES: frozenset[str] = frozenset(
    {".jpg", ".jpeg", ".jpe", ".png", ".webp", ".heic", ".heif", ".hif", ".avif"}
)

# Pillow format ids we let Image.open try; restricting them keeps e.g. a TGA named .jpg out.
_WANTED_FORMATS = ("JPEG", "MPO", "PNG", "WEBP", "HEIF", "AVIF")
_HEIF_BRANDS = {b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"hevm", b"hevs", b"mif1"}
_AVIF_BRANDS = {b"avif", b"avis"}
_ORIENTATION_TAG = 0x0112
_HEAD_BYTES = 64


class DecodeError(Exception):
    """A photo that cannot be used; the message is the reason written to the rejection report."""


@dataclass(frozen=True)
class DecodedImage:
    """A decoded, upright, 8-bit RGB photo plus what the manifest records about the original."""

    image: Image.Image
    format: str
    mode: str
    original_size: tuple[int, int]
    orientation: int
    notes: tuple[str, ...] = ()


@cache
def heif_support() -> bool:
    """Whether HEIC/HEIF can be decoded (pillow-heif importable); registers its opener once."""
    try:
        import pillow_heif
    except ImportError:
        return False
    pillow_heif.register_heif_opener()
    return True


@cache
def avif_support() -> bool:
    """Whether this Pillow build decodes AVIF (Pillow >= 11.3 built with libavif)."""
    return bool(features.check("avif"))


def parse_color(value: str) -> tuple[int, int, int]:
    """``#rrggbb`` to an RGB tuple (the config already validated the pattern)."""
    text = value.lstrip("#")
    return int(text[0:2], 16), int(text[2:4], 16), int(text[4:6], 16)


def sniff(head: bytes) -> str | None:
    """Container kind from the first bytes, for clearer reasons than Pillow's generic error."""
    if head.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    if head[4:8] == b"ftyp":
        brand = head[8:12]
        if brand in _HEIF_BRANDS:
            return "HEIF"
        if brand in _AVIF_BRANDS:
            return "AVIF"
    return None


def _looks_like_text(head: bytes) -> bool:
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return all(ch.isprintable() or ch in "\r\n\t" for ch in text)


def _allowed_formats() -> list[str]:
    """Format ids to pass to ``Image.open``; only registered ones (else Pillow raises KeyError)."""
    heif_support()  # make sure the HEIF opener is registered when pillow-heif exists
    Image.init()
    allowed = [f for f in _WANTED_FORMATS if f in Image.OPEN]
    # heif_support() is consulted on every call so a test can simulate pillow-heif's absence.
    if not heif_support():
        allowed = [f for f in allowed if f != "HEIF"]
    return allowed


def _unidentified_reason(path: Path, head: bytes) -> str:
    suffix = path.suffix.lower() or "(no suffix)"
    if _looks_like_text(head):
        return f"not an image: the {suffix} file contains text ({head[:24]!r}...)"
    return f"not a decodable image: {suffix} content is not JPEG/PNG/WebP/HEIC/AVIF ({head[:12]!r})"


@contextmanager
def _pixel_limit(max_pixels: int) -> Iterator[None]:
    """Use the configured decompression-bomb limit for Pillow's own check, then restore it."""
    previous = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = max_pixels
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = previous


def _orientation(im: Image.Image) -> int:
    # pillow-heif applies HEIF rotation itself and resets the EXIF tag, keeping the original here.
    value = im.info.get("original_orientation")
    if value is None:
        value = im.getexif().get(_ORIENTATION_TAG, 1)
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def decode_image(
    path: Path,
    *,
    max_pixels: int,
    background: tuple[int, int, int] = (255, 255, 255),
    grayscale: bool = False,
) -> DecodedImage:
    """Decode ``path`` fully into an upright 8-bit RGB image.

    Raises:
        DecodeError: with a one-line reason (empty, text, truncated, bomb, missing plugin...).
    """
    with path.open("rb") as fh:
        head = fh.read(_HEAD_BYTES)
    if not head:
        raise DecodeError("empty file (0 bytes)")
    kind = sniff(head)
    if kind == "HEIF" and not heif_support():
        raise DecodeError(
            "HEIC/HEIF photo but pillow-heif is not installed (pip install pillow-heif)"
        )
    if kind == "AVIF" and not avif_support():
        raise DecodeError("AVIF photo but this Pillow build has no AVIF support (Pillow >= 11.3)")
    notes: list[str] = []
    with _pixel_limit(max_pixels), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            with Image.open(path, formats=_allowed_formats()) as im:
                width, height = im.size
                if width * height > max_pixels:
                    raise DecodeError(
                        f"decompression-bomb guard: {width}x{height} = {width * height:,} pixels "
                        f"exceeds max_image_pixels={max_pixels:,}"
                    )
                im.load()  # decode now: truncation must surface here, not later
                fmt, mode, orientation = str(im.format), im.mode, _orientation(im)
                upright = ImageOps.exif_transpose(im)
                rgb = to_rgb8(upright, background, notes)
        except Image.DecompressionBombError as exc:
            raise DecodeError(_bomb_reason(exc, max_pixels)) from None
        except UnidentifiedImageError:
            raise DecodeError(_unidentified_reason(path, head)) from None
        except (OSError, SyntaxError, ValueError, EOFError) as exc:
            raise DecodeError(f"truncated or corrupt image data ({fmt_exc(exc)})") from None
    notes.extend(sorted({str(w.message) for w in caught if not _is_bomb_warning(w.category)}))
    if grayscale:
        rgb = rgb.convert("L").convert("RGB")
    rgb.info = {}  # nothing from the source (ICC, EXIF, text chunks) may leak into outputs
    return DecodedImage(rgb, fmt, mode, (width, height), orientation, tuple(notes))


def _bomb_reason(exc: Exception, max_pixels: int) -> str:
    """Pillow's own guard (at twice the limit) fires before we see the size; reuse its count."""
    found = re.search(r"\((\d+) pixels\)", str(exc))
    count = f"{int(found[1]):,} pixels" if found else str(exc)
    return f"decompression-bomb guard: {count} exceeds max_image_pixels={max_pixels:,}"


def _is_bomb_warning(category: type[Warning]) -> bool:
    return issubclass(category, Image.DecompressionBombWarning)


def fmt_exc(exc: BaseException) -> str:
    """``ExcType: message`` in one line."""
    return f"{type(exc).__name__}: {' '.join(str(exc).split())}"


def to_rgb8(im: Image.Image, background: tuple[int, int, int], notes: list[str]) -> Image.Image:
    """Any Pillow mode to 8-bit sRGB RGB; alpha is flattened onto ``background``."""
    icc = im.info.get("icc_profile")
    if im.mode.startswith("I") or im.mode == "F":
        im = _high_depth_to_l(im)
    if im.mode == "1":
        im = im.convert("L")
    if im.mode == "P" or "transparency" in im.info or im.mode in ("LA", "La", "PA", "RGBa"):
        im = im.convert("RGBA")
    if icc and im.mode in ("RGB", "CMYK"):
        im = _icc_to_srgb(im, icc, notes)
    if im.mode == "RGBA":
        base = Image.new("RGBA", im.size, (*background, 255))
        im = Image.alpha_composite(base, im)
    return im.convert("RGB") if im.mode != "RGB" else im


def _high_depth_to_l(im: Image.Image) -> Image.Image:
    """16-bit (or 32-bit int / float) grayscale to 8-bit ``L`` by scaling the full range."""
    arr = np.asarray(im).astype(np.float64)
    if im.mode == "F":
        scale = 255.0 if float(arr.max(initial=0.0)) <= 1.0 else 1.0
        arr = arr * scale
    elif im.mode.startswith("I;16") or float(arr.max(initial=0.0)) > 255:
        arr = arr * (255.0 / 65535.0)
    return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8))


def _icc_to_srgb(im: Image.Image, icc: bytes, notes: list[str]) -> Image.Image:
    try:
        src = ImageCms.ImageCmsProfile(io.BytesIO(icc))
        out = ImageCms.profileToProfile(im, src, ImageCms.createProfile("sRGB"), outputMode="RGB")
    except (ImageCms.PyCMSError, OSError, ValueError) as exc:
        notes.append(f"embedded ICC profile ignored ({fmt_exc(exc)})")
        return im
    assert out is not None  # profileToProfile returns None only with inPlace=True
    return out
