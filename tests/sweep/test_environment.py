"""The packages and model weights a study was started with: stored by its first worker,
compared by the others (other packages: a warning; other weights: refused), the packages
recorded on every run (harness.sweep.environment)."""

from __future__ import annotations

import importlib.metadata
import json
import logging
from pathlib import Path

import optuna
import pytest

from harness.config import HarnessConfig
from harness.sweep import open_studies, run_sweep
from harness.sweep.claims import Claims, WorkerSlot, open_claims
from harness.sweep.environment import (
    ENVIRONMENT_ATTR,
    MODEL_ATTR,
    PACKAGES,
    differences,
    join_environment,
    join_model,
    software_versions,
)
from harness.sweep.study import Studies, SweepError

from .fakes import FakeBackend
from .test_sweep_logic import make_cfg


def _claims(tmp_path: Path, study: str) -> Claims:
    return open_claims(f"sqlite:///{tmp_path / 'claims.db'}", study)


def test_versions_are_the_installed_distributions() -> None:
    found = software_versions()
    assert list(found) == list(PACKAGES)
    assert found["diffusers"] == importlib.metadata.version("diffusers")
    assert found["torch"] == importlib.metadata.version("torch")
    assert software_versions(("no-such-package-here",)) == {"no-such-package-here": "absent"}


