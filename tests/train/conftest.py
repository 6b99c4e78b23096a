"""Fixtures of the trainer tests: one torch thread, a module's own tiny SD 1.x pipeline."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from harness.config import ModelConfig
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
