"""Isolation for the tracking tests: ClearML sees only a temporary home, cache and config."""

from __future__ import annotations

import json
import socket
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

CLEARML_VARS = [
    "CLEARML_API_HOST",
    "CLEARML_WEB_HOST",
    "CLEARML_FILES_HOST",
    "CLEARML_API_ACCESS_KEY",
    "CLEARML_API_SECRET_KEY",
    "CLEARML_CONFIG_FILE",
    "CLEARML_CACHE_DIR",
    "TRAINS_API_HOST",
    "TRAINS_CONFIG_FILE",
    "TRAINS_API_ACCESS_KEY",
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "http_proxy",
    "https_proxy",
]


@pytest.fixture(autouse=True)
def isolated_clearml(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A fresh HOME and cache; no server configured; no proxy for the loopback probes."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    for name in CLEARML_VARS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("CLEARML_CACHE_DIR", str(tmp_path / "clearml-cache"))
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    yield home


@pytest.fixture
def closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def read_zip(path: Path) -> dict[str, bytes]:
    """All members of a session zip."""
    with zipfile.ZipFile(path) as zf:
        return {name: zf.read(name) for name in zf.namelist()}


def read_session(path: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """``(task.json, metrics.jsonl events)`` of an offline session zip."""
    files = read_zip(path)
    task = json.loads(files["task.json"])
    events: list[dict[str, Any]] = []
    for line in files.get("metrics.jsonl", b"").decode().splitlines():
        if line.strip():
            chunk = json.loads(line)
            events.extend(chunk if isinstance(chunk, list) else [chunk])
    return task, events


@pytest.fixture(name="read_session")
def read_session_fixture() -> Any:
    """The :func:`read_session` helper."""
    return read_session


@pytest.fixture(name="read_zip")
def read_zip_fixture() -> Any:
    """The :func:`read_zip` helper."""
    return read_zip


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """ClearML's bundled HOCON parser calls pyparsing's deprecated API; not ours to fix."""
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.filterwarnings("ignore:'parseAll' argument is deprecated"))
