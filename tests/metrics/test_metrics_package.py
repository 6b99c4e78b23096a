"""Package-level guarantees: standalone (no ``harness`` import), public API, CUDA precision."""

from __future__ import annotations

import ast
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from PIL import Image

import metrics
from metrics.encoders import ImageEncoder, load_clip, load_dino

PACKAGE = Path(metrics.__file__).parent


def test_metrics_never_imports_harness() -> None:
    sources = sorted(PACKAGE.glob("*.py"))
    assert len(sources) >= 10
    for source in sources:
        for node in ast.walk(ast.parse(source.read_text(), filename=str(source))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            else:
                continue
            assert not any(n == "harness" or n.startswith("harness.") for n in names), source


def test_public_api_is_exported() -> None:
    for name in metrics.__all__:
        assert hasattr(metrics, name), name
    assert (PACKAGE / "py.typed").is_file()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_bf16_autocast_on_cuda(make_image: Callable[..., Image.Image]) -> None:
    images = [make_image(s) for s in range(3)]
    loaders: list[Callable[..., ImageEncoder]] = [
        lambda **kw: load_dino("tiny://dino", device="cuda", **kw),
        lambda **kw: load_clip("tiny://clip", None, device="cuda", **kw),
    ]
    for load in loaders:
        fp32, bf16 = load(), load(bf16_autocast=True)
        assert fp32.id.endswith(":fp32") and bf16.id.endswith(":bf16")
        a, b = fp32.encode_images(images), bf16.encode_images(images)
        assert b.dtype == torch.float32 and torch.allclose(a, b, atol=3e-2)
