"""Issue 16: a conditional search space and the inference scheduler as a dimension, through the
CLI on the real tiny models (`harness -S ... sweep`, as a user overrides a preset)."""

from __future__ import annotations

from pathlib import Path

import optuna
import pandas as pd
import pytest

from ._helpers import cli_env, clone_project, run_cli, tail

OVERRIDES = [
    "sweep.sampler=grid",
    "sweep.n_trials=10",
    # Merged into the preset's space (learning_rate, dropout), as -S merges mappings.
    "sweep.space.learning_rate={choices: [1.0e-3]}",
    "sweep.space.dropout={choices: [0.0]}",
    "sweep.space.train_text_encoder={choices: [false, true]}",
    "sweep.space.text_encoder_lr={choices: [1.0e-4, 1.0e-3]}",
    "sweep.inference.guidance_scale=[7.5]",
    "sweep.inference.lora_scale=[1.0]",
    "sweep.inference.scheduler=[ddim, euler]",
    "train.max_steps=2",
    "train.checkpoint_steps=[2]",
]


@pytest.mark.slow
def test_grid_trains_distinct_configurations_and_evaluates_each_scheduler(
    prepared_template: Path, tmp_path: Path
) -> None:
    project = clone_project(
        prepared_template, tmp_path / "project", {"sweep": {"study_name": "e2e-cond"}}
    )
    env, log = cli_env(tmp_path / "home"), tmp_path / "cli.log"
    args = [a for o in OVERRIDES for a in ("-S", o)] + ["sweep"]
    done = run_cli(project, args, env, log, timeout=300)
    assert done.returncode == 0, tail(log)

    frame = pd.read_parquet(project / "runs/sweep/results.parquet")
    # 4 grid combinations, 3 distinct trainings: text_encoder_lr means nothing without the
    # text encoder, so that run is trained once.
    assert frame["run_key"].nunique() == 3
    runs = frame.drop_duplicates("run_key")
    assert sorted(runs["train.train_text_encoder"].astype(bool)) == [False, True, True]
    assert set(
        runs.loc[runs["train.train_text_encoder"].astype(bool), "train.text_encoder_lr"]
    ) == {
        1e-4,
        1e-3,
    }
    # Every run's checkpoint under both schedulers: 3 runs x 1 step x 2 settings.
    assert len(frame) == 6 and set(frame["eval.scheduler"]) == {"ddim", "euler"}
    assert frame["setting_id"].nunique() == 2
    assert frame["score.dino"].notna().all()

    storage = f"sqlite:///{project / 'runs/sweep/study.db'}"
    names = [n for n in optuna.get_all_study_names(storage) if "." not in n]  # not .runs/.proxy
    (points_name,) = names
    points = optuna.load_study(study_name=points_name, storage=storage).get_trials()
    for point in points:
        has_lr = "train.text_encoder_lr" in point.params
        assert has_lr == point.params["train.train_text_encoder"]
