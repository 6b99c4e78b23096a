"""Many workers on one study, as on a cluster: real worker processes on a real PostgreSQL, a
journal file, and a real one-node SLURM; every configuration trained exactly once."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import threading
import time
from pathlib import Path
from typing import Any

import optuna
import pandas as pd
import pytest
from optuna.trial import FrozenTrial, TrialState
from sqlalchemy.pool import NullPool

from harness.config import load_config
from harness.sweep.study import study_id

from ._helpers import (
    cli_env,
    clone_project,
    retrained_tiny_cache,
    run_cli,
    start_cli,
    stop_process,
    wait_for,
)
from .conftest import Postgres
from .slurm import Slurm

# Run alone after the other tests (`make test`): heartbeats and grace periods are timed.
pytestmark = [pytest.mark.slow, pytest.mark.cluster]

GRID = {"learning_rate": {"choices": [1.0e-4, 3.0e-4]}, "dropout": {"choices": [0.0, 0.1]}}


def _overrides(name: str, storage: str, n_trials: int, **sweep: Any) -> dict[str, Any]:
    return {
        "sweep": {
            "study_name": name,
            "storage": storage,
            "n_trials": n_trials,
            "heartbeat_interval_s": 1,
            "grace_period_s": 3,
            **sweep,
        }
    }


def _runs(project: Path, storage: str) -> list[FrozenTrial]:
    name = study_id(load_config(project / "params.yaml"), project)
    study = optuna.load_study(study_name=f"{name}.runs", storage=_optuna_storage(storage))
    return study.get_trials(deepcopy=False)


def _optuna_storage(url: str) -> Any:
    if url.startswith("journal:"):
        from optuna.storages import JournalStorage
        from optuna.storages.journal import JournalFileBackend

        return JournalStorage(JournalFileBackend(url.removeprefix("journal://")))
    # No pool: the test polls often, and each call's pooled connections would stay open.
    return optuna.storages.RDBStorage(url, engine_kwargs={"poolclass": NullPool})


def _trained(trials: list[FrozenTrial]) -> list[FrozenTrial]:
    return [t for t in trials if t.state == TrialState.COMPLETE]


def _assert_each_configuration_once(project: Path, storage: str, n_runs: int) -> list[FrozenTrial]:
    trials = _runs(project, storage)
    states = [(t.number, t.state.name, sorted(t.user_attrs)) for t in trials]
    done = _trained(trials)
    assert len(done) == n_runs, states
    keys = [t.user_attrs["run_key"] for t in done]
    assert len(set(keys)) == n_runs, f"a configuration trained twice: {keys}"
    assert all(t.state != TrialState.RUNNING for t in trials), states
    # Every worker rewrites the tables: the last rewrite holds every worker's points, and the
    # CSV and Parquet files are one pair (renamed together).
    frame = pd.read_parquet(project / "runs/sweep/results.parquet")
    assert set(frame["run_key"]) == set(keys)
    assert not frame.duplicated(["run_key", "checkpoint_step", "setting_id"]).any()
    csv = pd.read_csv(project / "runs/sweep/results.csv")
    point = ["run_key", "checkpoint_step", "setting_id"]
    assert sorted(map(tuple, csv[point].values)) == sorted(map(tuple, frame[point].values))
    summary = json.loads((project / "runs/sweep/summary.json").read_text())
    assert summary["points"] == len(frame), summary
    # No two trials share a run folder unless one is the other's retry.
    dirs = [t.user_attrs["run_dir"] for t in done]
    assert len(set(dirs)) == len(dirs)
    return trials


def _start_workers(project: Path, env: dict[str, str], n: int, log_dir: Path) -> list[Any]:
    return [
        start_cli(
            project,
            ["sweep", "worker"],
            # The cores shared out, as `harness sweep launch --local` does.
            {**env, "HARNESS_WORKER_ID": f"w{i}", "OMP_NUM_THREADS": "1"},
            log_dir / f"worker-{i}.log",
        )
        for i in range(n)
    ]


def test_three_local_workers_cover_a_grid_once_and_finish_a_killed_workers_run(
    prepared_template: Path, tmp_path: Path, postgres_server: Postgres
) -> None:
    """`harness sweep launch --local 3` on PostgreSQL, a 2x2 grid (n_trials 6: the grid is the
    budget); one worker is SIGKILLed mid-run: another retries the run and resumes it from its
    checkpoint, every cell trains exactly once, nothing is left RUNNING."""
    storage = postgres_server.url("unused-pw")
    project = clone_project(
        prepared_template,
        tmp_path / "project",
        _overrides("grid", storage, 6, sampler="grid", space=GRID),
    )
    env = cli_env(tmp_path / "home")
    log = tmp_path / "launch.log"
    launcher = start_cli(project, ["sweep", "launch", "--local", "3"], env, log)
    with _ConnectionSampler(postgres_server) as connections:
        try:
            victim = wait_for(
                "a run past its first checkpoint",
                lambda: _mid_run(project, storage),
                300,
                launcher,
                log,
            )
            pid = _worker_pid(postgres_server, project, victim)
            os.kill(pid, signal.SIGKILL)
            code = launcher.wait(timeout=600)
        finally:
            stop_process(launcher)
    _assert_workers_hold_no_idle_connections(connections.samples)
    text = log.read_text()
    assert code == 2, text[-3000:]  # the launcher reports the killed worker's exit
    assert "-9" in text.splitlines()[-1], text[-500:]
    trials = _assert_each_configuration_once(project, storage, 4)
    cells = {(t.params["train.learning_rate"], t.params["train.dropout"]) for t in _trained(trials)}
    assert len(cells) == 4
    killed = next(t for t in trials if t.number == victim.number)
    assert killed.state == TrialState.FAIL
    retry = next(t for t in _trained(trials) if t.params == victim.params)
    result = json.loads((Path(retry.user_attrs["run_dir"]) / "result.json").read_text())
    assert result["resumed_from"] in (2, 4), result
    assert all(f"[w{i}]" in text for i in range(3)), text[-2000:]
    assert "unused-pw" not in text
    status = run_cli(project, ["sweep", "status"], env, tmp_path / "status.log")
    report = (tmp_path / "status.log").read_text()
    assert status.returncode == 0, report
    assert "runs: 4 complete, 1 fail" in report and "0 of 4 runs left" in report, report
    assert "unused-pw" not in report
    # Each attempt counts for the worker it ran under: the killed worker's slot shows its
    # failed attempt (counted by claim holder, it moved to the retry's worker).
    slots = [line for line in report.splitlines() if line.startswith("  slot ")]
    assert len(slots) == 3, report
    assert sum("1 fail" in line for line in slots) == 1, report
    completes = [re.search(r"(\d+) complete", line) for line in slots]
    assert sum(int(m.group(1)) for m in completes if m) == 4, report
    # A caller whose own config has another budget is told the workers' one.
    run_cli(project, ["-S", "sweep.n_trials=1", "sweep", "status"], env, tmp_path / "status2.log")
    other = (tmp_path / "status2.log").read_text()
    assert "0 of 4 runs left (the workers' sweep.n_trials; this command's config says 1)" in other


class _ConnectionSampler:
    """Samples the server's connections every 0.2 s while in use: one ``{application_name:
    count}`` per sample, the sampler's own connection left out."""

    def __init__(self, server: Postgres) -> None:
        import sqlalchemy as sa

        self.engine = sa.create_engine(server.url("x"))
        self.samples: list[dict[str, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        import sqlalchemy as sa

        query = sa.text(
            "SELECT application_name, count(*) FROM pg_stat_activity "
            "WHERE datname = 'harness' AND pid <> pg_backend_pid() GROUP BY application_name"
        )
        with self.engine.connect() as conn:
            while not self._stop.wait(0.2):
                self.samples.append({str(name): int(n) for name, n in conn.execute(query)})
                conn.rollback()  # a fresh snapshot of pg_stat_activity each time

    def __enter__(self) -> _ConnectionSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self.engine.dispose()


def _assert_workers_hold_no_idle_connections(samples: list[dict[str, int]]) -> None:
    """Every worker names its connections (``harness <worker id>`` in pg_stat_activity) and
    closes them when idle: pools that kept theirs held ~6 per worker through training (18 for
    these three), and PostgreSQL's max_connections (100) capped a cluster at ~16 workers. (With
    this test's 1 s heartbeats a worker is never idle for long: ~0.8 on average.)"""
    named = [{k: n for k, n in s.items() if k.startswith("harness ")} for s in samples]
    workers = {name for sample in named for name in sample}
    assert len(workers) >= 3, (workers, samples[-5:])  # the three workers, maybe the launcher
    mean = sum(sum(sample.values()) for sample in named) / max(len(named), 1) / 3
    assert len(samples) > 20 and mean < 2.0, (mean, len(samples), max(named, key=len))


def _mid_run(project: Path, storage: str) -> FrozenTrial | None:
    try:
        trials = _runs(project, storage)
    except Exception:  # the study is not created yet
        return None
    running = (t for t in trials if t.state == TrialState.RUNNING)
    return next((t for t in running if "proxy.step-2" in t.user_attrs), None)


def _worker_pid(server: Postgres, project: Path, trial: FrozenTrial) -> int:
    """The pid of the worker process that holds ``trial`` (claims and slots tables)."""
    import sqlalchemy as sa

    name = study_id(load_config(project / "params.yaml"), project)
    engine = sa.create_engine(server.url("x"))
    query = sa.text(
        "SELECT w.pid FROM harness_run_claims c JOIN harness_sweep_workers w "
        "ON w.study = c.study AND w.worker = c.worker WHERE c.study = :s AND c.trial = :t"
    )
    with engine.connect() as conn:
        pid = conn.execute(query, {"s": name, "t": trial.number}).scalar()
    engine.dispose()
    assert pid, f"no worker holds run {trial.number}"
    return int(pid)


def test_two_workers_on_one_journal_file(prepared_template: Path, tmp_path: Path) -> None:
    storage = f"journal://{tmp_path / 'shared' / 'study.log'}"
    project = clone_project(
        prepared_template, tmp_path / "project", _overrides("journal", storage, 2, sampler="random")
    )
    env = cli_env(tmp_path / "home")
    procs = _start_workers(project, env, 2, tmp_path)
    try:
        codes = [p.wait(timeout=600) for p in procs]
    finally:
        for p in procs:
            stop_process(p)
    logs = "\n".join((tmp_path / f"worker-{i}.log").read_text() for i in range(2))
    assert codes == [0, 0], logs[-4000:]
    _assert_each_configuration_once(project, storage, 2)


def test_slurm_array_launched_by_the_cli_completes_the_study(
    prepared_template: Path, tmp_path: Path, postgres_server: Postgres, slurm: Slurm
) -> None:
    storage = postgres_server.url("unused-pw")
    overrides = _overrides("slurm", storage, 2, sampler="random")
    # The setup line shows the threads each task's worker gets: its --cpus-per-task.
    slurm_cfg = {
        "gpus_per_task": 0,
        "cpus_per_task": 1,
        "setup": ['echo "threads=$OMP_NUM_THREADS"'],
    }
    overrides["launch"] = {"workers": 2, "slurm": slurm_cfg}
    project = clone_project(prepared_template, tmp_path / "project", overrides)
    env = cli_env(tmp_path / "home", slurm.env())
    env.pop("OMP_NUM_THREADS", None)  # sbatch passes the caller's environment on
    log = tmp_path / "launch.log"
    done = run_cli(project, ["sweep", "launch", "--slurm"], env, log, timeout=120)
    text = log.read_text()
    assert done.returncode == 0, text
    assert "#SBATCH --array=0-1" in text and "submitted: job" in text, text
    assert "unused-pw" not in text
    script = next((project / "runs/sweep/launch").glob("*.sbatch"))
    assert "unused-pw" not in script.read_text()
    wait_for("the SLURM array to finish", lambda: not slurm.jobs(), 600, interval=2)
    outputs = sorted((project / "runs/sweep/launch").glob("slurm-*.out"))
    assert len(outputs) == 2, outputs
    logs = "\n".join(p.read_text() for p in outputs)
    _assert_each_configuration_once(project, storage, 2)
    assert logs.count("worker done:") == 2, logs[-3000:]
    assert [line for line in logs.splitlines() if line.startswith("threads=")] == ["threads=1"] * 2


def test_a_database_restart_mid_sweep_costs_nothing(
    prepared_template: Path, tmp_path: Path, postgres_server: Postgres
) -> None:
    """PostgreSQL stopped for a few seconds while a run trains, and again while a run is
    evaluated (its points being added: Optuna's cached storage called the database directly,
    unretried, and the run failed with its points lost): the worker retries its storage calls
    with backoff and finishes the sweep; every run and point is recorded once."""
    storage = postgres_server.url("unused-pw")
    project = clone_project(
        prepared_template, tmp_path / "project", _overrides("outage", storage, 2, sampler="random")
    )
    env = cli_env(tmp_path / "home")
    log = tmp_path / "sweep.log"
    proc = start_cli(project, ["sweep"], env, log)
    try:
        wait_for("a run in training", lambda: _mid_run(project, storage), 300, proc, log)
        _outage(postgres_server, 6)
        wait_for("a run in evaluation", lambda: _points(project, storage) > 0, 300, proc, log)
        _outage(postgres_server, 6)
        code = proc.wait(timeout=600)
    finally:
        stop_process(proc)
    text = log.read_text()
    assert code == 0, text[-4000:]
    assert text.count("retrying in") >= 2, text[-3000:]
    assert "Traceback" not in text and "(2 completed, 0 pruned, 0 failed)" in text, text[-3000:]
    assert "unused-pw" not in text
    _assert_each_configuration_once(project, storage, 2)
    assert _points(project, storage) == 2 * 2 * 4  # 2 runs x 2 checkpoints x 4 settings


def _outage(server: Postgres, seconds: float) -> None:
    server.stop()
    try:
        time.sleep(seconds)
    finally:
        server.start()


def _points(project: Path, storage: str) -> int:
    """Evaluated points recorded so far (the points study: one trial per point)."""
    name = study_id(load_config(project / "params.yaml"), project)
    with contextlib.suppress(KeyError):  # not created yet
        study = optuna.load_study(study_name=name, storage=_optuna_storage(storage))
        return len(study.get_trials(deepcopy=False))
    return 0


def test_of_two_workers_with_other_weights_one_sweeps_and_one_is_refused(
    prepared_template: Path, tmp_path: Path, postgres_server: Postgres
) -> None:
    """Two nodes, one study, the same `model.pretrained` but other weights on one of them (here
    a retrained tiny UNet in that worker's model cache). Started together, the first to store
    its weights in the study sweeps; the other stops with one line before it trains, whichever
    came first, and every run is the first one's."""

    storage = postgres_server.url("unused-pw")
    project = clone_project(
        prepared_template, tmp_path / "project", _overrides("weights", storage, 2, sampler="random")
    )
    cache = retrained_tiny_cache(tmp_path / "other-cache")
    env = cli_env(tmp_path / "home")
    envs = [env, {**env, "HARNESS_CACHE_DIR": str(cache)}]
    procs = [
        start_cli(
            project,
            ["sweep", "worker"],
            {**e, "HARNESS_WORKER_ID": f"w{i}", "OMP_NUM_THREADS": "1"},
            tmp_path / f"worker-{i}.log",
        )
        for i, e in enumerate(envs)
    ]
    try:
        codes = [p.wait(timeout=600) for p in procs]
    finally:
        for p in procs:
            stop_process(p)
    logs = [(tmp_path / f"worker-{i}.log").read_text() for i in range(2)]
    assert sorted(codes) == [0, 2], "\n".join(log[-3000:] for log in logs)
    winner, loser = (0, 1) if codes[0] == 0 else (1, 0)
    assert "these weights are not those study" in logs[loser]
    assert "Traceback" not in logs[loser]
    trials = _runs(project, storage)
    name = study_id(load_config(project / "params.yaml"), project)
    study = optuna.load_study(study_name=f"{name}.runs", storage=_optuna_storage(storage))
    stored = study.user_attrs["model"]["weights"]
    assert f"(the study's: {stored[:12]})" in logs[loser]
    assert {t.user_attrs.get("worker") for t in _trained(trials)} == {f"w{winner}"}
    _assert_each_configuration_once(project, storage, 2)
