"""The DreamBooth loss of one micro-batch, following diffusers' examples.

Latents are sampled from the cached VAE posteriors, noised at random timesteps and the UNet
predicts the noise (or the velocity, for v-prediction schedulers); the loss is the MSE, plus
``prior_loss_weight`` times the class images' MSE with prior preservation. Every random draw
comes from the trainer's own generator, in a fixed order, so checkpointing that generator
makes a resumed run repeat the uninterrupted one.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from harness.config import HarnessConfig
from harness.models import LoadedModel
from harness.train.cache import encode_prompts
from harness.train.inputs import Posterior, Shard, TrainInputs, sample_indices
from harness.train.microcond import TimeIds, class_time_ids

__all__ = ["Batch", "DenoisingObjective", "MicroLoss"]

MicroLoss = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]  # (total, instance, prior)


@dataclass(frozen=True)
class Batch:
    """One micro-batch: scaled latents, their prompts and SDXL time ids (n x 6)."""

    latents: torch.Tensor
    prompts: list[str]
    time_ids: torch.Tensor


@dataclass
class DenoisingObjective:
    """The loss of micro-batch ``m`` of this process's shard."""

    cfg: HarnessConfig
    model: LoadedModel
    inputs: TrainInputs
    noise_scheduler: Any
    generator: torch.Generator
    shard: Shard
    autocast: Callable[[], AbstractContextManager[Any]]  # the accelerator's mixed precision

    @property
    def prior(self) -> bool:
        """Whether class images are mixed into every micro-batch."""
        return self.cfg.train.prior_preservation

    def loss(self, micro: int) -> MicroLoss:
        """(total, instance, prior) loss of micro-batch ``micro`` (0-based, over the run)."""
        batch = self._batch(micro)
        noisy, steps, target = self._noised(batch.latents)
        with self.autocast():
            pred = self._predict(noisy, steps, batch)
        pred, target = pred.float(), target.to(self.model.device).float()
        weights = self._snr_weights(steps)
        if not self.prior:
            loss = _weighted_mse(pred, target, weights)
            return loss, loss, None
        pred_i, pred_p = pred.chunk(2)
        target_i, target_p = target.chunk(2)
        w_i, w_p = (None, None) if weights is None else weights.chunk(2)
        inst = _weighted_mse(pred_i, target_i, w_i)
        prior = _weighted_mse(pred_p, target_p, w_p)
        return inst + self.cfg.train.prior_loss_weight * prior, inst, prior

    def _snr_weights(self, steps: torch.Tensor) -> torch.Tensor | None:
        """Min-SNR-gamma weights per sample (``train.snr_gamma``; None: unweighted), as
        diffusers' examples compute them: min(SNR, gamma) / SNR for noise prediction,
        / (SNR + 1) for v-prediction."""
        gamma = self.cfg.train.snr_gamma
        if gamma is None:
            return None
        from diffusers.training_utils import compute_snr

        snr = compute_snr(self.noise_scheduler, steps).float()
        clipped = torch.clamp(snr, max=gamma)
        if self.noise_scheduler.config.prediction_type == "v_prediction":
            return (clipped / (snr + 1)).to(self.model.device)
        return (clipped / snr).to(self.model.device)

    def _draw(self, pairs: list[Posterior], idx: list[int]) -> torch.Tensor:
        mean = torch.stack([pairs[i][0] for i in idx])
        std = torch.stack([pairs[i][1] for i in idx])
        return mean + std * torch.randn(mean.shape, generator=self.generator)

    def _flips(self, n: int) -> list[bool]:
        """Which of the batch's ``n`` photos are mirrored (probability ``train.random_flip``;
        the coins come from the generator only when flipping is on, so a run without it
        draws exactly what it always did)."""
        if self.cfg.train.random_flip <= 0 or self.inputs.flipped is None:
            return [False] * n
        coins = torch.rand(n, generator=self.generator) < self.cfg.train.random_flip
        return [bool(c) for c in coins]

    def _time_ids(self, idx: list[int], flips: list[bool]) -> list[TimeIds]:
        """The SDXL micro-conditioning of the batch's photos (mirrored ones: their own)."""
        data = self.inputs
        if data.time_ids is None:  # inputs without geometry: the target size, uncropped
            return [class_time_ids(self.cfg.data.resolution)] * len(idx)
        mirrored = data.flipped_time_ids or data.time_ids
        return [(mirrored if f else data.time_ids)[i] for i, f in zip(idx, flips, strict=True)]

    def _batch(self, micro: int) -> Batch:
        """Scaled latents, prompts and time ids: instance samples, then as many class ones."""
        t, data, b = self.cfg.train, self.inputs, self.cfg.train.batch_size
        start = self.shard.start(micro)
        idx = sample_indices(len(data.latents), start, b, t.seed)
        prompts = [data.captions[i] for i in idx]
        flips = self._flips(len(idx))
        pairs = [
            data.flipped[i] if f and data.flipped is not None else data.latents[i]
            for i, f in zip(idx, flips, strict=True)
        ]
        latents = self._draw(pairs, list(range(len(idx))))
        ids = self._time_ids(idx, flips)
        if self.prior:
            cidx = sample_indices(len(data.class_latents), start, b, t.seed + 1)
            latents = torch.cat([latents, self._draw(data.class_latents, cidx)])
            prompts += [data.class_prompt] * b
            ids += [data.class_time_ids or class_time_ids(self.cfg.data.resolution)] * b
        vae_cfg = self.model.pipeline.vae.config
        shift = vae_cfg.get("shift_factor") or 0.0
        scaled = (latents - shift) * vae_cfg.scaling_factor
        return Batch(scaled, prompts, torch.tensor(ids, dtype=torch.float32))

    def _noised(self, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(noisy latents, timesteps, regression target)."""
        scheduler = self.noise_scheduler
        noise = torch.randn(latents.shape, generator=self.generator)
        offset = self.cfg.train.noise_offset
        if offset > 0:  # one shift per sample and channel (diffusers' --noise_offset)
            shift = torch.randn((*latents.shape[:2], 1, 1), generator=self.generator)
            noise = noise + offset * shift
        steps = torch.randint(
            0, scheduler.config.num_train_timesteps, (latents.shape[0],), generator=self.generator
        )
        noisy = scheduler.add_noise(latents, noise, steps)
        if scheduler.config.prediction_type == "v_prediction":
            return noisy, steps, scheduler.get_velocity(latents, noise, steps)
        return noisy, steps, noise

    def _conditioning(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.inputs.embeddings is None:
            return encode_prompts(self.model, prompts)
        cached = [self.inputs.embeddings[p] for p in prompts]
        embeds = torch.stack([e.prompt_embeds for e in cached])
        pooled_list = [e.pooled for e in cached]
        pooled = (
            torch.stack([x for x in pooled_list if x is not None])
            if pooled_list[0] is not None
            else None
        )
        return embeds, pooled

    def _predict(self, noisy: torch.Tensor, steps: torch.Tensor, batch: Batch) -> Any:
        """The UNet's prediction (under the caller's autocast)."""
        dev, dtype = self.model.device, self.model.dtype
        embeds, pooled = self._conditioning(batch.prompts)
        added: dict[str, torch.Tensor] | None = None
        if self.model.family == "sdxl":
            assert pooled is not None
            ids = batch.time_ids.to(dev, dtype)
            added = {"text_embeds": pooled.to(dev, dtype), "time_ids": ids}
        return self.model.pipeline.unet(
            noisy.to(dev, dtype),
            steps.to(dev),
            encoder_hidden_states=embeds.to(dev, dtype),
            added_cond_kwargs=added,
            return_dict=False,
        )[0]


def _weighted_mse(
    pred: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None
) -> torch.Tensor:
    """The MSE, or with per-sample ``weights`` the weighted mean of the per-sample MSEs."""
    if weights is None:
        return F.mse_loss(pred, target)
    per_sample = F.mse_loss(pred, target, reduction="none").mean(dim=tuple(range(1, pred.ndim)))
    return (per_sample * weights).mean()
