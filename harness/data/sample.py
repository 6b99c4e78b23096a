"""A sample subject the project draws itself, so ``dvc repro`` works on a fresh clone.

The subject is a distinctive toy robot (orange body with a teal dotted band and a purple star,
yellow head, magenta antenna ball, navy feet), drawn on varied backgrounds (gradients, stripes,
checks, blobs, a table edge), at varied positions, scales, tilts and lighting. To exercise the
ingest path, the set mixes JPEG, PNG, WebP and HEIC, and some files carry an EXIF orientation
(their pixels are stored rotated, so only a reader that applies the tag sees them upright).

Everything derives from ``seed`` and the photo index through ``random.Random`` (whose integer
seeding and draws are stable across platforms and Python versions), and the encoders are
deterministic, so the same seed gives byte-identical files. Files are rewritten only when their
bytes change.
"""

from __future__ import annotations

import io
import logging
import math
import random
from collections.abc import Callable
from pathlib import Path

from PIL import Image, ImageDraw, ImageFilter

from harness.data.ingest import heif_support

__all__ = ["SAMPLE_CLASS_NAME", "SAMPLE_PREFIX", "make_sample_subject"]

log = logging.getLogger(__name__)

SAMPLE_CLASS_NAME = "toy"
SAMPLE_PREFIX = "sample_"
_SIZES = ((320, 256), (256, 320), (288, 288), (384, 288), (256, 352), (320, 320))
# (suffix, EXIF orientation or 1); a fixed cycle so every set of >= 8 photos has every kind.
_KINDS = (
    ("jpg", 1),
    ("jpg", 6),
    ("heic", 1),
    ("png", 1),
    ("jpg", 3),
    ("webp", 1),
    ("heic", 8),
    ("jpg", 8),
)
# Pixels stored so that ImageOps.exif_transpose(tag) gives back the upright drawing.
_STORE = {
    1: None,
    3: Image.Transpose.ROTATE_180,
    6: Image.Transpose.ROTATE_90,
    8: Image.Transpose.ROTATE_270,
}
RGB = tuple[int, int, int]


def make_sample_subject(out_dir: Path, n_images: int, seed: int = 0) -> list[Path]:
    """Draw ``n_images`` photos of the sample toy into ``out_dir``; return their paths, sorted.

    Deterministic for ``seed``: files whose bytes would not change are left untouched, and
    earlier ``sample_*`` files beyond ``n_images`` are removed (other files are never touched).
    HEIC needs pillow-heif; without it those photos are written as PNG (with a warning).
    """
    if n_images < 1:
        raise ValueError(f"n_images must be >= 1, got {n_images}")
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(n_images):
        suffix, orientation = _KINDS[index % len(_KINDS)]
        if suffix == "heic" and not heif_support():
            log.warning("pillow-heif missing: sample photo %d written as PNG", index)
            suffix = "png"
        data = _encode(_draw(random.Random(seed * 1_000_003 + index)), suffix, orientation)
        path = out_dir / f"{SAMPLE_PREFIX}{index:02d}.{suffix}"
        if not path.is_file() or path.read_bytes() != data:
            path.write_bytes(data)
        paths.append(path)
    keep = set(paths)
    for stale in out_dir.glob(f"{SAMPLE_PREFIX}*"):
        if stale.is_file() and stale not in keep:
            stale.unlink()
    return sorted(paths)


def _encode(im: Image.Image, suffix: str, orientation: int) -> bytes:
    transpose = _STORE[orientation]
    stored = im.transpose(transpose) if transpose is not None else im
    params: dict[str, object] = {}
    if orientation != 1:
        exif = Image.Exif()
        exif[0x0112] = orientation
        params["exif"] = exif.tobytes()
    fmt = {"jpg": "JPEG", "png": "PNG", "webp": "WEBP", "heic": "HEIF"}[suffix]
    if fmt in ("JPEG", "WEBP", "HEIF"):
        params["quality"] = 90
    buf = io.BytesIO()
    stored.save(buf, format=fmt, **params)
    return buf.getvalue()


# ------------------------------------------------------------------------------------------
# Drawing
# ------------------------------------------------------------------------------------------


def _jitter(rng: random.Random, color: RGB, amount: int = 18) -> RGB:
    r, g, b = (max(0, min(255, c + rng.randint(-amount, amount))) for c in color)
    return r, g, b


def _random_color(rng: random.Random) -> RGB:
    return rng.randint(30, 230), rng.randint(30, 230), rng.randint(30, 230)


def _draw(rng: random.Random) -> Image.Image:
    width, height = rng.choice(_SIZES)
    im = _BACKGROUNDS[rng.randrange(len(_BACKGROUNDS))](rng, (width, height))
    scale = rng.uniform(0.45, 0.8) * min(width, height)
    cx = rng.uniform(0.35, 0.65) * width
    cy = rng.uniform(0.4, 0.6) * height
    _shadow(im, cx, cy + 0.5 * scale, scale)
    toy = _draw_toy(rng, round(scale)).rotate(
        rng.uniform(-15, 15), Image.Resampling.BICUBIC, expand=True
    )
    im.paste(toy, (round(cx - toy.width / 2), round(cy - toy.height / 2)), toy)
    return _light(rng, im)


