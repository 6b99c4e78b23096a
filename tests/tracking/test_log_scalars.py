"""``Run.log_scalars`` takes a whole trainer log record and keeps only its numbers."""

from __future__ import annotations

from typing import Any

from harness.tracking import NullRun


def test_log_scalars_keeps_numbers_only(monkeypatch: Any) -> None:
    run = NullRun("test")
    seen: list[tuple[str, str, float, int]] = []
    monkeypatch.setattr(run, "log_scalar", lambda t, s, v, step: seen.append((t, s, v, step)))
    record = {
        "loss": 0.5,
        "step": 3,
        "lr/unet": 1e-4,
        "status": "ok",
        "cuda_util": None,
        "nan_seen": False,
    }
    run.log_scalars(record, 3, title="train")
    assert seen == [("train", "loss", 0.5, 3), ("train", "step", 3, 3), ("lr", "unet", 1e-4, 3)]
