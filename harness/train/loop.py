"""The DreamBooth LoRA training loop (SD 1.x and SDXL), following diffusers' examples.

Per optimizer step: ``gradient_accumulation_steps`` micro-batches of ``batch_size`` instance
samples (plus as many class samples with prior preservation); noise-prediction MSE on cached
VAE latents (sampled from the cached posterior each step); AdamW with one parameter group for
the UNet LoRA and one for the text-encoder LoRA (its own learning rate); gradient clipping;
``diffusers.optimization.get_scheduler``. The data order is a pure function of (seed, sample
index) and all RNG state is checkpointed, so a resumed run repeats the uninterrupted one.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from harness.config import HarnessConfig
from harness.models import LoadedModel
from harness.models.tiny import default_cache_root
from harness.train.cache import (
    CacheStats,
    PromptEmbedding,
    cached_latents,
    cached_prompt_embeddings,
    encode_prompts,
    ensure_class_images,
)
from harness.train.io import atomic_write_json, atomic_write_tensors, content_hash, file_sha256
from harness.train.lora import AttachedLora, attached_lora, export_kohya, save_diffusers_lora
from harness.train.state import (
    TrainingState,
    capture_rng,
    complete_checkpoints,
    load_optimizer,
    restore_rng,
    resumable_checkpoints,
    save_optimizer,
    write_checkpoint_atomically,
)
from harness.train.types import CheckpointInfo, TrainingError, TrainResult

__all__ = ["class_prompt_for", "config_hash", "train_lora"]

KOHYA_NAME = "kohya_lora.safetensors"

logger = logging.getLogger(__name__)

LogCallback = Callable[[dict[str, Any], int], None]
CheckpointCallback = Callable[[CheckpointInfo], bool | None]

# Keys that do not change the training trajectory (so changing them keeps resume possible).
_NOT_HASHED = {"checkpoint_steps", "output_dir", "export_kohya"}


def config_hash(cfg: HarnessConfig) -> str:
    """Hash of everything in the config that affects the trained weights."""
    train = {k: v for k, v in cfg.train.model_dump(mode="json").items() if k not in _NOT_HASHED}
    model = {k: v for k, v in cfg.model.model_dump(mode="json").items() if k != "device"}
    data = cfg.data.model_dump(mode="json")
    return content_hash(
        {
            "model": model,
            "train": train,
            "data": {k: data[k] for k in ("resolution", "token", "class_name")},
        }
    )[:16]


def class_prompt_for(cfg: HarnessConfig) -> str:
    """``train.class_prompt`` with ``{class_name}`` / ``{token}`` filled in."""
    template = cfg.train.class_prompt
    if "{class_name}" in template and not cfg.data.class_name:
        raise TrainingError("prior preservation needs data.class_name for train.class_prompt")
    return template.replace("{class_name}", cfg.data.class_name or "").replace(
        "{token}", cfg.data.token
    )


class _NonFinite(Exception):
    pass


def _is_oom(exc: BaseException) -> bool:
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def _autocast_dtype(mixed_precision: str, device: torch.device) -> torch.dtype | None:
    if mixed_precision == "no":
        return None
    if device.type != "cuda":
        logger.warning(
            "train.mixed_precision=%s ignored on %s: training in fp32", mixed_precision, device
        )
        return None
    return torch.bfloat16 if mixed_precision == "bf16" else torch.float16


def _sample_indices(n: int, start: int, count: int, seed: int) -> list[int]:
    """Samples ``start .. start+count-1`` of an endless stream of per-epoch permutations."""
    out: list[int] = []
    perms: dict[int, torch.Tensor] = {}
    for pos in range(start, start + count):
        epoch, k = divmod(pos, n)
        if epoch not in perms:
            gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
            perms[epoch] = torch.randperm(n, generator=gen)
        out.append(int(perms[epoch][k]))
    return out


def _memory_stats(device: torch.device) -> dict[str, float]:
    if device.type == "cuda":
        stats = {"cuda_max_memory_mb": torch.cuda.max_memory_allocated(device) / 2**20}
        with contextlib.suppress(Exception):  # needs pynvml / NVML; optional
            stats["cuda_utilization"] = float(torch.cuda.utilization(device))
        return stats
    import psutil

    return {"rss_mb": psutil.Process(os.getpid()).memory_info().rss / 2**20}


@dataclass
class _Data:
    """Cached training inputs."""

    latents: list[tuple[torch.Tensor, torch.Tensor]]
    captions: list[str]
    class_latents: list[tuple[torch.Tensor, torch.Tensor]]
    class_prompt: str
    embeddings: dict[str, PromptEmbedding] | None  # None when the text encoder trains
    stats: dict[str, CacheStats] = field(default_factory=dict)


def _param_groups(lora: AttachedLora, train: Any) -> list[dict[str, Any]]:
    """AdamW groups: UNet LoRA at ``learning_rate``, text-encoder LoRA at ``text_encoder_lr``."""
    groups: list[dict[str, Any]] = [
        {"params": lora.parameters("unet"), "lr": train.learning_rate, "name": "unet"}
    ]
    te_params = [p for c in lora.modules if c != "unet" for p in lora.parameters(c)]
    if te_params:
        groups.append({"params": te_params, "lr": train.text_encoder_lr, "name": "text_encoder"})
    return groups


class _Attachment:
    """The training adapters on the shared pipeline; can be detached and re-attached."""

    def __init__(self, model: LoadedModel, train: Any) -> None:
        self._model, self._train = model, train
        self._cm: contextlib.AbstractContextManager[AttachedLora] | None = None
        self._lora: AttachedLora | None = None

    @property
    def lora(self) -> AttachedLora:
        if self._lora is None:
            raise RuntimeError("training adapters are detached")
        return self._lora

    def attach(self) -> AttachedLora:
        rng = torch.get_rng_state()  # LoRA init draws from it; keep the trajectory seeded
        self._cm = attached_lora(self._model, self._train)
        self._lora = self._cm.__enter__()
        torch.set_rng_state(rng)
        return self._lora

    def detach(self) -> None:
        if self._cm is not None:
            cm, self._cm, self._lora = self._cm, None, None
            cm.__exit__(None, None, None)

    def __enter__(self) -> _Attachment:
        self.attach()
        return self

    def __exit__(self, *exc: object) -> None:
        self.detach()


@dataclass
class _Trainer:
    """State of one training call; methods are the pieces of the loop."""

    cfg: HarnessConfig
    model: LoadedModel
    data: _Data
    attachment: _Attachment
    optimizer: torch.optim.Optimizer
    lr_scheduler: Any
    noise_scheduler: Any
    generator: torch.Generator
    autocast: torch.dtype | None
    scaler: torch.amp.GradScaler | None

    @property
    def prior(self) -> bool:
        return self.cfg.train.prior_preservation

    @property
    def lora(self) -> AttachedLora:
        return self.attachment.lora

    @contextlib.contextmanager
    def suspended(self) -> Iterator[None]:
        """Give the caller the untouched base pipeline (adapters detached, eval mode), e.g. for
        a proxy evaluation that loads the checkpoint itself; then re-attach the adapters with
        the same weights, re-bind the optimizer state and restore all RNG states, so the
        callback cannot change the training trajectory."""
        lora_state = {
            c: {k: v.detach().clone() for k, v in sd.items()}
            for c, sd in self.lora.peft_state_dicts().items()
        }
        rng = capture_rng(self.generator)
        old_groups = [list(g["params"]) for g in self.optimizer.param_groups]
        self.attachment.detach()

        def restore() -> None:
            self.attachment.attach()
            self.lora.load_peft_state_dicts(lora_state)
            new_groups = _param_groups(self.lora, self.cfg.train)
            for group, old, new in zip(
                self.optimizer.param_groups, old_groups, new_groups, strict=True
            ):
                for old_p, new_p in zip(old, new["params"], strict=True):
                    if old_p in self.optimizer.state:
                        self.optimizer.state[new_p] = self.optimizer.state.pop(old_p)
                group["params"] = new["params"]
            restore_rng(rng, self.generator)

        try:
            yield
        except BaseException:
            # The callback failed or was interrupted (Ctrl-C, SIGTERM): training stops anyway, so
            # a failed restore must not replace the original exception (the sweep re-queues an
            # interrupted run, but records any other error as a failed one).
            try:
                restore()
            except Exception:
                logging.getLogger(__name__).exception("could not re-attach adapters")
            raise
        restore()

    def _draw(self, pairs: list[tuple[torch.Tensor, torch.Tensor]], idx: list[int]) -> torch.Tensor:
        mean = torch.stack([pairs[i][0] for i in idx])
        std = torch.stack([pairs[i][1] for i in idx])
        return mean + std * torch.randn(mean.shape, generator=self.generator)

    def _conditioning(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.data.embeddings is None:
            return encode_prompts(self.model, prompts)
        embeds = torch.stack([self.data.embeddings[p].prompt_embeds for p in prompts])
        pooled_list = [e.pooled for e in (self.data.embeddings[p] for p in prompts)]
        pooled = (
            torch.stack([x for x in pooled_list if x is not None])
            if pooled_list[0] is not None
            else None
        )
        return embeds, pooled

    def micro_loss(self, micro: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(total, instance, prior) loss of micro-batch number ``micro`` (0-based, global)."""
        t, pipe, dev = self.cfg.train, self.model.pipeline, self.model.device
        b = t.batch_size
        idx = _sample_indices(len(self.data.latents), micro * b, b, t.seed)
        prompts = [self.data.captions[i] for i in idx]
        latents = self._draw(self.data.latents, idx)
        if self.prior:
            cidx = _sample_indices(len(self.data.class_latents), micro * b, b, t.seed + 1)
            latents = torch.cat([latents, self._draw(self.data.class_latents, cidx)])
            prompts += [self.data.class_prompt] * b
        vae_cfg = pipe.vae.config
        shift = vae_cfg.get("shift_factor") or 0.0
        latents = (latents - shift) * vae_cfg.scaling_factor
        noise = torch.randn(latents.shape, generator=self.generator)
        steps = torch.randint(
            0,
            self.noise_scheduler.config.num_train_timesteps,
            (latents.shape[0],),
            generator=self.generator,
        )
        noisy = self.noise_scheduler.add_noise(latents, noise, steps)
        if self.noise_scheduler.config.prediction_type == "v_prediction":
            target = self.noise_scheduler.get_velocity(latents, noise, steps)
        else:
            target = noise
        amp = torch.autocast(dev.type, dtype=self.autocast) if self.autocast else nullcontext()
        with amp:
            embeds, pooled = self._conditioning(prompts)
            added: dict[str, torch.Tensor] | None = None
            if self.model.family == "sdxl":
                res = self.cfg.data.resolution
                time_ids = torch.tensor([[res, res, 0, 0, res, res]] * latents.shape[0])
                assert pooled is not None
                added = {
                    "text_embeds": pooled.to(dev, self.model.dtype),
                    "time_ids": time_ids.to(dev, self.model.dtype),
                }
            pred = pipe.unet(
                noisy.to(dev, self.model.dtype),
                steps.to(dev),
                encoder_hidden_states=embeds.to(dev, self.model.dtype),
                added_cond_kwargs=added,
                return_dict=False,
            )[0]
        pred, target = pred.float(), target.to(dev).float()
        if not self.prior:
            loss = F.mse_loss(pred, target)
            return loss, loss, None
        pred_i, pred_p = pred.chunk(2)
        target_i, target_p = target.chunk(2)
        inst = F.mse_loss(pred_i, target_i)
        prior = F.mse_loss(pred_p, target_p)
        return inst + t.prior_loss_weight * prior, inst, prior

    def step(self, step: int) -> dict[str, Any]:
        """One optimizer step (1-based ``step``); returns its log record."""
        t = self.cfg.train
        started = time.perf_counter()
        total = inst_sum = 0.0
        prior_sum: float | None = 0.0 if self.prior else None
        for k in range(t.gradient_accumulation_steps):
            loss, inst, prior = self.micro_loss((step - 1) * t.gradient_accumulation_steps + k)
            if not torch.isfinite(loss):
                raise _NonFinite(f"non-finite loss ({loss.item()}) at step {step}")
            scaled = loss / t.gradient_accumulation_steps
            (self.scaler.scale(scaled) if self.scaler else scaled).backward()
            total += loss.item() / t.gradient_accumulation_steps
            inst_sum += inst.item() / t.gradient_accumulation_steps
            if prior is not None and prior_sum is not None:
                prior_sum += prior.item() / t.gradient_accumulation_steps
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, t.max_grad_norm))
        if self.scaler is None and not torch.isfinite(torch.tensor(grad_norm)):
            raise _NonFinite(f"non-finite gradient norm ({grad_norm}) at step {step}")
        lrs = {g.get("name", str(i)): g["lr"] for i, g in enumerate(self.optimizer.param_groups)}
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.model.device.type == "cuda":
            torch.cuda.synchronize(self.model.device)
        dt = max(time.perf_counter() - started, 1e-9)
        samples = t.batch_size * t.gradient_accumulation_steps * (2 if self.prior else 1)
        record: dict[str, Any] = {
            "step": step,
            "loss": total,
            "loss_instance": inst_sum,
            "lr_unet": lrs["unet"],
            "grad_norm": grad_norm,
            "steps_per_s": 1.0 / dt,
            "samples_per_s": samples / dt,
        }
        if prior_sum is not None:
            record["loss_prior"] = prior_sum
        if "text_encoder" in lrs:
            record["lr_text_encoder"] = lrs["text_encoder"]
        record.update(_memory_stats(self.model.device))
        return record

    def save(
        self, run_dir: Path, step: int, loss: float | None, meta: dict[str, Any]
    ) -> CheckpointInfo:
        """Write the checkpoint of ``step`` atomically."""
        t = self.cfg.train

        def write(tmp: Path) -> dict[str, Any]:
            peft_state = self.lora.peft_state_dicts()
            save_diffusers_lora(tmp, self.model.family, self.lora, peft_state)
            if t.export_kohya:
                export_kohya(
                    tmp / KOHYA_NAME,
                    self.model.family,
                    peft_state,
                    self.lora.configs,
                    self.model.pipeline.unet.config,
                )
            flat = {f"{c}::{k}": v for c, sd in peft_state.items() for k, v in sd.items()}
            atomic_write_tensors(tmp / "state" / "lora.safetensors", flat)
            save_optimizer(self.optimizer, tmp / "state")
            atomic_write_tensors(tmp / "state" / "rng.safetensors", capture_rng(self.generator))
            sched = self.lr_scheduler.state_dict()  # plain numbers and lists
            atomic_write_json(
                tmp / "state" / "trainer.json",
                {
                    "step": step,
                    "loss": loss,
                    "lr_scheduler": sched,
                    "grad_scaler": self.scaler.state_dict() if self.scaler else None,
                },
            )
            return {**meta, "loss": loss, "components": sorted(peft_state)}

        path = write_checkpoint_atomically(run_dir, step, write)
        kohya = path / KOHYA_NAME
        return CheckpointInfo(step, path, loss, kohya if kohya.is_file() else None)

    def restore(self, state: TrainingState) -> float | None:
        """Continue from ``state``; returns its recorded loss."""
        self.lora.load_peft_state_dicts(state.lora_state())
        load_optimizer(self.optimizer, state.state_dir)
        trainer = state.trainer()
        self.lr_scheduler.load_state_dict(trainer["lr_scheduler"])
        if self.scaler is not None and trainer.get("grad_scaler"):
            self.scaler.load_state_dict(trainer["grad_scaler"])
        restore_rng(state.rng(), self.generator)
        loss = trainer.get("loss")
        return float(loss) if loss is not None else None


