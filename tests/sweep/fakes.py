"""A deterministic fake backend: the sweep's bookkeeping, without models."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from harness.config import HarnessConfig, InferenceSetting
from harness.sweep import PointScores
from harness.train import CheckpointInfo, TrainResult


class FakeBackend:
    """Scores are smooth functions of lr, steps and guidance; lr above ``hopeless_lr`` is bad."""

    def __init__(
        self, hopeless_lr: float = 1.0, fail_lr: float | None = None, flat: bool = False
    ) -> None:
        self.hopeless_lr, self.fail_lr, self.flat = hopeless_lr, fail_lr, flat
        self.trained: list[dict[str, Any]] = []
        self.evaluated: list[tuple[str, int]] = []
        self.checkpoints_seen: list[int] = []

    def train(
        self,
        cfg: HarnessConfig,
        run_dir: Path,
        on_checkpoint: Callable[[CheckpointInfo], bool],
        on_log: Callable[[Mapping[str, Any], int], None],
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
    ) -> list[PointScores]:
        step = checkpoint.step
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
            out.append(PointScores(s, scores, out_dir / s.id, n_images=4))
        return out

    def references(self, cfg: HarnessConfig, out_dir: Path) -> dict[str, dict[str, float]]:
        return {"baseline": {"dino": 0.2, "clip_i": 0.2, "clip_t": 0.31}}
