"""Exponential moving average of the adapter weights (``train.ema_decay``).

Plain EMA, in fp32: the average starts at the adapters' initial weights and after every
optimizer step becomes ``decay * average + (1 - decay) * weights``, with the configured decay
from the first step on (no warmup; its memory is about ``1 / (1 - decay)`` steps, so a decay
whose window is long against ``max_steps`` keeps much of the initialisation). Every process
updates its own copy from its (identical) weights, so the copies stay equal without
communication. Checkpoints write the average as the adapter and keep both it and the raw
weights in the resumable state.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

__all__ = ["AdapterEMA"]

SEP = "::"  # "<component>::<PEFT key>", as in the checkpoint's state/lora.safetensors


class AdapterEMA:
    """The average of PEFT-format adapter tensors per component (``unet``, ``text_encoder``...)."""

    def __init__(self, decay: float, initial: Mapping[str, Mapping[str, torch.Tensor]]) -> None:
        self.decay = decay
        self.average = {
            component: {k: v.detach().float().clone() for k, v in state.items()}
            for component, state in initial.items()
        }

    @torch.no_grad()
    def update(self, weights: Mapping[str, Mapping[str, torch.Tensor]]) -> None:
        """One step: ``average = decay * average + (1 - decay) * weights``."""
        for component, state in self.average.items():
            current = weights[component]
            for key, avg in state.items():
                avg.lerp_(current[key].detach().float(), 1.0 - self.decay)

    def flat(self) -> dict[str, torch.Tensor]:
        """The average as ``{"<component>::<key>": tensor}`` (for safetensors)."""
        return {f"{c}{SEP}{k}": v for c, state in self.average.items() for k, v in state.items()}

    def load_flat(self, flat: Mapping[str, torch.Tensor]) -> None:
        """Inverse of :meth:`flat` (on resume); the keys must be exactly this average's.

        Raises:
            ValueError: a tensor is missing or unexpected.
        """
        expected = set(self.flat())
        if set(flat) != expected:
            missing, unexpected = sorted(expected - set(flat)), sorted(set(flat) - expected)
            raise ValueError(
                f"EMA state does not match (missing {missing[:3]}, unexpected {unexpected[:3]})"
            )
        for name, value in flat.items():
            component, key = name.split(SEP, 1)
            self.average[component][key].copy_(value)
