"""The training adapters on the caller's (shared) pipeline, and how they step aside.

The sweep evaluates each checkpoint on the very pipeline it trains on, from inside
``on_checkpoint``: :meth:`Attachment.suspended` hands it the untouched base model and puts
the adapters back afterwards exactly as they were, so the callback cannot change the
training trajectory.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

import torch

from harness.config import TrainConfig
from harness.models import LoadedModel
from harness.train.lora import AttachedLora, attached_lora
from harness.train.state import capture_rng, restore_rng

__all__ = ["Attachment", "param_groups"]

logger = logging.getLogger(__name__)


def param_groups(lora: AttachedLora, train: TrainConfig) -> list[dict[str, Any]]:
    """Optimizer groups: UNet LoRA at ``learning_rate``, text-encoder LoRA at ``text_encoder_lr``
    (Prodigy replaces both with its multiplier, see :mod:`harness.train.optim`)."""
    groups: list[dict[str, Any]] = [
        {"params": lora.parameters("unet"), "lr": train.learning_rate, "name": "unet"}
    ]
    te_params = [p for c in lora.modules if c != "unet" for p in lora.parameters(c)]
    if te_params:
        groups.append({"params": te_params, "lr": train.text_encoder_lr, "name": "text_encoder"})
    return groups


def _rebind(
    optimizer: torch.optim.Optimizer, old: list[list[Any]], new: list[dict[str, Any]]
) -> None:
    """Point the optimizer's groups and per-parameter state at re-created parameters."""
    for group, old_params, fresh in zip(optimizer.param_groups, old, new, strict=True):
        for old_p, new_p in zip(old_params, fresh["params"], strict=True):
            if old_p in optimizer.state:
                optimizer.state[new_p] = optimizer.state.pop(old_p)
        group["params"] = fresh["params"]


class Attachment:
    """The training adapters on the shared pipeline; can be detached and re-attached."""

    def __init__(self, model: LoadedModel, train: TrainConfig) -> None:
        self._model, self._train = model, train
        self._cm: contextlib.AbstractContextManager[AttachedLora] | None = None
        self._lora: AttachedLora | None = None

    @property
    def lora(self) -> AttachedLora:
        """The attached adapters (an error while suspended)."""
        if self._lora is None:
            raise RuntimeError("training adapters are detached")
        return self._lora

    def attach(self) -> AttachedLora:
        """Add fresh adapters (their initialisation does not advance the global RNG)."""
        rng = torch.get_rng_state()  # LoRA init draws from it; keep the trajectory seeded
        self._cm = attached_lora(self._model, self._train)
        self._lora = self._cm.__enter__()
        torch.set_rng_state(rng)
        return self._lora

    def detach(self) -> None:
        """Remove the adapters and undo everything :meth:`attach` changed."""
        if self._cm is not None:
            cm, self._cm, self._lora = self._cm, None, None
            cm.__exit__(None, None, None)

    def __enter__(self) -> Attachment:
        self.attach()
        return self

    def __exit__(self, *exc: object) -> None:
        self.detach()

    @contextlib.contextmanager
    def suspended(
        self, optimizer: torch.optim.Optimizer, generator: torch.Generator
    ) -> Iterator[None]:
        """Give the caller the untouched base pipeline (adapters detached, eval mode), e.g. for
        a proxy evaluation that loads the checkpoint itself; then re-attach the adapters with
        the same weights, re-bind ``optimizer``'s state and restore all RNG states."""
        lora_state = {
            c: {k: v.detach().clone() for k, v in sd.items()}
            for c, sd in self.lora.peft_state_dicts().items()
        }
        rng = capture_rng(generator)
        old_groups = [list(g["params"]) for g in optimizer.param_groups]
        self.detach()

        def restore() -> None:
            self.attach()
            self.lora.load_peft_state_dicts(lora_state)
            _rebind(optimizer, old_groups, param_groups(self.lora, self._train))
            restore_rng(rng, generator)

        try:
            yield
        except BaseException:
            # The callback failed or was interrupted (Ctrl-C, SIGTERM): training stops anyway, so
            # a failed restore must not replace the original exception (the sweep re-queues an
            # interrupted run, but records any other error as a failed one).
            try:
                restore()
            except Exception:
                logger.exception("could not re-attach adapters")
            raise
        restore()
