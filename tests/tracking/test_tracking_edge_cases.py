"""Edge cases of tracking: a proxy answering 5xx, URL passwords with ``/`` or ``@``, numbers under
secret-looking keys, a failing session import, and what ClearML would send online unmasked."""

from __future__ import annotations

import http.server
import json
import logging
import os
import shutil
import subprocess
import sys
import textwrap
import threading
import time
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from harness.config import TrackingConfig
from harness.tracking import check_reachable, create_tracker, is_secret_key, redact_text
from harness.tracking.clearml_backend import TrackingError
from harness.tracking.secrets import collect_secret_literals, scrub_secrets, secret_values

SLASH_PW = "Xy7/kP+q9Lm2"  # sqlalchemy.engine.make_url reads this whole password
SLASH_URL = f"postgresql://optuna:{SLASH_PW}@db.example.com:5432/optuna"
AT_PW = "p@ssw0rd-7"
AT_URL = f"postgresql://u:{AT_PW}@h/db"


# --- 1. a proxy in front of a dead API server answers 5xx ------------------------------------


def _serve(status: int) -> tuple[http.server.ThreadingHTTPServer, str]:
    """A loopback HTTP server answering ``status`` to every GET (a proxy's 502/503)."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(status)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


@pytest.fixture(params=[503, 502])
def bad_gateway(request: pytest.FixtureRequest) -> Iterator[tuple[int, str]]:
    """``(status, url)`` of a loopback server answering a 5xx status."""
    server, url = _serve(request.param)
    yield request.param, url
    server.shutdown()
    server.server_close()


@pytest.fixture
def api_401() -> Iterator[str]:
    """A loopback server answering 401, as a live API server does without credentials."""
    server, url = _serve(401)
    yield url
    server.shutdown()
    server.server_close()


def _point_clearml_at(monkeypatch: pytest.MonkeyPatch, url: str) -> None:
    monkeypatch.delenv("CLEARML_OFFLINE_MODE", raising=False)
    for name in ("CLEARML_API_HOST", "CLEARML_WEB_HOST", "CLEARML_FILES_HOST"):
        monkeypatch.setenv(name, url)
    monkeypatch.setenv("CLEARML_API_ACCESS_KEY", "ACCESSKEY0123456789")
    monkeypatch.setenv("CLEARML_API_SECRET_KEY", "clearml-secret-key-do-not-leak-42")


def test_a_5xx_answer_is_unreachable(bad_gateway: tuple[int, str], api_401: str) -> None:
    status, url = bad_gateway
    down = check_reachable(url, 2.0)
    assert not down.ok and down.detail == f"HTTP {status}"
    assert down.seconds < 2.5
    up = check_reachable(api_401, 2.0)  # a 4xx is a live server refusing us: reachable
    assert up.ok and up.detail == "HTTP 401"


def test_a_proxy_answering_5xx_means_offline_or_strict_error_within_seconds(
    bad_gateway: tuple[int, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    status, url = bad_gateway
    _point_clearml_at(monkeypatch, url)
    tracker = create_tracker(TrackingConfig(connect_timeout_s=2.0), tmp_path)
    assert tracker.mode == "online"  # planned: a server is configured
    started = time.monotonic()
    mode = tracker.preflight()
    assert time.monotonic() - started < 5.0
    assert mode == "offline" and mode.is_fallback
    assert "unreachable" in mode.reason and f"HTTP {status}" in mode.reason

    strict = create_tracker(TrackingConfig(strict=True, connect_timeout_s=2.0), tmp_path)
    started = time.monotonic()
    with pytest.raises(TrackingError, match=rf"unreachable.*HTTP {status}"):
        strict.preflight()
    assert time.monotonic() - started < 5.0


# --- 2. URL passwords holding "/" or "@" -------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "password", "masked"),
    [
        (SLASH_URL, SLASH_PW, "postgresql://optuna:***@db.example.com:5432/optuna"),
        (AT_URL, AT_PW, "postgresql://u:***@h/db"),
        ("redis://:a@b/c@cache:6379/0", "a@b/c", "redis://:***@cache:6379/0"),
    ],
)
def test_url_password_with_slash_or_at_is_masked_whole(
    url: str, password: str, masked: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert redact_text(f"storage {url} is down") == f"storage {masked} is down"
    assert scrub_secrets({"sweep": {"storage": url}}) == {"sweep": {"storage": masked}}
    if len(password) >= 6:  # shorter ones are masked in URLs, not hunted as bare literals
        assert password in collect_secret_literals({"sweep": {"storage": url}})
        monkeypatch.setenv("OPTUNA_STORAGE", url)
        assert password in secret_values()
        assert redact_text(f"password {password} rejected") == "password *** rejected"


def test_url_masking_stays_inside_one_json_string_and_spares_passwordless_urls() -> None:
    text = json.dumps({"storage": AT_URL, "mail": "me@example.com", "s": SLASH_URL})
    clean = redact_text(text)
    assert json.loads(clean) == {
        "storage": "postgresql://u:***@h/db",
        "mail": "me@example.com",
        "s": "postgresql://optuna:***@db.example.com:5432/optuna",
    }
    for plain in ("https://huggingface.co/@user/x", "http://127.0.0.1:8008/debug.ping"):
        assert redact_text(plain) == plain


def test_offline_session_holds_no_part_of_a_slash_or_at_password(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, read_zip: Any
) -> None:
    monkeypatch.delenv("CLEARML_OFFLINE_MODE", raising=False)
    config = {"sweep": {"storage": SLASH_URL, "backup": AT_URL}, "train": {"rank": 4}}
    run = create_tracker(TrackingConfig(mode="offline"), tmp_path).start_run(
        "trial-0", config=config, tags=[]
    )
    run.log_text(f"could not reach {SLASH_URL} nor {AT_URL}")
    zip_path = run.close()
    assert zip_path is not None
    members = read_zip(zip_path)
    for fragment in (SLASH_PW, "kP+q9Lm2", AT_PW, "ssw0rd-7"):
        assert not [n for n, data in members.items() if fragment.encode() in data], fragment
    params = json.loads(members["task.json"])["hyperparams"]["config"]
    assert params["sweep/storage"]["value"] == "postgresql://optuna:***@db.example.com:5432/optuna"


# --- 3. numbers under secret-looking keys -----------------------------------------------------


@pytest.mark.parametrize(
    ("key", "secret"),
    [
        ("token_seed", False),
        ("seed_of_token", True),
        ("password_file", False),
        ("SSH_AUTH_SOCK", False),
        ("hf_token", True),
        ("AWS_SECRET_ACCESS_KEY", True),
        ("CLEARML_API_SECRET_KEY", True),
        ("secretKey", True),
        ("PGPASSWORD", True),
    ],
)
def test_a_key_is_secret_by_its_last_words_only(key: str, secret: bool) -> None:
    assert is_secret_key(key) is secret


def test_numbers_and_short_strings_are_never_literals_to_scrub(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    config = {
        "hub": {"api_key": 20242024, "token": "1.5e-3", "password": "abc"},
        "db": {"password": "20242024", "url": "postgresql://u:12345678@h/db"},
    }
    assert collect_secret_literals(config) == set()
    monkeypatch.setenv("OPTUNA_STORAGE", "postgresql://u:20242024@h/db")
    assert "20242024" not in secret_values()
    assert scrub_secrets(config)["hub"] == {"api_key": "***", "token": "***", "password": "***"}


def test_token_seed_keeps_its_value_and_every_session_json_line_parses(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, read_zip: Any, read_session: Any
) -> None:
    monkeypatch.delenv("CLEARML_OFFLINE_MODE", raising=False)
    monkeypatch.setenv("OPTUNA_STORAGE", "postgresql://optuna:20242024@db/study")
    config = {"data": {"token": "sks", "token_seed": 2024}, "train": {"rank": 4}}
    run = create_tracker(TrackingConfig(mode="offline"), tmp_path).start_run(
        "trial-2024", config=config, tags=[]
    )
    run.log_scalar("loss", "train", 1.2024, 2024)
    run.log_scalar("loss", "train", 3.20242024, 2025)
    run.log_text("seed 2024 chosen")
    zip_path = run.close()
    assert zip_path is not None

    for name, data in read_zip(zip_path).items():
        if name.endswith(".json"):
            json.loads(data)
        elif name.endswith(".jsonl"):
            for line in data.decode().splitlines():
                if line.strip():
                    json.loads(line)  # 1.2024 -> 1.*** broke the import
    task, events = read_session(zip_path)
    params = {k: v["value"] for k, v in task["hyperparams"]["config"].items()}
    assert params["data/token_seed"] == "2024" and params["data/token"] == "sks"
    assert task["name"] == "trial-2024"
    scalars = {e["iter"]: e["value"] for e in events if e["type"] == "training_stats_scalar"}
    assert scalars[2024] == pytest.approx(1.2024)
    assert scalars[2025] == pytest.approx(3.20242024)


# --- 4. python -m harness.tracking import: one failing zip ------------------------------------


@pytest.fixture
def root_filters() -> Iterator[None]:
    """``main()`` adds a RedactingFilter to the root handlers; give them their filters back."""
    root = logging.getLogger()
    before = {h: list(h.filters) for h in root.handlers}
    yield
    for handler, filters in before.items():
        handler.filters[:] = filters


def _sessions(folder: Path, names: list[str]) -> list[Path]:
    """Zips named ``names`` under ``folder/offline``: ``bad*`` ones are not zip files."""
    (folder / "offline").mkdir(parents=True, exist_ok=True)
    paths = []
    for name in names:
        path = folder / "offline" / name
        if name.startswith("bad"):
            path.write_bytes(b"not a zip at all")
        else:
            with zipfile.ZipFile(path, "w") as zf:
                zf.writestr("task.json", json.dumps({"id": name}))
        paths.append(path)
    return paths


def _run_import(
    folder: Path,
    fake_import: Callable[[str], str],
    monkeypatch: pytest.MonkeyPatch,
    api_host: str,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> tuple[int, str]:
    """``harness.tracking import FOLDER`` in process against ``api_host``, ClearML's session
    import replaced by ``fake_import``: (exit status, stderr)."""
    from harness.tracking.__main__ import main
    from harness.tracking.clearml_backend import Task

    monkeypatch.setenv("CLEARML_API_HOST", api_host)
    monkeypatch.setattr(Task, "import_offline_session", fake_import)
    monkeypatch.setattr(Task, "set_offline", lambda offline_mode=False: None)
    with caplog.at_level(logging.INFO, logger="harness.tracking"):
        status = main(["import", str(folder)])
    return status, capsys.readouterr().err


def test_import_cli_reports_a_corrupt_zip_and_imports_the_others(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    api_401: str,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
    root_filters: None,
) -> None:
    from harness.tracking.clearml_backend import Task

    folder = tmp_path / "runs" / "clearml"
    good_a, bad, good_c = _sessions(folder, ["a.zip", "bad-b.zip", "c.zip"])
    real_import = Task.import_offline_session
    tried: list[str] = []

    def fake_import(path: str) -> str:
        tried.append(Path(path).name)
        if Path(path).name.startswith("bad"):
            return real_import(path)  # ClearML itself meets the corrupt zip
        return "task-" + Path(path).stem

    status, err = _run_import(folder, fake_import, monkeypatch, api_401, caplog, capsys)
    assert status == 2
    assert tried == ["a.zip", "bad-b.zip", "c.zip"]
    assert (folder / "offline" / "a.zip.imported").read_text().strip() == "task-a"
    assert (folder / "offline" / "c.zip.imported").read_text().strip() == "task-c"
    assert not (folder / "offline" / "bad-b.zip.imported").exists()
    failures = [r.getMessage() for r in caplog.records if str(bad) in r.getMessage()]
    assert len(failures) == 1 and "\n" not in failures[0] and "BadZipFile" in failures[0]
    assert "Traceback" not in err and "Traceback" not in caplog.text
    assert err.count("error:") == 1 and "1 of 3" in err
    assert good_a.exists() and good_c.exists()


def test_import_cli_stops_at_once_when_the_server_refuses_the_login(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    api_401: str,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
    root_filters: None,
) -> None:
    from clearml.backend_api.session.session import LoginError

    folder = tmp_path / "runs" / "clearml"
    _sessions(folder, ["a.zip", "b.zip", "c.zip"])
    tried: list[str] = []

    def refused(path: str) -> str:
        tried.append(Path(path).name)
        raise LoginError(f"Failed getting token (error 401 from {api_401}): Unauthorized")

    monkeypatch.setenv("CLEARML_API_SECRET_KEY", "clearml-secret-key-do-not-leak-42")
    status, err = _run_import(folder, refused, monkeypatch, api_401, caplog, capsys)
    assert status == 2 and tried == ["a.zip"]
    error_lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1 and "LoginError" in error_lines[0]
    assert "Traceback" not in err
    assert "clearml-secret-key-do-not-leak-42" not in err + caplog.text


def test_import_cli_subprocess_corrupt_zips_one_line_each_exit_2(
    tmp_path: Path, api_401: str
) -> None:
    folder = tmp_path / "runs" / "clearml"
    _sessions(folder, ["bad-a.zip"])
    with zipfile.ZipFile(folder / "offline" / "no-task.zip", "w") as zf:
        zf.writestr("metrics.jsonl", "")  # a zip, but no session inside
    env = {**os.environ, "CLEARML_API_HOST": api_401, "HOME": str(tmp_path / "home")}
    env.pop("CLEARML_OFFLINE_MODE", None)
    proc = subprocess.run(
        [sys.executable, "-m", "harness.tracking", "import", str(folder)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = proc.stderr.splitlines()
    assert sum("bad-a.zip" in line and "not imported" in line for line in lines) == 1
    assert sum("no-task.zip" in line and "not imported" in line for line in lines) == 1
    assert sum(line.startswith("error:") for line in lines) == 1


# --- 5. what ClearML sends online: the console and the uncommitted diff -----------------------

_CONSOLE_SCRIPT = """
import json, sys, zipfile
from pathlib import Path
from clearml import Task
from clearml.backend_interface.task.log import BackgroundLogService
from harness.config import TrackingConfig
from harness.tracking import create_tracker

