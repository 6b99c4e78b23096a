"""The DreamBooth LoRA training loop (SD 1.x and SDXL), following diffusers' examples.

A step is one optimizer step: ``gradient_accumulation_steps`` micro-batches of ``batch_size``
instance samples (plus as many class samples with prior preservation) on every process,
their gradients averaged over the processes, clipped to ``max_grad_norm``, one step of the
``train.optimizer`` (:mod:`harness.train.optim`; UNet LoRA and text-encoder LoRA in their own
groups), one step of ``diffusers.optimization.get_scheduler``'s schedule and, with
``train.ema_decay``, of the weights' average (:mod:`harness.train.ema`). accelerate supplies
the device, mixed precision, the accumulation bookkeeping and clipping
(:mod:`harness.train.distributed`); the loss is :mod:`harness.train.objective`; checkpoints
are :mod:`harness.train.checkpointing`.
The data order is a pure function of (seed, sample index) and all RNG state is
checkpointed, so a resumed run repeats the uninterrupted one.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator

from harness.config import HarnessConfig
from harness.models import LoadedModel
from harness.models.tiny import default_cache_root
from harness.train.attachment import Attachment
from harness.train.cache import ensure_class_images
from harness.train.checkpointing import resume_from, resume_point, save_checkpoint
from harness.train.distributed import broadcast_flag, describe, make_accelerator, training_model
from harness.train.failures import StepFailure
from harness.train.fingerprints import config_hash, data_hash, hashed_time_ids
from harness.train.inputs import (
    Shard,
    TrainInputs,
    class_prompt_for,
    instance_time_ids,
    prepare_inputs,
)
from harness.train.objective import DenoisingObjective
from harness.train.optim import check_optimizer
from harness.train.records import CheckpointInfo, TrainingError, TrainResult
from harness.train.reporting import LogCallback, StepLog
from harness.train.session import TrainingSession, open_session
from harness.train.state import TrainingState
from harness.train.step import Trainer
from harness.train.tensorfiles import atomic_write_json
from harness.train.validation import ValidationCallback, Validator

__all__ = ["class_prompt_for", "config_hash", "train_lora"]

logger = logging.getLogger(__name__)

CheckpointCallback = Callable[[CheckpointInfo], bool | None]


@dataclass
class _Plan:
    """What one call reports to and where: its result, run folder and callbacks."""

    result: TrainResult
    on_log: LogCallback | None
    on_checkpoint: CheckpointCallback | None
    progress: bool
    meta: dict[str, Any] = field(default_factory=dict)  # every checkpoint.json's metadata
    on_validation: ValidationCallback | None = None  # train.validation_steps' images

    @property
    def run_dir(self) -> Path:
        """The run folder."""
        return self.result.run_dir


@dataclass(frozen=True)
class _Options:
    """:func:`train_lora`'s options for the inputs and the resume point."""

    class_images: Sequence[Path] | None
    resume: bool
    cache_root: Path
    class_inference_steps: int | None


