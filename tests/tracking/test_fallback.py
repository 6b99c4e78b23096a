"""A configured but unreachable server (a closed loopback port): offline within seconds."""

from __future__ import annotations

import http.server
import logging
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from harness.config import TrackingConfig
from harness.tracking import check_reachable, create_tracker, import_offline_sessions
from harness.tracking.clearml_backend import TrackingError, detect_server


def _configure_env(monkeypatch: pytest.MonkeyPatch, port: int) -> None:
    monkeypatch.delenv("CLEARML_OFFLINE_MODE", raising=False)
    monkeypatch.setenv("CLEARML_API_HOST", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("CLEARML_WEB_HOST", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("CLEARML_FILES_HOST", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("CLEARML_API_ACCESS_KEY", "ACCESSKEY0123456789")
    monkeypatch.setenv("CLEARML_API_SECRET_KEY", "clearml-secret-key-do-not-leak-42")


def _configure_file(monkeypatch: pytest.MonkeyPatch, port: int, tmp_path: Path) -> None:
    monkeypatch.delenv("CLEARML_OFFLINE_MODE", raising=False)
    conf = tmp_path / "clearml.conf"
    conf.write_text(
        "api {\n"
        f'  api_server: "http://127.0.0.1:{port}"\n'
        f'  web_server: "http://127.0.0.1:{port}"\n'
        f'  files_server: "http://127.0.0.1:{port}"\n'
        '  credentials { access_key: "ACCESSKEY0123456789", '
        'secret_key: "clearml-secret-key-do-not-leak-42" }\n'
        "}\n"
    )
    monkeypatch.setenv("CLEARML_CONFIG_FILE", str(conf))


@pytest.mark.parametrize("how", ["env", "config_file"])
def test_unreachable_server_falls_back_to_offline_within_seconds(
    how: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    closed_port: int,
    caplog: pytest.LogCaptureFixture,
    read_session: Any,
    read_zip: Any,
) -> None:
    if how == "env":
        _configure_env(monkeypatch, closed_port)
    else:
        _configure_file(monkeypatch, closed_port, tmp_path)
    assert detect_server().api_host == f"http://127.0.0.1:{closed_port}"

    tracker = create_tracker(TrackingConfig(connect_timeout_s=1.0), tmp_path)
    assert tracker.mode == "online"  # planned: a server is configured
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="harness.tracking"):
        run = tracker.start_run("trial-7", config={"train": {"rank": 2}}, tags=["subject:dog"])
    # A hang (Task.init against a dead server) takes minutes; the probe takes ~1 s, so this
    # bound only fails on a real hang, not on a loaded CI machine.
    assert time.monotonic() - started < 30.0
    assert run.mode == "offline" and run.mode.is_fallback
    assert f"127.0.0.1:{closed_port}" in run.mode.reason and "unreachable" in run.mode.reason
    assert any("falling back to offline" in r.getMessage() for r in caplog.records)

    run.log_scalar("loss", "train", 0.125, 5)
    zip_path = run.close()
    assert zip_path is not None and zip_path.is_relative_to(tmp_path / "runs" / "clearml")
    task, events = read_session(zip_path)
    assert task["hyperparams"]["config"]["train/rank"]["value"] == "2"
    assert {(e["metric"], e["variant"], e["iter"], e["value"]) for e in events if "value" in e} >= {
        ("loss", "train", 5, 0.125)
    }
    blob = b"".join(read_zip(zip_path).values())
    assert b"clearml-secret-key-do-not-leak-42" not in blob
    assert "clearml-secret-key-do-not-leak-42" not in caplog.text


def test_strict_unreachable_server_is_a_clear_error_within_seconds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, closed_port: int
) -> None:
    _configure_env(monkeypatch, closed_port)
    tracker = create_tracker(TrackingConfig(strict=True, connect_timeout_s=1.0), tmp_path)
    started = time.monotonic()
    with pytest.raises(TrackingError, match=rf"127\.0\.0\.1:{closed_port}.*unreachable"):
        tracker.start_run("trial", config={}, tags=[])
    # A hang (Task.init against a dead server) takes minutes; the probe takes ~1 s, so this
    # bound only fails on a real hang, not on a loaded CI machine.
    assert time.monotonic() - started < 30.0


def test_online_without_configuration(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CLEARML_OFFLINE_MODE", raising=False)
    with pytest.raises(TrackingError, match="no ClearML server is configured"):
        create_tracker(TrackingConfig(mode="online", strict=True), tmp_path)
    tracker = create_tracker(TrackingConfig(mode="online"), tmp_path)
    assert tracker.mode == "offline" and tracker.mode.is_fallback


def test_offline_environment_variable_wins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CLEARML_OFFLINE_MODE", "1")
    monkeypatch.setenv("CLEARML_API_HOST", "http://127.0.0.1:9")
    tracker = create_tracker(TrackingConfig(), tmp_path)
    assert tracker.mode == "offline" and "CLEARML_OFFLINE_MODE" in tracker.mode.reason


@pytest.fixture
def http_server() -> Iterator[str]:
    """A loopback HTTP server that answers 401 to everything (like an API server)."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(401)
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_check_reachable(http_server: str, closed_port: int) -> None:
    up = check_reachable(http_server, 2.0)
    assert up.ok and up.detail == "HTTP 401"
    down = check_reachable(f"http://127.0.0.1:{closed_port}", 1.0)
    assert not down.ok and down.seconds < 2.0
    assert not check_reachable("not a url", 1.0).ok


def test_detect_server_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert not detect_server().configured
    (Path.home() / "clearml.conf").write_text('api { credentials { access_key: "k" } }\n')
    assert detect_server().api_host == "https://api.clear.ml"
    monkeypatch.setenv("CLEARML_API_HOST", "http://127.0.0.1:8008/")
    assert detect_server() == detect_server().__class__(
        True, "http://127.0.0.1:8008", "CLEARML_API_HOST"
    )


def test_import_offline_sessions(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, http_server: str, closed_port: int
) -> None:
    folder = tmp_path / "runs" / "clearml"
    (folder / "offline").mkdir(parents=True)
    (folder / "offline" / "offline-abc.zip").write_bytes(b"zip")
    with pytest.raises(TrackingError, match="no ClearML server configured"):
        import_offline_sessions(folder)
    monkeypatch.setenv("CLEARML_API_HOST", f"http://127.0.0.1:{closed_port}")
    with pytest.raises(TrackingError, match=r"(?i)refused"):
        import_offline_sessions(folder)

    from harness.tracking.clearml_backend import Task

    calls: list[str] = []
    monkeypatch.setenv("CLEARML_API_HOST", http_server)
    monkeypatch.setattr(Task, "import_offline_session", lambda p: calls.append(p) or "task-1")
    monkeypatch.setattr(Task, "set_offline", lambda offline_mode=False: None)
    assert import_offline_sessions(folder) == {folder / "offline" / "offline-abc.zip": "task-1"}
    assert (folder / "offline" / "offline-abc.zip.imported").read_text().strip() == "task-1"
    assert import_offline_sessions(folder) == {}  # already imported
    assert len(calls) == 1


def test_online_without_configuration_warns_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The tracker said so three times per sweep: created, checked, and at each run."""
    monkeypatch.delenv("CLEARML_OFFLINE_MODE", raising=False)
    with caplog.at_level(logging.WARNING, logger="harness.tracking"):
        tracker = create_tracker(TrackingConfig(mode="online"), tmp_path)
        assert tracker.preflight() == "offline"
        for name in ("trial-0", "trial-1"):
            tracker.start_run(name, config={}, tags=[]).close()
    said = [r for r in caplog.records if "no ClearML server is configured" in r.getMessage()]
    assert len(said) == 1, [r.getMessage() for r in caplog.records]