def _draw_toy(rng: random.Random, size: int) -> Image.Image:
    """The subject on a transparent square canvas of side ``size`` (unit = size / 100)."""
    layer = Image.new("RGBA", (size, size), (0, 0, 0, 0))
    d = ImageDraw.Draw(layer)
    u = size / 100

    def box(x0: float, y0: float, x1: float, y1: float) -> list[float]:
        return [x0 * u, y0 * u, x1 * u, y1 * u]

    d.line(box(50, 22, 50, 8), fill=(60, 60, 60), width=max(1, round(2 * u)))
    d.ellipse(box(44, 2, 56, 14), fill=(230, 40, 160))  # antenna ball
    d.rounded_rectangle(
        box(28, 20, 72, 46),
        radius=6 * u,
        fill=(255, 205, 30),
        outline=(40, 40, 40),
        width=max(1, round(u)),
    )
    for ex in (40, 60):
        d.ellipse(box(ex - 6, 27, ex + 6, 39), fill=(255, 255, 255))
        d.ellipse(box(ex - 3, 30, ex + 3, 36), fill=(15, 15, 15))
    d.rounded_rectangle(
        box(20, 46, 80, 88),
        radius=8 * u,
        fill=(255, 122, 26),
        outline=(40, 40, 40),
        width=max(1, round(u)),
    )
    d.rectangle(box(20, 52, 80, 60), fill=(25, 179, 166))  # teal band
    for dx in range(26, 80, 9):
        d.ellipse(box(dx - 2, 54, dx + 2, 58), fill=(255, 255, 255))
    d.polygon(_star(50 * u, 74 * u, 10 * u, 4 * u), fill=(120, 50, 200))
    for fx in (28, 56):
        d.rectangle(box(fx, 88, fx + 16, 97), fill=(20, 30, 90))
    if rng.random() < 0.5:  # the toy faces either way: pose variety without a new design
        layer = layer.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return layer


def _star(cx: float, cy: float, outer: float, inner: float) -> list[tuple[float, float]]:
    points = []
    for k in range(10):
        radius = outer if k % 2 == 0 else inner
        angle = math.pi / 2 + k * math.pi / 5
        points.append((cx + radius * math.cos(angle), cy - radius * math.sin(angle)))
    return points


def _shadow(im: Image.Image, cx: float, cy: float, scale: float) -> None:
    shadow = Image.new("L", im.size, 0)
    ImageDraw.Draw(shadow).ellipse(
        [cx - 0.4 * scale, cy - 0.06 * scale, cx + 0.4 * scale, cy + 0.06 * scale], fill=90
    )
    shadow = shadow.filter(ImageFilter.GaussianBlur(max(1.0, scale / 25)))
    im.paste((0, 0, 0), (0, 0), shadow)


def _light(rng: random.Random, im: Image.Image) -> Image.Image:
    """Global brightness plus a soft directional light (a linear ramp in a random direction)."""
    gain = rng.uniform(0.7, 1.2)
    ramp = Image.linear_gradient("L").resize(im.size).rotate(rng.choice([0, 90, 180, 270]))
    dark = im.point(lambda v: round(v * gain * 0.75))
    bright = im.point(lambda v: min(255, round(v * gain * 1.1)))
    return Image.composite(bright, dark, ramp)


def _bg_gradient(rng: random.Random, size: tuple[int, int]) -> Image.Image:
    top, bottom = _random_color(rng), _random_color(rng)
    mask = Image.linear_gradient("L").resize(size)
    return Image.composite(Image.new("RGB", size, bottom), Image.new("RGB", size, top), mask)


def _bg_stripes(rng: random.Random, size: tuple[int, int]) -> Image.Image:
    a, b = _random_color(rng), _random_color(rng)
    im = Image.new("RGB", size, a)
    d = ImageDraw.Draw(im)
    step = rng.randint(14, 40)
    for x in range(-size[1], size[0], 2 * step):
        d.polygon(
            [(x, 0), (x + step, 0), (x + step + size[1], size[1]), (x + size[1], size[1])], fill=b
        )
    return im


def _bg_checks(rng: random.Random, size: tuple[int, int]) -> Image.Image:
    a, b = _random_color(rng), _random_color(rng)
    im = Image.new("RGB", size, a)
    d = ImageDraw.Draw(im)
    step = rng.randint(20, 48)
    for y in range(0, size[1], step):
        for x in range(0, size[0], step):
            if (x // step + y // step) % 2:
                d.rectangle([x, y, x + step - 1, y + step - 1], fill=b)
    return im


def _bg_blobs(rng: random.Random, size: tuple[int, int]) -> Image.Image:
    im = Image.new("RGB", size, _random_color(rng))
    d = ImageDraw.Draw(im)
    for _ in range(rng.randint(6, 14)):
        x, y, r = rng.uniform(0, size[0]), rng.uniform(0, size[1]), rng.uniform(10, 70)
        d.ellipse([x - r, y - r, x + r, y + r], fill=_random_color(rng))
    return im.filter(ImageFilter.GaussianBlur(6))


def _bg_table(rng: random.Random, size: tuple[int, int]) -> Image.Image:
    wall, table = _random_color(rng), _jitter(rng, (150, 100, 60), 40)
    im = Image.new("RGB", size, wall)
    edge = round(size[1] * rng.uniform(0.55, 0.75))
    d = ImageDraw.Draw(im)
    d.rectangle([0, edge, size[0], size[1]], fill=table)
    for y in range(edge + 6, size[1], 9):  # wood grain
        d.line([0, y, size[0], y + rng.randint(-3, 3)], fill=_jitter(rng, table, 25), width=1)
    return im


_BACKGROUNDS: tuple[Callable[[random.Random, tuple[int, int]], Image.Image], ...] = (
    _bg_gradient,
    _bg_stripes,
    _bg_checks,
    _bg_blobs,
    _bg_table,
)
