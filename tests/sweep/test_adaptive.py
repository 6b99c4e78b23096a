"""Adaptive evaluation (``sweep.evaluation: {rungs, keep_fraction}``) with the fake backend:
who is promoted, what is recorded at which fidelity, what the front and the runs study see."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import optuna
import pandas as pd
import pytest
from optuna.trial import TrialState

from harness.config import ConfigError, HarnessConfig, load_config
from harness.sweep import open_studies, run_sweep
from harness.sweep.adaptive import kept, promotion_order
from harness.sweep.runner import scalarize
from harness.sweep.select import select_points
from harness.sweep.study import study_id

from .fakes import FakeBackend
from .test_sweep_logic import make_cfg

ADAPTIVE = {"rungs": [{"prompts": 1}], "keep_fraction": 0.25}
POINTS_PER_RUN = 2 * 4  # 2 checkpoints x (2 guidance x 2 LoRA scales)


def adaptive_cfg(tmp_path: Path, evaluation: Any = None, **sweep: Any) -> HarnessConfig:
    cfg = make_cfg(tmp_path, **sweep)
    data = cfg.to_dict()
    data["sweep"]["evaluation"] = ADAPTIVE if evaluation is None else evaluation
    # The fake's full protocol is two prompts x two seeds.
    data["eval"].update(prompts=["a photo of {token} {class_name}", "a {token} on a beach"])
    data["eval"]["images_per_prompt"] = 2
    return HarnessConfig.model_validate(data)


def test_each_run_promotes_its_best_quarter_to_the_full_protocol(tmp_path: Path) -> None:
    cfg = adaptive_cfg(tmp_path)
    backend = FakeBackend()
    summary = run_sweep(cfg, tmp_path, backend)

    frame = pd.read_parquet(summary.results_parquet)
    assert summary.runs_completed == 4 and len(frame) == 4 * POINTS_PER_RUN
    full = frame[frame["fidelity"] == 1.0]
    cheap = frame[frame["fidelity"] < 1.0]
    # ceil(0.25 x 8) = 2 full-fidelity points per run; the rest stopped at the 1-image rung.
    assert (full.groupby("run_key").size() == 2).all() and full["run_key"].nunique() == 4
    assert set(cheap["fidelity"]) == {0.25} and (cheap["n_images"] == 1).all()
    assert (full["n_images"] == 4).all()
    assert not cheap["pareto"].any() and full["pareto"].any()

    # Images: 1 per point at the rung, then the 3 each promoted point lacks (the rung's is
    # reused), instead of 4 per point.
    assert backend.generated_images == 4 * (POINTS_PER_RUN * 1 + 2 * 3)
    # One backend call per checkpoint and fidelity; the full calls hold only promoted points.
    full_calls = [n for _, rung, n in backend.rungs_evaluated if rung is None]
    assert sum(full_calls) == 8 and all(
        rung in (None, (1, 1)) for _, rung, _ in backend.rungs_evaluated
    )

    points = optuna.load_study(study_name=summary.study_name, storage=summary.storage)
    states = [t.state for t in points.get_trials()]
    assert states.count(TrialState.COMPLETE) == 8 and states.count(TrialState.PRUNED) == 24
    front = {t.number for t in points.best_trials}
    assert front == set(frame.loc[frame["pareto"], "point"])
    assert front <= set(full["point"])


def test_the_promoted_points_are_the_best_at_the_rung_and_keep_its_scores(
    tmp_path: Path,
) -> None:
    cfg = adaptive_cfg(tmp_path)
    summary = run_sweep(cfg, tmp_path, FakeBackend(rung_error=0.0))
    points = optuna.load_study(study_name=summary.study_name, storage=summary.storage)
    for run in {t.user_attrs["run_key"] for t in points.get_trials()}:
        mine = [t for t in points.get_trials() if t.user_attrs["run_key"] == run]
        promoted = [t for t in mine if t.state == TrialState.COMPLETE]
        # Each promoted point's rung scores are in its history, and the rung's ranking put it
        # ahead of every point that stopped there.
        rung_scores = {t.number: t.user_attrs["rungs"][0]["scores"] for t in promoted}
        rung_scores |= {t.number: t.user_attrs["scores"] for t in mine if t not in promoted}
        numbers = list(rung_scores)
        order = promotion_order(cfg, [rung_scores[n] for n in numbers])
        assert {numbers[i] for i in order[:2]} == {t.number for t in promoted}
        for t in promoted:
            (history,) = t.user_attrs["rungs"]
            assert history["rung"] == 0 and history["fidelity"] == 0.25
            assert history["n_images"] == 1
            assert t.user_attrs["fidelity"] == 1.0 and "rung" not in t.user_attrs
        for t in mine:
            if t.state == TrialState.PRUNED:
                assert t.user_attrs["rung"] == 0 and t.values is not None


def test_the_runs_study_is_told_the_best_full_fidelity_point(tmp_path: Path) -> None:
    cfg = adaptive_cfg(tmp_path, weights={"dino": 0.5, "clip_t": 0.5})
    summary = run_sweep(cfg, tmp_path, FakeBackend(rung_error=0.5))
    frame = pd.read_parquet(summary.results_parquet)
    runs = open_studies(cfg, tmp_path).runs
    for trial in runs.get_trials(states=(TrialState.COMPLETE,)):
        mine = frame[frame["run_trial"] == trial.number]
        full = mine[mine["fidelity"] == 1.0]
        best_full = max(scalarize(cfg, _scores(row)) for _, row in full.iterrows())
        assert trial.value == pytest.approx(best_full)
        # With a large rung error the cheap scores can beat every full one; they never count.
        scored = full.assign(_s=[scalarize(cfg, _scores(r)) for _, r in full.iterrows()])
        best_step = int(scored.sort_values("_s").iloc[-1]["checkpoint_step"])
        assert trial.user_attrs["best_adapter"].endswith(f"step-{best_step:06d}")


def test_the_evaluate_stage_never_selects_a_cheap_point(tmp_path: Path) -> None:
    cfg = adaptive_cfg(tmp_path)
    summary = run_sweep(cfg, tmp_path, FakeBackend(rung_error=0.5))
    frame = pd.read_parquet(summary.results_parquet)
    cheap = frame[frame["fidelity"] < 1.0]
    # The large error makes some cheap points look better than any full one.
    assert cheap["score.dino"].max() > frame.loc[frame["fidelity"] == 1.0, "score.dino"].max()
    chosen = select_points(cfg, frame)
    assert len(chosen) and (chosen["fidelity"] == 1.0).all()
    assert summary.pareto and all(row["fidelity"] == 1.0 for row in summary.pareto)


def test_a_second_rung_promotes_from_the_first_rungs_survivors(tmp_path: Path) -> None:
    evaluation = {
        "rungs": [{"prompts": 1}, {"prompts": 2}],
        "keep_fraction": 0.5,
    }
    cfg = adaptive_cfg(tmp_path, evaluation, n_trials=1)
    backend = FakeBackend()
    summary = run_sweep(cfg, tmp_path, backend)
    frame = pd.read_parquet(summary.results_parquet)
    # 8 points -> 4 at rung 1 -> 2 at the full protocol.
    assert frame["fidelity"].value_counts().to_dict() == {0.25: 4, 0.5: 2, 1.0: 2}
    # 8 x 1 image, then 4 x 1 more, then 2 x 2 more.
    assert backend.generated_images == 8 + 4 + 4
    points = optuna.load_study(study_name=summary.study_name, storage=summary.storage)
    for t in points.get_trials(states=(TrialState.COMPLETE,)):
        assert [h["rung"] for h in t.user_attrs["rungs"]] == [0, 1]


def test_resuming_an_adaptive_sweep_records_every_point_once(tmp_path: Path) -> None:
    cfg = adaptive_cfg(tmp_path, n_trials=2)
    run_sweep(cfg, tmp_path, FakeBackend())
    backend = FakeBackend()
    summary = run_sweep(cfg, tmp_path, backend)
    assert backend.trained == [] and summary.points == 2 * POINTS_PER_RUN


def test_adaptive_and_exhaustive_sweeps_are_different_studies(tmp_path: Path) -> None:
    adaptive, exhaustive = adaptive_cfg(tmp_path), make_cfg(tmp_path)
    other = adaptive_cfg(tmp_path, {"rungs": [{"prompts": 1}], "keep_fraction": 0.5})
    assert len({study_id(adaptive), study_id(exhaustive), study_id(other)}) == 3


def test_promotion_order_is_by_pareto_front_then_by_the_weighted_score(tmp_path: Path) -> None:
    cfg = make_cfg(tmp_path)  # objectives dino and clip_t, no weights: pareto
    scores = [
        {"dino": 0.5, "clip_t": 0.5},  # front 0
        {"dino": 0.9, "clip_t": 0.1},  # front 0, weighted 0.5
        {"dino": 0.4, "clip_t": 0.4},  # front 1 (dominated by 0 only)
        {"dino": 0.7, "clip_t": 0.05},  # front 1 (dominated by 1), weighted 0.375 < 0.4
        {"dino": 0.1, "clip_t": 0.1},  # front 2
    ]
    assert promotion_order(cfg, scores) == [0, 1, 2, 3, 4]
    weighted = make_cfg(tmp_path, weights={"dino": 1.0})
    assert promotion_order(weighted, scores) == [1, 3, 0, 2, 4]


def test_kept_is_the_ceiling_of_the_fraction_and_at_least_min_keep(tmp_path: Path) -> None:
    cfg = adaptive_cfg(tmp_path, {"rungs": [{"prompts": 1}], "keep_fraction": 0.3, "min_keep": 2})
    evaluation = cfg.sweep.evaluation
    assert not isinstance(evaluation, str)
    assert [kept(evaluation, n) for n in (1, 2, 3, 10, 11)] == [1, 2, 2, 3, 4]


def test_a_rung_that_is_the_whole_protocol_evaluates_every_point_fully(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A preset's rung can meet a protocol shrunk with ``-S``: no error, every point is then a
    full-fidelity point (and the log says why)."""
    cfg = adaptive_cfg(
        tmp_path,
        {"rungs": [{"prompts": 2, "images_per_prompt": 2}], "keep_fraction": 0.25},
        n_trials=1,
    )
    with caplog.at_level("INFO", logger="harness.sweep.adaptive"):
        summary = run_sweep(cfg, tmp_path, FakeBackend())
    frame = pd.read_parquet(summary.results_parquet)
    assert len(frame) == POINTS_PER_RUN and (frame["fidelity"] == 1.0).all()
    assert summary.points_full == POINTS_PER_RUN
    assert "rung 0 (2 prompts x 2 images) is the whole evaluation protocol here" in caplog.text


