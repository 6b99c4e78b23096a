"""Shared by the sweep tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest


@pytest.fixture(autouse=True)
def _fresh_storage_retries() -> Iterator[None]:
    """A test whose storage retries gave up (harness.sweep.retry keeps when, so that the calls
    after a give-up fail at once) leaves no such state to the next test in its process."""
    from harness.sweep import retry

    retry._gave_up_at = None
    yield
    retry._gave_up_at = None
