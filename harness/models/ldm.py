"""diffusers -> original (LDM/sgm) Stable Diffusion UNet names.

Model sites distribute checkpoints in the original CompVis layout (``model.diffusion_model.*``),
and kohya-ss names SDXL LoRA modules after the same UNet layout: :func:`ldm_unet_module_name`
renames one diffusers UNet module (the kohya export uses it). The tables also serve the tests'
single-file checkpoint writer (``tests/models/single_file.py``), which no command needs.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["ldm_unet_module_name"]

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