def _prepare_data(
    cfg: HarnessConfig,
    model: LoadedModel,
    instance: Sequence[tuple[Path, str]],
    class_images: Sequence[Path],
    cache_root: Path,
) -> _Data:
    stats = {"latents": CacheStats(), "text": CacheStats()}
    res = cfg.data.resolution
    latents = cached_latents(
        model, cfg.model, [p for p, _ in instance], res, cache_root, stats["latents"]
    )
    class_latents = cached_latents(
        model, cfg.model, list(class_images), res, cache_root, stats["latents"]
    )
    captions = [c for _, c in instance]
    class_prompt = class_prompt_for(cfg) if cfg.train.prior_preservation else ""
    embeddings = None
    if not cfg.train.train_text_encoder:
        prompts = captions + ([class_prompt] if class_prompt else [])
        embeddings = cached_prompt_embeddings(model, cfg.model, prompts, cache_root, stats["text"])
    return _Data(latents, captions, class_latents, class_prompt, embeddings, stats)


def _resume_point(
    run_dir: Path, resume: bool, chash: str, dhash: str, max_steps: int
) -> tuple[list[TrainingState], list[str]]:
    """The checkpoints to continue after (the last one is restored) and warnings about broken
    ones that were skipped (they are overwritten when training reaches their step again)."""
    ckpt_root = run_dir / "checkpoints"
    for leftover in ckpt_root.glob(".tmp-*") if ckpt_root.is_dir() else []:
        shutil.rmtree(leftover, ignore_errors=True)
    if not resume:
        shutil.rmtree(ckpt_root, ignore_errors=True)
        return [], []
    states = complete_checkpoints(run_dir)
    for state in states:
        if state.meta.get("config_hash") != chash or state.meta.get("data_hash") != dhash:
            raise TrainingError(
                f"{state.path}: checkpoint of a different config or dataset; use a new run "
                "directory or resume=False (which deletes the old checkpoints)"
            )
    states, warnings = resumable_checkpoints([s for s in states if s.step <= max_steps])
    for warning in warnings:
        logger.warning("%s: %s", run_dir, warning)
    return states, warnings


