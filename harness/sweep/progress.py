"""A sweep-level progress bar (runs, points, ETA), a sink like any other record consumer."""

from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import IO, Any

from tqdm.auto import tqdm

from harness.config import HarnessConfig
from harness.sweep._base import RunEnd, RunSpec, ScoredPoint, SweepSink
from harness.sweep.space import run_budget

__all__ = ["SweepProgress"]


class SweepProgress(SweepSink):
    """One bar over the sweep's budget of training runs (``sweep.n_trials``, or the space's
    size when smaller), above the trainer's per-run bars.

    The budget counts every worker's runs, so the bar starts at the runs already finished and
    its postfix counts this worker's evaluated points and the last run's status.
    """

    def __init__(self, cfg: HarnessConfig, done: int = 0, file: IO[str] | None = None) -> None:
        self._options: dict[str, Any] = {
            "total": run_budget(cfg),
            "initial": done,
            "desc": f"sweep {cfg.sweep.study_name}",
            "unit": "run",
            "position": 0,
            "dynamic_ncols": True,
            "file": file or sys.stderr,
        }
        self._made: Any = None
        self._points = 0

    @property
    def _bar(self) -> Any:
        """The bar, drawn at the first event: a worker refused as it joins (other model
        weights) prints its one line without a bar above it."""
        if self._made is None:
            self._made = tqdm(**self._options)
        return self._made

    def run_started(self, run: RunSpec) -> None:
        self._bar.set_postfix_str(f"run {run.number} training, {self._points} points")

    def proxy_scored(
        self, run: RunSpec, step: int, scores: Mapping[str, float], value: float
    ) -> None:
        self._bar.set_postfix_str(f"run {run.number} step {step}, {self._points} points")

    def point_scored(self, point: ScoredPoint) -> None:
        self._points += 1
        self._bar.set_postfix_str(f"run {point.run.number} evaluating, {self._points} points")

    def run_finished(self, run: RunSpec, end: RunEnd) -> None:
        if end.status != "interrupted":  # an interrupted run is retried, not finished
            self._bar.update(1)
        self._bar.set_postfix_str(f"run {run.number} {end.status}, {self._points} points")

    def sweep_finished(self, summary: Any) -> None:
        self._bar.close()

    def sweep_stopped(self, error: BaseException) -> None:
        if self._made is not None:
            self._made.close()  # ends its line: the error message starts on its own
