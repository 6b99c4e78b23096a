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
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from harness.config import HarnessConfig, InferenceSetting

if TYPE_CHECKING:
    from harness.config import Rung
    from harness.data import PreparedSubject
    from harness.models import LoadedModel
    from harness.sweep._base import PointScores
    from harness.train import CheckpointInfo

__all__ = [
    "BenchInputs",
    "PathRun",
    "adaptive_recall",
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
    """One pass of a path: how many points, steps, images and scores, the time of each
    phase and, where measured, of the whole pass (seconds)."""

    points: int
    train_s: float
    train_steps: int
    generate_s: float
    images: int
    score_s: float
    scored: int
    peak_bytes: int | None = None
    # ``{(checkpoint step, setting id): (weighted score, fidelity)}`` of the harness paths:
    # what the recall of adaptive evaluation is computed from.
    scores: dict[tuple[int, str], tuple[float, float]] = field(default_factory=dict)
    # Wall clock of the whole pass, training to the last score: it also counts the work
    # between the timed phases (the backend's image grids, manifests, adaptive bookkeeping).
    wall_s: float | None = None

    @property
    def total_s(self) -> float:
        """The pass's seconds: its wall clock, else (a pass that has none) its phases' sum."""
        if self.wall_s is not None:
            return self.wall_s
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


def harness_path(
    inputs: BenchInputs,
    loaded: LoadedModel,
    scorer: Any,
    work: Path,
    evaluation: str = "configured",
) -> PathRun:
    """The harness: :func:`harness.train.train_lora` (latent and text-embedding caches,
    checkpoints in one run), then the sweep backend's evaluation of every point: per
    checkpoint every setting generated in batches with the adapter loaded once, scored with the
    real photos' embeddings cached, with ``sweep.evaluation`` (``evaluation="exhaustive"``:
    every point at the full protocol whatever the config says). PRES is off, as on the naive
    path."""
    from harness.sweep.runner import scalarize
    from harness.train import train_lora

    cfg = _harness_config(inputs.cfg, evaluation)
    shutil.rmtree(work, ignore_errors=True)
    with peak_memory(loaded.device) as peak:
        started = time.perf_counter()
        result = train_lora(cfg, loaded, inputs.pairs, work / "run", resume=False, progress=False)
        sync_device(loaded.device)
        train_s = time.perf_counter() - started
        points = _evaluate_points(cfg, inputs, loaded, scorer, result.checkpoints, work / "eval")
        sync_device(loaded.device)
        # The naive path is timed by the wall clock: so is this one. The points' own
        # generate/score seconds below leave out the backend's work between them.
        wall_s = time.perf_counter() - started
    measured = [p for _, p in points]
    return PathRun(
        points=len(points),
        train_s=train_s,
        train_steps=cfg.train.max_steps,
        generate_s=sum(p.seconds["generate"] for p in measured),
        # A promoted point's images include its rungs' (reused, generated once); its rungs'
        # scoring scored them again.
        images=sum(p.n_images for p in measured),
        score_s=sum(p.seconds["score"] for p in measured),
        scored=sum(p.n_images + sum(h["n_images"] for h in p.history) for p in measured),
        peak_bytes=peak[0],
        scores={(step, p.setting.id): (scalarize(cfg, p.scores), p.fidelity) for step, p in points},
        wall_s=wall_s,
    )


def _evaluate_points(
    cfg: HarnessConfig,
    inputs: BenchInputs,
    loaded: LoadedModel,
    scorer: Any,
    checkpoints: Sequence[CheckpointInfo],
    out_dir: Path,
) -> list[tuple[int, PointScores]]:
    """Every point through the sweep backend, exhaustively or adaptively as ``cfg`` says."""
    from harness.sweep.adaptive import evaluate_points
    from harness.sweep.backend import HarnessBackend

    backend = HarnessBackend(cfg, loaded, inputs.subject, scorer, progress=False)
    points: list[tuple[int, PointScores]] = []

    def evaluate(
        ckpt: CheckpointInfo,
        settings: Sequence[InferenceSetting],
        rung: Rung | None,
        reuse: Sequence[PointScores],
    ) -> list[PointScores]:
        step_dir = out_dir / f"step-{ckpt.step}"
        return backend.evaluate(cfg, ckpt, settings, step_dir, rung=rung, reuse=reuse)

    def record(ckpt: CheckpointInfo, point: PointScores) -> None:
        points.append((ckpt.step, point))

    evaluate_points(cfg, checkpoints, inputs.settings, evaluate, record)
    return points


def _harness_config(cfg: HarnessConfig, evaluation: str) -> HarnessConfig:
    """``cfg`` without PRES (the naive path has none) and, for ``"exhaustive"``, with
    ``sweep.evaluation: exhaustive``."""
    sweep = cfg.sweep
    if evaluation == "exhaustive":
        sweep = sweep.model_copy(update={"evaluation": "exhaustive"})
    return cfg.model_copy(
        update={
            "eval": cfg.eval.model_copy(update={"prior_preservation_images": 0}),
            "sweep": sweep,
        }
    )


def adaptive_recall(exhaustive: PathRun, adaptive: PathRun, top: int = 5) -> tuple[float, int]:
    """Recall of the exhaustive top-``top`` points (by the weighted score) among the adaptive
    path's top-``top`` full-fidelity points, and how many points that top holds."""
    top = min(top, len(exhaustive.scores))
    best = sorted(exhaustive.scores, key=lambda k: -exhaustive.scores[k][0])[:top]
    full = [k for k, (_, fidelity) in adaptive.scores.items() if fidelity >= 1.0 - 1e-9]
    found = sorted(full, key=lambda k: -adaptive.scores[k][0])[:top]
    return len(set(best) & set(found)) / max(top, 1), top


def fill_prompts(templates: Sequence[str], token: str, class_name: str) -> tuple[str, ...]:
    """The prompts the templates stand for."""
    from harness.generate import format_prompt

    return tuple(format_prompt(t, token, class_name) for t in templates)