def train_lora(
    cfg: HarnessConfig,
    model: LoadedModel,
    instance: Sequence[tuple[Path, str]],
    run_dir: Path,
    *,
    class_images: Sequence[Path] | None = None,
    on_log: LogCallback | None = None,
    on_checkpoint: CheckpointCallback | None = None,
    resume: bool = True,
    cache_root: Path | None = None,
    progress: bool = True,
    class_inference_steps: int | None = None,
    on_validation: ValidationCallback | None = None,
) -> TrainResult:
    """Train a DreamBooth LoRA on ``model`` (left unchanged afterwards) and checkpoint it.

    Args:
        cfg: the harness config (``train``, ``data.resolution``/``class_name``, ``model``).
        model: the loaded base pipeline; adapters are attached under the name ``harness_train``
            and removed when this returns or raises.
        instance: (image path, caption) pairs, square PNGs at ``data.resolution`` (SDXL time
            ids: from the prepared manifest beside them, :mod:`harness.train.microcond`).
        run_dir: where checkpoints, ``train_log.jsonl`` and ``result.json`` go.
        class_images: prior-preservation images; default: generated and cached by
            :func:`ensure_class_images` with ``class_inference_steps`` (default:
            ``train.class_inference_steps``) and ``train.class_guidance_scale``.
        on_log: called with each step's record and the step.
        on_checkpoint: called after each checkpoint; returning True stops training ("pruned").
        resume: continue from the last complete checkpoint in ``run_dir``; False deletes old
            checkpoints first.
        cache_root: root of the latent / text / class-image caches (default: harness cache).
        progress: show a progress bar.
        on_validation: called with each round of images of :mod:`harness.train.validation`.

    Under ``accelerate launch`` every process calls this; only the main one writes to
    ``run_dir`` and calls ``on_log`` / ``on_checkpoint``.

    Returns:
        A :class:`TrainResult`; NaN/inf loss and out-of-memory give ``status="failed"`` with
        ``error_type`` and ``reason`` (``result.raise_for_status()`` raises the typed error).
        Other exceptions are recorded in ``result.json`` and re-raised.
    """
    started = time.perf_counter()
    accelerator, model, result = _begin(cfg, model, instance, Path(run_dir))
    plan = _Plan(result, on_log, on_checkpoint, progress, on_validation=on_validation)
    try:
        root = cache_root or default_cache_root()
        options = _Options(class_images, resume, root, class_inference_steps)
        inputs, states = _prepare(cfg, model, accelerator, instance, options, plan)
        _run(cfg, model, accelerator, inputs, states, plan)
    except BaseException as exc:
        if result.reason is None:
            result.status, result.error_type = "failed", "error"
            result.reason = f"{type(exc).__name__}: {exc}"
        raise
    finally:
        result.wall_s = time.perf_counter() - started
        _write_result(accelerator, result)
    return result


def _begin(
    cfg: HarnessConfig, model: LoadedModel, instance: Sequence[tuple[Path, str]], run_dir: Path
) -> tuple[Accelerator, LoadedModel, TrainResult]:
    """The run folder, this call's accelerator, the model on its device, and the result,
    written as ``running``."""
    if not instance:
        raise TrainingError("no instance images to train on")
    check_optimizer(cfg.train, model.device)  # e.g. adamw8bit on a CPU: before any work
    run_dir.mkdir(parents=True, exist_ok=True)
    accelerator = make_accelerator(cfg.train, model.device)
    model = training_model(model, accelerator)
    result = TrainResult("failed", run_dir, 0, cfg.train.max_steps, config_hash=config_hash(cfg))
    _write_result(accelerator, result, running=True)
    return accelerator, model, result


def _write_result(accelerator: Accelerator, result: TrainResult, running: bool = False) -> None:
    """``result.json`` (main process only): ``running`` at the start, the outcome at the end."""
    if accelerator.is_main_process:
        data = result.to_dict()
        atomic_write_json(result.result_path, {**data, "status": "running"} if running else data)


def _prepare(
    cfg: HarnessConfig,
    model: LoadedModel,
    accelerator: Accelerator,
    instance: Sequence[tuple[Path, str]],
    options: _Options,
    plan: _Plan,
) -> tuple[TrainInputs, list[TrainingState]]:
    """Class images, the data hash, the resume point and the cached inputs (the main process
    fills the caches first; the others then read them)."""
    t, class_images, root = cfg.train, options.class_images, options.cache_root
    if t.prior_preservation and class_images is None:
        with accelerator.main_process_first():
            class_images = ensure_class_images(
                cfg,
                model,
                class_prompt_for(cfg),
                t.num_class_images,
                root,
                num_inference_steps=options.class_inference_steps or t.class_inference_steps,
                guidance_scale=t.class_guidance_scale,
            )
    class_list = list(class_images or []) if t.prior_preservation else []
    if t.prior_preservation and not class_list:
        raise TrainingError("prior preservation is on but there are no class images")
    ids = instance_time_ids(cfg, [p for p, _ in instance])
    micro = hashed_time_ids(model.family, cfg.data.resolution, [i for i in ids if i is not None])
    dhash = data_hash(instance, class_list, micro)
    plan.meta = _checkpoint_meta(cfg, model, accelerator, plan.result.config_hash, dhash)
    hashes = (plan.result.config_hash, dhash)
    states, plan.result.warnings = resume_point(
        accelerator, plan.run_dir, options.resume, hashes, t.max_steps
    )
    with accelerator.main_process_first():
        inputs = prepare_inputs(cfg, model, instance, class_list, root)
    return inputs, states


