"""Fixtures of the trainer tests: one torch thread, a module's own tiny SD 1.x pipeline."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch

from harness.config import HarnessConfig, ModelConfig
from harness.models import LoadedModel, load_pipeline


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    """Tiny models run faster on one thread, and two spinning OpenMP threads on a busy
    2-core machine can make a run 10x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def sd15() -> LoadedModel:
    """This module's own tiny SD 1.x pipeline to train on (the trainer leaves it unchanged;
    a module may define its own)."""
    return load_pipeline(ModelConfig(pretrained="tiny://sd15", device="cpu"))


def tiny_train_config(family: str = "sd15", **train: Any) -> HarnessConfig:
    """A config for the tiny ``family`` model at 64 px with ``train`` overrides (2 steps and
    no checkpoints unless overridden)."""
    return HarnessConfig.model_validate(
        {
            "preset": "t",
            "model": {"pretrained": f"tiny://{family}", "device": "cpu"},
            "data": {"class_name": "dog", "resolution": 64},
            "train": {"max_steps": 2, "checkpoint_steps": [], **train},
        }
    )


def pinned_default_config() -> HarnessConfig:
    """The repository's params.yaml, after checking the identities every existing study, run
    and checkpoint of the default preset resumes under: the study name before the preset's
    LPIPS DIV (metrics.lpips_weights: tiny, a new score of every point, so a new study), the
    run key and the checkpoint hash. Keys added later at their defaults change none of them."""
    from pathlib import Path

    from harness.config import load_config
    from harness.sweep.runner import run_key
    from harness.sweep.study import study_id
    from harness.train.fingerprints import config_hash

    root = Path(__file__).resolve().parents[2]
    cfg = load_config(root / "params.yaml", root=root)
    before_lpips = cfg.model_copy(
        update={"metrics": cfg.metrics.model_copy(update={"lpips_weights": None})}
    )
    assert study_id(before_lpips) == "tiny-cpu-e17db0af"
    assert study_id(cfg) != study_id(before_lpips)
    assert (run_key(cfg), config_hash(cfg)) == ("3f3041d2dbf5", "8ca73f5e4debf276")
    return cfg
