"""Model FLOPs of training and generation, and model FLOP utilisation (MFU) on CUDA.

FLOPs are counted, not estimated: :class:`torch.utils.flop_counter.FlopCounterMode` records
every matmul and convolution of one UNet forward (batch 1, the evaluation resolution's latent,
77 text tokens) and one VAE decode. Then

- a training step is ``2 x train.batch_size`` UNet forwards: the forward and the backward
  through the frozen weights (activation gradients; the LoRA weights' own gradients are
  negligible), with latents and text embeddings cached (the harness path) so neither encoder
  runs;
- an image is ``steps x (2 with guidance, else 1)`` UNet forwards (classifier-free guidance
  runs both halves) and one VAE decode.

MFU is achieved FLOP/s over the card's dense bf16 peak (:data:`PEAK_BF16`, from the vendors'
data sheets); for a card not in the table it is not printed.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from harness.config import InferenceSetting

__all__ = ["PEAK_BF16", "ModelFlops", "count_flops", "mfu", "peak_flops", "unknown_peak"]

# Dense (no sparsity) bf16 tensor-core peaks, FLOP/s, by a substring of the device name.
PEAK_BF16: dict[str, float] = {
    "H200": 989e12,
    "H100 PCIe": 756e12,
    "H100": 989e12,
    "A100": 312e12,
    "L40S": 362e12,
    "L4": 121e12,
    "A10": 125e12,
    "RTX 4090": 165e12,
}


@dataclass(frozen=True)
class ModelFlops:
    """FLOPs of one UNet forward (batch 1), one VAE decode (one image)."""

    unet_forward: float
    vae_decode: float

    def train_step(self, batch_size: int) -> float:
        """One LoRA training step: forward and backward through the frozen UNet."""
        return 2.0 * batch_size * self.unet_forward

    def image(self, steps: int, guidance: bool) -> float:
        """One generated image: every denoising step's UNet forward(s), then the decode."""
        return steps * (2 if guidance else 1) * self.unet_forward + self.vae_decode

    def mean_image(self, settings: Sequence[InferenceSetting]) -> float:
        """An image's FLOPs averaged over ``settings`` (each generates as many images)."""
        return statistics.mean(
            self.image(s.num_inference_steps, s.guidance_scale > 1.0) for s in settings
        )


def count_flops(pipeline: Any, resolution: int) -> ModelFlops:
    """Count one UNet forward and one VAE decode of ``pipeline`` at ``resolution`` pixels.

    Works on any device, the ``meta`` device included (shapes only, no arithmetic)."""
    from torch.utils.flop_counter import FlopCounterMode

    unet, vae = pipeline.unet, pipeline.vae
    param = next(unet.parameters())
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    side = resolution // factor
    latents = torch.zeros(
        1, unet.config.in_channels, side, side, device=param.device, dtype=param.dtype
    )
    context = torch.zeros(
        1, 77, unet.config.cross_attention_dim, device=param.device, dtype=param.dtype
    )
    timestep = torch.tensor([10], device=param.device)
    extra = _added_conditions(pipeline, param)
    with torch.no_grad():
        with FlopCounterMode(display=False) as unet_count:
            unet(latents, timestep, encoder_hidden_states=context, **extra)
        with FlopCounterMode(display=False) as vae_count:
            vae.decode(latents.to(next(vae.parameters()).dtype))
    return ModelFlops(float(unet_count.get_total_flops()), float(vae_count.get_total_flops()))


def _added_conditions(pipeline: Any, param: torch.Tensor) -> dict[str, Any]:
    """SDXL's pooled text embedding and size/crop ids (SD 1.x needs none)."""
    if getattr(pipeline.unet.config, "addition_embed_type", None) != "text_time":
        return {}
    pooled = pipeline.text_encoder_2.config.projection_dim
    return {
        "added_cond_kwargs": {
            "text_embeds": torch.zeros(1, pooled, device=param.device, dtype=param.dtype),
            "time_ids": torch.zeros(1, 6, device=param.device, dtype=param.dtype),
        }
    }


def peak_flops(device_name: str) -> float | None:
    """The dense bf16 peak of a CUDA device by name, or None when unknown."""
    for key, value in PEAK_BF16.items():
        if key in device_name:
            return value
    return None


def unknown_peak(device: str) -> str:
    """The line printed instead of MFU figures for a card not in :data:`PEAK_BF16`."""
    return f"model FLOP utilisation: the bf16 peak of {device} is not known"


def mfu(flops: float, seconds: float, peak: float) -> float:
    """Model FLOP utilisation: ``flops`` done in ``seconds`` against ``peak`` FLOP/s."""
    return flops / seconds / peak
