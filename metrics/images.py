"""Image inputs: loading (RGB, EXIF-upright), content hashing and listing folders.

An :data:`ImageInput` is a path or an already opened ``PIL.Image``. Paths are decoded lazily,
one batch at a time, so a large folder never sits in memory at once.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from pathlib import Path
from typing import TypeAlias

from PIL import Image, ImageOps, UnidentifiedImageError

from metrics.errors import MetricsInputError

__all__ = [
    "ImageInput",
    "check_image_file",
    "image_name",
    "image_sha256",
    "list_image_files",
    "load_image",
]

ImageInput: TypeAlias = str | os.PathLike[str] | Image.Image

_HEIF_REGISTERED = False


def _register_heif() -> None:
    """Let PIL open HEIC/HEIF phone photos when pillow-heif is installed (optional)."""
    global _HEIF_REGISTERED
    if _HEIF_REGISTERED:
        return
    _HEIF_REGISTERED = True
    try:
        from pillow_heif import register_heif_opener
    except ImportError:  # pragma: no cover - optional dependency
        return
    register_heif_opener()


def _to_rgb(image: Image.Image) -> Image.Image:
    # Phone photos store their orientation in EXIF: score what a person sees.
    image = ImageOps.exif_transpose(image)
    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        # Transparent product shots: composite on white (the harness prepares photos the same
        # way) instead of letting convert() expose whatever colour hides under alpha = 0.
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def load_image(item: ImageInput) -> Image.Image:
    """Return ``item`` as an upright RGB image; a path that is not a readable image raises
    :class:`~metrics.errors.MetricsInputError` naming the file."""
    if isinstance(item, Image.Image):
        return _to_rgb(item)
    _register_heif()
    path = Path(item)
    try:
        with Image.open(path) as opened:
            opened.load()
            return _to_rgb(opened)
    except FileNotFoundError:
        raise MetricsInputError(f"image file not found: {path}") from None
    except UnidentifiedImageError:
        raise MetricsInputError(f"not an image file: {path}") from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise MetricsInputError(f"cannot read image {path}: {exc}") from None


def image_sha256(item: ImageInput) -> str:
    """Content hash (the embedding-cache key of an image).

    A file: sha256 of its bytes, which hold everything :func:`load_image` reads (palette,
    EXIF orientation, alpha). An in-memory image: sha256 of size and pixels of its
    :func:`load_image` result, i.e. of what the encoder sees: its raw ``tobytes()`` would be
    palette indices for a ``P`` image and ignore the EXIF orientation, so two different
    pictures would share one cache entry.
    """
    digest = hashlib.sha256()
    if isinstance(item, Image.Image):
        rgb = load_image(item)
        digest.update(f"pil-rgb:{rgb.size[0]}x{rgb.size[1]}:".encode())
        digest.update(rgb.tobytes())
        return digest.hexdigest()
    path = Path(item)
    try:
        with path.open("rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    except OSError as exc:
        raise MetricsInputError(f"cannot read image {path}: {exc.strerror or exc}") from None
    return digest.hexdigest()


def image_name(item: ImageInput, index: int) -> str:
    """Label of an image in result rows: its path, or ``<image i>`` for an in-memory image."""
    if isinstance(item, Image.Image):
        return f"<image {index}>"
    return str(item)


def check_image_file(path: str | os.PathLike[str]) -> None:
    """Raise :class:`~metrics.errors.MetricsInputError` unless ``path`` has an image header.

    Only the header is read (cheap); full decoding happens batch by batch when encoding.
    """
    _register_heif()
    try:
        with Image.open(path):
            pass
    except FileNotFoundError:
        raise MetricsInputError(f"image file not found: {path}") from None
    except UnidentifiedImageError:
        raise MetricsInputError(f"not an image file: {path}") from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise MetricsInputError(f"cannot read image {path}: {exc}") from None


def list_image_files(
    folder: str | os.PathLike[str], exclude: Iterable[Path] = (), *, allow_empty: bool = False
) -> list[Path]:
    """The image files directly inside ``folder``, sorted by name.

    Hidden files (``.DS_Store``...) and sub-folders are skipped; paths in ``exclude`` (e.g. a
    prompts manifest kept next to the images) are ignored. Any other file must be an image:
    detection reads the file header, not the extension.

    Raises:
        MetricsInputError: the folder is missing or holds no image (unless ``allow_empty``),
            or a file is not an image.
    """
    _register_heif()
    root = Path(folder)
    if not root.is_dir():
        raise MetricsInputError(f"not a folder: {root}")
    excluded = {p.resolve() for p in exclude}
    files: list[Path] = []
    for path in sorted(root.iterdir()):
        if path.name.startswith(".") or not path.is_file() or path.resolve() in excluded:
            continue
        check_image_file(path)
        files.append(path)
    if not files and not allow_empty:
        raise MetricsInputError(f"no images in folder: {root}")
    return files
