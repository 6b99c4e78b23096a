"""End-to-end fixtures: a prepared tiny project (once per session) and a throwaway PostgreSQL."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from ._helpers import CLEARML_SERVER_VARS, new_project

PG_BIN = Path("/usr/lib/postgresql/15/bin")


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Nothing in-process touches the real home or a configured ClearML server."""
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("CLEARML_CACHE_DIR", str(home / "clearml-cache"))
    for name in CLEARML_SERVER_VARS:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(scope="session")
def prepared_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tmp project (tiny-cpu, shrunk) after ``resolve`` and ``prepare``; tests clone it."""
    from harness.config import load_config
    from harness.stages import run_prepare, run_resolve

    root = new_project(tmp_path_factory.mktemp("template") / "project")
    cfg = load_config(root / "params.yaml")
    run_resolve(cfg, root)
    (result,) = run_prepare(cfg, root, progress=False)
    assert result.n_train + result.n_val == 5
    return root


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _as_postgres(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run a PostgreSQL binary as the ``postgres`` user (initdb refuses root)."""
    cmd = [str(PG_BIN / args[0]), *args[1:]]
    if os.geteuid() == 0:
        cmd = ["runuser", "-u", "postgres", "--", *cmd]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)


@dataclass(frozen=True)
class Postgres:
    """A running throwaway cluster on 127.0.0.1 with an empty ``harness`` database."""

    port: int
    data: Path | None = None
    options: str = ""
    log: Path | None = None

    def stop(self) -> None:
        """Stop the server (connections are cut), e.g. to test a database outage."""
        assert self.data is not None
        done = _as_postgres("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop")
        assert done.returncode == 0, done.stderr

    def start(self) -> None:
        """Start the stopped server again on the same port and data."""
        assert self.data is not None
        args = ("pg_ctl", "-D", str(self.data), "-o", self.options, "-l", str(self.log))
        done = _as_postgres(*args, "-w", "start")
        assert done.returncode == 0, done.stderr

    def url(self, password: str) -> str:
        """SQLAlchemy URL with ``password`` in it (trust auth ignores it)."""
        return f"postgresql+psycopg2://postgres:{password}@127.0.0.1:{self.port}/harness"

    def password_url(self, password: str) -> str:
        """URL of the role that must authenticate (its real password is PASSWORD_ROLE[1])."""
        user = PASSWORD_ROLE[0]
        return f"postgresql+psycopg2://{user}:{password}@127.0.0.1:{self.port}/{user}"


# A role with password authentication (scram), for wrong-password tests; everyone else: trust.
PASSWORD_ROLE = ("harness_pw", "Right-pw-123")


def _add_password_role(data: Path, port: int) -> None:
    """Create PASSWORD_ROLE and make it (only it) authenticate with its password."""
    user, password = PASSWORD_ROLE
    made = _as_postgres(
        *("psql", "-h", "127.0.0.1", "-p", str(port), "-U", "postgres"),
        *("-c", f"CREATE ROLE {user} LOGIN PASSWORD '{password}'"),
        *("-c", f"CREATE DATABASE {user} OWNER {user}"),  # its own: PG 15 locks schema public
    )
    assert made.returncode == 0, f"psql failed:\n{made.stderr}"
    hba = data / "pg_hba.conf"
    rule = f"host all {user} 127.0.0.1/32 scram-sha-256\n"
    # The first matching line wins: the password rule goes before initdb's trust lines.
    # (Rewritten in place, so the file keeps its owner, postgres.)
    hba.write_text(rule + hba.read_text())
    reloaded = _as_postgres("pg_ctl", "-D", str(data), "reload")
    assert reloaded.returncode == 0, f"pg_ctl reload failed:\n{reloaded.stderr}"


def postgres_missing_reason() -> str | None:
    """Why no cluster can be started here, or None."""
    missing = [b for b in ("initdb", "pg_ctl", "createdb") if not (PG_BIN / b).is_file()]
    if missing:
        return f"PostgreSQL 15 binaries missing in {PG_BIN}: {missing}"
    if os.geteuid() == 0 and shutil.which("runuser") is None:
        return "running as root without runuser: cannot start PostgreSQL as user postgres"
    return None


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[Postgres]:
    """Session-wide PostgreSQL 15, loopback only, trust auth; a failure in CI when missing."""
    reason = postgres_missing_reason()
    if reason is not None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(reason + " (required in CI)")
        pytest.skip(reason)
    # Not under pytest's tmp dir: that one is private to root and postgres could not enter it.
    base = Path(tempfile.mkdtemp(prefix="harness-e2e-pg-"))
    data = base / "data"
    if os.geteuid() == 0:
        shutil.chown(base, user="postgres", group="postgres")
    port = _free_port()
    started = False
    try:
        init = _as_postgres("initdb", "-D", str(data), "-A", "trust", "-U", "postgres")
        assert init.returncode == 0, f"initdb failed:\n{init.stdout}\n{init.stderr}"
        options = f"-p {port} -k {base} -c listen_addresses=127.0.0.1"
        start = _as_postgres(
            "pg_ctl", "-D", str(data), "-o", options, "-l", str(base / "server.log"), "-w", "start"
        )
        started = start.returncode == 0
        assert started, f"pg_ctl start failed:\n{start.stdout}\n{start.stderr}"
        created = _as_postgres(
            "createdb", "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "harness"
        )
        assert created.returncode == 0, f"createdb failed:\n{created.stderr}"
        _add_password_role(data, port)
        yield Postgres(port, data, options, base / "server.log")
    finally:
        if started or (data / "postmaster.pid").exists():
            _as_postgres("pg_ctl", "-D", str(data), "-m", "fast", "stop")
        shutil.rmtree(base, ignore_errors=True)
