"""Export trained LoRA adapters in the kohya-ss layout read by A1111, ComfyUI and diffusers.

Every trained module ``M`` becomes three tensors::

    <prefix><M with "." replaced by "_">.lora_down.weight   (rank, in[, k, k])  = PEFT lora_A
    <prefix><M with "." replaced by "_">.lora_up.weight     (out, rank[, 1, 1]) = PEFT lora_B
    <prefix><M with "." replaced by "_">.alpha              scalar; scale = alpha / rank

with kohya-ss/sd-scripts' module names (``networks/lora.py``):

* UNet, prefix ``lora_unet_``: for SD 1.x the diffusers module names
  (``down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_k``: sd-scripts trains SD 1.x on a
  diffusers-structured UNet); for SDXL the original sgm/LDM names
  (``input_blocks_4_1_transformer_blocks_0_attn1_to_k``: sd-scripts' SDXL UNet is the sgm one).
* CLIP text encoders, rooted at ``text_model`` (``lora_te_text_model_encoder_layers_0_self_attn_
  q_proj``), prefix ``lora_te_`` for SD 1.x and ``lora_te1_`` / ``lora_te2_`` for SDXL's two.

diffusers' ``load_lora_weights`` converts exactly these names back
(``_maybe_map_sgm_blocks_to_diffusers`` + ``_convert_non_diffusers_lora_to_diffusers``).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig

from harness.models.ldm import ldm_unet_module_name
from harness.train.tensorfiles import atomic_write_tensors

__all__ = ["export_kohya", "kohya_module_name", "kohya_state_dict"]

_TE_PREFIX = {
    "sd15": {"text_encoder": "lora_te_"},
    "sdxl": {"text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"},
}
_ARCHITECTURE = {"sd15": "stable-diffusion-v1/lora", "sdxl": "stable-diffusion-xl-v1-base/lora"}
_BASE_VERSION = {"sd15": "sd_v1", "sdxl": "sdxl_base_v1-0"}


def kohya_module_name(
    component: str, path: str, family: str, unet_config: Mapping[str, Any] | None = None
) -> str:
    """The kohya name (prefix included, no suffix) of module ``path`` of ``component``.

    Raises:
        ValueError: for a component that has no kohya prefix in ``family``.
    """
    if component == "unet":
        if family == "sdxl":
            if unet_config is None:
                raise ValueError("SDXL UNet names need the UNet config")
            path = ldm_unet_module_name(path, dict(unet_config))
        return "lora_unet_" + path.replace(".", "_")
    prefix = _TE_PREFIX.get(family, {}).get(component)
    if prefix is None:
        raise ValueError(f"no kohya prefix for component {component!r} of a {family} model")
    if not path.startswith(("text_model.", "text_projection")):
        path = "text_model." + path  # transformers >= 5.6 flattened CLIPTextModel
    return prefix + path.replace(".", "_")


def _split_peft_key(key: str) -> tuple[str, str]:
    """``a.b.lora_A.weight`` -> (``a.b``, ``lora_down.weight``)."""
    for peft_name, kohya_name in (("lora_A", "lora_down"), ("lora_B", "lora_up")):
        marker = f".{peft_name}.weight"
        if key.endswith(marker):
            return key.removesuffix(marker), f"{kohya_name}.weight"
    raise ValueError(f"kohya export supports plain LoRA weights only, not {key!r}")


def kohya_state_dict(
    family: str,
    peft_state: Mapping[str, Mapping[str, torch.Tensor]],
    configs: Mapping[str, LoraConfig],
    unet_config: Mapping[str, Any] | None = None,
) -> dict[str, torch.Tensor]:
    """kohya tensors (down, up and a scalar alpha for every module) from PEFT state dicts."""
    out: dict[str, torch.Tensor] = {}
    for component, state in peft_state.items():
        config = configs[component]
        for key, value in state.items():
            path, suffix = _split_peft_key(key)
            name = kohya_module_name(component, path, family, unet_config)
            out[f"{name}.{suffix}"] = value.detach().float().contiguous().cpu()
            alpha = _module_alpha(config, path)
            out[f"{name}.alpha"] = torch.tensor(alpha, dtype=torch.float32)
    return out


def _module_alpha(config: LoraConfig, path: str) -> float:
    """The alpha PEFT used for module ``path`` (``alpha_pattern`` first, then ``lora_alpha``)."""
    for pattern, alpha in (config.alpha_pattern or {}).items():
        if path == pattern or path.endswith("." + pattern):
            return float(alpha)
    return float(config.lora_alpha)


def export_kohya(
    out_file: Path,
    family: str,
    peft_state: Mapping[str, Mapping[str, torch.Tensor]],
    configs: Mapping[str, LoraConfig],
    unet_config: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``out_file`` (safetensors) in the kohya layout; see the module docstring."""
    tensors = kohya_state_dict(family, peft_state, configs, unet_config)
    unet = configs.get("unet")
    metadata = {
        "format": "pt",
        "ss_network_module": "networks.lora",
        "ss_base_model_version": _BASE_VERSION.get(family, family),
        "modelspec.architecture": _ARCHITECTURE.get(family, family),
    }
    if unet is not None:
        metadata["ss_network_dim"] = str(unet.r)
        metadata["ss_network_alpha"] = f"{float(unet.lora_alpha):g}"
    atomic_write_tensors(out_file, tensors, metadata)
    return out_file
