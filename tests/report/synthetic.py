"""A synthetic project for the report: the sweep's and the evaluate stage's outputs written to
a temporary folder (no model, no study), with known numbers."""

from __future__ import annotations

import json
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from harness.config import HarnessConfig, InferenceSetting, validate_config
from harness.sweep import PointScores
from harness.sweep.confirm import confirmation_row, selection_bias

STUDY = "rep-0123abcd"
RUNS = {"run-a": 1e-4, "run-b": 5e-4, "run-c": 1e-3}  # run_key -> learning rate
STEPS = (10, 20)
GUIDANCE = (3.0, 7.5)
PROMPTS = (
    "a photo of sks robot",
    "a sks robot on the beach",
    "a sks robot in the snow",
    "a red sks robot",
)
SEEDS = (10, 11, 12, 13)
CONFIRMED = (11, 5, 2)  # points, best first (selection ranks 1, 2, 3)
# Per-image DINO offsets of the confirmed points: rank 2 equals rank 1 (noise), rank 3 is
# 0.1 lower (real). CLIP-T is the same for all three up to noise.
DINO_OFFSET = {11: 0.10, 5: 0.10, 2: 0.00}
PROMPT_EFFECT = (0.02, -0.01, -0.15, 0.0)  # the snow prompt loses the subject


def make_cfg(**sections: Any) -> HarnessConfig:
    """A config with tracking off and the given sections merged in."""
    data: dict[str, Any] = {"preset": "test", "tracking": {"mode": "off"}}
    data["sweep"] = {"study_name": "rep", **sections.pop("sweep", {})}
    data.update(sections)
    return validate_config(data)


def _interval(value: float, half: float) -> dict[str, float]:
    return {"": value, "_lo": value - half, "_hi": value + half}


def _scores(point: int, step: int, guidance: float, lr: float) -> dict[str, float]:
    dino = 0.55 + 0.01 * point + (0.02 if step == 20 else 0.0)
    clip_t = 0.32 - 0.004 * point + 0.001 * guidance + lr
    out: dict[str, float] = {}
    for name, value, half in (
        ("dino", dino, 0.02),
        ("clip_i", dino + 0.1, 0.015),
        ("clip_t", clip_t, 0.01),
        ("div", 0.3 + 0.001 * point, 0.05),
        ("div_dino", 0.2 + 0.001 * point, 0.04),
    ):
        out.update({f"score.{name}{k}": v for k, v in _interval(value, half).items()})
    out["score.pres"] = 0.6 - 0.002 * point
    return out


def sweep_table() -> pd.DataFrame:
    """Twelve points: three runs x two checkpoint steps x two guidance scales."""
    rows, point = [], 0
    for trial, (key, lr) in enumerate(RUNS.items()):
        for step in STEPS:
            for guidance in GUIDANCE:
                setting = InferenceSetting(guidance_scale=guidance, num_inference_steps=2)
                rows.append(
                    {
                        "point": point,
                        "run_trial": trial,
                        "run_key": key,
                        "train.learning_rate": lr,
                        "train.rank": 4,
                        "train.checkpoint_steps": "[10, 20]",
                        "checkpoint_step": step,
                        **{f"eval.{k}": v for k, v in setting.dimensions().items()},
                        **_scores(point, step, guidance, lr),
                        "pareto": point in CONFIRMED,
                        "setting_id": setting.id,
                        "scheduler": setting.scheduler,
                        "n_images": 16,
                        "adapter": f"runs/sweep/runs/{STUDY}/{key}/checkpoints/step-{step:06d}",
                        "images_dir": f"runs/sweep/runs/{STUDY}/{key}/eval/images",
                        "adapter_removed": False,
                    }
                )
                point += 1
    return pd.DataFrame(rows)


def evaluate_table(cfg: HarnessConfig, root: Path, sweep: pd.DataFrame) -> pd.DataFrame:
    """The confirmed points as the evaluate stage writes them (its own row builder)."""
    rows = []
    for rank, point in enumerate(CONFIRMED, start=1):
        row = sweep[sweep["point"] == point].iloc[0].to_dict()
        row.update({"selected_by": "pareto", "selection_rank": rank, "selection_score": 0.0})
        confirm = {
            k.removeprefix("score."): v - 0.03 * rank
            for k, v in row.items()
            if k.startswith("score.")
        }
        setting = InferenceSetting(guidance_scale=row["eval.guidance_scale"], num_inference_steps=2)
        measured = PointScores(setting, confirm, root / "runs/evaluate/images", 16)
        out = confirmation_row(cfg, root, row, measured)
        out.update(selection_bias(cfg, out, REFERENCES["baseline"], SWEEP_BASELINE))
        rows.append(out)
    return pd.DataFrame(rows)


