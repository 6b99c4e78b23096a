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

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig

from harness.models.ldm import ldm_unet_module_name
from harness.train.tensorfiles import atomic_write_tensors

__all__ = [
    "UNET_LAYOUT_KEYS",
    "KohyaUnsupported",
    "export_kohya",
    "kohya_from_diffusers",
    "kohya_module_name",
    "kohya_state_dict",
]

# The UNet config keys the SDXL (sgm) module names depend on (harness.models.ldm); a checkpoint
# records them (checkpoint.json's ``unet_layout``) so its file converts without the model.
UNET_LAYOUT_KEYS = ("layers_per_block", "block_out_channels", "up_block_types")


class KohyaUnsupported(ValueError):
    """The adapter has no kohya equivalent (DoRA, rsLoRA) or lacks what naming it needs."""


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
    return prefix + with_text_model(path).replace(".", "_")


def with_text_model(path: str) -> str:
    """``encoder.layers.0...`` -> ``text_model.encoder.layers.0...``: transformers >= 5.6
    flattened ``CLIPTextModel`` (``CLIPTextModelWithProjection`` kept its ``text_model``); LoRA
    files keep the spelling of the hub's, which older diffusers/transformers need (newer
    diffusers strip it again for a flattened model)."""
    return path if path.startswith(("text_model.", "text_projection")) else f"text_model.{path}"


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


# The suffixes of a diffusers-format file (harness.train.lora.save_diffusers_lora: diffusers'
# spellings, and PEFT's own where diffusers' converter keeps them) -> PEFT's
_FROM_DIFFUSERS = {
    ".lora_A.weight": ".lora_A.weight",
    ".lora_B.weight": ".lora_B.weight",
    ".lora.down.weight": ".lora_A.weight",
    ".lora.up.weight": ".lora_B.weight",
    ".lora_linear_layer.down.weight": ".lora_A.weight",
    ".lora_linear_layer.up.weight": ".lora_B.weight",
}


def kohya_from_diffusers(
    weights: Path,
    out_file: Path,
    family: str,
    unet_layout: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``out_file`` in the kohya layout from a diffusers-format LoRA file as
    :func:`harness.train.lora.save_diffusers_lora` writes it (its adapter configs, alphas
    included, in the file's ``lora_adapter_metadata``), with the same tensors: what
    ``harness export`` ships for a run that did not set ``train.export_kohya``.

    Raises:
        KohyaUnsupported: DoRA or rsLoRA adapters, a file without adapter metadata, or an SDXL
            UNet adapter without ``unet_layout`` (its kohya names need the UNet's layout).
    """
    from safetensors import safe_open

    with safe_open(str(weights), framework="pt") as handle:
        meta = json.loads((handle.metadata() or {}).get("lora_adapter_metadata") or "{}")
        names = handle.keys()  # a safe_open handle is not iterable
        tensors = {key: handle.get_tensor(key) for key in names}
    peft_state: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        component, path = key.split(".", 1)
        suffix = next((s for s in _FROM_DIFFUSERS if path.endswith(s)), None)
        if suffix is None:
            raise KohyaUnsupported(f"{weights}: {key} has no kohya equivalent (DoRA?)")
        peft_state.setdefault(component, {})[
            path.removesuffix(suffix) + _FROM_DIFFUSERS[suffix]
        ] = value
    configs = {c: _config_from_metadata(weights, meta, c) for c in peft_state}
    if family == "sdxl" and "unet" in peft_state and unet_layout is None:
        raise KohyaUnsupported(
            f"{weights}: an SDXL UNet adapter's kohya names need the UNet layout, which its "
            "checkpoint.json lacks (written before it was recorded): train with "
            "train.export_kohya: true"
        )
    return export_kohya(out_file, family, peft_state, configs, unet_layout)


def _config_from_metadata(weights: Path, meta: Mapping[str, Any], component: str) -> LoraConfig:
    """The LoRA config of ``component`` from diffusers' packed metadata (``<component>.<key>``)."""
    mine = {k.split(".", 1)[1]: v for k, v in meta.items() if k.startswith(component + ".")}
    if "r" not in mine or "lora_alpha" not in mine:
        raise KohyaUnsupported(f"{weights}: no adapter metadata for {component} (its alpha)")
    if mine.get("use_dora") or mine.get("use_rslora"):
        kind = "DoRA" if mine.get("use_dora") else "rsLoRA"
        raise KohyaUnsupported(f"{weights}: {component} is a {kind} adapter, which kohya lacks")
    return LoraConfig(
        r=int(mine["r"]),
        lora_alpha=mine["lora_alpha"],  # as trained (an int or a float)
        alpha_pattern=dict(mine.get("alpha_pattern") or {}),
        rank_pattern=dict(mine.get("rank_pattern") or {}),
    )