def _checkpoint_meta(
    cfg: HarnessConfig, model: LoadedModel, accelerator: Accelerator, chash: str, dhash: str
) -> dict[str, Any]:
    """What every ``checkpoint.json`` of the run records besides its step and loss."""
    return {
        "config_hash": chash,
        "data_hash": dhash,
        "family": model.family,
        "model": cfg.model.pretrained,
        "max_steps": cfg.train.max_steps,
        "model_revision": cfg.model.revision,
        "train_config": cfg.train.model_dump(mode="json"),
        "num_processes": accelerator.num_processes,
    }


def _run_info(inputs: TrainInputs, model: LoadedModel, accelerator: Accelerator) -> dict[str, Any]:
    """``result.info``: cache hits, precision, processes, attention processors."""
    processors = model.pipeline.unet.attn_processors.values()
    return {
        "latent_cache": vars(inputs.stats["latents"]),
        "text_cache": vars(inputs.stats["text"]),
        **describe(accelerator),
        "attention": sorted({type(p).__name__ for p in processors}),
    }


def _run(
    cfg: HarnessConfig,
    model: LoadedModel,
    accelerator: Accelerator,
    inputs: TrainInputs,
    states: list[TrainingState],
    plan: _Plan,
) -> None:
    """Attach the adapters, resume, train to ``max_steps`` (or a failure, or pruning)."""
    from diffusers import DDPMScheduler

    t = cfg.train
    torch.manual_seed(t.seed)
    noise_scheduler = DDPMScheduler.from_config(model.pipeline.scheduler.config)
    plan.result.info = _run_info(inputs, model, accelerator)
    with Attachment(model, t) as attachment:
        session = open_session(cfg, model, accelerator, attachment)
        shard = Shard(t.batch_size, accelerator.num_processes, accelerator.process_index)
        objective = DenoisingObjective(
            cfg, model, inputs, noise_scheduler, session.generator, shard, accelerator.autocast
        )
        trainer = Trainer(session, objective)
        start = resume_from(session, states, plan.result)
        log = StepLog(
            plan.result.log_path,
            start=start,
            total=t.max_steps,
            on_log=plan.on_log,
            progress=plan.progress,
            enabled=accelerator.is_main_process,
        )
        with log:
            _train_steps(trainer, plan, start, log)
        _report_replica(session, plan.result)


def _train_steps(trainer: Trainer, plan: _Plan, start: int, log: StepLog) -> None:
    """Steps ``start + 1 .. max_steps``, checkpointing at ``checkpoint_steps`` and the end."""
    t, result = trainer.cfg.train, plan.result
    save_at = set(t.checkpoint_steps) | {t.max_steps}
    validator = Validator(trainer.cfg, plan.run_dir, plan.on_validation)
    for step in range(start + 1, t.max_steps + 1):
        try:
            record = trainer.step(step)
        except StepFailure as failure:
            trainer.drop_gradients()
            result.status, result.error_type = "failed", failure.error_type
            result.reason = failure.reason
            return
        result.steps_done, result.final_loss = step, record["loss"]
        log.write(record, step)
        if validator.due(step):
            validator.run(trainer, step)
        if step in save_at and _checkpoint(trainer, plan, step, record["loss"]):
            result.status, result.reason = "pruned", f"stopped by on_checkpoint at step {step}"
            return
    result.status = "completed"


def _checkpoint(trainer: Trainer, plan: _Plan, step: int, loss: float) -> bool:
    """Save ``step``'s checkpoint, then run ``on_checkpoint`` on the main process with the
    adapters suspended; True when it asks to stop (every process gets its answer)."""
    session = trainer.session
    info = save_checkpoint(session, plan.run_dir, step, loss, plan.meta)
    result = plan.result
    result.checkpoints = [c for c in result.checkpoints if c.step != step] + [info]
    if plan.on_checkpoint is None:
        return False
    stop = False
    if session.accelerator.is_main_process:
        with trainer.suspended():
            stop = plan.on_checkpoint(info) is True
    return broadcast_flag(session.accelerator, stop)


def _report_replica(session: TrainingSession, result: TrainResult) -> None:
    """Under several processes, log a checksum of this process's adapter weights: data
    parallel keeps the replicas identical, so every process logs the same number."""
    accelerator = session.accelerator
    if accelerator.num_processes == 1:
        return
    checksum = sum(float(p.detach().double().sum()) for p in session.parameters())
    logger.info(
        "process %d of %d stopped at step %d; adapter checksum %.12e",
        accelerator.process_index,
        accelerator.num_processes,
        result.steps_done,
        checksum,
    )
