"""Which points evaluate re-scores: the Pareto front, the weighted best, at most top_k, best
first; and sweep.keep_adapters never deletes their adapters."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from harness.config import HarnessConfig
from harness.sweep import run_sweep
from harness.sweep.select import pareto_mask, select_points

from .fakes import FakeBackend


def cfg_with(top_k: int = 5, **sweep: Any) -> HarnessConfig:
    return HarnessConfig.model_validate(
        {"preset": "test", "sweep": sweep, "evaluate": {"top_k": top_k}}
    )


def frame(scores: list[tuple[float, float, float]]) -> pd.DataFrame:
    """Points 0..n-1 with (dino, clip_i, clip_t) scores and an adapter each."""
    return pd.DataFrame(
        {
            "point": range(len(scores)),
            "score.dino": [s[0] for s in scores],
            "score.clip_i": [s[1] for s in scores],
            "score.clip_t": [s[2] for s in scores],
            "adapter": [f"runs/a/step-{i}" for i in range(len(scores))],
        }
    )


def test_pareto_mask_keeps_non_dominated_and_equal_points() -> None:
    values = np.array([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5], [0.4, 0.4], [1.0, 0.0], [0.5, 0.4]])
    assert pareto_mask(values).tolist() == [True, True, True, False, True, False]


def test_front_ranked_by_objective_sum_best_first() -> None:
    # dino x clip_t: 0, 1, 2 and 4 are on the front; 3 is dominated by 2.
    points = frame([(0.9, 0, 0.1), (0.2, 0, 0.9), (0.6, 0, 0.6), (0.5, 0, 0.5), (0.7, 0, 0.3)])
    chosen = select_points(cfg_with(), points)
    # Equal-weight sums: 2 -> 0.6, 1 -> 0.55, 0 -> 0.5, 4 -> 0.5 (ties by point number).
    assert chosen["point"].tolist() == [2, 1, 0, 4]
    assert (chosen["selected_by"] == "pareto").all()
    assert chosen["selection_rank"].tolist() == [1, 2, 3, 4]
    assert np.allclose(chosen["selection_score"], [0.6, 0.55, 0.5, 0.5])
    assert select_points(cfg_with(top_k=2), points)["point"].tolist() == [2, 1]


def test_subject_metric_clip_i_defines_the_front() -> None:
    points = frame([(0.9, 0.1, 0.5), (0.1, 0.9, 0.5)])  # same clip_t: clip_i decides
    chosen = select_points(cfg_with(subject_metric="clip_i"), points)
    assert chosen["point"].tolist() == [1]


def test_weighted_best_comes_first_even_off_the_front() -> None:
    # Point 3 has by far the best clip_i but is dominated on (dino, clip_t).
    points = frame([(0.9, 0.1, 0.1), (0.2, 0.1, 0.9), (0.6, 0.1, 0.6), (0.5, 0.99, 0.5)])
    chosen = select_points(cfg_with(weights={"clip_i": 1.0}), points)
    assert chosen["point"].tolist()[0] == 3
    assert chosen["selected_by"].tolist()[0] == "weighted"
    assert set(chosen["point"]) == {0, 1, 2, 3}
    assert (chosen["selected_by"].iloc[1:] == "pareto").all()
    assert select_points(cfg_with(top_k=1, weights={"clip_i": 1.0}), points)["point"].tolist() == [
        3
    ]


def test_weighted_best_on_the_front_is_labelled_both() -> None:
    points = frame([(0.9, 0, 0.1), (0.2, 0, 0.9), (0.6, 0, 0.6), (0.5, 0, 0.5)])
    chosen = select_points(cfg_with(weights={"dino": 0.7, "clip_t": 0.3}), points)
    assert chosen["point"].tolist()[0] == 0  # 0.7 * 0.9 + 0.3 * 0.1 = 0.66, the best
    assert chosen["selected_by"].tolist() == ["pareto+weighted", "pareto", "pareto"]


def test_points_without_scores_are_never_selected() -> None:
    points = frame([(0.9, 0, 0.9), (0.2, 0, 0.1)])
    points.loc[0, "score.clip_t"] = float("nan")
    assert select_points(cfg_with(), points)["point"].tolist() == [1]
    assert select_points(cfg_with(), points.iloc[:0]).empty


class TradeOffBackend(FakeBackend):
    """Later checkpoints copy the subject better but follow prompts worse: a front that spans
    several checkpoints (adapters), not only the inference settings of one."""

    def evaluate(self, cfg: HarnessConfig, checkpoint: Any, settings: Any, out_dir: Path) -> Any:
        points = super().evaluate(cfg, checkpoint, settings, out_dir)
        for p in points:
            p.scores["clip_t"] -= checkpoint.step / 100
        return points


def _kept(root: Path) -> set[Path]:
    return {p.resolve() for p in (root / "runs/sweep/runs").rglob("checkpoints/step-*")}


def _sweep_cfg(**sweep: Any) -> HarnessConfig:
    return HarnessConfig.model_validate(
        {
            "preset": "test",
            "train": {"max_steps": 20, "checkpoint_steps": [10, 20]},
            "sweep": {
                "study_name": "keep",
                "n_trials": 3,
                "sampler": "random",
                "pruner": "none",
                "space": {"learning_rate": {"low": 1e-5, "high": 1e-3, "log": True}},
                "inference": {"guidance_scale": [3.0, 7.0], "lora_scale": [0.5, 1.0]},
                **sweep,
            },
            "evaluate": {"top_k": 3},
            "tracking": {"mode": "off"},
        }
    )


def test_keep_adapters_best_keeps_every_selected_adapter(tmp_path: Path) -> None:
    cfg = _sweep_cfg(keep_adapters="best", weights={"dino": 0.5, "clip_t": 0.5})
    summary = run_sweep(cfg, tmp_path, TradeOffBackend())
    results = pd.read_parquet(summary.results_parquet)
    chosen = select_points(cfg, results)
    assert len(chosen) >= 2  # the weighted best and at least one more front point
    assert chosen["adapter"].notna().all()
    selected = {(tmp_path / a).resolve() for a in chosen["adapter"]}
    assert all(p.is_dir() for p in selected) and len(selected) >= 2  # more than "the best"
    assert _kept(tmp_path) == selected  # best: exactly what evaluate needs, nothing else
    assert len(_kept(tmp_path)) < results["run_key"].nunique() * 2  # some were removed


def test_keep_adapters_pareto_keeps_the_front_and_the_selection(tmp_path: Path) -> None:
    cfg = _sweep_cfg(keep_adapters="pareto")
    summary = run_sweep(cfg, tmp_path, TradeOffBackend())
    results = pd.read_parquet(summary.results_parquet)
    chosen = select_points(cfg, results)
    wanted = {(tmp_path / a).resolve() for a in chosen["adapter"]}
    wanted |= {(tmp_path / a).resolve() for a in results.loc[results["pareto"], "adapter"]}
    assert _kept(tmp_path) == wanted
