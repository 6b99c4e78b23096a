"""The trainer on accelerate: one :class:`accelerate.Accelerator` per ``train_lora`` call.

The accelerator picks the device (each process's own GPU under ``accelerate launch``), runs
mixed precision (autocast, and fp16 loss scaling through its ``GradScaler``), counts the
micro-batches of gradient accumulation (``accumulate``, ``backward``) and clips gradients
(``clip_grad_norm_``). The same code runs as one plain process (the sweep) or as several
data-parallel ones under ``accelerate launch --multi_gpu`` (one big run).

Data parallel without wrapping the UNet in DistributedDataParallel: the adapters live on the
caller's pipeline and are detached and re-attached around ``on_checkpoint`` (new parameter
objects each time), and ``prepare`` would also patch the pipeline's ``forward`` for autocast.
LoRA gradients are small, so once per optimizer step they are averaged across processes in
one flat all-reduce (:func:`average_gradients`) -- what DDP with ``no_sync`` during
accumulation does too, minus overlapping it with the backward pass.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import (
    DistributedType,
    GradientAccumulationPlugin,
    broadcast,
    broadcast_object_list,
    gather_object,
)

from harness.config import TrainConfig
from harness.models import LoadedModel
from harness.train.records import TrainingError
from harness.train.state import capture_rng

__all__ = [
    "average_gradients",
    "broadcast_flag",
    "broadcast_parameters",
    "describe",
    "effective_mixed_precision",
    "gather_rng",
    "make_accelerator",
    "own_rng",
    "training_model",
]

logger = logging.getLogger(__name__)

_AUTOCAST_NAMES = {"fp16": str(torch.float16), "bf16": str(torch.bfloat16)}


def effective_mixed_precision(requested: str, device: torch.device) -> str:
    """``train.mixed_precision``, or ``"no"`` (with a warning) off CUDA: fp16 autocast and loss
    scaling need a GPU, and CPU bf16 autocast is slower than fp32 for these models."""
    if requested != "no" and device.type != "cuda":
        logger.warning(
            "train.mixed_precision=%s ignored on %s: training in fp32", requested, device
        )
        return "no"
    return requested


def make_accelerator(train: TrainConfig, device: torch.device) -> Accelerator:
    """An Accelerator for one training call with the model on ``device``.

    ``train.mixed_precision`` and ``train.gradient_accumulation_steps`` decide (they are part
    of the config hash); a different ``accelerate launch --mixed_precision`` is ignored with a
    warning, and ``ACCELERATE_GRADIENT_ACCUMULATION_STEPS`` is never read.
    """
    mixed = effective_mixed_precision(train.mixed_precision, device)
    launcher = os.environ.get("ACCELERATE_MIXED_PRECISION", "no").lower()
    if launcher not in ("no", mixed):
        logger.warning(
            "accelerate launch --mixed_precision %s ignored: train.mixed_precision=%s decides",
            launcher,
            mixed,
        )
    cpu = device.type == "cpu"
    _clear_conflicting_state(mixed, cpu)
    return Accelerator(
        mixed_precision=mixed,
        cpu=cpu,
        gradient_accumulation_plugin=GradientAccumulationPlugin(
            num_steps=train.gradient_accumulation_steps, sync_with_dataloader=False
        ),
        device_placement=False,  # the pipeline stays where its owner put it
        step_scheduler_with_optimizer=False,  # one scheduler step per optimizer step, by us
        dynamo_backend="no",
    )


def _clear_conflicting_state(mixed: str, cpu: bool) -> None:
    """Let this call's Accelerator differ from an earlier one in the same process.

    accelerate keeps one process-wide state and refuses a second Accelerator with another
    mixed precision or device: right for one training script, wrong for a sweep worker whose
    trials differ. Without a process group nothing else depends on that state, so it is
    reset; under a launcher it belongs to torch.distributed, and a conflict is an error.
    """
    partial = PartialState._shared_state
    if not partial:
        return
    device = partial.get("device")
    device_differs = device is not None and (device.type == "cpu") != cpu
    previous = AcceleratorState._shared_state.get("_mixed_precision", mixed)
    if not device_differs and previous == mixed:
        return
    if partial.get("distributed_type", DistributedType.NO) != DistributedType.NO:
        raise TrainingError(
            f"accelerate already runs this process with mixed_precision={previous} on {device}; "
            "under a launcher every train_lora call needs the same train.mixed_precision and "
            "model.device"
        )
    logger.debug("resetting accelerate's state (was %s on %s)", previous, device)
    AcceleratorState._reset_state(reset_partial_state=device_differs)


def bind_launched_device() -> None:
    """Under a multi-GPU launcher (``accelerate launch``, torchrun), make ``cuda`` mean this
    process's GPU before anything loads; otherwise every process loads onto the first GPU."""
    local_rank = os.environ.get("LOCAL_RANK")
    if local_rank is not None and torch.cuda.is_available():
        torch.cuda.set_device(int(local_rank))


