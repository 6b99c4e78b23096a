"""Every user error of a real command line is one line and exit status 2, found before any
training starts, with nothing already done lost (issue 17, items 7 and 8)."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

import optuna

from ._helpers import cli_env, clone_project, harness_cmd
from .conftest import PASSWORD_ROLE, Postgres

PASSWORD = "Pw-wr0ng-77"


def _closed_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _run(
    project: Path, *args: str, env: dict[str, str], timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        harness_cmd(project, *args),
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def _error_lines(proc: subprocess.CompletedProcess[str]) -> list[str]:
    """The ``error:`` lines; the test fails with the whole output when there is a traceback."""
    assert "Traceback" not in proc.stderr, proc.stderr[-4000:]
    return [line for line in proc.stderr.splitlines() if line.startswith("error:")]


def _no_run_started(project: Path, name: str) -> None:
    db = project / "runs/sweep/study.db"
    if not db.is_file():
        return
    storage = f"sqlite:///{db}"
    for study_name in optuna.get_all_study_names(storage):  # <name>-<fingerprint>[.runs|.proxy]
        if study_name.startswith(f"{name}-"):
            study = optuna.load_study(study_name=study_name, storage=storage)
            assert study.get_trials(deepcopy=False) == [], f"{study_name} has trials"
    assert not (project / "runs/sweep/runs").exists() or not any(
        (project / "runs/sweep/runs").iterdir()
    )


def test_missing_metric_weights_fail_before_training(
    prepared_template: Path, tmp_path: Path
) -> None:
    name = "e2e-weights"
    project = clone_project(prepared_template, tmp_path / "p", {"sweep": {"study_name": name}})
    missing = tmp_path / "nowhere" / "dino.safetensors"
    started = time.monotonic()
    proc = _run(
        project, "-S", f"metrics.dino_model={missing}", "sweep", env=cli_env(tmp_path / "home")
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = _error_lines(proc)
    assert len(lines) == 1 and str(missing) in lines[0], proc.stderr[-3000:]
    _no_run_started(project, name)
    # Far below one training run plus its proxy evaluation (which the bug spent first).
    assert time.monotonic() - started < 90


def test_strict_tracking_with_dead_server_is_one_line(
    prepared_template: Path, tmp_path: Path
) -> None:
    name = "e2e-strict"
    project = clone_project(prepared_template, tmp_path / "p", {"sweep": {"study_name": name}})
    port = _closed_port()
    env = cli_env(
        tmp_path / "home",
        {
            "CLEARML_API_HOST": f"http://127.0.0.1:{port}",
            "CLEARML_API_ACCESS_KEY": "k",
            "CLEARML_API_SECRET_KEY": "s",
        },
    )
    env.pop("CLEARML_OFFLINE_MODE", None)
    args = ("-S", "tracking.mode=online", "-S", "tracking.strict=true")
    args += ("-S", "tracking.connect_timeout_s=1")
    proc = _run(project, *args, "sweep", env=env)
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = _error_lines(proc)
    assert len(lines) == 1, proc.stderr[-3000:]
    assert f"127.0.0.1:{port}" in lines[0] and "tracking.strict" in lines[0]
    _no_run_started(project, name)


def test_unreachable_storage_is_one_line_with_the_password_masked(
    prepared_template: Path, tmp_path: Path
) -> None:
    project = clone_project(prepared_template, tmp_path / "p")
    url = f"postgresql+psycopg2://harness:{PASSWORD}@127.0.0.1:{_closed_port()}/harness"
    proc = _run(project, "-S", f"sweep.storage={url}", "sweep", env=cli_env(tmp_path / "home"))
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = _error_lines(proc)
    assert len(lines) == 1 and "sweep.storage" in lines[0], proc.stderr[-3000:]
    assert "127.0.0.1" in lines[0]
    assert PASSWORD not in proc.stderr + proc.stdout


def test_storage_with_a_missing_database_is_one_line(
    prepared_template: Path, tmp_path: Path, postgres_server: Postgres
) -> None:
    project = clone_project(prepared_template, tmp_path / "p")
    url = postgres_server.url(PASSWORD).rsplit("/", 1)[0] + "/no_such_db"
    proc = _run(project, "-S", f"sweep.storage={url}", "sweep", env=cli_env(tmp_path / "home"))
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = _error_lines(proc)
    assert len(lines) == 1 and "no_such_db" in lines[0], proc.stderr[-3000:]
    assert PASSWORD not in proc.stderr + proc.stdout


def test_tracking_import_against_a_dead_server_is_one_line(tmp_path: Path) -> None:
    port = _closed_port()
    env = cli_env(
        tmp_path / "home",
        {"CLEARML_API_HOST": f"http://127.0.0.1:{port}", "CLEARML_API_ACCESS_KEY": "k"},
    )
    (tmp_path / "runs/clearml").mkdir(parents=True)
    proc = subprocess.run(
        [sys.executable, "-m", "harness.tracking", "import", str(tmp_path / "runs/clearml")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = _error_lines(proc)
    assert len(lines) == 1 and f"127.0.0.1:{port}" in lines[0], proc.stderr


def test_storage_with_a_wrong_password_is_one_line_and_masked(
    prepared_template: Path, tmp_path: Path, postgres_server: Postgres
) -> None:
    project = clone_project(prepared_template, tmp_path / "p")
    env = cli_env(tmp_path / "home")
    # The role really authenticates: its right password opens the storage.
    optuna.storages.RDBStorage(postgres_server.password_url(PASSWORD_ROLE[1]))
    proc = _run(
        project, "-S", f"sweep.storage={postgres_server.password_url(PASSWORD)}", "sweep", env=env
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = _error_lines(proc)
    assert len(lines) == 1 and "password authentication failed" in lines[0], proc.stderr[-3000:]
    assert PASSWORD not in proc.stderr + proc.stdout
