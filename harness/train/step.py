"""One training step: ``gradient_accumulation_steps`` micro-batches, one optimizer step.

Each micro-batch's loss is backpropagated by accelerate inside ``accelerator.accumulate()``
(which divides it by the number of micro-batches and scales it for fp16); after the last one
the gradients are averaged over the processes, clipped by ``accelerator.clip_grad_norm_``,
and the optimizer and the LR schedule step once (then the weights' EMA, when on). The logged
loss is the mean over the micro-batches (and the processes).
"""

from __future__ import annotations

import math
import time
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

import torch

from harness.config import HarnessConfig
from harness.train.distributed import average_gradients
from harness.train.failures import StepFailure, first_line, is_oom, oom_reason
from harness.train.objective import DenoisingObjective
from harness.train.reporting import memory_stats
from harness.train.session import TrainingSession

__all__ = ["StepSums", "Trainer"]


@dataclass
class StepSums:
    """Loss sums of one step's micro-batches (each divided by their number), or its failure."""

    total: float = 0.0
    instance: float = 0.0
    prior: float | None = None
    bad_loss: float | None = None  # the first non-finite loss
    oom: str | None = None  # the out-of-memory message

    def add(self, loss: float, inst: float, prior: float | None, n: int) -> None:
        """Count one micro-batch of ``n``."""
        self.total += loss / n
        self.instance += inst / n
        if prior is not None and self.prior is not None:
            self.prior += prior / n

    def tensor(self) -> torch.Tensor:
        """The sums and failure flags, to average over processes."""
        flags = [float(self.bad_loss is not None), float(self.oom is not None)]
        return torch.tensor([self.total, self.instance, self.prior or 0.0, *flags])

    def averaged(self, stats: torch.Tensor) -> StepSums:
        """These sums replaced by their averages ``stats``; failures on any process count."""
        total, inst, prior, bad, oom = stats.tolist()
        return StepSums(
            total,
            inst,
            prior if self.prior is not None else None,
            self.bad_loss if self.bad_loss is not None else (math.nan if bad > 0 else None),
            self.oom or ("out of memory on another process" if oom > 0 else None),
        )

    def failure(self, step: int, batch_size: int) -> StepFailure | None:
        """What makes this step fail, if anything."""
        if self.oom is not None:
            return StepFailure("oom", oom_reason(step, batch_size, self.oom))
        if self.bad_loss is not None:
            return StepFailure(
                "non_finite_loss", f"non-finite loss ({self.bad_loss}) at step {step}"
            )
        return None


