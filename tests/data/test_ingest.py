"""Decoding: every format and colour mode to upright 8-bit RGB, and each bad file's reason."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import pytest
from data_helpers import encode, exif_bytes, photo, png16_rgb
from PIL import Image, ImageCms

from harness.data import ingest
from harness.data.ingest import DecodeError, decode_image

BIG = 89_478_485


def decode(
    path: Path,
    max_pixels: int = BIG,
    background: tuple[int, int, int] = (255, 255, 255),
    grayscale: bool = False,
) -> ingest.DecodedImage:
    return decode_image(path, max_pixels=max_pixels, background=background, grayscale=grayscale)


@pytest.mark.parametrize(
    ("suffix", "fmt", "expected"),
    [
        ("jpg", "JPEG", "JPEG"),
        ("png", "PNG", "PNG"),
        ("webp", "WEBP", "WEBP"),
        ("heic", "HEIF", "HEIF"),
        ("avif", "AVIF", "AVIF"),
    ],
)
def test_each_format_decodes_to_rgb(tmp_path: Path, suffix: str, fmt: str, expected: str) -> None:
    path = tmp_path / f"x.{suffix}"
    path.write_bytes(encode(photo(1), fmt, quality=90))
    out = decode(path)
    assert (out.format, out.image.mode, out.image.size, out.original_size) == (
        expected,
        "RGB",
        (96, 80),
        (96, 80),
    )


def test_content_not_suffix_decides(tmp_path: Path) -> None:
    path = tmp_path / "really_png.jpg"
    path.write_bytes(encode(photo(2), "PNG"))
    assert decode(path).format == "PNG"


@pytest.mark.parametrize("mode", ["L", "1", "P", "CMYK", "I;16", "LA", "RGBA"])
def test_modes_become_8bit_rgb(tmp_path: Path, mode: str) -> None:
    fmt = "JPEG" if mode == "CMYK" else "PNG"
    path = tmp_path / f"x.{fmt.lower()}"
    im = photo(3).convert(mode) if mode != "I;16" else photo(3).convert("L").convert("I;16")
    path.write_bytes(encode(im, fmt))
    out = decode(path)
    assert out.mode == mode and out.image.mode == "RGB"


def test_sixteen_bit_gray_is_scaled_not_clipped(tmp_path: Path) -> None:
    path = tmp_path / "g16.png"
    path.write_bytes(encode(Image.new("I;16", (40, 40), 32896), "PNG"))  # 32896 / 257 = 128
    assert decode(path).image.getpixel((5, 5)) == (128, 128, 128)


def test_sixteen_bit_rgb_png(tmp_path: Path) -> None:
    path = tmp_path / "rgb16.png"
    path.write_bytes(png16_rgb(40, 30, 0xFFFF))
    out = decode(path)
    assert out.image.size == (40, 30) and out.image.getpixel((0, 0)) == (255, 255, 255)


def test_alpha_is_flattened_on_background(tmp_path: Path) -> None:
    im = Image.new("RGBA", (40, 40), (255, 0, 0, 0))
    im.paste((0, 0, 255, 255), (0, 0, 20, 40))
    path = tmp_path / "a.png"
    path.write_bytes(encode(im, "PNG"))
    out = decode(path, background=(0, 200, 0)).image
    assert out.getpixel((30, 5)) == (0, 200, 0)  # transparent -> background
    assert out.getpixel((5, 5)) == (0, 0, 255)


def test_palette_transparency_is_flattened(tmp_path: Path) -> None:
    im = Image.new("P", (20, 20), 0)
    im.putpalette([10, 20, 30, 200, 0, 0] + [0] * 762)
    im.paste(1, (0, 0, 10, 20))
    path = tmp_path / "p.png"
    path.write_bytes(encode(im, "PNG", transparency=0))
    out = decode(path, background=(255, 255, 255)).image
    assert out.getpixel((15, 5)) == (255, 255, 255) and out.getpixel((2, 2)) == (200, 0, 0)


def test_grayscale_unification(tmp_path: Path) -> None:
    path = tmp_path / "c.png"
    path.write_bytes(encode(photo(4), "PNG"))
    r, g, b = decode(path, grayscale=True).image.getpixel((10, 10))  # type: ignore[misc]
    assert r == g == b


def test_icc_profile_is_converted_and_not_kept(tmp_path: Path) -> None:
    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    path = tmp_path / "icc.jpg"
    path.write_bytes(encode(photo(5), "JPEG", icc_profile=icc))
    out = decode(path)
    assert out.image.mode == "RGB" and "icc_profile" not in out.image.info


def upright_test_image() -> Image.Image:
    """Landscape, red top half, blue bottom half: any rotation error is visible."""
    im = Image.new("RGB", (120, 80), (0, 0, 255))
    im.paste((255, 0, 0), (0, 0, 120, 40))
    return im


STORE = {3: Image.Transpose.ROTATE_180, 6: Image.Transpose.ROTATE_90, 8: Image.Transpose.ROTATE_270}


@pytest.mark.parametrize(
    ("fmt", "orientation"), [("JPEG", 3), ("JPEG", 6), ("JPEG", 8), ("PNG", 6), ("HEIF", 6)]
)
def test_exif_rotation_gives_upright_image(tmp_path: Path, fmt: str, orientation: int) -> None:
    stored = upright_test_image().transpose(STORE[orientation])
    path = tmp_path / f"rot.{fmt.lower()}"
    path.write_bytes(encode(stored, fmt, exif=exif_bytes(orientation), quality=95))
    out = decode(path)
    assert out.orientation == orientation
    assert out.image.size == (120, 80)
    top, bottom = out.image.getpixel((60, 10)), out.image.getpixel((60, 70))
    assert top[0] > 200 and top[2] < 60, top  # type: ignore[index]
    assert bottom[2] > 200 and bottom[0] < 60, bottom  # type: ignore[index]


# ---------------------------------------------------------------------------------------------
# Bad files: each has a clear reason
# ---------------------------------------------------------------------------------------------


def reason(path: Path, max_pixels: int = BIG) -> str:
    with pytest.raises(DecodeError) as info:
        decode(path, max_pixels=max_pixels)
    return str(info.value)


def test_zero_byte_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.jpg"
    path.write_bytes(b"")
    assert reason(path) == "empty file (0 bytes)"


def test_text_named_jpg(tmp_path: Path) -> None:
    path = tmp_path / "notes.jpg"
    path.write_text("these are not pixels\n")
    assert "contains text" in reason(path)


def test_random_bytes(tmp_path: Path) -> None:
    path = tmp_path / "noise.png"
    path.write_bytes(bytes(range(256)) * 4)
    assert "not a decodable image" in reason(path)


def test_truncated_jpeg(tmp_path: Path) -> None:
    data = encode(photo(6, (256, 256)), "JPEG", quality=95)
    path = tmp_path / "cut.jpg"
    path.write_bytes(data[: len(data) // 2])
    assert "truncated" in reason(path)


def test_heic_without_pillow_heif(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "x.heic"
    path.write_bytes(encode(photo(7), "HEIF"))
    monkeypatch.setattr(ingest, "heif_support", lambda: False)
    assert "pillow-heif is not installed" in reason(path)


def test_decompression_bomb_by_config_limit(tmp_path: Path) -> None:
    path = tmp_path / "big.png"
    path.write_bytes(encode(Image.new("L", (200, 200)), "PNG"))
    assert "200x200 = 40,000 pixels" in reason(path, max_pixels=30_000)  # our own check
    text = reason(path, max_pixels=10_000)  # Pillow's check, beyond twice the limit
    assert "decompression-bomb" in text and "40,000 pixels" in text and "10,000" in text


def test_decompression_bomb_header_is_never_decoded(tmp_path: Path) -> None:
    """A PNG header claiming 100k x 100k pixels, with almost no data: rejected from the header."""
    ihdr = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 0, 0, 0, 0)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    path = tmp_path / "bomb.png"
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 100))
    )
    assert "decompression-bomb" in reason(path)
    assert "10,000,000,000 pixels exceeds max_image_pixels=89,478,485" in reason(path)
    assert Image.MAX_IMAGE_PIXELS == BIG  # the global limit is restored