def per_image_table() -> pd.DataFrame:
    """Per-image scores of the confirmed points and the base model (point -1) on the fresh
    seeds, with known differences (see DINO_OFFSET)."""
    rng = np.random.default_rng(7)
    rows = []
    for point in (*CONFIRMED, -1):
        offset = DINO_OFFSET.get(point, -0.05)
        for p, prompt in enumerate(PROMPTS):
            for seed in SEEDS:
                rows.append(
                    {
                        "point": point,
                        "run_key": "base" if point < 0 else "run",
                        "checkpoint_step": 0 if point < 0 else 20,
                        "setting_id": "g3-u1-t1-n2-dpmsolver++",
                        "template": prompt.replace("sks robot", "{token} {class_name}"),
                        "prompt": prompt,
                        "seed": seed,
                        "image": f"img-{point}-{p}-{seed}.png",
                        "dino": 0.6 + offset + PROMPT_EFFECT[p] + rng.normal(0, 0.004),
                        "clip_i": 0.7 + offset + rng.normal(0, 0.004),
                        "clip_t": 0.30 + rng.normal(0, 0.004),
                        "baseline": point < 0,
                    }
                )
    return pd.DataFrame(rows)


def _write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2), encoding="utf-8")


def _run_folders(root: Path) -> None:
    """run-a records GPU memory, run-b CPU memory, run-c has no folder (not recorded)."""
    for key, memory in (("run-a", "cuda_max_memory_mb"), ("run-b", "rss_mb")):
        run_dir = root / "runs/sweep/runs" / STUDY / key
        _write_json(
            run_dir / "result.json",
            {"status": "completed", "wall_s": 12.5, "info": {"num_processes": 2}},
        )
        lines = [json.dumps({"step": s, "loss": 0.1, memory: 1000.0 + s}) for s in (1, 2, 3)]
        (run_dir / "train_log.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")


REFERENCES = {
    "baseline": {"dino": 0.512, "dino_lo": 0.5, "dino_hi": 0.524, "clip_i": 0.61, "clip_t": 0.331},
    "real_ceiling": {"dino": 0.774, "clip_i": 0.885},
}
# The base model on the sweep's seeds: DINO 0.02 higher than on the fresh ones, CLIP-T lower.
SWEEP_BASELINE = {"dino": 0.532, "clip_i": 0.61, "clip_t": 0.321}


@dataclass
class Project:
    """A synthetic project root and its config."""

    root: Path
    cfg: HarnessConfig
    sweep: pd.DataFrame
    evaluate: pd.DataFrame
    per_image: pd.DataFrame | None


def write_project(root: Path, cfg: HarnessConfig, per_image: bool = True) -> Project:
    """Every input of the report under ``root``."""
    sweep = sweep_table()
    if cfg.sweep.weights:  # a weighted sweep's one objective is a score column of its own
        sweep["score.weighted"] = sum(w * sweep[f"score.{m}"] for m, w in cfg.sweep.weights.items())
    (root / "runs/sweep").mkdir(parents=True, exist_ok=True)
    (root / "runs/evaluate").mkdir(parents=True, exist_ok=True)
    sweep.to_parquet(root / "runs/sweep/results.parquet", index=False)
    _write_json(
        root / "runs/sweep/metrics.json",
        {"study": STUDY, "runs": 3, "points": len(sweep), **REFERENCES},
    )
    evaluate = evaluate_table(cfg, root, sweep)
    evaluate.to_parquet(root / "runs/evaluate/results.parquet", index=False)
    _write_json(root / "runs/evaluate/references.json", {**REFERENCES, "seeds": list(SEEDS)})
    _write_json(root / "reports/metrics.json", {"study": STUDY})
    images = per_image_table() if per_image else None
    if images is not None:
        images.to_parquet(root / "runs/evaluate/per_image.parquet", index=False)
    _run_folders(root)
    return Project(root, cfg, sweep, evaluate, images)


@dataclass
class FakeGrid:
    kind: str
    title: str
    path: Path
    manifest: Path


def no_grids_module() -> types.ModuleType:
    """A stand-in for ``harness.report.grids`` that makes no grid."""
    module = types.ModuleType("harness.report.grids")
    module.make_grids = lambda cfg, root, out_dir: []  # type: ignore[attr-defined]
    return module
