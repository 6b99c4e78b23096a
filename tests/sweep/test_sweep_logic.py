"""Sweep bookkeeping with a fake backend: points, pruning, resume, refusal, grid, failures."""

from __future__ import annotations

import itertools
import logging
from pathlib import Path
from typing import Any

import optuna
import pandas as pd
import pytest
from optuna.trial import TrialState

from harness.config import HarnessConfig
from harness.errors import HarnessError
from harness.sweep import open_studies, run_sweep
from harness.sweep.study import SweepError
from harness.sweep.summary import param_importances
from metrics.errors import MetricsInputError

from .fakes import FakeBackend


def make_cfg(tmp_path: Path, **sweep: Any) -> HarnessConfig:
    base: dict[str, Any] = {
        "study_name": "t",
        "n_trials": 4,
        "sampler": "random",
        "pruner": "none",
        "space": {
            "learning_rate": {"low": 1e-5, "high": 1e-3, "log": True},
            "rank": {"choices": [2, 4]},
        },
        "inference": {"guidance_scale": [3.0, 7.0], "lora_scale": [0.5, 1.0]},
    }
    base.update(sweep)
    return HarnessConfig.model_validate(
        {
            "preset": "test",
            "train": {"max_steps": 20, "checkpoint_steps": [10, 20]},
            "sweep": base,
            "tracking": {"mode": "off"},
        }
    )


def test_more_points_than_runs_over_steps_and_scales(tmp_path: Path) -> None:
    cfg = make_cfg(tmp_path)
    backend = FakeBackend()
    summary = run_sweep(cfg, tmp_path, backend)
    assert summary.runs_completed == 4
    # 4 runs x 2 checkpoints x (2 guidance x 2 LoRA scales) points.
    assert summary.points == 4 * 2 * 4 > summary.runs_completed
    assert len(backend.trained) == 4  # one training per run, never per step or scale
    frame = pd.read_parquet(summary.results_parquet)
    assert set(frame["checkpoint_step"]) == {10, 20}
    assert set(frame["eval.guidance_scale"]) == {3.0, 7.0}
    assert set(frame["eval.lora_scale"]) == {0.5, 1.0}
    assert {
        "train.learning_rate",
        "train.rank",
        "score.dino",
        "score.clip_t",
        "score.dino_lo",
    } <= set(frame.columns)
    assert frame["pareto"].any()
    assert pd.read_csv(summary.results_csv).shape == frame.shape
    points = optuna.load_study(study_name=summary.study_name, storage=summary.storage)
    assert len(points.best_trials) == int(frame["pareto"].sum())
    # Importances can be computed over steps and scales too.
    importances = param_importances(points, ["dino", "clip_t"])["dino"]
    assert {"checkpoint_step", "eval.lora_scale", "eval.guidance_scale"} <= set(importances)
    assert "4 training runs" in summary.describe() and "32 evaluated points" in summary.describe()


def test_hopeless_trial_is_pruned(tmp_path: Path) -> None:
    lrs = [1e-4, 2e-4, 3e-4, 0.5]
    cfg = make_cfg(tmp_path, pruner="median", n_trials=4, space={"learning_rate": {"choices": lrs}})
    runs_study = open_studies(cfg, tmp_path).runs
    for lr in lrs:  # three healthy runs first (the pruner's baseline), the hopeless one last
        runs_study.enqueue_trial({"train.learning_rate": lr})
    backend = FakeBackend(hopeless_lr=0.5, flat=True)
    summary = run_sweep(cfg, tmp_path, backend)
    studies = open_studies(cfg, tmp_path)
    runs = studies.runs.get_trials()
    pruned = [t for t in runs if t.state == TrialState.PRUNED]
    assert [t.params["train.learning_rate"] for t in pruned] == [0.5]
    assert pruned[0].user_attrs["prune_reason"] == "pruned at step 10"
    assert summary.runs_pruned == 1 and summary.runs_completed == 3
    # Pruned at its first checkpoint: it never reached step 20, nor the full evaluation.
    assert backend.checkpoints_seen == [10, 20, 10, 20, 10, 20, 10]
    assert summary.points == 3 * 2 * 4


