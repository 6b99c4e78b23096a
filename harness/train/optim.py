"""The optimizer of a training run (``train.optimizer``): AdamW, 8-bit AdamW or Prodigy.

* ``adamw``: ``torch.optim.AdamW``, the UNet LoRA at ``learning_rate`` and the text-encoder
  LoRA at ``text_encoder_lr`` (:func:`harness.train.attachment.param_groups`).
* ``adamw8bit``: bitsandbytes' ``AdamW8bit`` (8-bit optimizer states, CUDA only), same groups.
  :func:`check_optimizer` fails before any training work on a machine that cannot run it.
* ``prodigy``: ``prodigyopt.Prodigy``, which estimates the step size ``d`` itself; its ``lr`` is
  a multiplier of that estimate, 1.0 for every group (Prodigy requires equal ones), so the
  configured learning rates are ignored (a warning says so). The remaining arguments are the
  defaults of diffusers' DreamBooth LoRA scripts (``--optimizer prodigy``): decoupled weight
  decay, bias correction and ``safeguard_warmup``.

The LR schedule multiplies each group's ``lr`` in all three cases.
"""

from __future__ import annotations

import contextlib
import io
import logging
from typing import Any

import torch

from harness.config import TrainConfig
from harness.train.records import TrainingError

__all__ = ["PRODIGY_LR", "build_optimizer", "check_optimizer"]

logger = logging.getLogger(__name__)

PRODIGY_LR = 1.0
_warned: set[tuple[float, float]] = set()


def check_optimizer(train: TrainConfig, device: torch.device) -> None:
    """Fail now, naming ``train.optimizer``, when the optimizer cannot run on ``device``.

    Raises:
        TrainingError: ``adamw8bit`` without a CUDA device or without bitsandbytes.
    """
    if train.optimizer == "adamw8bit":
        _adamw8bit_class(device)


def _adamw8bit_class(device: torch.device) -> Any:
    """bitsandbytes' ``AdamW8bit``, or the error that says what to do instead."""
    if device.type != "cuda":
        raise TrainingError(
            f"train.optimizer 'adamw8bit' (bitsandbytes) needs a CUDA device, but this run "
            f"trains on {device.type!r}: use train.optimizer 'adamw' (or 'prodigy') here"
        )
    try:
        import bitsandbytes
    except ImportError:
        raise TrainingError(
            "train.optimizer 'adamw8bit' needs bitsandbytes, which is not installed: install "
            "the 'cuda' extra (pip install -e '.[cuda]') or use train.optimizer 'adamw'"
        ) from None
    return bitsandbytes.optim.AdamW8bit


def build_optimizer(
    groups: list[dict[str, Any]], train: TrainConfig, device: torch.device
) -> torch.optim.Optimizer:
    """The configured optimizer over ``groups`` (each with ``params``, ``lr`` and ``name``)."""
    if train.optimizer == "prodigy":
        return _prodigy(groups, train)
    if train.optimizer == "adamw8bit":
        adamw8bit = _adamw8bit_class(device)
        optimizer: torch.optim.Optimizer = adamw8bit(groups, weight_decay=train.adam_weight_decay)
        return optimizer
    return torch.optim.AdamW(groups, weight_decay=train.adam_weight_decay)


def _prodigy(groups: list[dict[str, Any]], train: TrainConfig) -> torch.optim.Optimizer:
    """Prodigy at lr multiplier 1.0 for every group, with diffusers' arguments."""
    from prodigyopt import Prodigy

    _warn_ignored_lrs(train, text_encoder=len(groups) > 1)
    groups = [{**g, "lr": PRODIGY_LR} for g in groups]
    with contextlib.redirect_stdout(io.StringIO()):  # it prints "Using decoupled weight decay"
        optimizer: torch.optim.Optimizer = Prodigy(
            groups,
            lr=PRODIGY_LR,
            betas=(0.9, 0.999),
            beta3=None,
            eps=1e-8,
            weight_decay=train.adam_weight_decay,
            decouple=True,
            use_bias_correction=True,
            safeguard_warmup=True,
        )
    return optimizer


def _warn_ignored_lrs(train: TrainConfig, text_encoder: bool) -> None:
    """Say once per process (and learning rates) that Prodigy ignores them."""
    key = (train.learning_rate, train.text_encoder_lr if text_encoder else 0.0)
    if key in _warned:
        return
    _warned.add(key)
    ignored = f"train.learning_rate={train.learning_rate:g}"
    if text_encoder:
        ignored += f" and train.text_encoder_lr={train.text_encoder_lr:g}"
    logger.warning(
        "train.optimizer 'prodigy' estimates its own step size: %s are ignored (every group "
        "trains at Prodigy's lr multiplier %g)",
        ignored,
        PRODIGY_LR,
    )
