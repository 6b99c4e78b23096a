"""A user error inside a run stops ``harness sweep`` at once, as one line, without spending the
budget; after the fix, a rerun retries that run first and finishes the study. An optimizer the
machine cannot run is refused before the first run."""

from __future__ import annotations

import subprocess
from pathlib import Path

import optuna
from optuna.trial import TrialState

from harness.config import load_config
from harness.sweep.study import study_id

from ._helpers import cli_env, clone_project, harness_cmd


def _sweep(project: Path, home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        harness_cmd(project, *args, "sweep"),
        cwd=project,
        env=cli_env(home),
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )


def _status(project: Path, home: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        harness_cmd(project, "sweep", "status"),
        cwd=project,
        env=cli_env(home),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def _without_bars(proc: subprocess.CompletedProcess[str]) -> str:
    """Both workers' output without progress bars, for a failure message: the last 3000
    characters of it were all bars of the worker that succeeded (a worker that exited 1 once,
    in a full `make test`, left no trace of why)."""
    bars = ("it/s", "img/s", "run/s", "s/it", "s/img", "s/run", "?it", "?img", "?run")
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip("[w01] ")]
    return "\n".join(line for line in lines if not any(bar in line for bar in bars))[-6000:]


def _runs(project: Path, study: str) -> list[optuna.trial.FrozenTrial]:
    storage = f"sqlite:///{project / 'runs/sweep/study.db'}"
    return optuna.load_study(study_name=f"{study}.runs", storage=storage).get_trials()


def test_a_user_error_inside_a_run_stops_the_sweep_and_the_rerun_retries_it(
    prepared_template: Path, tmp_path: Path
) -> None:
    project = clone_project(
        prepared_template, tmp_path / "p", {"sweep": {"study_name": "e2e-stop", "n_trials": 2}}
    )
    study = study_id(load_config(project / "params.yaml"), project)
    # A file where the study's run folders go: every run would fail the same way (like a full
    # disk or a read-only mount), whatever its settings.
    blocker = project / "runs/sweep/runs" / study
    blocker.parent.mkdir(parents=True)
    blocker.write_text("not a folder\n")

    before = _status(project, tmp_path / "home")
    assert before.returncode == 0, before.stderr[-3000:]
    assert f"study {study} in " in before.stdout and "not started" in before.stdout
    assert not (project / "runs/sweep/study.db").exists()  # status only reads

    stopped = _sweep(project, tmp_path / "home")
    assert stopped.returncode == 2, stopped.stderr[-3000:]
    assert "Traceback" not in stopped.stderr, stopped.stderr[-3000:]
    errors = [line for line in stopped.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 2, stopped.stderr[-3000:]
    assert errors[0].startswith("error: run 0 (") and str(blocker) in errors[0], errors
    assert "run 0 runs first" in errors[1], errors
    trials = _runs(project, study)
    # One run tried, none counted: it is queued again, not recorded as failed.
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.WAITING]
    assert "fail_reason" not in trials[0].user_attrs
    assert trials[1].user_attrs["retry_of"] == 0
    assert trials[1].system_attrs["fixed_params"] == trials[0].params  # the same run, queued

    status = _status(project, tmp_path / "home")
    assert status.returncode == 0, status.stderr[-3000:]
    assert "runs: 1 fail, 1 waiting" in status.stdout, status.stdout
    queued = [line for line in status.stdout.splitlines() if line.startswith("queued: ")]
    assert len(queued) == 1 and queued[0].startswith("queued: run 1, the retry of run 0 ("), queued
    assert "NotADirectoryError" in queued[0] and str(blocker) in queued[0], queued

    blocker.unlink()
    done = _sweep(project, tmp_path / "home")
    assert done.returncode == 0, done.stderr[-3000:]
    # 2 runs, one of them in two attempts (the stopped one and its retry): not 3 runs.
    assert "2 training runs (2 completed, 0 pruned, 0 failed) -> " in done.stdout
    assert "; 1 interrupted attempt retried" in done.stdout
    completed = [t for t in _runs(project, study) if t.state == TrialState.COMPLETE]
    assert len(completed) == 2
    assert completed[0].params == trials[0].params  # the stopped run ran first


def test_an_optimizer_the_machine_cannot_run_is_refused_before_training(
    prepared_template: Path, tmp_path: Path
) -> None:
    project = clone_project(prepared_template, tmp_path / "p", {"sweep": {"study_name": "e2e-8b"}})
    space = "sweep.space.optimizer={choices: [adamw, adamw8bit]}"
    proc = _sweep(project, tmp_path / "home", "-S", space)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr[-3000:]
    assert "sweep.space.optimizer" in errors[0] and "adamw8bit" in errors[0], errors
    assert not (project / "runs/sweep/runs").exists()


def test_two_local_workers_stopped_by_one_user_error_lose_no_run(
    prepared_template: Path, tmp_path: Path
) -> None:
    """Both workers meet the error at about the same time; each stopped run is queued once, a
    retry popped by the other worker is not taken for a duplicate, and after the fix the study
    ends with its budget of distinct configurations."""
    project = clone_project(
        prepared_template, tmp_path / "p", {"sweep": {"study_name": "e2e-stop2", "n_trials": 2}}
    )
    study = study_id(load_config(project / "params.yaml"), project)
    blocker = project / "runs/sweep/runs" / study
    blocker.parent.mkdir(parents=True)
    blocker.write_text("not a folder\n")

    def launch() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            harness_cmd(project, "sweep", "launch", "--local", "2"),
            cwd=project,
            env=cli_env(tmp_path / "home"),
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )

    stopped = launch()
    assert stopped.returncode == 2, _without_bars(stopped)
    trials = _runs(project, study)
    assert all(t.state in (TrialState.FAIL, TrialState.WAITING) for t in trials)
    assert not any("fail_reason" in t.user_attrs for t in trials)  # nothing counted as failed
    assert any(t.state == TrialState.WAITING for t in trials)

    blocker.unlink()
    done = launch()
    assert done.returncode == 0, _without_bars(done)
    completed = [t for t in _runs(project, study) if t.state == TrialState.COMPLETE]
    keys = [t.user_attrs["run_key"] for t in completed]
    assert len(keys) == 2 and len(set(keys)) == 2, keys
    stopped_params = [t.params for t in trials if t.state == TrialState.FAIL]
    assert all(p in [t.params for t in completed] for p in stopped_params)  # each was retried
