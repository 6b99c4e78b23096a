"""The CUDA path of the models, generation and training: run with ``pytest -m gpu`` on a GPU
machine (``make gpu-check`` on a lent device), skipped without one and never run in CI."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from harness.config import InferenceSetting, ModelConfig
from harness.generate import Speed, generate_images
from harness.models import LoadedModel, load_pipeline

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]

SETTING = InferenceSetting(guidance_scale=5.0, num_inference_steps=4, scheduler="dpmsolver++")


@pytest.fixture(scope="module")
def bf16() -> LoadedModel:
    return load_pipeline(ModelConfig(pretrained="tiny://sd15", device="cuda", dtype="bfloat16"))


def test_the_pipeline_is_placed_on_the_gpu_in_bf16_with_sdpa_attention(bf16: LoadedModel) -> None:
    assert bf16.device.type == "cuda" and bf16.dtype == torch.bfloat16
    for name in ("unet", "vae", "text_encoder"):
        params = list(getattr(bf16.pipeline, name).parameters())
        assert {p.device.type for p in params} == {"cuda"}, name
        assert {p.dtype for p in params} == {torch.bfloat16}, name
    processors = {type(p).__name__ for p in bf16.pipeline.unet.attn_processors.values()}
    assert processors == {"AttnProcessor2_0"}  # diffusers' torch SDPA attention
    assert bf16.pipeline.text_encoder.config._attn_implementation == "sdpa"


def _images(out: Path, records: list) -> list[np.ndarray]:  # type: ignore[type-arg]
    return [np.asarray(Image.open(out / r.file), dtype=np.float32) for r in records]


def test_bf16_generation_is_deterministic_and_compile_and_channels_last_match_it(
    bf16: LoadedModel, tmp_path: Path
) -> None:
    def generate(out: Path, speed: Speed) -> list[np.ndarray]:
        records = generate_images(
            bf16,
            templates=["a photo of {token} {class_name}"],
            token="sks",
            class_name="toy",
            seeds=[0, 1, 2, 3],
            settings=[SETTING],
            out_dir=out,
            resolution=64,
            batch_size=4,
            progress=False,
            speed=speed,
        )
        return _images(out, records)

    torch.cuda.reset_peak_memory_stats()
    eager = generate(tmp_path / "eager", Speed())
    assert torch.cuda.max_memory_allocated() > 0
    assert all(np.isfinite(image).all() and image.std() > 0 for image in eager)
    again = generate(tmp_path / "again", Speed())
    assert all(np.array_equal(a, b) for a, b in zip(eager, again, strict=True))
    # Compiled kernels and NHWC convolutions round bf16 differently: the same images to
    # within a few levels; afterwards the weights are contiguous again.
    for name, speed in (("compiled", Speed(compile=True)), ("nhwc", Speed(channels_last=True))):
        other = generate(tmp_path / name, speed)
        diffs = [float(np.abs(a - b).mean()) for a, b in zip(eager, other, strict=True)]
        print(f"{name}: mean |difference| per image {diffs}")
        assert max(diffs) < 4.0, (name, diffs)
    assert all(p.is_contiguous() for p in bf16.pipeline.unet.parameters())
