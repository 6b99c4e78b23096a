"""``harness sweep launch`` (and the storage it needs) as a user runs it, a subprocess in a
project folder: a password never reaches a generated file, a command line or the console,
``--dry-run`` starts nothing on any engine, and a missing database driver says what to install."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from e2e._helpers import new_project

PASSWORD = "Pw-s3cret-77"
URL = f"postgresql+psycopg2://sweeper:{PASSWORD}@127.0.0.1:1/sweeps"


@pytest.fixture
def project(tmp_path: Path) -> Path:
    return new_project(tmp_path / "proj")


def _launch(
    project: Path, *args: str, sets: tuple[str, ...] = (), env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    overrides = [arg for item in sets for arg in ("-S", item)]
    command = [sys.executable, "-m", "harness", "-p", str(project / "params.yaml"), *overrides]
    return subprocess.run(
        [*command, "sweep", "launch", *args],
        cwd=project,
        env={**os.environ, "PATH": f"{project}/no-sbatch", **(env or {})},
        capture_output=True,
        text=True,
        timeout=120,
    )


def _written(project: Path) -> list[Path]:
    return [p for p in project.rglob("*") if p.is_file() and "runs" in p.parts]


@pytest.mark.parametrize(
    "engine",
    [("--slurm", "--dry-run"), ("--clearml-queue", "gpu", "--dry-run"), ("--local", "2")],
    ids=["slurm", "clearml", "local"],
)
def test_a_password_in_a_storage_override_is_refused_before_anything_is_written(
    project: Path, engine: tuple[str, ...]
) -> None:
    """``-S sweep.storage=<url with a password>`` would go into the sbatch script, the ClearML
    task or every local worker's command line (which ``ps`` shows): refused, naming the key and
    where the URL goes instead."""
    done = _launch(project, *engine, sets=(f"sweep.storage={URL}", "train.rank=8"))
    assert done.returncode == 2, done.stdout + done.stderr
    assert "-S sweep.storage" in done.stderr and "HARNESS_SWEEP_STORAGE" in done.stderr
    assert PASSWORD not in done.stdout + done.stderr
    assert _written(project) == []


def test_the_password_of_the_storage_variable_stays_out_of_the_script(project: Path) -> None:
    done = _launch(project, "--slurm", "--dry-run", env={"HARNESS_SWEEP_STORAGE": URL})
    assert done.returncode == 0, done.stderr
    (script,) = (project / "runs/sweep/launch").glob("*.sbatch")
    assert "harness" in script.read_text() and "not submitted (--dry-run)" in done.stdout
    for text in (script.read_text(), done.stdout, done.stderr):
        assert PASSWORD not in text


def test_a_local_dry_run_shows_each_worker_and_starts_none(project: Path) -> None:
    # data.token's key looks secret, its value (the identifier) is not: passed on.
    done = _launch(project, "--local", "2", "--dry-run", sets=("data.token=zwx", "train.rank=8"))
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    workers = [line for line in lines if line.startswith("worker ")]
    assert len(workers) == 2, done.stdout
    for i, line in enumerate(workers):
        assert "HARNESS_WORKER_ID=local-" in line and line.endswith(
            "-S data.token=zwx -S train.rank=8 sweep worker"
        ), line
        assert line.startswith(f"worker {i}: ")
    assert "not started (--dry-run)" in done.stdout
    assert _written(project) == [], "a worker ran: it opens the study under runs/"


def test_the_worker_count_of_a_local_launch_is_given_once(project: Path) -> None:
    done = _launch(project, "--local", "2", "-n", "3")
    assert done.returncode == 2
    assert "--local N" in done.stderr and "-n" in done.stderr
    assert _written(project) == []


def test_config_show_masks_the_password_of_a_storage_url(project: Path) -> None:
    command = [sys.executable, "-m", "harness", "-p", str(project / "params.yaml")]
    for fmt in ([], ["--json"]):
        done = subprocess.run(
            [*command, "-S", f"sweep.storage={URL}", "config", "show", *fmt],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, done.stderr
        assert PASSWORD not in done.stdout and "sweeper:***@127.0.0.1:1/sweeps" in done.stdout
        assert "token: sks" in done.stdout or '"token": "sks"' in done.stdout


def _has_mysql_driver() -> bool:
    import importlib.util

    return any(importlib.util.find_spec(name) for name in ("pymysql", "MySQLdb"))


@pytest.mark.skipif(_has_mysql_driver(), reason="a MySQL driver is installed here")
def test_a_mysql_storage_without_its_driver_says_what_to_install(project: Path) -> None:
    command = [sys.executable, "-m", "harness", "-p", str(project / "params.yaml")]
    done = subprocess.run(
        [*command, "-S", "sweep.storage=mysql://sweeper@127.0.0.1:1/sweeps", "sweep", "status"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert "sweep.storage" in done.stderr and "no MySQL driver" in done.stderr
    assert "'.[mysql]'" in done.stderr and "Traceback" not in done.stderr
