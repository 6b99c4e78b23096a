"""The trainer's checkpoints: where a run resumes, writing one, continuing from one.

The file layout and its atomic write are in :mod:`harness.train.state`. Under several
processes only the main one touches the run folder; the others wait for it
(``wait_for_everyone``), then every process resumes from the same checkpoint, each with its
own RNG states (all of them are saved).
"""

from __future__ import annotations

import functools
import json
import logging
import shutil
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator

from harness.train.distributed import gather_rng, own_rng
from harness.train.kohya import UNET_LAYOUT_KEYS
from harness.train.lora import export_kohya, save_diffusers_lora
from harness.train.records import CheckpointInfo, TrainingError, TrainResult
from harness.train.session import TrainingSession
from harness.train.state import (
    EMA_TENSORS,
    KOHYA_WEIGHTS,
    TrainingState,
    checkpoint_dir,
    complete_checkpoints,
    load_optimizer,
    restore_rng,
    resumable_checkpoints,
    save_optimizer,
    write_checkpoint_atomically,
)
from harness.train.tensorfiles import atomic_write_json, atomic_write_tensors

__all__ = [
    "KOHYA_NAME",
    "restore_checkpoint",
    "resume_from",
    "resume_point",
    "save_checkpoint",
    "truncate_log",
]

KOHYA_NAME = KOHYA_WEIGHTS

logger = logging.getLogger(__name__)


def resume_point(
    accelerator: Accelerator, run_dir: Path, resume: bool, hashes: tuple[str, str], max_steps: int
) -> tuple[list[TrainingState], list[str]]:
    """The checkpoints to continue after (the last one is restored) and warnings about broken
    ones that were skipped (they are overwritten when training reaches their step again).

    ``hashes`` is (config hash, data hash); a checkpoint of another config or dataset is an
    error. ``resume=False`` deletes the old checkpoints.
    """
    if accelerator.is_main_process:
        ckpt_root = run_dir / "checkpoints"
        for leftover in ckpt_root.glob(".tmp-*") if ckpt_root.is_dir() else []:
            shutil.rmtree(leftover, ignore_errors=True)
        if not resume:
            shutil.rmtree(ckpt_root, ignore_errors=True)
    accelerator.wait_for_everyone()
    if not resume:
        return [], []
    states = complete_checkpoints(run_dir)
    for state in states:
        if (state.meta.get("config_hash"), state.meta.get("data_hash")) != hashes:
            raise TrainingError(
                f"{state.path}: checkpoint of a different config or dataset; use another run "
                f"folder (harness train --run-dir DIR) or delete {state.path.parent} to start "
                "over"
            )
    states, warnings = resumable_checkpoints([s for s in states if s.step <= max_steps])
    for warning in warnings if accelerator.is_main_process else []:
        logger.warning("%s: %s", run_dir, warning)
    return states, warnings


