"""Model FLOPs and MFU: counted on the real SD 1.5 architecture (on the meta device, so no
memory and no time), and the MFU arithmetic."""

from __future__ import annotations

from typing import Any

import pytest

from harness.bench.flops import ModelFlops, count_flops, mfu, peak_flops
from harness.models import parse_model_ref
from harness.models.tiny import build_random_sd15


@pytest.fixture(scope="module")
def sd15_meta() -> Any:
    return build_random_sd15(device="meta")


def test_the_random_sd15_has_the_real_architectures_parameter_counts(sd15_meta: Any) -> None:
    """The published sizes of SD 1.5's components: the random model is the real architecture."""
    counts = {
        name: sum(p.numel() for p in getattr(sd15_meta, name).parameters())
        for name in ("unet", "vae", "text_encoder")
    }
    assert counts == {"unet": 859_520_964, "vae": 83_653_863, "text_encoder": 123_060_480}
    assert parse_model_ref("random://sd15").kind == "random"


def test_flops_of_one_unet_forward_and_one_decode_at_512(sd15_meta: Any) -> None:
    flops = count_flops(sd15_meta, 512)
    # SD 1.5's UNet at a 64x64 latent: about 0.8 TFLOPs per forward (0.4 T multiply-adds).
    assert 0.6e12 < flops.unet_forward < 1.0e12, flops
    assert 2.0e12 < flops.vae_decode < 3.0e12, flops  # the decoder at 512 px: 1.25 T MACs
    assert count_flops(sd15_meta, 256).unet_forward < flops.unet_forward / 3


def test_train_step_and_image_flops_and_mfu() -> None:
    flops = ModelFlops(unet_forward=1e12, vae_decode=2e12)
    assert flops.train_step(4) == 8e12
    assert flops.image(25, guidance=True) == 52e12
    assert flops.image(25, guidance=False) == 27e12
    assert mfu(494.5e12, 1.0, peak_flops("NVIDIA H100 80GB HBM3") or 0) == pytest.approx(0.5)
    assert peak_flops("NVIDIA H100 PCIe") == 756e12 and peak_flops("NVIDIA H200") == 989e12
    assert peak_flops("Some GPU") is None


def test_sdxl_flops_are_counted_with_its_added_conditions() -> None:
    """SDXL's UNet needs the pooled text embedding and the size/crop ids to run at all."""
    from harness.models.tiny import build_tiny_pipeline

    flops = count_flops(build_tiny_pipeline("sdxl"), 64)
    assert flops.unet_forward > 0 and flops.vae_decode > 0


def test_bench_mfu_per_pass_against_the_cards_peak() -> None:
    """The MFU arithmetic of ``harness bench`` on CUDA, from counted FLOPs and measured times."""
    from types import SimpleNamespace

    from harness.bench import pass_figures
    from harness.bench.paths import PathRun
    from harness.config import HarnessConfig, InferenceSetting

    cfg = HarnessConfig.model_validate({"preset": "t", "train": {"batch_size": 4}})
    inputs = SimpleNamespace(
        cfg=cfg, settings=(InferenceSetting(guidance_scale=7.5, num_inference_steps=25),)
    )
    flops = ModelFlops(unet_forward=1e12, vae_decode=2e12)
    # 100 steps of 8e12 FLOPs in 2 s; 10 images of 52e12 FLOPs in 1.3 s: 400 TFLOP/s each,
    # 40.44% of the H100's 989.
    run = PathRun(
        points=1, train_s=2.0, train_steps=100, generate_s=1.3, images=10, score_s=1.0, scored=10
    )
    figures = pass_figures(inputs, "cuda (NVIDIA H100 80GB HBM3)", flops)  # type: ignore[arg-type]
    for name in ("training MFU", "generation MFU"):
        unit, value = figures[name]
        assert unit == "%" and value(run) == pytest.approx(40.44, abs=0.01)
    unknown = pass_figures(inputs, "cuda (Mystery)", flops)  # type: ignore[arg-type]
    assert "training MFU" not in unknown and "generation MFU" not in unknown