def test_resume_does_not_repeat_finished_runs(tmp_path: Path) -> None:
    first = FakeBackend()
    run_sweep(make_cfg(tmp_path, n_trials=2), tmp_path, first)
    second = FakeBackend()
    summary = run_sweep(make_cfg(tmp_path, n_trials=4), tmp_path, second)
    assert len(first.trained) == 2 and len(second.trained) == 2
    assert summary.runs_completed == 4 and summary.points == 32
    third = FakeBackend()
    again = run_sweep(make_cfg(tmp_path, n_trials=4), tmp_path, third)
    assert third.trained == [] and again.points == 32


def test_changed_config_never_reports_old_results_and_switching_back_resumes(
    tmp_path: Path,
) -> None:
    first = run_sweep(make_cfg(tmp_path, n_trials=1), tmp_path, FakeBackend())
    old_rows = pd.read_parquet(first.results_parquet)
    changed_cfg = make_cfg(
        tmp_path, n_trials=2, space={"learning_rate": {"low": 1e-6, "high": 1e-3, "log": True}}
    )
    backend = FakeBackend()
    changed = run_sweep(changed_cfg, tmp_path, backend)
    assert changed.study_name != first.study_name
    assert len(backend.trained) == 2 and changed.runs_completed == 2  # trained afresh
    assert not set(pd.read_parquet(changed.results_parquet)["run_key"]) & set(old_rows["run_key"])
    again = FakeBackend()
    back = run_sweep(make_cfg(tmp_path, n_trials=1), tmp_path, again)
    assert back.study_name == first.study_name and not again.trained  # resumed, budget met
    pd.testing.assert_frame_equal(pd.read_parquet(back.results_parquet), old_rows)


def test_grid_sampler_reproduces_grid_exactly(tmp_path: Path) -> None:
    lrs, ranks = [1e-5, 1e-4], [2, 8]
    cfg = make_cfg(
        tmp_path,
        sampler="grid",
        n_trials=10,
        space={"learning_rate": {"choices": lrs}, "rank": {"choices": ranks}},
        inference={
            "guidance_scale": [1.0, 7.0, 14.0],
            "lora_scale": [0.5, 1.0],
            "text_encoder_lora_scale": [0.0, 1.0],
        },
    )
    # Text-encoder LoRA trained: its scale is a dimension of every run.
    cfg = cfg.model_copy(
        update={"train": cfg.train.model_copy(update={"train_text_encoder": True})}
    )
    summary = run_sweep(cfg, tmp_path, FakeBackend())
    frame = pd.read_parquet(summary.results_parquet)
    assert summary.runs_completed == 4  # the grid is exhausted before n_trials
    got_train = set(zip(frame["train.learning_rate"], frame["train.rank"], strict=True))
    assert got_train == set(itertools.product(lrs, ranks))
    got = set(
        zip(
            frame["train.learning_rate"],
            frame["train.rank"],
            frame["checkpoint_step"],
            frame["eval.guidance_scale"],
            frame["eval.lora_scale"],
            frame["eval.text_encoder_lora_scale"],
            strict=True,
        )
    )
    expected = set(
        itertools.product(lrs, ranks, [10, 20], [1.0, 7.0, 14.0], [0.5, 1.0], [0.0, 1.0])
    )
    assert got == expected and len(frame) == len(expected)


def test_failed_run_is_recorded_and_sweep_goes_on(tmp_path: Path) -> None:
    cfg = make_cfg(
        tmp_path, sampler="grid", space={"learning_rate": {"choices": [1e-4, 2e-4, 3e-4]}}
    )
    summary = run_sweep(cfg, tmp_path, FakeBackend(fail_lr=2e-4))
    runs = open_studies(cfg, tmp_path).runs.get_trials()
    failed = [t for t in runs if t.state == TrialState.FAIL]
    assert len(failed) == 1
    assert failed[0].user_attrs["fail_reason"] == "loss is NaN at step 3"
    assert summary.runs_completed == 2 and summary.runs_failed == 1


