"""The two ways of evaluating the same points that the benchmark compares.

A *point* is a (checkpoint step, inference setting) pair of one training run, scored on every
evaluation prompt x ``eval.images_per_prompt`` seeds. Both paths train one run with the
config's checkpoint steps and evaluate every point of :func:`bench_settings`; model and encoder
loading happen before the clock starts (a sweep worker loads them once).
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from harness.config import HarnessConfig, InferenceSetting

if TYPE_CHECKING:
    from harness.data import PreparedSubject
    from harness.models import LoadedModel

__all__ = [
    "BenchInputs",
    "PathRun",
    "bench_settings",
    "harness_path",
    "is_cuda",
    "peak_memory",
    "sync_device",
]


@dataclass(frozen=True)
class BenchInputs:
    """What both paths share: the config, the subject, its prompts and seeds, the points."""

    cfg: HarnessConfig
    subject: PreparedSubject
    prompts: tuple[str, ...]  # filled in (token and class noun)
    templates: tuple[str, ...]
    seeds: tuple[int, ...]
    settings: tuple[InferenceSetting, ...]

    @property
    def pairs(self) -> list[tuple[Path, str]]:
        """The training pairs (photo, caption)."""
        return list(zip(self.subject.train_paths, self.subject.train_captions, strict=True))

    @property
    def class_name(self) -> str:
        return self.subject.class_name or self.cfg.data.class_name or "object"

    @property
    def points(self) -> int:
        return len(self.cfg.train.checkpoint_steps) * len(self.settings)


@dataclass(frozen=True)
class PathRun:
    """One pass of a path: how many points, steps, images and scores, and the time of each
    phase (seconds)."""

    points: int
    train_s: float
    train_steps: int
    generate_s: float
    images: int
    score_s: float
    scored: int
    peak_bytes: int | None = None

    @property
    def total_s(self) -> float:
        return self.train_s + self.generate_s + self.score_s

    @property
    def per_point_s(self) -> float:
        """Seconds per evaluated point, training included (the figure that matters)."""
        return self.total_s / self.points


def bench_settings(cfg: HarnessConfig) -> tuple[InferenceSetting, ...]:
    """The sweep's inference grid (``sweep.inference``): the settings every point is made of."""
    from harness.sweep.space import inference_settings

    return tuple(inference_settings(cfg))


@contextmanager
def peak_memory(device: Any) -> Iterator[list[int | None]]:
    """Yields a one-item list that holds the peak CUDA memory (bytes) of the block on exit;
    ``None`` on other devices (a process's peak RSS cannot be reset per block)."""
    import torch

    out: list[int | None] = [None]
    cuda = is_cuda(device)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    try:
        yield out
    finally:
        if cuda:
            torch.cuda.synchronize()
            out[0] = int(torch.cuda.max_memory_allocated())


def is_cuda(device: Any) -> bool:
    """Is ``device`` (a ``torch.device`` or its name) a CUDA device on this machine?"""
    import torch

    return getattr(device, "type", str(device)) == "cuda" and torch.cuda.is_available()


def sync_device(device: Any) -> None:
    """Wait for queued CUDA work, so a clock read after it counts that work (no-op on CPU)."""
    import torch

    if is_cuda(device):
        torch.cuda.synchronize()


def harness_path(inputs: BenchInputs, loaded: LoadedModel, scorer: Any, work: Path) -> PathRun:
    """The harness: :func:`harness.train.train_lora` (latent and text-embedding caches,
    checkpoints in one run), then per checkpoint every setting generated in batches with the
    adapter loaded once, scored with the real photos' embeddings cached."""
    from harness.evaluate import evaluate_adapter
    from harness.train import train_lora

    cfg = inputs.cfg
    shutil.rmtree(work, ignore_errors=True)
    results = []
    with peak_memory(loaded.device) as peak:
        started = time.perf_counter()
        result = train_lora(cfg, loaded, inputs.pairs, work / "run", resume=False, progress=False)
        sync_device(loaded.device)
        train_s = time.perf_counter() - started
        for ckpt in result.checkpoints:
            results += evaluate_adapter(
                cfg,
                loaded,
                scorer,
                reference=inputs.subject.reference,
                token=inputs.subject.token,
                class_name=inputs.class_name,
                adapter=ckpt.path,
                settings=inputs.settings,
                templates=inputs.templates,
                seeds=inputs.seeds,
                out_dir=work / "eval" / f"step-{ckpt.step}",
            )
        sync_device(loaded.device)
    images = sum(len(r.images) for r in results)
    return PathRun(
        points=len(results),
        train_s=train_s,
        train_steps=cfg.train.max_steps,
        generate_s=sum(r.seconds["generate"] for r in results),
        images=images,
        score_s=sum(r.seconds["score"] for r in results),
        scored=images,
        peak_bytes=peak[0],
    )


def fill_prompts(templates: Sequence[str], token: str, class_name: str) -> tuple[str, ...]:
    """The prompts the templates stand for."""
    from harness.generate import format_prompt

    return tuple(format_prompt(t, token, class_name) for t in templates)
