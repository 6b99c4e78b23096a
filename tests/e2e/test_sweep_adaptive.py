"""Issue 14: adaptive evaluation through the CLI, as a user runs it: `harness sweep`, then
`harness evaluate` and `harness report`, on the real tiny models."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from ._helpers import cli_env, clone_project, run_cli, tail

ADAPTIVE = {"rungs": [{"prompts": 1, "images_per_prompt": 1}], "keep_fraction": 0.25}
POINTS = 2 * 4  # 2 checkpoints x (2 guidance x 2 LoRA scales) of the tiny-cpu grid
FULL_IMAGES = 2 * 2  # 2 prompts x 2 seeds


def test_adaptive_sweep_promotes_a_quarter_and_only_full_points_reach_the_report(
    prepared_template: Path, tmp_path: Path
) -> None:
    project = clone_project(
        prepared_template,
        tmp_path / "project",
        {
            "eval": {"images_per_prompt": 2},
            "sweep": {"study_name": "e2e-adaptive", "n_trials": 1, "evaluation": ADAPTIVE},
            "evaluate": {"top_k": 2},
            "report": {"bootstrap_samples": 100},
        },
    )
    env, log = cli_env(tmp_path / "home"), tmp_path / "cli.log"
    for args in (["sweep"], ["evaluate"], ["report"]):
        done = run_cli(project, args, env, log, timeout=240)
        assert done.returncode == 0, tail(log)

    sweep_dir = project / "runs" / "sweep"
    frame = pd.read_csv(sweep_dir / "results.csv")
    assert len(frame) == POINTS
    assert frame["fidelity"].value_counts().to_dict() == {0.25: 6, 1.0: 2}
    full = frame[frame["fidelity"] == 1.0]
    assert (full["n_images"] == FULL_IMAGES).all()
    assert (frame.loc[frame["fidelity"] < 1.0, "n_images"] == 1).all()
    assert frame.loc[frame["pareto"], "fidelity"].eq(1.0).all()

    # On disk, each point's folder holds exactly its scored images: the rung's image was kept
    # and the promoted points got the three they lacked.
    for row in frame.itertuples():
        pngs = list((project / str(row.images_dir)).glob("*.png"))
        assert len(pngs) == row.n_images, row.images_dir
    images = 6 * 1 + 2 * FULL_IMAGES
    metrics = json.loads((sweep_dir / "metrics.json").read_text())
    assert (metrics["points"], metrics["points_full"]) == (POINTS, 2)
    assert (metrics["images"], metrics["images_exhaustive"]) == (images, POINTS * FULL_IMAGES)
    text = log.read_text()
    assert f"2 of them with the full protocol ({images} of {POINTS * FULL_IMAGES} images" in text
    per_image = pd.read_parquet(sweep_dir / "per_image.parquet")
    assert len(per_image) == images

    confirmed = pd.read_parquet(project / "runs" / "evaluate" / "results.parquet")
    assert len(confirmed) and set(confirmed["point"]) <= set(full["point"])
    html = (project / "reports" / "index.html").read_text(encoding="utf-8")
    assert "Adaptive evaluation (sweep.evaluation): 2 of 8 points" in html
    summary = (project / "reports" / "summary.md").read_text(encoding="utf-8")
    assert "1 training run -> 8 evaluated points (2 with the full protocol)" in summary