def test_bad_adaptive_settings_are_refused_naming_the_key(tmp_path: Path) -> None:
    params = tmp_path / "params.yaml"
    root = Path(__file__).resolve().parents[2]
    cases = {
        "{rungs: [{prompts: 1}], keep_fraction: 0}": r"sweep\.evaluation\.keep_fraction: must be > 0",
        "{rungs: [], keep_fraction: 0.5}": r"sweep\.evaluation\.rungs: List should have at least 1",
        "{rungs: [{prompts: 2}, {prompts: 1}], keep_fraction: 0.5}": (
            r"sweep\.evaluation\.rungs: rung 1 \(1 prompts x 1\) must hold rung 0"
        ),
        "{rungs: [{prompts: 1}], keep_fraction: 0.5, keep: 2}": (
            r"sweep\.evaluation\.keep: unknown key.*allowed: keep_fraction, min_keep, rank_by, rungs"
        ),
        "halving": r"sweep\.evaluation: must be one of 'exhaustive', got 'halving'",
    }
    for value, message in cases.items():
        params.write_text(f"preset: tiny-cpu\nsweep: {{evaluation: {value}}}\n", encoding="utf-8")
        with pytest.raises(ConfigError, match=message) as err:
            load_config(params, root=root)
        assert str(params) in str(err.value)


def _scores(row: pd.Series) -> dict[str, float]:
    return {
        k.removeprefix("score."): float(v) for k, v in row.items() if str(k).startswith("score.")
    }
