"""Tiny, seeded, randomly initialised Stable Diffusion pipelines for CPU tests and demos.

They have the real architecture (UNet with cross-attention, KL VAE, CLIP text encoders, a real
CLIP BPE tokenizer built offline from the vocabulary that ``open_clip`` ships) at a size that
trains and samples in seconds on two CPU cores. Scores obtained with them mean nothing about
image quality; they exercise every code path.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Literal

import torch

from harness.clip_bpe import build_clip_tokenizer
from harness.config import TINY_VERSION

TinyKind = Literal["sd15", "sdxl"]
TINY_KINDS: tuple[TinyKind, ...] = ("sd15", "sdxl")


def default_cache_root() -> Path:
    """Root of the harness' own on-disk caches (``HARNESS_CACHE_DIR`` or ``~/.cache/harness``)."""
    env = os.environ.get("HARNESS_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "harness"


def _text_config(projection: bool) -> Any:
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=49408,
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
        hidden_act="gelu" if projection else "quick_gelu",
        projection_dim=32,
    )


def _vae() -> Any:
    """Four levels, as Stable Diffusion's VAE: latents 8x smaller than the image (64 px photos,
    8x8 latents), so the tiny UNet works on the latent size a real one sees, scaled down."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        block_out_channels=(16, 32, 64, 64),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        norm_num_groups=16,
        sample_size=64,
    )


def build_tiny_pipeline(kind: TinyKind, seed: int = 0) -> Any:
    """Build a tiny random pipeline in memory (use :func:`tiny_pipeline_dir` for the cache)."""
    if kind not in TINY_KINDS:
        raise ValueError(f"unknown tiny model {kind!r}; choose one of {', '.join(TINY_KINDS)}")
    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory() as tmp:
        if kind == "sd15":
            return _tiny_sd15(Path(tmp))
        return _tiny_sdxl(Path(tmp))


# The UNet layout both tiny models share: two levels, attention in the lower one.
_TINY_UNET: dict[str, Any] = {
    "block_out_channels": (32, 64),
    "layers_per_block": 2,
    "sample_size": 8,  # latents of 64 px images (the VAE's 8x): the pipelines' default size
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
}


def sd_scheduler() -> Any:
    """DDIM with Stable Diffusion's noise schedule (scaled linear betas 0.00085..0.012)."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )


def _tiny_sd15(tokenizer_dir: Path) -> Any:
    """The SD 1.x pipeline: one CLIP text encoder, DDIM (components drawn in this order)."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    unet = UNet2DConditionModel(**_TINY_UNET, cross_attention_dim=32)
    vae = _vae()
    text_encoder = CLIPTextModel(_text_config(projection=False))
    return StableDiffusionPipeline(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=build_clip_tokenizer(tokenizer_dir),
        scheduler=sd_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def _tiny_sdxl(tokenizer_dir: Path) -> Any:
    """The SDXL pipeline: two text encoders, micro-conditioning, Euler (drawn in this order)."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    unet = UNet2DConditionModel(
        **_TINY_UNET,
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=80,  # 6 * addition_time_embed_dim + 32
        cross_attention_dim=64,  # both text encoders' hidden states, concatenated
    )
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        steps_offset=1,
        timestep_spacing="leading",
    )
    return StableDiffusionXLPipeline(
        unet=unet,
        vae=_vae(),
        text_encoder=CLIPTextModel(_text_config(projection=True)),
        text_encoder_2=CLIPTextModelWithProjection(_text_config(projection=True)),
        tokenizer=build_clip_tokenizer(tokenizer_dir),
        tokenizer_2=build_clip_tokenizer(tokenizer_dir / "2", pad_token="!"),
        scheduler=scheduler,
    )


def tiny_pipeline_dir(kind: TinyKind, cache_root: Path | None = None, seed: int = 0) -> Path:
    """Path of the cached diffusers folder of ``tiny://<kind>``, building it on first use.

    The folder is written under a temporary name and renamed into place, so concurrent
    workers never see half a model.
    """
    root = (cache_root or default_cache_root()) / "tiny"
    target = root / f"{kind}-v{TINY_VERSION}-seed{seed}"
    if (target / "model_index.json").is_file():
        return target
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{kind}-", dir=root))
    try:
        build_tiny_pipeline(kind, seed).save_pretrained(staging, safe_serialization=True)
        try:
            staging.rename(target)
        except OSError:
            # Another process won the race; its copy is identical (same seed and configs).
            if not (target / "model_index.json").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


# The Stable Diffusion 1.5 architecture (its published component configs), for benchmarks:
# speed does not depend on the weights' values, so a random model times like the real one.
SD15_UNET: dict[str, Any] = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": (320, 640, 1280, 1280),
    "layers_per_block": 2,
    "attention_head_dim": 8,
    "cross_attention_dim": 768,
    "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
}
SD15_VAE: dict[str, Any] = {
    "block_out_channels": (128, 256, 512, 512),
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "latent_channels": 4,
    "layers_per_block": 2,
    "sample_size": 512,
}
SD15_TEXT: dict[str, Any] = {  # CLIP ViT-L/14's text tower
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "projection_dim": 768,
}


def build_random_sd15(seed: int = 0, device: str | torch.device = "cpu") -> Any:
    """An SD 1.5-architecture pipeline with random weights, built on ``device`` (``meta``:
    shapes only, instantly). Nothing is downloaded; the tokenizer is the offline CLIP BPE."""
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    text = CLIPTextConfig(
        vocab_size=49408,
        max_position_embeddings=77,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
        hidden_act="quick_gelu",
        **SD15_TEXT,
    )
    with torch.device(device):
        unet = UNet2DConditionModel(**SD15_UNET)
        vae = AutoencoderKL(in_channels=3, out_channels=3, **SD15_VAE)
        text_encoder = CLIPTextModel(text)
    with tempfile.TemporaryDirectory() as tmp:
        return StableDiffusionPipeline(
            unet=unet,
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=build_clip_tokenizer(Path(tmp)),
            scheduler=sd_scheduler(),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