def is_main_launched_process() -> bool:
    """False in every process but the first under a launcher (before any Accelerator exists)."""
    return int(os.environ.get("RANK", "0")) == 0


def _concrete(device: torch.device) -> tuple[str, int]:
    if device.index is not None:
        return device.type, device.index
    if device.type == "cuda":
        return device.type, torch.cuda.current_device()
    return device.type, 0


def training_model(model: LoadedModel, accelerator: Accelerator) -> LoadedModel:
    """``model`` on this process's accelerate device.

    One process trains where the caller put the (possibly shared) pipeline, and a device that
    accelerate disagrees with is an error. Under a launcher each process owns its pipeline,
    which moves to that process's GPU when it was loaded elsewhere (e.g. all onto the first).
    """
    current = next(model.pipeline.unet.parameters()).device
    target = accelerator.device
    if _concrete(current) == _concrete(target):
        return model
    if accelerator.num_processes == 1:
        raise TrainingError(
            f"the model is on {current} but accelerate selected {target} (ACCELERATE_USE_CPU, "
            "ACCELERATE_TORCH_DEVICE or accelerate launch --cpu?); set model.device to match"
        )
    model.pipeline.to(target)
    return dataclasses.replace(model, device=target)


def describe(accelerator: Accelerator) -> dict[str, Any]:
    """How the run was distributed (for ``result.json``)."""
    return {
        "autocast": _AUTOCAST_NAMES.get(accelerator.mixed_precision, "fp32"),
        "mixed_precision": accelerator.mixed_precision,
        "num_processes": accelerator.num_processes,
        "distributed_type": DistributedType(accelerator.distributed_type).value,
    }


def _flat(tensors: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def _unflatten_into(flat: torch.Tensor, params: list[torch.nn.Parameter], grads: bool) -> int:
    """Copy consecutive slices of ``flat`` into each parameter (or its gradient)."""
    offset = 0
    for p in params:
        chunk = flat[offset : offset + p.numel()].view_as(p)
        if grads:
            p.grad = chunk.clone()
        else:
            with torch.no_grad():
                p.copy_(chunk)
        offset += p.numel()
    return offset


def average_gradients(
    accelerator: Accelerator, params: list[torch.nn.Parameter], stats: torch.Tensor
) -> torch.Tensor:
    """Average ``params``' gradients and ``stats`` over all processes in one all-reduce.

    Returns the averaged ``stats``. A gradient that is ``None`` counts as zeros. With one
    process nothing is communicated.
    """
    if accelerator.num_processes == 1:
        return stats
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = accelerator.reduce(_flat([*grads, stats.to(grads[0])]), reduction="mean")
    offset = _unflatten_into(flat, params, grads=True)
    return flat[offset:].to(stats)


def broadcast_parameters(accelerator: Accelerator, params: list[torch.nn.Parameter]) -> None:
    """Give every process the main process's values of ``params`` (fresh adapters start equal,
    whatever each device's RNG did)."""
    if accelerator.num_processes == 1:
        return
    flat = broadcast(_flat([p.detach() for p in params]).contiguous(), from_process=0)
    _unflatten_into(flat, params, grads=False)


def broadcast_flag(accelerator: Accelerator, flag: bool) -> bool:
    """The main process's ``flag``, on every process."""
    if accelerator.num_processes == 1:
        return flag
    return bool(broadcast_object_list([flag], from_process=0)[0])


def gather_rng(accelerator: Accelerator, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Every process's RNG states, for the main process to save.

    The main process's keep their usual names (so a single-process checkpoint is what it has
    always been); process ``p``'s are stored as ``process<p>.<name>``.
    """
    own = capture_rng(generator)
    if accelerator.num_processes == 1:
        return own
    everyone: list[dict[str, torch.Tensor]] = gather_object([own])
    out = dict(everyone[0])
    for index, states in enumerate(everyone[1:], start=1):
        out.update({f"process{index}.{name}": value for name, value in states.items()})
    return out


def own_rng(states: dict[str, torch.Tensor], process_index: int) -> dict[str, torch.Tensor] | None:
    """This process's part of :func:`gather_rng`'s states; ``None`` when it has none (the
    checkpoint was written by fewer processes)."""
    if process_index == 0:
        return {k: v for k, v in states.items() if not k.startswith("process")}
    prefix = f"process{process_index}."
    mine = {k.removeprefix(prefix): v for k, v in states.items() if k.startswith(prefix)}
    return mine or None
