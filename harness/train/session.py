"""The objects one ``train_lora`` call trains with: what a checkpoint saves and restores."""

from __future__ import annotations

from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

import torch
from accelerate import Accelerator

from harness.config import HarnessConfig
from harness.models import LoadedModel
from harness.train.attachment import Attachment, param_groups
from harness.train.distributed import broadcast_parameters
from harness.train.ema import AdapterEMA
from harness.train.lora import AttachedLora
from harness.train.optim import build_optimizer

__all__ = ["TrainingSession", "open_session"]


@dataclass
class TrainingSession:
    """Adapters, optimizer, LR schedule and noise generator of one training call.

    ``optimizer`` is accelerate's wrapper (it steps through the fp16 ``GradScaler`` when there
    is one); :attr:`torch_optimizer` is the optimizer inside it (``train.optimizer``), whose
    state is checkpointed. ``ema`` is the average of the adapter weights (``train.ema_decay``).
    """

    cfg: HarnessConfig
    model: LoadedModel
    accelerator: Accelerator
    attachment: Attachment
    optimizer: Any
    lr_scheduler: Any
    generator: torch.Generator
    ema: AdapterEMA | None = None

    @property
    def lora(self) -> AttachedLora:
        """The adapters being trained."""
        return self.attachment.lora

    @property
    def torch_optimizer(self) -> torch.optim.Optimizer:
        """The plain optimizer (no accelerate wrapper)."""
        inner: torch.optim.Optimizer = self.optimizer.optimizer
        return inner

    @property
    def scaler(self) -> torch.amp.GradScaler | None:
        """The fp16 loss scaler (``None`` without fp16 mixed precision)."""
        scaler: torch.amp.GradScaler | None = self.accelerator.scaler
        return scaler

    def parameters(self) -> list[torch.nn.Parameter]:
        """The trainable parameters, in optimizer order (current after a suspension)."""
        return [p for g in self.optimizer.param_groups for p in g["params"]]

    def adapter_state(self) -> dict[str, dict[str, torch.Tensor]]:
        """The adapter a checkpoint publishes: the EMA when it is on, else the weights."""
        if self.ema is not None:
            return self.ema.average
        return self.lora.peft_state_dicts()

    def suspended(self) -> AbstractContextManager[None]:
        """The base pipeline for a callback (see :meth:`Attachment.suspended`)."""
        return self.attachment.suspended(self.torch_optimizer, self.generator)


def open_session(
    cfg: HarnessConfig, model: LoadedModel, accelerator: Accelerator, attachment: Attachment
) -> TrainingSession:
    """Optimizer, LR schedule and EMA for the attached adapters, and this process's generator.

    Process ``p`` draws its noise from ``seed + p`` (process 0 from ``seed``, as a single
    process does) and, after the adapters are made equal everywhere, its dropout from the
    global RNG seeded the same way. The EMA starts from the equalised adapters.
    """
    from diffusers.optimization import get_scheduler

    t, index = cfg.train, accelerator.process_index
    lora = attachment.lora
    broadcast_parameters(accelerator, [p for c in lora.modules for p in lora.parameters(c)])
    if index:
        torch.manual_seed(t.seed + index)
    inner = build_optimizer(param_groups(lora, t), t, model.device)
    lr_scheduler = get_scheduler(
        t.lr_scheduler, inner, num_warmup_steps=t.lr_warmup_steps, num_training_steps=t.max_steps
    )
    optimizer = accelerator.prepare_optimizer(inner, device_placement=False)
    generator = torch.Generator("cpu").manual_seed(t.seed + index)
    ema = AdapterEMA(t.ema_decay, lora.peft_state_dicts()) if t.ema_decay is not None else None
    return TrainingSession(
        cfg, model, accelerator, attachment, optimizer, lr_scheduler, generator, ema
    )