@dataclass
class Trainer:
    """One training call's session and loss; :meth:`step` is the body of the loop."""

    session: TrainingSession
    objective: DenoisingObjective

    @property
    def cfg(self) -> HarnessConfig:
        """The run's config."""
        return self.session.cfg

    def suspended(self) -> AbstractContextManager[None]:
        """The untouched base pipeline for ``on_checkpoint`` (see :class:`Attachment`)."""
        return self.session.suspended()

    def step(self, step: int) -> dict[str, Any]:
        """One optimizer step (1-based ``step``) on every process; returns its log record.

        Raises:
            StepFailure: a non-finite loss or gradient norm, or out of memory (on any process).
        """
        started = time.perf_counter()
        batch_size = self.cfg.train.batch_size
        sums = self._synchronize(self._accumulate(step))
        failure = sums.failure(step, batch_size)
        if failure is not None:
            raise failure
        try:
            grad_norm, lrs = self._apply_gradients(step)
        except RuntimeError as exc:
            if not is_oom(exc):
                raise
            raise StepFailure("oom", oom_reason(step, batch_size, first_line(exc))) from None
        return self._record(step, sums, grad_norm, lrs, started)

    def _accumulate(self, step: int) -> StepSums:
        """Forward and backward of the step's micro-batches; stops at the first failing one."""
        accelerator, n = self.session.accelerator, self.cfg.train.gradient_accumulation_steps
        sums = StepSums(prior=0.0 if self.cfg.train.prior_preservation else None)
        for k in range(n):
            with accelerator.accumulate():  # counts micro-batches: sync_gradients on the last
                if not self._micro_step((step - 1) * n + k, sums):
                    break
        return sums

    def _micro_step(self, micro: int, sums: StepSums) -> bool:
        """One micro-batch into ``sums``; False when it failed (recorded in ``sums``)."""
        n = self.cfg.train.gradient_accumulation_steps
        try:
            loss, inst, prior = self.objective.loss(micro)
            if not torch.isfinite(loss):
                sums.bad_loss = loss.item()
                return False
            self.session.accelerator.backward(loss)  # divides by n; scales the fp16 loss
        except RuntimeError as exc:
            if not is_oom(exc):
                raise
            sums.oom = first_line(exc)
            return False
        sums.add(loss.item(), inst.item(), prior.item() if prior is not None else None, n)
        return True

    def _synchronize(self, sums: StepSums) -> StepSums:
        """Average the gradients and the sums over the processes (a no-op for one)."""
        accelerator = self.session.accelerator
        if accelerator.num_processes == 1:
            return sums
        stats = average_gradients(accelerator, self.session.parameters(), sums.tensor())
        return sums.averaged(stats)

    def _apply_gradients(self, step: int) -> tuple[float, dict[str, float]]:
        """Clip, step the optimizer and the LR schedule, zero the gradients."""
        s, accelerator = self.session, self.session.accelerator
        if not accelerator.sync_gradients:  # accelerate counts micro-batches too: must agree
            raise RuntimeError(f"step {step}: accelerate is not at the end of an accumulation")
        grad_norm = float(accelerator.clip_grad_norm_(s.parameters(), self.cfg.train.max_grad_norm))
        if s.scaler is None and not math.isfinite(grad_norm):
            raise StepFailure(
                "non_finite_loss", f"non-finite gradient norm ({grad_norm}) at step {step}"
            )
        lrs = {g.get("name", str(i)): g["lr"] for i, g in enumerate(s.optimizer.param_groups)}
        s.optimizer.step()  # through the fp16 GradScaler when there is one
        s.lr_scheduler.step()
        s.optimizer.zero_grad(set_to_none=True)
        if s.ema is not None:
            s.ema.update(s.lora.peft_state_dicts())
        if s.model.device.type == "cuda":
            torch.cuda.synchronize(s.model.device)
        return grad_norm, lrs

    def _record(
        self, step: int, sums: StepSums, grad_norm: float, lrs: dict[str, float], started: float
    ) -> dict[str, Any]:
        """The step's log record (throughput counts the samples of all processes)."""
        t, processes = self.cfg.train, self.session.accelerator.num_processes
        dt = max(time.perf_counter() - started, 1e-9)
        samples = t.batch_size * t.gradient_accumulation_steps * (2 if t.prior_preservation else 1)
        record: dict[str, Any] = {
            "step": step,
            "loss": sums.total,
            "loss_instance": sums.instance,
            "lr_unet": lrs["unet"],
            "grad_norm": grad_norm,
            "steps_per_s": 1.0 / dt,
            "samples_per_s": samples * processes / dt,
        }
        if sums.prior is not None:
            record["loss_prior"] = sums.prior
        if "text_encoder" in lrs:
            record["lr_text_encoder"] = lrs["text_encoder"]
        estimate = self.session.torch_optimizer.param_groups[0].get("d")
        if estimate is not None:  # Prodigy's step size: the effective lr is d x lr
            record["prodigy_d"] = float(estimate)
        record.update(memory_stats(self.session.model.device))
        return record

    def drop_gradients(self) -> None:
        """Free the gradients (and cached CUDA blocks) of a failed step."""
        self.session.torch_optimizer.zero_grad(set_to_none=True)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
