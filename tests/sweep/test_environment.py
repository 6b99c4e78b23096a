"""The packages a study was started with: stored by its first worker, compared by the others,
recorded on every run (harness.sweep.environment)."""

from __future__ import annotations

import importlib.metadata
import logging

import optuna
import pytest

from harness.sweep.environment import (
    ENVIRONMENT_ATTR,
    PACKAGES,
    differences,
    join_environment,
    software_versions,
)


def test_versions_are_the_installed_distributions() -> None:
    found = software_versions()
    assert list(found) == list(PACKAGES)
    assert found["diffusers"] == importlib.metadata.version("diffusers")
    assert found["torch"] == importlib.metadata.version("torch")
    assert software_versions(("no-such-package-here",)) == {"no-such-package-here": "absent"}


def test_the_first_worker_stores_its_versions_and_later_ones_compare(
    caplog: pytest.LogCaptureFixture,
) -> None:
    study = optuna.create_study(study_name="env")
    caplog.clear()
    mine = {"torch": "2.14.1", "diffusers": "0.42.1", "peft": "0.21.2"}
    assert join_environment(study, mine) == []
    assert study.user_attrs[ENVIRONMENT_ATTR] == mine
    with caplog.at_level(logging.WARNING, logger="harness.sweep.environment"):
        assert join_environment(study, mine) == []
        assert not [r for r in caplog.records if r.name == "harness.sweep.environment"]
        other = {**mine, "diffusers": "0.43.0"}
        assert join_environment(study, other) == ["diffusers 0.43.0 (the study's: 0.42.1)"]
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
