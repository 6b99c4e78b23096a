"""The conditional search space (a child sampled only when its parent makes it matter) and the
inference scheduler as an evaluated dimension."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import optuna
import pandas as pd
import pytest
from optuna.trial import TrialState

from harness.config import ConfigError, HarnessConfig, validate_config
from harness.sweep import open_studies, run_sweep
from harness.sweep.space import (
    evaluated_distributions,
    inference_settings,
    never_sampled,
    sample_training_params,
    sampling_order,
    search_space_size,
)
from harness.sweep.study import make_sampler

from .fakes import FakeBackend
from .test_sweep_logic import make_cfg

TE_SPACE: dict[str, Any] = {
    "train_text_encoder": {"choices": [False, True]},
    "text_encoder_lr": {"choices": [1e-5, 1e-4, 1e-3]},
    "rank": {"choices": [2, 4]},
}


def _ask(cfg: HarnessConfig, sampler: optuna.samplers.BaseSampler, n: int) -> list[dict[str, Any]]:
    study = optuna.create_study(sampler=sampler)
    out = []
    for _ in range(n):
        trial = study.ask()
        params = sample_training_params(trial, cfg)
        study.tell(trial, float(len(params)))
        out.append(params)
    return out


def test_a_child_is_sampled_only_when_its_parent_is_on(tmp_path: Path) -> None:
    cfg = make_cfg(tmp_path, space=TE_SPACE)
    assert sampling_order(cfg.sweep)[0] == "train_text_encoder"  # the parent is asked first
    drawn = _ask(cfg, optuna.samplers.RandomSampler(seed=0), 40)
    on = [p for p in drawn if p["train_text_encoder"]]
    off = [p for p in drawn if not p["train_text_encoder"]]
    assert on and off
    assert all("text_encoder_lr" in p for p in on)
    assert all("text_encoder_lr" not in p for p in off)
    assert all("rank" in p for p in drawn)  # unconditional parameters always


def test_tpe_models_the_conditional_space_without_warnings(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The study's own TPE (multivariate, grouped) past its random start-up trials."""
    cfg = make_cfg(tmp_path, sampler="tpe", space=TE_SPACE)
    with caplog.at_level("WARNING", logger="optuna"):
        drawn = _ask(cfg, make_sampler(cfg), 16)
    assert not [r for r in caplog.records if "independent" in r.getMessage()]
    assert {p["train_text_encoder"] for p in drawn[4:]} <= {False, True}
    assert all(("text_encoder_lr" in p) == p["train_text_encoder"] for p in drawn)


def test_a_fixed_parent_decides_for_the_child(tmp_path: Path) -> None:
    """prior_loss_weight searched with prior_preservation fixed on: always sampled."""
    base = make_cfg(tmp_path).to_dict()
    base["train"]["prior_preservation"] = True
    base["sweep"]["space"] = {"prior_loss_weight": {"choices": [0.5, 1.0]}}
    cfg = validate_config(base)
    drawn = _ask(cfg, optuna.samplers.RandomSampler(seed=1), 5)
    assert all("prior_loss_weight" in p for p in drawn)


