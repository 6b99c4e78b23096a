"""Issue 11: ``harness sweep`` then ``harness evaluate`` as a user runs them (subprocesses, tiny
models): the chosen points re-scored on fresh seeds and held-out prompts, side by side with
their sweep scores, and reports/metrics.json for DVC."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd

from ._helpers import cli_env, clone_project, run_cli, tail

HELD_OUT = ["a {token} {class_name} in the snow"]


def test_sweep_then_evaluate_confirms_the_chosen_points(
    prepared_template: Path, tmp_path: Path
) -> None:
    root = clone_project(
        prepared_template,
        tmp_path / "project",
        {
            "sweep": {
                "study_name": "e2e-evaluate",
                "n_trials": 2,
                "keep_adapters": "best",
                "inference": {"guidance_scale": [3.0], "lora_scale": [0.6, 1.0]},
            },
            "evaluate": {"top_k": 2, "prompts": HELD_OUT},
        },
    )
    env, log = cli_env(tmp_path / "home"), tmp_path / "cli.log"
    assert run_cli(root, ["sweep"], env, log, timeout=300).returncode == 0, tail(log)
    sweep = pd.read_parquet(root / "runs/sweep/results.parquet")
    assert json.loads((root / "runs/sweep/metrics.json").read_text())["points"] == len(sweep)

    proc = run_cli(root, ["evaluate"], env, log, timeout=300)
    assert proc.returncode == 0, tail(log)
    output = log.read_text().split("$ harness evaluate", 1)[1]
    assert "shrinkage" in output and "runs/evaluate/results.csv" in output

    table = pd.read_csv(root / "runs/evaluate/results.csv")
    assert 1 <= len(table) <= 2 and table["selection_rank"].tolist() == [*range(1, len(table) + 1)]
    for metric in ("dino", "clip_i", "clip_t"):
        for column in (f"score.{metric}", f"confirm.{metric}", f"shrinkage.{metric}"):
            assert table[column].map(math.isfinite).all(), column
        shrink = table[f"score.{metric}"] - table[f"confirm.{metric}"]
        assert (shrink - table[f"shrinkage.{metric}"]).abs().max() < 1e-9
    # Each row's sweep scores are its point's, from the sweep's table.
    merged = table.merge(sweep, on="point", suffixes=("", ".sweep"))
    assert (merged["score.dino"] == merged["score.dino.sweep"]).all()
    assert (merged["checkpoint_step"] == merged["checkpoint_step.sweep"]).all()

    # Fresh seeds (the sweep used seed 0 only) on the held-out prompt, one image per point.
    for row in table.to_dict(orient="records"):
        manifest = root / row["confirm.images_dir"] / "manifest.jsonl"
        entries = [json.loads(line) for line in manifest.read_text().splitlines()]
        assert [e["seed"] for e in entries] == [1]
        assert [e["prompt"] for e in entries] == ["a sks toy in the snow"]
        assert (root / row["adapter"]).is_dir()  # keep_adapters: best kept what was needed

    metrics = json.loads((root / "reports/metrics.json").read_text())
    best = table.iloc[0]
    assert metrics["best_point"] == best["point"]
    for metric in ("dino", "clip_i", "clip_t"):
        assert math.isclose(metrics["sweep"][metric], best[f"score.{metric}"])
        assert math.isclose(metrics["confirm"][metric], best[f"confirm.{metric}"])
        assert math.isclose(metrics["shrinkage"][metric], best[f"shrinkage.{metric}"])
        assert metrics["confirm"][f"{metric}_lo"] <= metrics["confirm"][metric] + 1e-9
        assert math.isfinite(metrics["baseline"][metric])
    assert set(metrics["real_ceiling"]) == {"dino", "clip_i"}
