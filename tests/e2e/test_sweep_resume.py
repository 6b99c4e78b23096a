"""Issue 6: an interrupted ``harness sweep`` (SIGTERM, SIGKILL) resumes without repeating work;
another search space opens another study (and says why), and switching back resumes the old."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path
from typing import Any

import optuna
import pandas as pd
import pytest
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.trial import FrozenTrial, TrialState

from harness.config import load_config
from harness.sweep import open_studies
from harness.sweep.study import safe_storage_url, storage_url, study_id

from ._helpers import cli_env, clone_project, run_cli, start_cli, stop_process, tail, wait_for

STEPS = 2  # checkpoints at steps 2 and 4
SETTINGS = 2  # guidance 3.0 / 7.5 at LoRA scale 1.0


def _overrides(name: str, n_trials: int, **sweep: Any) -> dict[str, Any]:
    return {
        "sweep": {
            "study_name": name,
            "n_trials": n_trials,
            "inference": {"guidance_scale": [3.0, 7.5], "lora_scale": [1.0]},
            **sweep,
        },
    }


def _study_name(project: Path) -> str:
    """The study id of the project's config (``<sweep.study_name>-<fingerprint>``)."""
    return study_id(load_config(project / "params.yaml"), project)


def _runs_study(project: Path, name: str) -> optuna.Study | None:
    db = project / "runs/sweep/study.db"
    if not db.is_file():
        return None
    assert _study_name(project).startswith(f"{name}-")
    try:
        return optuna.load_study(
            study_name=f"{_study_name(project)}.runs", storage=f"sqlite:///{db}"
        )
    except Exception:  # not created yet, or locked by the worker for a moment
        return None


def _trials(study: optuna.Study) -> list[FrozenTrial]:
    for _ in range(20):
        try:
            return study.get_trials(deepcopy=False)
        except Exception:  # sqlite busy while the worker commits
            time.sleep(0.1)
    return study.get_trials(deepcopy=False)


def _mid_run(study: optuna.Study, completed: int) -> FrozenTrial | None:
    """The running trial once ``completed`` runs are done and it has passed its first checkpoint
    (so the signal lands inside training, not between runs)."""
    trials = _trials(study)
    if sum(t.state == TrialState.COMPLETE for t in trials) < completed:
        return None
    running = [t for t in trials if t.state == TrialState.RUNNING]
    return next((t for t in running if "proxy.step-2" in t.user_attrs), None)


def _start_and_interrupt(
    template: Path, tmp_path: Path, name: str, n_trials: int, sig: signal.Signals, **sweep: Any
) -> tuple[Path, FrozenTrial, int]:
    """Start ``harness sweep``; send ``sig`` while run ``n_trials - 1`` trains."""
    project = clone_project(template, tmp_path / "project", _overrides(name, n_trials, **sweep))
    env = cli_env(tmp_path / "home")
    log = tmp_path / "sweep.log"
    proc = start_cli(project, ["sweep"], env, log)
    try:
        study = wait_for("the study", lambda: _runs_study(project, name), 90, proc, log)
        victim = wait_for(
            f"run {n_trials - 2} in training", lambda: _mid_run(study, n_trials - 2), 120, proc, log
        )
        proc.send_signal(sig)
        code = proc.wait(timeout=60)
    finally:
        stop_process(proc)
    return project, victim, code