def test_the_first_worker_stores_its_versions_and_later_ones_compare(
    caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    study = optuna.create_study(study_name="env")
    claims = _claims(tmp_path, "env")
    caplog.clear()
    mine = {"torch": "2.14.1", "diffusers": "0.42.1", "peft": "0.21.2"}
    assert join_environment(study, claims, mine) == []
    assert study.user_attrs[ENVIRONMENT_ATTR] == mine
    with caplog.at_level(logging.WARNING, logger="harness.sweep.environment"):
        assert join_environment(study, claims, mine) == []
        assert not [r for r in caplog.records if r.name == "harness.sweep.environment"]
        other = {**mine, "diffusers": "0.43.0"}
        assert join_environment(study, claims, other) == ["diffusers 0.43.0 (the study's: 0.42.1)"]
    (record,) = [r for r in caplog.records if r.name == "harness.sweep.environment"]
    assert "study env" in record.getMessage() and "diffusers 0.43.0" in record.getMessage()
    assert "sweep.study_name" in record.getMessage()
    assert study.user_attrs[ENVIRONMENT_ATTR] == mine  # the study keeps its first versions


def test_a_package_one_side_lacks_is_not_compared() -> None:
    """An older harness recorded fewer packages: nothing to compare them with."""
    assert differences({"torch": "2.13"}, {"torch": "2.13", "lpips": "0.1.4"}) == []
    assert differences({"torch": "2.13", "timm": "1.0"}, {"torch": "2.14", "timm": "1.0"}) == [
        "torch 2.14 (the study's: 2.13)"
    ]


def _workers(cfg: HarnessConfig, studies: Studies) -> list[WorkerSlot]:
    return open_claims(studies.storage_url, studies.name, cfg.sweep.storage_retry_s).workers()


WEIGHTS = {"model": "tiny://sd15", "weights": "a" * 64}
RETRAINED = {"model": "tiny://sd15", "weights": "b" * 64}


def test_the_first_weights_are_stored_and_other_weights_are_refused(tmp_path: Path) -> None:
    study = optuna.create_study(study_name="weights.runs")  # as open_studies names it
    claims = _claims(tmp_path, "weights")
    join_model(study, WEIGHTS, claims)
    assert study.user_attrs[MODEL_ATTR] == WEIGHTS
    join_model(study, {**WEIGHTS, "model": "/another/machine/path"}, claims)  # files elsewhere
    with pytest.raises(SweepError) as refused:
        join_model(study, RETRAINED, claims)
    message = str(refused.value)
    assert message.startswith(
        "model.pretrained 'tiny://sd15': these weights are not those study weights was started"
    )
    assert f"weights {'b' * 12} (the study's: {'a' * 12})" in message
    assert "-S sweep.study_name=<new name>" in message and "commit" not in message
    assert study.user_attrs[MODEL_ATTR] == WEIGHTS  # the study keeps its own


def test_a_study_that_stored_its_weights_before_the_claim_keeps_them(tmp_path: Path) -> None:
    study = optuna.create_study(study_name="older.runs")
    study.set_user_attr(MODEL_ATTR, WEIGHTS)
    claims = _claims(tmp_path, "older")
    with pytest.raises(SweepError, match="these weights are not those"):
        join_model(study, RETRAINED, claims)
    assert json.loads(claims.settle(MODEL_ATTR, "{}")) == WEIGHTS


def _settle(args: tuple[str, str, int]) -> str:
    url, study, n = args
    return open_claims(url, study).settle("model", f"worker {n}")


@pytest.mark.parametrize("storage", ["sqlite", "journal"])
def test_of_workers_settling_at_once_exactly_one_value_stands(tmp_path: Path, storage: str) -> None:
    """Optuna's study attributes keep the last write: two first workers each stored their own
    weights, each read its own back, and both trained (found by the two-worker test on
    PostgreSQL). Settling is an insert on a primary key (a locked file for journal storage):
    every worker gets the one value that stands."""
    import multiprocessing as mp

    url = (
        f"sqlite:///{tmp_path / 'study.db'}"
        if storage == "sqlite"
        else f"journal:///{tmp_path / 'study.log'}"
    )
    with mp.get_context("spawn").Pool(4) as pool:
        answers = pool.map(_settle, [(url, "race", n) for n in range(8)])
    assert len(set(answers)) == 1 and answers[0].startswith("worker "), answers
    assert open_claims(url, "race").settle("model", "late") == answers[0]
    assert open_claims(url, "other study").settle("model", "late") == "late"


def test_a_hub_model_whose_main_moved_is_refused_with_the_studys_commit(tmp_path: Path) -> None:
    study = optuna.create_study(study_name="hub")
    claims = _claims(tmp_path, "hub")
    old, new = "1" * 40, "2" * 40
    join_model(study, {"model": "owner/name", "commit": old}, claims)
    with pytest.raises(SweepError, match=f"commit {'2' * 12} \\(the study's: {'1' * 12}\\)") as e:
        join_model(study, {"model": "owner/name", "commit": new}, claims)
    assert f"the study's commit: {old}" in str(e.value)


def test_a_sweep_with_other_weights_trains_nothing_and_leaves_no_worker(tmp_path: Path) -> None:
    """run_sweep refuses before its worker joins: the study's runs, claims and worker slots
    are as they were, and its results table too."""
    cfg = make_cfg(tmp_path, n_trials=2)
    run_sweep(cfg, tmp_path, FakeBackend(), model=WEIGHTS)
    results = (tmp_path / cfg.sweep.dir / "results.csv").read_bytes()
    summary = json.loads((tmp_path / cfg.sweep.dir / "summary.json").read_text())
    assert summary["model"] == WEIGHTS and summary["environment"] == software_versions()
    studies = open_studies(cfg, tmp_path)
    before = (len(studies.runs.trials), _workers(cfg, studies))
    more = cfg.model_copy(update={"sweep": cfg.sweep.model_copy(update={"n_trials": 3})})
    backend = FakeBackend()
    with pytest.raises(SweepError, match="these weights are not those"):
        run_sweep(more, tmp_path, backend, model=RETRAINED)
    assert backend.trained == []
    studies = open_studies(more, tmp_path)
    assert (len(studies.runs.trials), _workers(more, studies)) == before
    assert (tmp_path / cfg.sweep.dir / "results.csv").read_bytes() == results
    run_sweep(more, tmp_path, backend, model=WEIGHTS)  # the study's weights go on
    assert len(backend.trained) == 1