def test_a_nan_run_is_one_warning_line_without_a_traceback(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = make_cfg(tmp_path, sampler="grid", space={"learning_rate": {"choices": [2e-4]}})
    with caplog.at_level(logging.INFO):
        run_sweep(cfg, tmp_path, FakeBackend(fail_lr=2e-4))
    failed = [r for r in caplog.records if "failed" in r.getMessage()]
    assert [r.getMessage() for r in failed] == ["run 0 failed: loss is NaN at step 3"]
    assert failed[0].levelno == logging.WARNING and failed[0].exc_info is None
    # Optuna's own "Trial 0 failed" (with the traceback of our exception) is not shown.
    assert not any(
        r.name.startswith("optuna") and "failed" in r.getMessage() for r in caplog.records
    )


class _BrokenEvaluation(FakeBackend):
    """A bug in evaluation: every run trains, then fails the same way."""

    def evaluate(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("index 3 is out of bounds")


def test_runs_failing_in_a_row_with_an_unexpected_error_stop_the_sweep(tmp_path: Path) -> None:
    cfg = make_cfg(tmp_path, n_trials=8, max_failures_in_a_row=3)
    backend = _BrokenEvaluation()
    with pytest.raises(SweepError, match=r"3 runs in a row failed") as info:
        run_sweep(cfg, tmp_path, backend)
    message = str(info.value)
    assert "run 2" in message and "RuntimeError: index 3 is out of bounds" in message
    assert "sweep.max_failures_in_a_row" in message
    assert len(backend.trained) == 3  # not the whole budget of 8
    runs = open_studies(cfg, tmp_path).runs.get_trials()
    assert [t.user_attrs.get("fail_reason") for t in runs] == [
        "RuntimeError: index 3 is out of bounds"
    ] * 3


@pytest.mark.parametrize(
    "error",
    [HarnessError("adapter: x.safetensors: LoRA weights not found"), MetricsInputError("bad")],
)
def test_a_user_error_in_a_run_stops_at_once_and_queues_the_run(
    tmp_path: Path, error: Exception
) -> None:
    cfg = make_cfg(tmp_path, n_trials=3)

    class Once(FakeBackend):
        def evaluate(self, *args: Any, **kwargs: Any) -> Any:
            raise error

    with pytest.raises(SweepError) as info:
        run_sweep(cfg, tmp_path, Once())
    first, second = str(info.value).splitlines()
    assert first.startswith("run 0 (") and first.endswith(f"): {error}")
    assert "run 0 runs first" in second
    runs = open_studies(cfg, tmp_path).runs.get_trials()
    assert [t.state for t in runs] == [TrialState.FAIL, TrialState.WAITING]
    assert runs[0].user_attrs["interrupted"] is True and "fail_reason" not in runs[0].user_attrs
    assert runs[0].user_attrs["interrupt_reason"] == f"{type(error).__name__}: {error}"
    fixed = FakeBackend()
    summary = run_sweep(cfg, tmp_path, fixed)
    assert summary.runs_completed == 3 and len(fixed.trained) == 3
    assert fixed.trained[0]["learning_rate"] == runs[0].params["train.learning_rate"]


def test_nan_runs_in_a_row_do_not_stop_the_sweep_and_null_never_stops(tmp_path: Path) -> None:
    # NaN losses are what some settings do (too high a learning rate): the sweep learns from them.
    lrs = [2e-4, 3e-4, 4e-4, 5e-4]
    cfg = make_cfg(
        tmp_path, sampler="grid", space={"learning_rate": {"choices": lrs}}, max_failures_in_a_row=1
    )

    class AllNaN(FakeBackend):
        def train(self, cfg: HarnessConfig, run_dir: Path, *args: Any) -> Any:
            self.fail_lr = cfg.train.learning_rate
            return super().train(cfg, run_dir, *args)

    assert run_sweep(cfg, tmp_path, AllNaN()).runs_failed == 4
    unlimited = make_cfg(tmp_path / "b", n_trials=4, max_failures_in_a_row=None)
    assert run_sweep(unlimited, tmp_path / "b", _BrokenEvaluation()).runs_failed == 4


def test_weighted_single_objective(tmp_path: Path) -> None:
    cfg = make_cfg(tmp_path, weights={"dino": 0.7, "clip_t": 0.3}, n_trials=2)
    summary = run_sweep(cfg, tmp_path, FakeBackend())
    frame = pd.read_parquet(summary.results_parquet)
    assert "score.weighted" in frame.columns
    expected = 0.7 * frame["score.dino"] + 0.3 * frame["score.clip_t"]
    assert (frame["score.weighted"] - expected).abs().max() < 1e-12
    assert int(frame["pareto"].sum()) == 1
    assert frame.loc[frame["pareto"], "score.weighted"].item() == frame["score.weighted"].max()


def test_non_pareto_adapters_removed(tmp_path: Path) -> None:
    cfg = make_cfg(tmp_path, n_trials=2, keep_adapters="pareto")
    summary = run_sweep(cfg, tmp_path, FakeBackend())
    kept = {
        Path(p).resolve() for p in (tmp_path / "runs/sweep/runs").glob("*/*/checkpoints/step-*")
    }
    pareto = {(tmp_path / p["adapter"]).resolve() for p in summary.pareto}
    assert kept == pareto and kept


def test_one_run_and_one_point_are_counted_in_the_singular(tmp_path: Path) -> None:
    from harness.report.build import _sweep_counts

    cfg = make_cfg(
        tmp_path,
        n_trials=1,
        inference={"guidance_scale": [3.0], "lora_scale": [1.0]},
        space={"learning_rate": {"choices": [1e-4]}},
    )
    cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"checkpoint_steps": [20]})})
    summary = run_sweep(cfg, tmp_path, FakeBackend())
    assert summary.describe() == (
        "1 training run (1 completed, 0 pruned, 0 failed) -> 1 evaluated point "
        "(1.0 per completed run)"
    )
    assert _sweep_counts({"runs": 1, "points": 1}, 1) == "1 training run -> 1 evaluated point"
    assert _sweep_counts({"runs": 4, "points": 32}, 8) == (
        "4 training runs -> 32 evaluated points (8 with the full protocol)"
    )


