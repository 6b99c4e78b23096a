"""Training inputs: cached VAE posteriors and prompt embeddings, and which samples each
micro-batch draws.

The data order is a pure function of (seed, position in an endless stream of per-epoch
permutations), so a resumed run draws exactly what the uninterrupted one would have. Under
several processes the stream is dealt out in turn: micro-batch ``m`` of process ``p`` takes
the ``batch_size`` positions starting at ``(m * num_processes + p) * batch_size``; one
process alone reads the stream in order, as it always has.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from harness.config import HarnessConfig
from harness.models import LoadedModel
from harness.train.cache import (
    CacheStats,
    PromptEmbedding,
    cached_latents,
    cached_prompt_embeddings,
)
from harness.train.microcond import TimeIds, class_time_ids, geometries, time_ids
from harness.train.records import TrainingError

__all__ = [
    "Shard",
    "TrainInputs",
    "class_prompt_for",
    "instance_time_ids",
    "prepare_inputs",
    "sample_indices",
]

Posterior = tuple[torch.Tensor, torch.Tensor]  # (mean, std) of one image's VAE latent


@dataclass
class TrainInputs:
    """Cached training inputs (CPU tensors)."""

    latents: list[Posterior]
    captions: list[str]
    class_latents: list[Posterior]
    class_prompt: str
    embeddings: dict[str, PromptEmbedding] | None  # None when the text encoder trains
    stats: dict[str, CacheStats] = field(default_factory=dict)
    # The mirrored photos' posteriors, in ``latents``' order (``train.random_flip`` > 0).
    flipped: list[Posterior] | None = None
    # SDXL micro-conditioning per photo (and per mirrored photo), in ``latents``' order, and
    # of the class images (see harness.train.microcond); None: (res, res, 0, 0, res, res).
    time_ids: list[TimeIds] | None = None
    flipped_time_ids: list[TimeIds] | None = None
    class_time_ids: TimeIds | None = None


@dataclass(frozen=True)
class Shard:
    """This process's share of the sample stream (see the module docstring)."""

    batch_size: int
    num_processes: int = 1
    process_index: int = 0

    def start(self, micro: int) -> int:
        """First stream position of micro-batch ``micro`` (0-based, counted over the run)."""
        return (micro * self.num_processes + self.process_index) * self.batch_size


def class_prompt_for(cfg: HarnessConfig) -> str:
    """``train.class_prompt`` with ``{class_name}`` / ``{token}`` filled in."""
    template = cfg.train.class_prompt
    if cfg.data.token == "auto" and "{token}" in template:
        raise TrainingError(
            "data.token: auto is chosen by the prepare stage; train on the prepared subject "
            "(its config, harness.data.with_subject, carries the chosen token)"
        )
    if "{class_name}" in template and not cfg.data.class_name:
        raise TrainingError("prior preservation needs data.class_name for train.class_prompt")
    return template.replace("{class_name}", cfg.data.class_name or "").replace(
        "{token}", cfg.data.token
    )


def sample_indices(n: int, start: int, count: int, seed: int) -> list[int]:
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


def prepare_inputs(
    cfg: HarnessConfig,
    model: LoadedModel,
    instance: Sequence[tuple[Path, str]],
    class_images: Sequence[Path],
    cache_root: Path,
) -> TrainInputs:
    """Encode (or read from the caches) everything the loop trains on."""
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
    flipped = None
    paths = [p for p, _ in instance]
    if cfg.train.random_flip > 0:
        flipped = cached_latents(model, cfg.model, paths, res, cache_root, stats["latents"], True)
    ids, flipped_ids = instance_time_ids(cfg, paths)
    return TrainInputs(
        latents,
        captions,
        class_latents,
        class_prompt,
        embeddings,
        stats,
        flipped=flipped,
        time_ids=ids,
        flipped_time_ids=flipped_ids,
        class_time_ids=class_time_ids(res),
    )


def instance_time_ids(
    cfg: HarnessConfig, paths: Sequence[Path]
) -> tuple[list[TimeIds], list[TimeIds] | None]:
    """SDXL time ids of each photo, and of its mirror image when ``train.random_flip`` > 0.

    They come from the prepared manifest's geometry, not from the latent cache, so latent
    cache entries written before micro-conditioning existed stay valid."""
    res, found = cfg.data.resolution, geometries(paths)
    ids = [time_ids(g, res) for g in found]
    flipped = [time_ids(g, res, flip=True) for g in found] if cfg.train.random_flip > 0 else None
    return ids, flipped