def test_a_child_whose_fixed_parent_keeps_it_unused_is_never_sampled_and_said_so(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Not a config error: `harness -S train.optimizer=prodigy train` on a preset that searches
    learning_rate must still train; the sweep says the parameter is never sampled."""
    base = make_cfg(tmp_path, n_trials=1).to_dict()
    base["sweep"]["space"] = {"text_encoder_lr": {"low": 1e-6, "high": 1e-4, "log": True}}
    cfg = validate_config(base)
    problems = never_sampled(cfg)
    assert len(problems) == 1 and "sweep.space.text_encoder_lr" in problems[0]
    assert "train.train_text_encoder is False" in problems[0]
    assert _ask(cfg, optuna.samplers.RandomSampler(seed=0), 3) == [{}, {}, {}]
    with caplog.at_level("WARNING", logger="harness.sweep.runner"):
        run_sweep(cfg, tmp_path, FakeBackend())
    assert any("text_encoder_lr is never sampled" in r.getMessage() for r in caplog.records)
    assert never_sampled(make_cfg(tmp_path, space=TE_SPACE)) == []


def test_the_space_size_counts_distinct_configurations(tmp_path: Path) -> None:
    cfg = make_cfg(tmp_path, space=TE_SPACE)
    # (off + 3 learning rates when on) x 2 ranks = 8, not the plain product 2 x 3 x 2 = 12.
    assert search_space_size(cfg) == 8
    warm = make_cfg(
        tmp_path,
        space={
            "lr_scheduler": {"choices": ["constant", "cosine"]},
            "lr_warmup_steps": {"choices": [0, 5]},
        },
    )
    assert search_space_size(warm) == 3


def test_a_grid_over_a_conditional_space_trains_each_configuration_once(tmp_path: Path) -> None:
    """The grid proposes all 12 combinations; the 8 distinct configurations train once each,
    the sweep ends on its budget, and the points study holds each point's own parameters."""
    cfg = make_cfg(tmp_path, sampler="grid", n_trials=50, space=TE_SPACE)
    backend = FakeBackend()
    summary = run_sweep(cfg, tmp_path, backend)
    assert summary.runs_completed == 8 == len(backend.trained)
    configs = {(t["train_text_encoder"], t["text_encoder_lr"], t["rank"]) for t in backend.trained}
    assert len(configs) == 8
    # Runs without the text encoder keep the fixed text_encoder_lr: no invented value.
    fixed = cfg.train.text_encoder_lr
    assert {t["text_encoder_lr"] for t in backend.trained if not t["train_text_encoder"]} == {fixed}
    points = open_studies(cfg, tmp_path).points.get_trials(states=(TrialState.COMPLETE,))
    for point in points:
        assert ("train.text_encoder_lr" in point.params) == point.params["train.train_text_encoder"]
        assert set(point.distributions) == set(point.params)
    frame = pd.read_parquet(summary.results_parquet)
    off = frame[~frame["train.train_text_encoder"].astype(bool)]
    # The table shows what each run used: the fixed value where the parameter was not sampled.
    assert not off.empty and set(off["train.text_encoder_lr"]) == {fixed}

    # Importance: Optuna 5's PED-ANOVA ranks a conditional parameter too (points without it
    # are a regime of their own), so the report's importances cover it.
    from harness.report.importance import importances

    found = importances(cfg, tmp_path, open_studies(cfg, tmp_path).name, frame, ["dino"])
    assert found.source.startswith("the points study")
    assert "train.text_encoder_lr" in found.values["dino"]


def test_the_scheduler_is_an_evaluated_dimension_when_swept(tmp_path: Path) -> None:
    plain = make_cfg(tmp_path)
    assert "eval.scheduler" not in evaluated_distributions(plain)
    assert {s.scheduler for s in inference_settings(plain)} == {plain.eval.scheduler}
    cfg = make_cfg(
        tmp_path,
        n_trials=1,
        inference={"guidance_scale": [3.0, 7.0], "scheduler": ["ddim", "euler"]},
    )
    settings = inference_settings(cfg)
    assert len(settings) == 4 and {s.scheduler for s in settings} == {"ddim", "euler"}
    assert len({s.id for s in settings}) == 4
    summary = run_sweep(cfg, tmp_path, FakeBackend())
    points = open_studies(cfg, tmp_path).points.get_trials(states=(TrialState.COMPLETE,))
    assert {p.params["eval.scheduler"] for p in points} == {"ddim", "euler"}
    frame = pd.read_parquet(summary.results_parquet)
    assert set(frame["eval.scheduler"]) == {"ddim", "euler"}
    assert len(frame) == 2 * 4  # 2 checkpoints x 4 settings


def test_duplicate_schedulers_are_refused(tmp_path: Path) -> None:
    base = make_cfg(tmp_path).to_dict()
    base["sweep"]["inference"]["scheduler"] = ["ddim", "ddim"]
    with pytest.raises(ConfigError, match=r"sweep\.inference\.scheduler"):
        validate_config(base)


def test_learning_rates_are_not_sampled_under_prodigy(tmp_path: Path) -> None:
    """A child of two parents: text_encoder_lr needs the text encoder and an optimizer that
    uses learning rates (Prodigy sets its own)."""
    space = {
        **TE_SPACE,
        "optimizer": {"choices": ["adamw", "prodigy"]},
        "learning_rate": {"low": 1e-5, "high": 1e-3, "log": True},
    }
    cfg = make_cfg(tmp_path, space=space)
    drawn = _ask(cfg, optuna.samplers.RandomSampler(seed=2), 60)
    for p in drawn:
        assert ("learning_rate" in p) == (p["optimizer"] == "adamw")
        uses_te_lr = p["optimizer"] == "adamw" and p["train_text_encoder"]
        assert ("text_encoder_lr" in p) == uses_te_lr
    assert any("text_encoder_lr" in p for p in drawn)
    base = make_cfg(tmp_path).to_dict()
    base["train"]["optimizer"] = "prodigy"  # the default space searches learning_rate
    (problem,) = never_sampled(validate_config(base))
    assert "sweep.space.learning_rate" in problem and "optimizer is not prodigy" in problem


def test_a_study_from_before_the_conditional_space_does_not_retrain_its_runs(
    tmp_path: Path,
) -> None:
    """Before the conditional space, every parameter was sampled and applied: a run without the
    text encoder still recorded (and keyed) a text_encoder_lr it never used. Resuming such a
    study must recognise that run as the configuration it trained, not train it again."""
    from optuna.distributions import CategoricalDistribution

    from harness.sweep.runner import run_key
    from harness.sweep.space import with_training_params

    cfg = make_cfg(tmp_path, sampler="grid", n_trials=50, space=TE_SPACE)
    legacy = {"train_text_encoder": False, "text_encoder_lr": 1e-3, "rank": 2}
    assert legacy["text_encoder_lr"] != cfg.train.text_encoder_lr
    old_key = run_key(with_training_params(cfg, legacy))  # how the old sweep keyed it
    runs = open_studies(cfg, tmp_path).runs
    runs.add_trial(
        optuna.trial.create_trial(
            params={f"train.{k}": v for k, v in legacy.items()},
            distributions={
                f"train.{k}": CategoricalDistribution(TE_SPACE[k]["choices"]) for k in legacy
            },
            values=[0.5, 0.3],
            user_attrs={"run_key": old_key, "status": "completed"},
        )
    )
    backend = FakeBackend()
    run_sweep(cfg, tmp_path, backend)
    trained = {(t["train_text_encoder"], t["rank"]) for t in backend.trained}
    assert (False, 2) not in trained  # the legacy run is that configuration
    assert len(backend.trained) == 7  # the other 7 of the 8 distinct configurations


def test_the_tpe_sampler_is_made_without_optuna_s_experimental_warning() -> None:
    """``group=True`` is chosen on purpose; the warning was printed at every sweep start."""
    import warnings

    cfg = HarnessConfig.model_validate({"preset": "t", "sweep": {"sampler": "tpe"}})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sampler = make_sampler(cfg)
    assert isinstance(sampler, optuna.samplers.TPESampler)
    assert not [w for w in caught if issubclass(w.category, optuna.exceptions.ExperimentalWarning)]