def _assert_resumed_sweep(
    project: Path, name: str, n_trials: int, victim: FrozenTrial, log: Path
) -> list[FrozenTrial]:
    study = _runs_study(project, name)
    assert study is not None
    trials = _trials(study)
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    assert len(complete) == n_trials, [(t.number, t.state.name) for t in trials]
    combos = [(t.params["train.learning_rate"], t.params["train.dropout"]) for t in complete]
    assert len(set(combos)) == n_trials, f"a training configuration ran twice: {combos}"
    victim_combo = (victim.params["train.learning_rate"], victim.params["train.dropout"])
    assert victim_combo in combos, "the interrupted run's parameters were not retried"
    retry = next(t for t in complete if t.params == victim.params)
    assert retry.number > victim.number
    assert retry.user_attrs["run_key"] == victim.user_attrs["run_key"]
    # Same run folder; the trainer resumed from a checkpoint of the interrupted run (step 2, or
    # step 4 when the signal landed during its evaluation) instead of starting over.
    result = json.loads((Path(retry.user_attrs["run_dir"]) / "result.json").read_text())
    assert result["status"] == "completed" and result["resumed_from"] in (2, 4), result
    assert all(t.state != TrialState.RUNNING for t in trials)

    points = optuna.load_study(study_name=_study_name(project), storage=study._storage)  # type: ignore[attr-defined]
    n_points = len(points.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
    assert n_points == n_trials * STEPS * SETTINGS
    frame = pd.read_parquet(project / "runs/sweep/results.parquet")
    assert len(frame) == n_points
    assert not frame.duplicated(["run_key", "checkpoint_step", "setting_id"]).any()
    assert (frame.groupby("run_key").size() == STEPS * SETTINGS).all()
    text = log.read_text()
    assert f"{n_trials} training runs ({n_trials} completed, 0 pruned, 0 failed) -> " in text
    assert "; 1 interrupted attempt retried" in text
    return trials


def test_sigterm_then_rerun_finishes_exactly_the_budget(
    prepared_template: Path, tmp_path: Path
) -> None:
    name, n_trials = "e2e-term", 3
    project, victim, code = _start_and_interrupt(
        prepared_template, tmp_path, name, n_trials, signal.SIGTERM
    )
    log = tmp_path / "sweep.log"
    assert code == 130, tail(log)
    text = log.read_text()
    assert "interrupted" in text
    # One line, not Optuna's traceback of the KeyboardInterrupt and its "Trial N failed".
    assert "Traceback" not in text and f"Trial {victim.number} failed" not in text, tail(log)
    study = _runs_study(project, name)
    assert study is not None
    stopped = next(t for t in _trials(study) if t.number == victim.number)
    assert stopped.state == TrialState.FAIL and stopped.user_attrs.get("interrupted") is True
    queued = [t for t in _trials(study) if t.state == TrialState.WAITING]
    assert [t.user_attrs.get("retry_of") for t in queued] == [victim.number]

    done = run_cli(project, ["sweep"], cli_env(tmp_path / "home"), log, timeout=150)
    assert done.returncode == 0, tail(log)
    trials = _assert_resumed_sweep(project, name, n_trials, victim, log)
    retry = next(t for t in trials if t.state == TrialState.COMPLETE and t.params == victim.params)
    assert retry.user_attrs.get("retry_of") == victim.number


def test_dead_run_is_finished_by_a_rerun_whose_budget_is_used_up(
    prepared_template: Path, tmp_path: Path
) -> None:
    """A worker killed hard mid-run (SIGKILL: no handler runs, the trial stays RUNNING), then,
    once its heartbeat is stale, a `harness sweep` that may start no new run (its budget is
    spent): it still retries the dead run from its checkpoint, and no run or proxy trial is left
    RUNNING."""
    name = "e2e-kill-budget"
    project, victim, code = _start_and_interrupt(
        prepared_template,
        tmp_path,
        name,
        3,  # killed while run 1 trains, after run 0 completed
        signal.SIGKILL,
        heartbeat_interval_s=1,
        grace_period_s=2,
    )
    assert code == -signal.SIGKILL
    assert victim.number == 1
    study = _runs_study(project, name)
    assert study is not None
    assert next(t for t in _trials(study) if t.number == victim.number).state == (
        TrialState.RUNNING
    )
    time.sleep(2.5)  # > grace_period_s: the killed run's heartbeat is stale
    log = tmp_path / "sweep.log"
    # Run 0 already meets n_trials=1: no new run may start. Gradient checkpointing on, as
    # after an out-of-memory kill, and another model cache folder, as on another node: still
    # the same study, run key and checkpoints.
    node = f"model.cache_dir={tmp_path / 'node-cache'}"
    args = ["-S", "sweep.n_trials=1", "-S", "train.gradient_checkpointing=true", "-S", node]
    args.append("sweep")
    done = run_cli(project, args, cli_env(tmp_path / "home"), log, timeout=150)
    assert done.returncode == 0, tail(log)
    trials = _assert_resumed_sweep(project, name, 2, victim, log)
    killed = next(t for t in trials if t.number == victim.number)
    assert killed.state == TrialState.FAIL and "fail_reason" not in killed.user_attrs
    retry = next(t for t in trials if t.state == TrialState.COMPLETE and t.params == victim.params)
    assert RetryHeartbeatStaleTrialCallback.retried_trial_number(retry) == victim.number
    proxy = optuna.load_study(
        study_name=f"{_study_name(project)}.proxy",
        storage=f"sqlite:///{project / 'runs/sweep/study.db'}",
    )
    states = [t.state for t in _trials(proxy)]
    assert TrialState.RUNNING not in states, states
    assert states.count(TrialState.COMPLETE) == 2


def test_another_space_via_cli_opens_a_new_study_and_switching_back_resumes(
    prepared_template: Path, tmp_path: Path
) -> None:
    name = "e2e-mismatch"
    project = clone_project(prepared_template, tmp_path / "project", _overrides(name, 1))
    env, log = cli_env(tmp_path / "home"), tmp_path / "mismatch.log"
    first = run_cli(project, ["sweep"], env, log, timeout=150)
    assert first.returncode == 0, tail(log)
    old = _study_name(project)
    space = "sweep.space.learning_rate={low: 1.0e-5, high: 1.0e-4, log: true}"
    changed = run_cli(project, ["-S", space, "sweep"], env, log, timeout=150)
    text = log.read_text()
    assert changed.returncode == 0, tail(log)
    assert f"differs from study {old}" in text
    assert "space.train.learning_rate" in text.split("differs from study")[1]  # what changed
    assert "1 training run (1 completed" in text  # trained afresh, not the old run reported
    back = run_cli(project, ["sweep"], env, log, timeout=150)
    assert back.returncode == 0, tail(log)
    assert f"study {old}: optuna-dashboard" in log.read_text()  # the old study, resumed
    # Finished (budget spent, nothing queued or running): summarised without loading a model.
    back_log = log.read_text().rsplit("$ harness", 1)[1]
    assert "1 training run (1 completed" in back_log and " loaded tiny://" not in back_log
    assert " loaded tiny://sd15" in log.read_text()  # what the first two runs logged
    runs = _runs_study(project, name)
    assert runs is not None and len(_trials(runs)) == 1  # nothing trained twice


def test_storage_in_messages_keeps_the_project_path_under_pwd(
    prepared_template: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A shell started in the project sets PWD to it; messages must still say where the
    study is. (Bug: PWD is taken for a password and every path under it is masked.)"""
    project = clone_project(prepared_template, tmp_path / "project", _overrides("e2e-pwd", 1))
    monkeypatch.chdir(project)
    monkeypatch.setenv("PWD", str(project))
    cfg = load_config(project / "params.yaml")
    open_studies(cfg, project)
    shown = safe_storage_url(storage_url(cfg, project))
    assert f"{project.resolve()}/runs/sweep/study.db" in shown
