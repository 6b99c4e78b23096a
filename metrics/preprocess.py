"""Image preprocessing for the DINO encoder (CLIP uses open_clip's own transform).

The DINO protocol (as in the DINO repository's k-NN evaluation, which the DreamBooth paper
follows): resize the *short* side to 256 with bicubic interpolation (aspect ratio kept,
PIL's antialiasing resize), centre-crop 224 x 224, ``ToTensor`` (0..1), then ImageNet
mean/std normalisation.

Worked example, a 1920 x 1080 photo: the short side 1080 becomes 256 and the long side
``int(256 * 1920 / 1080) = 455``, so the image is resized to 455 x 256; the 224 crop box is
``(left, top, right, bottom) = (116, 16, 340, 240)`` in the resized image, i.e.
``left = round((455 - 224) / 2)``, ``top = round((256 - 224) / 2)``. See :func:`dino_crop_box`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from PIL import Image
from torchvision import transforms

__all__ = [
    "DINO_CROP_SIZE",
    "DINO_RESIZE",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "dino_crop_box",
    "dino_transform",
]

DINO_RESIZE = 256
DINO_CROP_SIZE = 224
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

ImageTransform = Callable[[Image.Image], torch.Tensor]


def dino_transform(resize: int = DINO_RESIZE, crop: int = DINO_CROP_SIZE) -> ImageTransform:
    """The DINO eval transform: PIL RGB image -> normalised ``[3, crop, crop]`` float tensor."""
    return transforms.Compose(
        [
            transforms.Resize(resize, interpolation=transforms.InterpolationMode.BICUBIC),
            transforms.CenterCrop(crop),
            transforms.ToTensor(),
            transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )


def dino_crop_box(
    width: int, height: int, resize: int = DINO_RESIZE, crop: int = DINO_CROP_SIZE
) -> tuple[tuple[int, int], tuple[int, int, int, int]]:
    """Where :func:`dino_transform` crops: ``((resized_w, resized_h), (left, top, right, bottom))``.

    Mirrors torchvision's rules: the long side is ``int(resize * long / short)`` and the crop
    offsets are ``int(round((size - crop) / 2))``.
    """
    if width <= height:
        new_w, new_h = resize, int(resize * height / width)
    else:
        new_w, new_h = int(resize * width / height), resize
    left = round((new_w - crop) / 2.0)
    top = round((new_h - crop) / 2.0)
    return (new_w, new_h), (left, top, left + crop, top + crop)
