"""Attach LoRA adapters for training, save them in diffusers format, detach them.

(The kohya export is in :mod:`harness.train.kohya`; :func:`export_kohya` is re-exported here.)

Training happens on the caller's (shared) pipeline under the adapter name :data:`ADAPTER`.
:func:`attached_lora` restores everything it changed when it exits: adapters removed (peft
layers fully unwrapped when the model had none before), ``requires_grad`` flags, train/eval
mode and gradient checkpointing. The base weights are frozen throughout, so they never change.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig
from peft.utils import (
    NoMatchingPeftModuleError,
    get_peft_model_state_dict,
    set_peft_model_state_dict,
)

from harness.config import TrainConfig
from harness.models import LoadedModel
from harness.train.kohya import export_kohya, with_text_model
from harness.train.layout import ADAPTER_WEIGHTS as WEIGHTS_NAME
from harness.train.records import TrainingError

__all__ = [
    "ADAPTER",
    "AttachedLora",
    "attached_lora",
    "export_kohya",
    "lora_configs",
    "save_diffusers_lora",
]

ADAPTER = "harness_train"


def _num(value: float) -> Any:
    """``8.0`` -> ``8`` (peft types alpha as int; fractional alphas work and are kept)."""
    return int(value) if float(value).is_integer() else value


def lora_configs(train: TrainConfig, family: str) -> dict[str, LoraConfig]:
    """One ``LoraConfig`` per trained component (UNet, and text encoders when enabled).

    The text encoders use ``text_encoder_rank`` (default: ``rank``) and ``text_encoder_alpha``
    (default: the UNet's alpha/rank scale); ``use_dora`` makes every adapter DoRA.
    """
    alpha = train.alpha if train.alpha is not None else float(train.rank)
    te_rank = train.text_encoder_rank or train.rank
    te_alpha = train.text_encoder_alpha
    configs = {
        "unet": LoraConfig(
            r=train.rank,
            lora_alpha=_num(alpha),
            lora_dropout=train.dropout,
            init_lora_weights="gaussian",
            target_modules=list(train.target_modules),
            use_dora=train.use_dora,
        )
    }
    if train.train_text_encoder:
        te = LoraConfig(
            r=te_rank,
            lora_alpha=_num(te_alpha if te_alpha is not None else alpha * te_rank / train.rank),
            lora_dropout=train.dropout,
            init_lora_weights="gaussian",
            target_modules=list(train.text_encoder_target_modules),
            use_dora=train.use_dora,
        )
        configs["text_encoder"] = te
        if family == "sdxl":
            configs["text_encoder_2"] = te
    return configs


@dataclass
class AttachedLora:
    """The components being trained, keyed ``unet`` / ``text_encoder`` / ``text_encoder_2``."""

    modules: dict[str, Any]
    configs: dict[str, LoraConfig]
    _restore: list[Any] = field(default_factory=list, repr=False)

    def parameters(self, component: str) -> list[torch.nn.Parameter]:
        """Trainable (LoRA) parameters of one component."""
        return [p for p in self.modules[component].parameters() if p.requires_grad]

    def peft_state_dicts(self) -> dict[str, dict[str, torch.Tensor]]:
        """PEFT-format LoRA tensors per component (adapter name stripped)."""
        return {
            name: get_peft_model_state_dict(module, adapter_name=ADAPTER)
            for name, module in self.modules.items()
        }

    def load_peft_state_dicts(self, state: dict[str, dict[str, torch.Tensor]]) -> None:
        """Inverse of :meth:`peft_state_dicts` (used on resume); every tensor must match."""
        for name, module in self.modules.items():
            result: Any = set_peft_model_state_dict(module, state[name], adapter_name=ADAPTER)
            missing = [k for k in result.missing_keys if "lora_" in k]
            if missing or result.unexpected_keys:
                raise ValueError(
                    f"{name}: LoRA state does not match (missing {missing[:3]}, "
                    f"unexpected {list(result.unexpected_keys)[:3]})"
                )


def _has_peft(module: Any) -> bool:
    return bool(getattr(module, "peft_config", None))


def _detach(module: Any, had_peft: bool) -> None:
    """Remove our adapter; fully unwrap peft layers when the module had none before."""
    from diffusers.utils import recurse_remove_peft_layers

    if had_peft:
        if hasattr(module, "delete_adapters"):
            module.delete_adapters(ADAPTER)
        else:
            module.delete_adapter(ADAPTER)
        return
    recurse_remove_peft_layers(module)
    if hasattr(module, "peft_config"):
        del module.peft_config
    if hasattr(module, "_hf_peft_config_loaded"):
        module._hf_peft_config_loaded = False


# The attention projections of SD's UNet and CLIP text encoders: what the error suggests.
_EXAMPLES = {"unet": "to_q, to_k, to_v, to_out.0", "text_encoder": "q_proj, k_proj, v_proj"}


def _unmatched_targets(module: Any, targets: Iterable[str]) -> list[str]:
    """The names in ``targets`` that no module of ``module`` has (peft's rule: the module's
    full name, or its last dotted part(s))."""
    names = [name for name, _ in module.named_modules()]
    return [t for t in targets if not any(n == t or n.endswith(f".{t}") for n in names)]


def _add_adapter(module: Any, name: str, config: LoraConfig, train: TrainConfig) -> None:
    """Attach our adapter to ``module`` (component ``name``).

    Raises:
        TrainingError: when no module matches the configured target modules, naming the key.
    """
    had_peft = _has_peft(module)
    if had_peft and ADAPTER in module.peft_config:
        _detach(module, had_peft=True)  # left over by an earlier crash
        had_peft = _has_peft(module)
    try:
        module.add_adapter(config, adapter_name=ADAPTER)
    except NoMatchingPeftModuleError:
        # Undo what add_adapter did before it failed, or the next attach fails another way:
        # a module without adapters was marked as having some (with no peft_config), one
        # with adapters has ours registered in peft_config though no layer has it.
        if had_peft:
            module.peft_config.pop(ADAPTER, None)
        else:
            _detach(module, had_peft=False)
        unet = name == "unet"
        key = "train.target_modules" if unet else "train.text_encoder_target_modules"
        targets = list(train.target_modules if unet else train.text_encoder_target_modules)
        missing = _unmatched_targets(module, targets) or targets
        verb = "matches" if len(missing) == 1 else "match"
        raise TrainingError(
            f"{key}: {', '.join(map(repr, missing))} {verb} no layer of the {name} "
            f"({type(module).__name__}); name layers it has, e.g. "
            f"{_EXAMPLES['unet' if unet else 'text_encoder']}"
        ) from None


def _make_trainable(module: Any) -> None:
    """Activate our adapter, its weights in fp32, the module in train mode."""
    if hasattr(module, "set_adapter"):
        module.set_adapter(ADAPTER)
    for param in module.parameters():
        if param.requires_grad:
            param.data = param.data.float()
    module.train()


def _enable_checkpointing(module: Any, name: str) -> bool:
    """Gradient (UNet) or activation (text encoders) checkpointing; True when switched on
    here, so that exit switches it off again."""
    if name == "unet":
        if module.is_gradient_checkpointing:
            return False
        module.enable_gradient_checkpointing()
        return True
    if module.is_activation_checkpointing:
        return False
    module.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    return True


def _disable_checkpointing(module: Any, name: str) -> None:
    if name == "unet":
        module.disable_gradient_checkpointing()
        return
    module.activation_checkpointing_disable()
    if hasattr(module, "disable_input_require_grads"):
        with contextlib.suppress(AttributeError):
            module.disable_input_require_grads()


@contextlib.contextmanager
def attached_lora(
    model: LoadedModel, train: TrainConfig, *, gradient_checkpointing: bool | None = None
) -> Iterator[AttachedLora]:
    """Add fresh LoRA adapters (fp32 trainable weights) for training; undo all on exit."""
    pipe = model.pipeline
    configs = lora_configs(train, model.family)
    checkpointing = (
        train.gradient_checkpointing if gradient_checkpointing is None else gradient_checkpointing
    )
    all_names = ["unet", "text_encoder"] + (["text_encoder_2"] if model.family == "sdxl" else [])
    modules: dict[str, Any] = {n: getattr(pipe, n) for n in all_names}
    saved = {
        n: (
            m.training,
            {k for k, p in m.named_parameters() if p.requires_grad},
            _has_peft(m),
        )
        for n, m in modules.items()
    }
    attached: list[str] = []
    checkpointed: list[str] = []
    try:
        for module in modules.values():
            module.requires_grad_(False)
        for name, config in configs.items():
            _add_adapter(modules[name], name, config, train)
            attached.append(name)
            _make_trainable(modules[name])
            if checkpointing and _enable_checkpointing(modules[name], name):
                checkpointed.append(name)
        yield AttachedLora({n: modules[n] for n in configs}, configs)
    finally:
        for name in checkpointed:
            _disable_checkpointing(modules[name], name)
        for name in attached:
            _detach(modules[name], had_peft=saved[name][2])
        for name, module in modules.items():
            training, grad_names, _ = saved[name]
            for key, param in module.named_parameters():
                param.requires_grad_(key in grad_names)
            module.train(training)


def _unet_to_diffusers(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """PEFT UNet keys -> diffusers' ``<module>.lora.down/up.weight``, for every module.

    ``convert_state_dict_to_diffusers`` renames only attention projections, and diffusers'
    loader decides the format of the whole file from its first key, so a file that mixes both
    spellings (e.g. ``to_q`` with ``proj_in`` or ``conv1``) silently loses half its modules.
    DoRA's ``<module>.lora_magnitude_vector`` keeps its PEFT name: the loader's conversion
    (``convert_unet_state_dict_to_peft``) leaves it as it is, and the adapter metadata
    (``use_dora``) makes the loaded layers DoRA layers.
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        for peft, diffusers in ((".lora_A.", ".lora.down."), (".lora_B.", ".lora.up.")):
            if peft in key:
                key = key.replace(peft, diffusers)
                break
        else:
            if not key.endswith(".lora_magnitude_vector"):
                raise ValueError(f"unexpected LoRA tensor {key!r}")
        out[key] = value
    return out


def _text_encoder_to_diffusers(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """PEFT text-encoder keys -> diffusers' ``lora_linear_layer`` spelling.

    DoRA magnitudes are written ``<module>.lora_magnitude_vector.weight``: transformers' adapter
    loader (which ``load_lora_weights`` uses for text encoders) inserts the adapter name after
    the ``lora_*`` part and would miss the parameter of the bare PEFT key, leaving the
    magnitudes at their initial values; PEFT's own loader reads both spellings.
    """
    from diffusers.utils import convert_state_dict_to_diffusers

    out: dict[str, torch.Tensor] = convert_state_dict_to_diffusers(state)
    return {
        with_text_model(f"{k}.weight" if k.endswith(".lora_magnitude_vector") else k): v
        for k, v in out.items()
    }


def save_diffusers_lora(
    out_dir: Path, family: str, lora: AttachedLora, peft_state: dict[str, dict[str, torch.Tensor]]
) -> Path:
    """Write ``pytorch_lora_weights.safetensors`` loadable by ``pipeline.load_lora_weights``.

    The adapter configs (rank, alpha, targets, ``use_dora``) go into the file's metadata, so an
    alpha that differs from the rank, and DoRA, survive loading.
    """
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    layers = {
        f"{name}_lora_layers": (
            _unet_to_diffusers(sd) if name == "unet" else _text_encoder_to_diffusers(sd)
        )
        for name, sd in peft_state.items()
    }
    metadata = {
        f"{name}_lora_adapter_metadata": lora.configs[name].to_dict() for name in peft_state
    }
    cls = StableDiffusionXLPipeline if family == "sdxl" else StableDiffusionPipeline
    cls.save_lora_weights(
        save_directory=out_dir,
        safe_serialization=True,
        weight_name=WEIGHTS_NAME,
        **layers,
        **metadata,
    )
    return out_dir / WEIGHTS_NAME
