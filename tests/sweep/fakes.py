"""A deterministic fake backend: the sweep's bookkeeping, without models."""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from harness.config import HarnessConfig, InferenceSetting, Rung
from harness.sweep import PointScores
from harness.train import CheckpointInfo, TrainResult

TEMPLATES = ("a photo of {token} {class_name}", "a {token} {class_name} in the snow")
PROMPTS = ("a photo of sks toy", "a sks toy in the snow")  # the fake's two prompts, filled in
OFFSETS = (-0.015, -0.005, 0.005, 0.015)  # per-image deviations from the point's mean


class FakeBackend:
    """Scores are smooth functions of lr, steps and guidance; lr above ``hopeless_lr`` is bad.

    Every point has four images (two prompts x two seeds) with per-image and per-prompt rows
    whose means are the point's scores; ``write_images`` also writes them as small PNGs.
    """

    def __init__(
        self,
        hopeless_lr: float = 1.0,
        fail_lr: float | None = None,
        flat: bool = False,
        write_images: bool = False,
        rung_error: float = 0.02,
    ) -> None:
        self.hopeless_lr, self.fail_lr, self.flat = hopeless_lr, fail_lr, flat
        self.write_images = write_images
        self.trained: list[dict[str, Any]] = []
        self.evaluated: list[tuple[str, int]] = []
        self.checkpoints_seen: list[int] = []
        self.released = 0  # release() calls: one per run that trained
        self.generated_images = 0  # images a real backend would generate (reuse excluded)
        self.rungs_evaluated: list[tuple[int, tuple[int, int] | None, int]] = []
        self.rung_error = rung_error  # how far a rung's scores are off (divided by its size)

    def train(
        self,
        cfg: HarnessConfig,
        run_dir: Path,
        on_checkpoint: Callable[[CheckpointInfo], bool],
        on_log: Callable[[Mapping[str, Any], int], None],
        on_validation: Callable[[Any], None] | None = None,
    ) -> TrainResult:
        self.trained.append(cfg.train.model_dump())
        max_steps = cfg.train.max_steps
        if self.fail_lr is not None and math.isclose(cfg.train.learning_rate, self.fail_lr):
            return TrainResult("failed", run_dir, 3, max_steps, reason="loss is NaN at step 3")
        done = []
        for step in cfg.train.checkpoint_steps:
            path = run_dir / "checkpoints" / f"step-{step:06d}"
            path.mkdir(parents=True, exist_ok=True)
            (path / "pytorch_lora_weights.safetensors").write_bytes(b"x")
            on_log({"loss": 1.0 / step}, step)
            ckpt = CheckpointInfo(step, path)
            done.append(ckpt)
            self.checkpoints_seen.append(step)
            if on_checkpoint(ckpt):
                return TrainResult(
                    "pruned", run_dir, step, max_steps, done, reason=f"pruned at step {step}"
                )
        return TrainResult("completed", run_dir, max_steps, max_steps, done)

    def _quality(self, cfg: HarnessConfig, step: int) -> float:
        lr = cfg.train.learning_rate
        if lr >= self.hopeless_lr:
            return 0.01
        if self.flat:
            return 0.6 + step / (10 * cfg.train.max_steps)
        return 0.5 + 0.1 * math.log10(lr / 1e-6) / 3 + step / (10 * cfg.train.max_steps)

    def proxy_scores(self, cfg: HarnessConfig, adapter: Path, out_dir: Path) -> dict[str, float]:
        step = int(adapter.name.split("-")[1])
        q = self._quality(cfg, step)
        return {"dino": q, "clip_i": q, "clip_t": 0.3}

    def evaluate(
        self,
        cfg: HarnessConfig,
        checkpoint: CheckpointInfo,
        settings: Sequence[InferenceSetting],
        out_dir: Path,
        rung: Rung | None = None,
        reuse: Sequence[PointScores] = (),
    ) -> list[PointScores]:
        """Full protocol: two prompts x two seeds. A rung scores its first prompts and seeds,
        off the full score by a deterministic error that shrinks with its size; images of
        ``reuse`` are not counted again in ``generated_images``."""
        step = checkpoint.step
        prompts, seeds = (2, 2) if rung is None else (rung.prompts, rung.images_per_prompt)
        held = {p.setting.id: set(p.generated) for p in reuse}
        self.rungs_evaluated.append(
            (step, None if rung is None else (prompts, seeds), len(settings))
        )
        out = []
        for s in settings:
            self.evaluated.append((checkpoint.path.parent.parent.name, step))
            q = self._quality(cfg, step) * s.lora_scale
            scores = {
                "dino": q,
                "dino_lo": q - 0.01,
                "dino_hi": q + 0.01,
                "clip_i": q,
                "clip_t": 0.3 - 0.01 * s.guidance_scale * s.lora_scale,
            }
            if rung is not None:
                error = self.rung_error * (zlib.crc32(f"{step}/{s.id}".encode()) % 200 - 100) / 100
                scores = {k: v + error / (prompts * seeds) for k, v in scores.items()}
            point = PointScores(s, scores, out_dir / s.id, n_images=prompts * seeds)
            point.fidelity = prompts * seeds / 4
            point.generated = [(i, seed) for i in range(prompts) for seed in range(seeds)]
            self.generated_images += len(set(point.generated) - held.get(s.id, set()))
            point.per_image = self._images(cfg, point, prompts, seeds)
            point.per_prompt = _prompt_rows(point.per_image)
            out.append(point)
        return out

    def _images(
        self, cfg: HarnessConfig, point: PointScores, prompts: int = 2, n_seeds: int = 2
    ) -> list[dict[str, Any]]:
        """Two prompts x two seeds (or a rung's first ones), the per-image scores spread around
        the point's means."""
        rows = []
        seeds = (cfg.eval.seed, cfg.eval.seed + 1)[:n_seeds]
        for k, (index, seed) in enumerate((i, s) for i in range(prompts) for s in seeds):
            path = point.images_dir / f"{index:03d}-{seed}.png"
            if self.write_images:
                _write_image(path)
            rows.append(
                {
                    "template": TEMPLATES[index],
                    "prompt": PROMPTS[index],
                    "seed": seed,
                    "image": str(path),
                    **{m: point.scores[m] + OFFSETS[k] for m in ("dino", "clip_i", "clip_t")},
                }
            )
        return rows

    def references(self, cfg: HarnessConfig, out_dir: Path) -> dict[str, dict[str, float]]:
        return {"baseline": {"dino": 0.2, "clip_i": 0.2, "clip_t": 0.31}}

    def release(self) -> None:
        self.released += 1


def _prompt_rows(images: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The per-prompt means of per-image rows (as the metrics package gives them)."""
    rows = []
    for prompt in sorted({row["prompt"] for row in images}):
        mine = [row for row in images if row["prompt"] == prompt]
        means = {m: sum(row[m] for row in mine) / len(mine) for m in ("dino", "clip_i", "clip_t")}
        rows.append(
            {
                "prompt": prompt,
                "text": prompt,
                "n_images": len(mine),
                **means,
                "div": 0.1,
                "div_dino": 0.2,
            }
        )
    return rows


def _write_image(path: Path) -> None:
    """A small PNG whose pixels depend on its path (distinct images per point and image)."""
    rng = np.random.default_rng(zlib.crc32(str(path).encode()))
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = rng.integers(0, 256, size=(4, 4, 3), dtype=np.uint8)
    Image.fromarray(pixels).resize((24, 24), Image.Resampling.NEAREST).save(path)
