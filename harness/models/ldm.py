"""diffusers <-> original (LDM/sgm) Stable Diffusion names, and SD 1.x single-file checkpoints.

Model sites distribute checkpoints in the original CompVis layout (``model.diffusion_model.*``,
``first_stage_model.*``, ``cond_stage_model.transformer.*``), and kohya-ss names SDXL LoRA
modules after the same UNet layout. :func:`ldm_unet_module_name` renames one diffusers UNet
module (the kohya export uses it); :func:`save_sd15_single_file` writes a whole SD 1.x-family
pipeline whose UNet follows the standard block structure in that layout, so that tests can
exercise the real ``from_single_file`` loading path with tiny models (no command writes one).
Weights are written as safetensors only.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

__all__ = ["ldm_unet_module_name", "save_sd15_single_file", "unet_to_ldm", "vae_to_ldm"]

_RESNET = [
    ("norm1", "in_layers.0"),
    ("conv1", "in_layers.2"),
    ("norm2", "out_layers.0"),
    ("conv2", "out_layers.3"),
    ("time_emb_proj", "emb_layers.1"),
    ("conv_shortcut", "skip_connection"),
]
_UNET_TOP = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}


def _unet_prefix_map(config: dict[str, Any]) -> dict[str, str]:
    """diffusers module prefix -> LDM module prefix for a standard SD UNet layout."""
    per_block = int(config["layers_per_block"])
    n_blocks = len(config["block_out_channels"])
    up_types = config["up_block_types"]
    prefixes: dict[str, str] = dict(_UNET_TOP)
    for i in range(n_blocks):
        for j in range(per_block):
            ldm = f"input_blocks.{(per_block + 1) * i + j + 1}"
            prefixes[f"down_blocks.{i}.resnets.{j}"] = f"{ldm}.0"
            prefixes[f"down_blocks.{i}.attentions.{j}"] = f"{ldm}.1"
        if i < n_blocks - 1:
            prefixes[f"down_blocks.{i}.downsamplers.0.conv"] = (
                f"input_blocks.{(per_block + 1) * (i + 1)}.0.op"
            )
        has_attention = "CrossAttn" in up_types[i]
        for j in range(per_block + 1):
            ldm = f"output_blocks.{(per_block + 1) * i + j}"
            prefixes[f"up_blocks.{i}.resnets.{j}"] = f"{ldm}.0"
            prefixes[f"up_blocks.{i}.attentions.{j}"] = f"{ldm}.1"
        if i < n_blocks - 1:
            ldm = f"output_blocks.{(per_block + 1) * i + per_block}"
            prefixes[f"up_blocks.{i}.upsamplers.0"] = f"{ldm}.{2 if has_attention else 1}"
    prefixes["mid_block.resnets.0"] = "middle_block.0"
    prefixes["mid_block.attentions.0"] = "middle_block.1"
    prefixes["mid_block.resnets.1"] = "middle_block.2"
    return prefixes


def _rename(key: str, prefixes: dict[str, str], inner: list[tuple[str, str]]) -> str:
    """Replace the longest matching module prefix, then resnet-internal names."""
    for src in sorted(prefixes, key=len, reverse=True):
        if key.startswith(src + "."):
            rest = key[len(src) + 1 :]
            if ".resnets." in src or src.startswith("mid_block.resnets"):
                for old, new in inner:
                    if rest.startswith(old + "."):
                        rest = new + rest[len(old) :]
                        break
            return f"{prefixes[src]}.{rest}"
    raise KeyError(f"no LDM name for UNet parameter {key!r}")


def ldm_unet_module_name(diffusers_path: str, unet_config: Mapping[str, Any]) -> str:
    """The original (sgm/LDM) name of a diffusers UNet module or parameter path.

    ``down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_k`` ->
    ``input_blocks.4.1.transformer_blocks.0.attn1.to_k`` for a UNet with two layers per block;
    resnet-internal names are renamed too: ``down_blocks.0.resnets.0.conv1`` ->
    ``input_blocks.1.0.in_layers.2``.

    Raises:
        KeyError: for a path outside the standard SD UNet layout.
    """
    dummy = ".__param__"  # the tables rename "<module>.<rest>": give a bare module a rest
    renamed = _rename(diffusers_path + dummy, _unet_prefix_map(dict(unet_config)), _RESNET)
    return renamed.removesuffix(dummy)


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