def _truncate_log(log_path: Path, keep_up_to: int) -> None:
    if not log_path.is_file():
        return
    kept = [
        line
        for line in log_path.read_text(encoding="utf-8").splitlines()
        if line.strip() and json.loads(line).get("step", 0) <= keep_up_to
    ]
    log_path.write_text("".join(f"{line}\n" for line in kept), encoding="utf-8")


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
) -> TrainResult:
    """Train a DreamBooth LoRA on ``model`` (left unchanged afterwards) and checkpoint it.

    Args:
        cfg: the harness config (``train``, ``data.resolution``/``class_name``, ``model``).
        model: the loaded base pipeline; adapters are attached under the name ``harness_train``
            and removed when this returns or raises.
        instance: (image path, caption) pairs, square PNGs at ``data.resolution``.
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

    Returns:
        A :class:`TrainResult`; NaN/inf loss and out-of-memory give ``status="failed"`` with
        ``error_type`` and ``reason`` (``result.raise_for_status()`` raises the typed error).
        Other exceptions are recorded in ``result.json`` and re-raised.
    """
    t = cfg.train
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if not instance:
        raise TrainingError("no instance images to train on")
    started = time.perf_counter()
    root = cache_root or default_cache_root()
    chash = config_hash(cfg)
    result = TrainResult("failed", run_dir, 0, t.max_steps, config_hash=chash)
    atomic_write_json(result.result_path, {**result.to_dict(), "status": "running"})
    try:
        if t.prior_preservation and class_images is None:
            class_images = ensure_class_images(
                cfg,
                model,
                class_prompt_for(cfg),
                t.num_class_images,
                root,
                num_inference_steps=class_inference_steps or t.class_inference_steps,
                guidance_scale=t.class_guidance_scale,
            )
        class_list = list(class_images or []) if t.prior_preservation else []
        if t.prior_preservation and not class_list:
            raise TrainingError("prior preservation is on but there are no class images")
        dhash = content_hash(
            [[file_sha256(Path(p)), c] for p, c in instance]
            + [file_sha256(Path(p)) for p in class_list]
        )[:16]
        states, result.warnings = _resume_point(run_dir, resume, chash, dhash, t.max_steps)
        data = _prepare_data(cfg, model, instance, class_list, root)
        _run(cfg, model, data, run_dir, states, result, dhash, on_log, on_checkpoint, progress)
    except BaseException as exc:
        if result.reason is None:
            result.status, result.error_type, result.reason = (
                "failed",
                "error",
                f"{type(exc).__name__}: {exc}",
            )
        result.wall_s = time.perf_counter() - started
        atomic_write_json(result.result_path, result.to_dict())
        raise
    result.wall_s = time.perf_counter() - started
    atomic_write_json(result.result_path, result.to_dict())
    return result