def truncate_log(log_path: Path, keep_up_to: int) -> None:
    """Drop the log records of steps after ``keep_up_to`` (they are trained again), and any
    line that is not a record: the one a crash or a full disk tore mid-write (a warning)."""
    if not log_path.is_file():
        return
    kept = []
    for number, line in enumerate(log_path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            step = json.loads(line).get("step", 0)
        except (ValueError, AttributeError):
            logger.warning(
                "%s: line %d is no log record (torn by a crash?); dropped", log_path, number
            )
            continue
        if step <= keep_up_to:
            kept.append(line)
    log_path.write_text("".join(f"{line}\n" for line in kept), encoding="utf-8")


def _write_files(
    session: TrainingSession,
    rng: dict[str, torch.Tensor],
    step: int,
    loss: float | None,
    meta: dict[str, Any],
    tmp: Path,
) -> dict[str, Any]:
    """Fill the checkpoint's temp folder; returns its ``checkpoint.json`` metadata."""
    lora, family = session.lora, session.model.family
    peft_state = lora.peft_state_dicts()
    adapter = session.adapter_state()  # the EMA when it is on: what is evaluated and shipped
    save_diffusers_lora(tmp, family, lora, adapter)
    unet_config = session.model.pipeline.unet.config
    if session.cfg.train.export_kohya:
        export_kohya(tmp / KOHYA_NAME, family, adapter, lora.configs, unet_config)
    flat = {f"{c}::{k}": v for c, sd in peft_state.items() for k, v in sd.items()}
    atomic_write_tensors(tmp / "state" / "lora.safetensors", flat)
    if session.ema is not None:
        atomic_write_tensors(tmp / "state" / EMA_TENSORS, session.ema.flat())
    save_optimizer(session.torch_optimizer, tmp / "state")
    atomic_write_tensors(tmp / "state" / "rng.safetensors", rng)
    scaler = session.scaler
    atomic_write_json(
        tmp / "state" / "trainer.json",
        {
            "step": step,
            "loss": loss,
            "lr_scheduler": session.lr_scheduler.state_dict(),  # plain numbers and lists
            "grad_scaler": scaler.state_dict() if scaler else None,
        },
    )
    layout = {key: unet_config[key] for key in UNET_LAYOUT_KEYS if key in unet_config}
    return {**meta, "loss": loss, "components": sorted(peft_state), "unet_layout": layout}


def save_checkpoint(
    session: TrainingSession, run_dir: Path, step: int, loss: float | None, meta: dict[str, Any]
) -> CheckpointInfo:
    """Write the checkpoint of ``step`` atomically, from the main process only; every process
    returns once it is complete."""
    accelerator = session.accelerator
    rng = gather_rng(accelerator, session.generator)  # a collective: every process takes part
    path = checkpoint_dir(run_dir, step)
    if accelerator.is_main_process:
        write = functools.partial(_write_files, session, rng, step, loss, meta)
        path = write_checkpoint_atomically(run_dir, step, write)
        logger.info(
            "saved checkpoint step %d (process %d of %d): %s",
            step,
            accelerator.process_index,
            accelerator.num_processes,
            path,
        )
    accelerator.wait_for_everyone()
    return CheckpointInfo(step, path, loss, _file_or_none(path / KOHYA_NAME))


def _restore_own_rng(session: TrainingSession, state: TrainingState) -> None:
    """This process's RNG states of ``state``, or a fresh seed when it has none."""
    accelerator = session.accelerator
    saved_by = state.meta.get("num_processes", 1)
    if saved_by != accelerator.num_processes and accelerator.is_main_process:
        logger.warning(
            "checkpoint of step %d was written by %s process(es), now %d: the data order "
            "and noise differ from an uninterrupted run",
            state.step,
            saved_by,
            accelerator.num_processes,
        )
    states = own_rng(state.rng(), accelerator.process_index)
    if states is None:
        seed = session.cfg.train.seed + accelerator.process_index + 1_000_003 * state.step
        torch.manual_seed(seed)
        session.generator.manual_seed(seed)
        return
    restore_rng(states, session.generator)


def restore_checkpoint(session: TrainingSession, state: TrainingState) -> float | None:
    """Continue from ``state``; returns its recorded loss."""
    session.lora.load_peft_state_dicts(state.lora_state())
    if session.ema is not None:
        session.ema.load_flat(state.ema_state())
    load_optimizer(session.torch_optimizer, state.state_dir)
    trainer = state.trainer()
    session.lr_scheduler.load_state_dict(trainer["lr_scheduler"])
    if session.scaler is not None and trainer.get("grad_scaler"):
        session.scaler.load_state_dict(trainer["grad_scaler"])
    _restore_own_rng(session, state)
    loss = trainer.get("loss")
    return float(loss) if loss is not None else None


def _checkpoint_info(state: TrainingState) -> CheckpointInfo:
    """The record of a checkpoint written before this resume, as :func:`save_checkpoint`
    made it: its kohya file included when ``train.export_kohya`` wrote one."""
    kohya = state.path / KOHYA_NAME
    return CheckpointInfo(state.step, state.path, state.meta.get("loss"), _file_or_none(kohya))


def _file_or_none(path: Path) -> Path | None:
    return path if path.is_file() else None


def resume_from(session: TrainingSession, states: list[TrainingState], result: TrainResult) -> int:
    """Restore the last of ``states`` (if any) into ``session`` and ``result``; returns the
    step training continues after."""
    start, last_loss = 0, None
    if states:
        start, last_loss = states[-1].step, restore_checkpoint(session, states[-1])
        result.resumed_from = start
        result.checkpoints = [_checkpoint_info(s) for s in states]
        logger.info("resuming %s from step %d", result.run_dir, start)
    result.steps_done, result.final_loss = start, last_loss
    return start
