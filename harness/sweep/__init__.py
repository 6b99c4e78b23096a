"""Optuna sweeps over training settings, checkpoint steps and inference scales.

See :mod:`harness.sweep.runner` for how one training run yields many evaluated points, and
:mod:`harness.sweep.study` for the studies, storage, and resume rules.
"""

from harness.sweep.runner import (
    Checkpoint,
    PointEval,
    SweepBackend,
    SweepSummary,
    TrainOutcome,
    run_key,
    run_sweep,
)
from harness.sweep.study import SweepError, open_studies

__all__ = [
    "Checkpoint",
    "PointEval",
    "SweepBackend",
    "SweepError",
    "SweepSummary",
    "TrainOutcome",
    "open_studies",
    "run_key",
    "run_sweep",
]
