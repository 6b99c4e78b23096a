"""The documented DINO preprocessing: resize 256 bicubic (short side), centre crop 224."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from metrics.preprocess import IMAGENET_MEAN, IMAGENET_STD, dino_crop_box, dino_transform


def gradient_image(width: int, height: int) -> Image.Image:
    x = np.linspace(0, 255, width)[None, :].repeat(height, 0)
    y = np.linspace(0, 255, height)[:, None].repeat(width, 1)
    rgb = np.stack([x, y, (x + y) / 2], axis=-1).astype(np.uint8)
    rgb[::37, :, :] = 255  # sharp lines, so an off-by-one crop would show
    return Image.fromarray(rgb)


def manual(
    image: Image.Image, size: tuple[int, int], box: tuple[int, int, int, int]
) -> torch.Tensor:
    cropped = image.resize(size, Image.Resampling.BICUBIC).crop(box)
    pixels = torch.from_numpy(np.asarray(cropped, dtype=np.float32) / 255.0).permute(2, 0, 1)
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return (pixels - mean) / std


def test_1920x1080_gives_the_documented_crop() -> None:
    assert dino_crop_box(1920, 1080) == ((455, 256), (116, 16, 340, 240))
    image = gradient_image(1920, 1080)
    out = dino_transform()(image)
    assert out.shape == (3, 224, 224)
    expected = manual(image, (455, 256), (116, 16, 340, 240))
    assert torch.allclose(out, expected, atol=1e-6)
    # A crop shifted by one pixel is measurably different (the test can fail).
    shifted = manual(image, (455, 256), (117, 16, 341, 240))
    assert not torch.allclose(out, shifted, atol=1e-3)


@pytest.mark.parametrize(("w", "h"), [(1080, 1920), (300, 300), (640, 480)])
def test_crop_box_matches_transform(w: int, h: int) -> None:
    size, box = dino_crop_box(w, h)
    assert min(size) == 256 and box[2] - box[0] == 224 and box[3] - box[1] == 224
    image = gradient_image(w, h)
    assert torch.allclose(dino_transform()(image), manual(image, size, box), atol=1e-6)