def _run(
    cfg: HarnessConfig,
    model: LoadedModel,
    data: _Data,
    run_dir: Path,
    states: list[TrainingState],
    result: TrainResult,
    dhash: str,
    on_log: LogCallback | None,
    on_checkpoint: CheckpointCallback | None,
    progress: bool,
) -> None:
    from diffusers import DDPMScheduler
    from diffusers.optimization import get_scheduler

    t = cfg.train
    autocast = _autocast_dtype(t.mixed_precision, model.device)
    torch.manual_seed(t.seed)
    generator = torch.Generator("cpu").manual_seed(t.seed)
    noise_scheduler = DDPMScheduler.from_config(model.pipeline.scheduler.config)
    log_path = result.log_path
    meta = {
        "config_hash": result.config_hash,
        "data_hash": dhash,
        "family": model.family,
        "model": cfg.model.pretrained,
        "max_steps": t.max_steps,
        "model_revision": cfg.model.revision,
        "train_config": t.model_dump(mode="json"),
    }
    result.info = {
        "latent_cache": vars(data.stats["latents"]),
        "text_cache": vars(data.stats["text"]),
        "autocast": str(autocast) if autocast else "fp32",
        "attention": sorted(
            {type(p).__name__ for p in model.pipeline.unet.attn_processors.values()}
        ),
    }
    with _Attachment(model, t) as attachment:
        optimizer = torch.optim.AdamW(
            _param_groups(attachment.lora, t), weight_decay=t.adam_weight_decay
        )
        lr_scheduler = get_scheduler(
            t.lr_scheduler,
            optimizer,
            num_warmup_steps=t.lr_warmup_steps,
            num_training_steps=t.max_steps,
        )
        scaler = torch.amp.GradScaler("cuda") if autocast == torch.float16 else None
        trainer = _Trainer(
            cfg,
            model,
            data,
            attachment,
            optimizer,
            lr_scheduler,
            noise_scheduler,
            generator,
            autocast,
            scaler,
        )
        start, last_loss = 0, None
        if states:
            start, last_loss = states[-1].step, trainer.restore(states[-1])
            result.resumed_from = start
            result.checkpoints = [
                CheckpointInfo(s.step, s.path, s.meta.get("loss")) for s in states
            ]
            logger.info("resuming %s from step %d", run_dir, start)
        _truncate_log(log_path, start)
        result.steps_done, result.final_loss = start, last_loss
        save_at = set(t.checkpoint_steps) | {t.max_steps}
        bar = tqdm(
            total=t.max_steps,
            initial=start,
            desc=f"train {run_dir.name}",
            disable=not progress,
            leave=False,
        )
        try:
            with log_path.open("a", encoding="utf-8") as log:
                for step in range(start + 1, t.max_steps + 1):
                    try:
                        record = trainer.step(step)
                    except _NonFinite as exc:
                        result.status, result.error_type, result.reason = (
                            "failed",
                            "non_finite_loss",
                            str(exc),
                        )
                        return
                    except (torch.cuda.OutOfMemoryError, RuntimeError) as exc:
                        if not _is_oom(exc):
                            raise
                        optimizer.zero_grad(set_to_none=True)
                        if torch.cuda.is_available():
                            torch.cuda.empty_cache()
                        result.status, result.error_type = "failed", "oom"
                        result.reason = (
                            f"out of memory at step {step} with batch_size={t.batch_size} "
                            f"(never reduced automatically; lower train.batch_size, raise "
                            f"gradient_accumulation_steps, enable gradient_checkpointing or "
                            f"mixed precision): {str(exc).splitlines()[0]}"
                        )
                        return
                    result.steps_done, result.final_loss = step, record["loss"]
                    log.write(json_line(record))
                    log.flush()
                    if on_log is not None:
                        on_log(record, step)
                    bar.update(1)
                    bar.set_postfix(loss=f"{record['loss']:.4f}")
                    if step in save_at:
                        info = trainer.save(run_dir, step, record["loss"], meta)
                        result.checkpoints = [c for c in result.checkpoints if c.step != step] + [
                            info
                        ]
                        if on_checkpoint is None:
                            continue
                        with trainer.suspended():
                            stop = on_checkpoint(info)
                        if stop is True:
                            result.status, result.reason = (
                                "pruned",
                                f"stopped by on_checkpoint at step {step}",
                            )
                            return
            result.status = "completed"
        finally:
            bar.close()


def json_line(record: dict[str, Any]) -> str:
    """One JSONL line."""
    return json.dumps(record, sort_keys=True) + "\n"
