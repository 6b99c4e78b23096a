"""Optuna sweeps over training settings, checkpoint steps and inference scales.

A point's way: :mod:`harness.config` (settings) -> :mod:`harness.sweep.runner` (the loop, which
emits events) -> :mod:`harness.sweep.backend` (trains and evaluates, returns records) ->
:mod:`harness.sweep.recorder` (fans the events out to the studies, the tracker and the results
table). The records are in :mod:`harness.sweep._base`; storage and resume rules in
:mod:`harness.sweep.study`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

# Loaded on first use (PEP 562): `harness.sweep.space` or `.status` alone stays light.
_EXPORTS = {
    "PointScores": "_base",
    "RunEnd": "_base",
    "RunSpec": "_base",
    "ScoredPoint": "_base",
    "SweepBackend": "_base",
    "SweepSink": "_base",
    "Recorder": "recorder",
    "run_key": "runner",
    "run_sweep": "runner",
    "SweepError": "study",
    "open_studies": "study",
    "SweepSummary": "summary",
}

if TYPE_CHECKING:
    from harness.sweep._base import (
        PointScores,
        RunEnd,
        RunSpec,
        ScoredPoint,
        SweepBackend,
        SweepSink,
    )
    from harness.sweep.recorder import Recorder
    from harness.sweep.runner import run_key, run_sweep
    from harness.sweep.study import SweepError, open_studies
    from harness.sweep.summary import SweepSummary


def __getattr__(name: str) -> Any:
    from harness._lazy import load_export

    return load_export(__name__, _EXPORTS, name)


__all__ = [
    "PointScores",
    "Recorder",
    "RunEnd",
    "RunSpec",
    "ScoredPoint",
    "SweepBackend",
    "SweepError",
    "SweepSink",
    "SweepSummary",
    "open_studies",
    "run_key",
    "run_sweep",
]
