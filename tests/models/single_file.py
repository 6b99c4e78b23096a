"""A test helper: SD 1.x pipelines saved as one original-layout (LDM) safetensors file.

Model sites distribute single-file checkpoints in the CompVis layout (``model.diffusion_model.*``,
``first_stage_model.*``, ``cond_stage_model.transformer.*``). Writing a tiny one lets the tests
exercise the real ``from_single_file`` loading path; no command of the harness writes one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from harness.models.ldm import _RESNET, _rename, _unet_prefix_map


def unet_to_ldm(state_dict: dict[str, torch.Tensor], config: dict[str, Any]) -> dict[str, Any]:
    """Rename a diffusers UNet state dict to LDM keys (``model.diffusion_model.`` prefix)."""
    prefixes = _unet_prefix_map(config)
    return {
        "model.diffusion_model." + _rename(k, prefixes, _RESNET): v for k, v in state_dict.items()
    }


def _vae_prefix_map(config: dict[str, Any]) -> dict[str, str]:
    n_blocks = len(config["block_out_channels"])
    per_block = int(config.get("layers_per_block", 1))
    prefixes: dict[str, str] = {
        "encoder.mid_block.attentions.0": "encoder.mid.attn_1",
        "decoder.mid_block.attentions.0": "decoder.mid.attn_1",
        "encoder.conv_norm_out": "encoder.norm_out",
        "decoder.conv_norm_out": "decoder.norm_out",
    }
    for side in ("encoder", "decoder"):
        for j in range(2):
            prefixes[f"{side}.mid_block.resnets.{j}"] = f"{side}.mid.block_{j + 1}"
    for i in range(n_blocks):
        for j in range(per_block):
            prefixes[f"encoder.down_blocks.{i}.resnets.{j}"] = f"encoder.down.{i}.block.{j}"
        for j in range(per_block + 1):
            up = n_blocks - 1 - i  # diffusers numbers decoder blocks in reverse
            prefixes[f"decoder.up_blocks.{i}.resnets.{j}"] = f"decoder.up.{up}.block.{j}"
        if i < n_blocks - 1:
            prefixes[f"encoder.down_blocks.{i}.downsamplers.0"] = f"encoder.down.{i}.downsample"
            up = n_blocks - 1 - i
            prefixes[f"decoder.up_blocks.{i}.upsamplers.0"] = f"decoder.up.{up}.upsample"
    return prefixes


_VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def vae_to_ldm(state_dict: dict[str, torch.Tensor], config: dict[str, Any]) -> dict[str, Any]:
    """Rename a diffusers VAE state dict to LDM keys (``first_stage_model.`` prefix)."""
    prefixes = _vae_prefix_map(config)
    out: dict[str, Any] = {}
    for key, value in state_dict.items():
        new = key
        for src in sorted(prefixes, key=len, reverse=True):
            if key.startswith(src + "."):
                rest = key[len(src) + 1 :].replace("conv_shortcut", "nin_shortcut")
                if src.endswith("attentions.0"):
                    for old, short in _VAE_ATTN.items():
                        if rest.startswith(old + "."):
                            rest = short + rest[len(old) :]
                            if short != "norm" and value.ndim == 2:
                                value = value[:, :, None, None]  # LDM uses 1x1 convolutions
                            break
                new = f"{prefixes[src]}.{rest}"
                break
        out["first_stage_model." + new] = value
    return out


def save_sd15_single_file(pipeline: Any, path: str | Path) -> Path:
    """Save an SD 1.x pipeline's UNet, VAE and text encoder as one LDM-layout safetensors file."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"{path}: single-file checkpoints are written as .safetensors only")
    if getattr(pipeline, "text_encoder_2", None) is not None:
        raise ValueError("save_sd15_single_file supports SD 1.x pipelines, not SDXL")
    state: dict[str, torch.Tensor] = {}
    state.update(unet_to_ldm(pipeline.unet.state_dict(), dict(pipeline.unet.config)))
    state.update(vae_to_ldm(pipeline.vae.state_dict(), dict(pipeline.vae.config)))
    for key, value in pipeline.text_encoder.state_dict().items():
        # transformers >= 5.6 flattened CLIPTextModel (no ``text_model.`` level); LDM has it.
        key = key if key.startswith("text_model.") else "text_model." + key
        state["cond_stage_model.transformer." + key] = value
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(path))
    return path