def test_text_encoder_scale_is_no_dimension_of_a_run_without_text_encoder_lora(
    tmp_path: Path,
) -> None:
    """A UNet-only run's images do not depend on eval.text_encoder_lora_scale: scoring them
    once per value made identical images distinct points (each its own Pareto and top_k slot)
    and put a scale that was never applied in the results table."""
    cfg = make_cfg(
        tmp_path,
        n_trials=2,
        sampler="grid",
        space={"train_text_encoder": {"choices": [False, True]}},
        inference={"guidance_scale": [3.0], "text_encoder_lora_scale": [0.6, 1.0]},
    )
    backend = FakeBackend()
    summary = run_sweep(cfg, tmp_path, backend)
    frame = pd.read_parquet(summary.results_parquet)
    unet_only = frame[~frame["train.train_text_encoder"].astype(bool)]
    both = frame[frame["train.train_text_encoder"].astype(bool)]
    assert len(both) == 2 * 2 and set(both["eval.text_encoder_lora_scale"]) == {0.6, 1.0}
    assert len(unet_only) == 2  # one point per checkpoint, not one per text-encoder scale
    assert unet_only["eval.text_encoder_lora_scale"].isna().all()
    assert summary.points == 6


def test_the_budget_spent_line_counts_the_runs_the_study_holds(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """It printed the configured budget as the runs claimed ('4 runs claimed' of 12)."""
    run_sweep(make_cfg(tmp_path, n_trials=3), tmp_path, FakeBackend())
    with caplog.at_level(logging.INFO, logger="harness.sweep.runner"):
        run_sweep(make_cfg(tmp_path, n_trials=2), tmp_path, FakeBackend())
    assert "the run budget is spent: 3 runs claimed, budget 2" in caplog.text
