"""Signals that arrive while a run is being recorded (the tables rewritten, the tracker's
artifact uploaded) wait for the record: a SIGTERM after a run finished stops the sweep with
that run complete, and a second Ctrl-C (``sweep launch --local`` passes the terminal's on to
workers that got it already) does not lose the interrupted run's retry."""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import pytest
from optuna.trial import TrialState

from harness.sweep import SweepSink, open_studies, run_sweep
from harness.sweep.runner import finished_runs

from .fakes import FakeBackend
from .test_sweep_logic import make_cfg


class _SignalWhileRecording(SweepSink):
    """Sends ``signum`` to this process while run 0's end is recorded."""

    def __init__(self, signum: int) -> None:
        self.signum = signum

    def run_finished(self, run: Any, end: Any) -> None:
        if run.number == 0:
            os.kill(os.getpid(), self.signum)


def test_a_sigterm_while_a_finished_run_is_recorded_keeps_it_complete(tmp_path: Path) -> None:
    cfg = make_cfg(tmp_path, n_trials=2)
    backend = FakeBackend()
    with pytest.raises(KeyboardInterrupt):
        run_sweep(cfg, tmp_path, backend, sinks=[_SignalWhileRecording(signal.SIGTERM)])
    assert len(backend.trained) == 1, "the sweep stops after the run it was recording"
    runs = open_studies(cfg, tmp_path).runs
    assert runs.trials[0].state == TrialState.COMPLETE
    assert finished_runs(runs) == 1
    again = FakeBackend()
    summary = run_sweep(cfg, tmp_path, again)
    assert len(again.trained) == 1 and summary.runs_completed == 2


class _InterruptedFirstRun(FakeBackend):
    def train(self, cfg: Any, run_dir: Path, *args: Any, **kwargs: Any) -> Any:
        if not self.trained:
            self.trained.append(cfg.train.model_dump())
            raise KeyboardInterrupt  # Ctrl-C while run 0 trains
        return super().train(cfg, run_dir, *args, **kwargs)


def test_a_second_ctrl_c_while_the_interrupted_run_is_recorded_keeps_its_retry(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The second SIGINT lands in the study's record of the interrupted run, before its retry
    is queued (the worst moment)."""
    from harness.sweep.recorder import StudySink

    record = StudySink.run_finished

    def second_ctrl_c(self: StudySink, run: Any, end: Any) -> None:
        os.kill(os.getpid(), signal.SIGINT)
        record(self, run, end)

    monkeypatch.setattr(StudySink, "run_finished", second_ctrl_c)
    cfg = make_cfg(tmp_path, n_trials=2)
    with pytest.raises(KeyboardInterrupt):
        run_sweep(cfg, tmp_path, _InterruptedFirstRun())
    monkeypatch.undo()
    runs = open_studies(cfg, tmp_path).runs
    waiting = runs.get_trials(deepcopy=False, states=(TrialState.WAITING,))
    assert len(waiting) == 1, "the interrupted run is queued again"
    assert waiting[0].system_attrs["fixed_params"] == runs.trials[0].params
    again = FakeBackend()
    summary = run_sweep(cfg, tmp_path, again)
    assert summary.runs_completed == 2
    assert again.trained[0]["learning_rate"] == pytest.approx(
        runs.trials[0].params["train.learning_rate"]
    )