sent = []  # what ClearML's log service gets: online, this goes to the server as is
real_add = BackgroundLogService.add_to_queue
def spy(self, record):
    sent.append(record.getMessage())
    return real_add(self, record)
BackgroundLogService.add_to_queue = spy

store_diff = Task._store_diff
tracker = create_tracker(TrackingConfig(mode="offline"), Path(sys.argv[1]))
run = tracker.start_run("trial-0", config={"hub": {"api_key": "sk-console-api-key-4242"}}, tags=[])
print("third-party code prints sk-console-api-key-4242 and", sys.argv[2])
__import__("logging").getLogger("x").warning("logged %s", "sk-console-api-key-4242")
zip_path = run.close()
task = json.loads(zipfile.ZipFile(zip_path).read("task.json"))
json.dump({"sent": sent, "script": task.get("script") or {}, "zip": str(zip_path),
           "store_diff_restored": Task._store_diff is store_diff}, open(sys.argv[3], "w"))
"""


@pytest.fixture(scope="module")
def online_bound(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Run a tracked script in a git repository whose params.yaml has an uncommitted token."""
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    base = tmp_path_factory.mktemp("online-bound")
    repo = base / "repo"
    repo.mkdir()
    git = ["git", "-c", "user.email=t@example.com", "-c", "user.name=t"]
    (repo / "params.yaml").write_text("sweep:\n  storage: null\n")
    (repo / "run.py").write_text(textwrap.dedent(_CONSOLE_SCRIPT))
    for args in (["init", "-q"], ["add", "."], ["commit", "-qm", "init"]):
        subprocess.run([*git, *args], cwd=repo, check=True, capture_output=True)
    (repo / "params.yaml").write_text("hub:\n  hub_token: ghp_diffSecret0123456789\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CLEARML_", "TRAINS_"))} | {
        "HOME": str(base / "home"),
        "CLEARML_CACHE_DIR": str(base / "cache"),
        "HF_TOKEN": "hf_EnvTokenValue0123456789",
    }
    out = base / "out.json"
    proc = subprocess.run(
        [sys.executable, "run.py", str(base), "hf_EnvTokenValue0123456789", str(out)],
        cwd=repo,
        capture_output=True,
        text=True,
        env=env,
        timeout=180,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result: dict[str, Any] = json.loads(out.read_text())
    return result


def test_the_uncommitted_git_diff_is_not_stored(
    online_bound: dict[str, Any], read_zip: Any
) -> None:
    assert online_bound["script"].get("diff", "") == ""
    assert online_bound["script"].get("entry_point") == "run.py"  # the repository still is
    blob = b"".join(read_zip(Path(online_bound["zip"])).values())
    assert b"ghp_diffSecret0123456789" not in blob
    assert online_bound["store_diff_restored"]


def test_console_lines_are_masked_before_clearml_reports_them(
    online_bound: dict[str, Any],
) -> None:
    sent = "\n".join(online_bound["sent"])
    assert "third-party code prints *** and ***" in sent  # the console is still captured
    assert "sk-console-api-key-4242" not in sent
    assert "hf_EnvTokenValue0123456789" not in sent
