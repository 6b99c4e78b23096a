"""ClearML implementation of the tracker interface: the only module that imports ``clearml``.

Modes (``tracking.mode``):

* ``auto``: online when a server is configured the standard way (``CLEARML_CONFIG_FILE``,
  ``~/clearml.conf``, ``CLEARML_API_HOST``, ``CLEARML_API_ACCESS_KEY``) and answers, else offline;
* ``online``: like auto, but a missing configuration is a fallback (warning) too;
* ``offline``: session folders and zips under ``<root>/<tracking.offline_dir>/offline/``.

``CLEARML_OFFLINE_MODE=1`` in the environment forces offline. Before ``Task.init`` the API
server gets a bounded HTTP probe (``tracking.connect_timeout_s``); unreachable means a warning and
offline (``tracking.strict: true``: :class:`TrackingError` instead).

Offline runs disable ClearML's reporting subprocess for their lifetime (the class attribute behind
``sdk.development.report_use_subprocess``), so closing takes milliseconds instead of ~10 s; the
user's ``clearml.conf`` is never touched and online runs keep ClearML's defaults, except two that
could send secrets to the server: no run stores the uncommitted git diff
(``sdk.development.store_uncommitted_code_diff``), and captured console lines are masked before
ClearML reports them.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import threading
import time
import zipfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from clearml import Task
from clearml.utilities.pyhocon import ConfigFactory
from clearml.utilities.resource_monitor import ResourceMonitor

from .base import NullRun, Run, RunKind, Tracker, TrackingError, TrackingMode, never_raise
from .secrets import collect_secret_literals, redact_text, scrub_secrets, secret_values
from .server import check_reachable

if TYPE_CHECKING:
    import pandas as pd
    from PIL import Image

    from harness.config import TrackingConfig

__all__ = [
    "ClearMLRun",
    "ClearMLTracker",
    "ServerSettings",
    "SessionImportError",
    "TrackingError",
    "detect_server",
    "enqueue_worker_task",
    "import_offline_sessions",
]

log = logging.getLogger("harness.tracking")

DEFAULT_API_HOST = "https://api.clear.ml"
SESSIONS_INDEX = "sessions.jsonl"
_TEXT_SUFFIXES = {".json", ".jsonl", ".txt", ".yaml", ".yml", ".conf", ".csv", ".log", ".md"}
_TRUE = {"1", "true", "yes", "on", "y"}


_NO_NVIDIA_DRIVER = "NVML Shared Library Not Found"


class _ResourceMonitor(ResourceMonitor):
    """ClearML's machine monitor (CPU, memory, disk, network and GPU scalars), except that on a
    machine without an NVIDIA driver (a CPU run, the demo) it stops polling GPUs at once: ClearML's
    own printed ``WARNING - Could not fetch GPU stats: NVML Shared Library Not Found`` and, three
    samples later, "GPU monitoring failed ..., switching off GPU monitoring" into every run's
    output. ClearML reads AMD GPUs without NVML; on such a machine its query does not fail this
    way, so they are polled as before, as are NVIDIA ones."""

    def _fix_active_gpus(self) -> None:
        # The first thing the monitor's thread does; ClearML's own version logs the failure.
        gpustat = getattr(self, "_gpustat", None)
        if gpustat is not None and _no_nvidia_driver(gpustat):
            self._gpustat = None
            return
        super()._fix_active_gpus()


def _no_nvidia_driver(gpustat: Any) -> bool:
    """Whether ClearML's GPU query fails because NVML, the NVIDIA driver's library, is absent."""
    try:
        gpustat.new_query(per_process_stats=False)
    except Exception as exc:  # pynvml's own error types; only this one message counts
        return _NO_NVIDIA_DRIVER in str(exc)
    return False


# ClearML allows one open main task per process; new runs wait for none but get refused.
_open_lock = threading.Lock()
_open_run: ClearMLRun | None = None


@dataclass(frozen=True)
class ServerSettings:
    """Where ClearML's standard configuration points (``api_host`` is None when unknown)."""

    configured: bool
    api_host: str | None
    source: str


def _env(*names: str) -> str | None:
    for name in names:
        value = os.environ.get(name)
        if value:
            return value
    return None


def detect_server() -> ServerSettings:
    """Find the configured API server the way ClearML does (environment first, then the file).

    ``CLEARML_API_HOST`` > ``api.api_server`` in ``CLEARML_CONFIG_FILE`` (or, when unset,
    ``~/clearml.conf``) > ClearML's default host when only credentials are configured.
    """
    env_host = _env("CLEARML_API_HOST", "TRAINS_API_HOST")
    if env_host:
        return ServerSettings(True, env_host.rstrip("/"), "CLEARML_API_HOST")
    override = _env("CLEARML_CONFIG_FILE", "TRAINS_CONFIG_FILE")
    candidates = (
        [Path(override).expanduser()]
        if override
        else [Path("~/trains.conf").expanduser(), Path("~/clearml.conf").expanduser()]
    )
    for path in reversed(candidates):  # clearml.conf wins over the legacy trains.conf
        if path.is_file():
            try:
                conf = ConfigFactory.parse_file(str(path))
                host = conf.get("api.api_server", None) or conf.get("api.host", None)
            except Exception as exc:
                return ServerSettings(True, None, f"{path} (unreadable: {exc})")
            return ServerSettings(True, str(host or DEFAULT_API_HOST).rstrip("/"), str(path))
    if _env("CLEARML_API_ACCESS_KEY", "TRAINS_API_ACCESS_KEY"):
        return ServerSettings(True, DEFAULT_API_HOST, "CLEARML_API_ACCESS_KEY")
    return ServerSettings(False, None, "")


@contextlib.contextmanager
def _env_set(name: str, value: str | None) -> Iterator[None]:
    old = os.environ.get(name)
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


class ClearMLTracker(Tracker):
    """Creates one ClearML task per run; see the module docstring for how the mode is chosen."""

    def __init__(self, cfg: TrackingConfig, root: Path) -> None:
        self.cfg = cfg
        self.root = Path(root)
        self.offline_root = self.root / cfg.offline_dir
        # Decided (and warned about) once: the configuration does not change while a command
        # runs; only the server's reachability is probed again at each run.
        self._planned = self._planned_mode()
        self._mode = self._planned

    @property
    def mode(self) -> TrackingMode:
        return self._mode

    def preflight(self) -> TrackingMode:
        """Planned mode confirmed by the bounded probe (raises under ``tracking.strict``)."""
        return self._effective_mode()

    def _planned_mode(self) -> TrackingMode:
        """The mode before any reachability check (cheap, no network)."""
        if self.cfg.mode == "offline":
            return TrackingMode("offline", "tracking.mode is 'offline'")
        if (_env("CLEARML_OFFLINE_MODE", "TRAINS_OFFLINE_MODE") or "").lower() in _TRUE:
            return TrackingMode("offline", "CLEARML_OFFLINE_MODE is set in the environment")
        server = detect_server()
        if not server.configured:
            if self.cfg.mode == "online":
                msg = "tracking.mode is 'online' but no ClearML server is configured"
                if self.cfg.strict:
                    raise TrackingError(msg + " (set CLEARML_API_HOST or create ~/clearml.conf)")
                log.warning("%s; recording offline under %s", msg, self.offline_root)
                return TrackingMode("offline", "fallback: " + msg)
            return TrackingMode("offline", "no ClearML server configured (clearml.conf, CLEARML_*)")
        return TrackingMode("online", f"server configured in {server.source}")

    def _effective_mode(self) -> TrackingMode:
        """Planned mode, confirmed by a bounded reachability probe when online."""
        planned = self._planned
        if planned != "online":
            return planned
        server = detect_server()
        if server.api_host is None:
            return self._fallback(f"ClearML configuration {server.source} names no API server")
        reach = check_reachable(server.api_host, self.cfg.connect_timeout_s)
        host = redact_text(server.api_host)
        if reach.ok:
            return TrackingMode("online", f"{host} reachable ({reach.detail}, {server.source})")
        return self._fallback(
            f"ClearML server {host} ({server.source}) unreachable after "
            f"{reach.seconds:.1f} s: {redact_text(reach.detail)}"
        )

    def _fallback(self, why: str) -> TrackingMode:
        if self.cfg.strict:
            raise TrackingError(f"{why} (tracking.strict is true)")
        log.warning("%s; falling back to offline tracking under %s", why, self.offline_root)
        return TrackingMode("offline", "fallback: " + why)

    def start_run(
        self,
        name: str,
        *,
        config: Mapping[str, Any],
        tags: Sequence[str] = (),
        kind: RunKind = "train",
        project: str | None = None,
    ) -> Run:
        global _open_run
        name = redact_text(name, collect_secret_literals(config))
        tags = [redact_text(t) for t in tags]
        with _open_lock:
            if _open_run is not None and not _open_run.closed:
                log.warning(
                    "tracking: run %r not tracked: ClearML run %r is still open in this process "
                    "(close it first)",
                    name,
                    _open_run.name,
                )
                return NullRun("another ClearML run is open in this process")
            mode = self._effective_mode()
            try:
                run = self._start(name, config, tags, kind, project or self.cfg.project, mode)
            except TrackingError:
                raise
            except Exception as exc:
                if mode == "online":
                    mode = self._fallback(
                        f"Task.init failed online ({type(exc).__name__}: {redact_text(str(exc))})"
                    )
                    try:
                        run = self._start(
                            name, config, tags, kind, project or self.cfg.project, mode
                        )
                    except Exception as exc2:
                        exc = exc2
                    else:
                        _open_run = run
                        return run
                log.warning(
                    "tracking: could not start ClearML run %r (%s: %s); not tracked",
                    name,
                    type(exc).__name__,
                    redact_text(str(exc)),
                )
                return NullRun(f"ClearML failed to start: {type(exc).__name__}")
            _open_run = run
            return run

    def _start(
        self,
        name: str,
        config: Mapping[str, Any],
        tags: Sequence[str],
        kind: RunKind,
        project: str,
        mode: TrackingMode,
    ) -> ClearMLRun:
        """Open the ClearML task of one run in ``mode``; raises (``start_run`` falls back)."""
        started = time.monotonic()
        offline = mode == "offline"
        restore = _OfflineSwitch(offline)
        restore.enter()
        try:
            task, folder = self._init_task(name, tags, kind, project, offline)
        except BaseException:
            restore.exit()
            raise
        secrets = collect_secret_literals(config)
        _mask_console(task, secrets)
        _connect_config(task, scrub_secrets(config))
        run = ClearMLRun(
            task=task,
            mode=mode,
            name=name,
            project=project,
            kind=kind,
            tags=list(tags),
            secrets=secrets,
            offline_folder=Path(folder) if folder is not None else None,
            index_file=self.offline_root / SESSIONS_INDEX if offline else None,
            restore=restore,
        )
        log.info(
            "tracking: %s run %r (task %s) started in %.2f s; mode %s",
            kind,
            name,
            task.id,
            time.monotonic() - started,
            mode.describe(),
        )
        return run

    def _init_task(
        self, name: str, tags: Sequence[str], kind: RunKind, project: str, offline: bool
    ) -> tuple[Task, Path | None]:
        """``Task.init`` with redacted names, and the task's offline folder (``None`` online)."""
        if offline:
            self.offline_root.mkdir(parents=True, exist_ok=True)
        _forget_parent_task()
        # ClearML resolves the offline folder from its cache dir once, inside Task.init.
        cache_dir = str(self.offline_root.resolve()) if offline else None
        with _env_set("CLEARML_CACHE_DIR", cache_dir) if offline else contextlib.nullcontext():
            task: Task = Task.init(
                project_name=redact_text(project),
                task_name=redact_text(name),
                task_type=(Task.TaskTypes.training if kind == "train" else Task.TaskTypes.custom),
                tags=[redact_text(t) for t in tags] + ([] if kind == "train" else ["summary"]),
                reuse_last_task_id=False,
                continue_last_task=False,
                auto_connect_arg_parser=False,  # argv may hold secrets; config is connected
                auto_connect_frameworks=False,  # no automatic checkpoint uploads
                auto_resource_monitoring=_ResourceMonitor,  # device memory and use
                auto_connect_streams=True,
            )
            folder = task.get_offline_mode_folder() if offline else None  # pins the folder
        return task, folder


# ClearML marks a process that ran a task with <pid>:<task id> here; its children inherit it.
_MASTER_ID_VARS = ("CLEARML_PROC_MASTER_ID", "TRAINS_PROC_MASTER_ID")


def _forget_parent_task() -> None:
    """Drop a ClearML master-process mark inherited from another process.

    A process started by one that ran a ClearML task (a notebook or script with a task that
    runs `dvc repro` or `harness sweep`) inherits ``CLEARML_PROC_MASTER_ID``, and ``Task.init``
    then treats it as that task's subprocess: it attached to the parent's task (every run logged
    into it) or, with no task id in the mark, returned a stub, and the run went untracked. A
    harness run is a task of its own. This process's own mark stays (ClearML's exit hook reads
    it). A clearml-agent's task is found by ``CLEARML_TASK_ID``, which this leaves alone.
    """
    mine = str(os.getpid())
    for name in _MASTER_ID_VARS:
        value = os.environ.get(name)
        if value and value.partition(":")[0] != mine:
            log.debug("tracking: ignoring %s=%s of a parent process", name, value)
            del os.environ[name]


def _connect_config(task: Task, clean: Mapping[str, Any]) -> None:
    """Attach the (already scrubbed) configuration as the task's hyperparameters; a failure
    only warns (tracking never breaks a run)."""
    try:
        task.connect(clean, name="config")
    except Exception as exc:
        log.warning(
            "tracking: connecting the configuration failed (%s: %s)", type(exc).__name__, exc
        )


# Task class attributes one run overrides (restored at close). The first two are what
# sdk.development.store_uncommitted_code_diff / store_code_diff_from_remote set: ClearML would
# store the uncommitted git diff (an edited params.yaml can hold a storage URL or a token) in the
# task, sent to the server unmasked; the repository, branch and commit are still recorded.
# The third is sdk.development.vcs_repo_detect_async: ClearML detects the repository in a thread
# that then reloads the task under its edit lock, racing the summary run's first artifact upload;
# once, under `dvc repro`, both waited on that lock forever. Detected inside Task.init instead.
_ALWAYS_OVERRIDDEN: dict[str, Any] = {
    "_store_diff": False,
    "_store_remote_diff": False,
    "_Task__detect_repo_async": False,
}
# sdk.development.report_use_subprocess: with the subprocess, close() of an offline task waits
# ~10 s for it; threads flush in milliseconds.
_OFFLINE_OVERRIDDEN: dict[str, Any] = {"_report_subprocess_enabled": False}


class _OfflineSwitch:
    """Process state one run changes, given back when it closes: ClearML's offline mode, the
    Task class attributes above, and the console streams.

    ``Task.init`` wraps ``sys.stdout``/``sys.stderr`` to capture the console and leaves the
    wrappers in place after ``close()``; writes through click (``typer.echo``) to such a wrapper
    are lost when the stream is not a terminal (``harness sweep > out``, every ``dvc repro``).
    """

    def __init__(self, offline: bool) -> None:
        self.offline = offline
        self._env_before: str | None = None
        # attribute name -> (set on Task itself before?, its value then)
        self._attrs_before: dict[str, tuple[bool, Any]] = {}
        self._streams: tuple[Any, Any] = (sys.stdout, sys.stderr)
        self._active = False

    def enter(self) -> None:
        self._streams = (sys.stdout, sys.stderr)
        self._env_before = os.environ.get("CLEARML_OFFLINE_MODE")
        overrides = {**_ALWAYS_OVERRIDDEN, **(_OFFLINE_OVERRIDDEN if self.offline else {})}
        own = vars(Task)
        self._attrs_before = {name: (name in own, own.get(name)) for name in overrides}
        Task.set_offline(self.offline)
        for name, value in overrides.items():
            setattr(Task, name, value)
        self._active = True

    def exit(self) -> None:
        if not self._active:
            return
        self._active = False
        sys.stdout, sys.stderr = self._streams
        for name, (had, before) in self._attrs_before.items():
            if had:
                setattr(Task, name, before)
            elif name in vars(Task):
                delattr(Task, name)
        # Task.set_offline() wrote CLEARML_OFFLINE_MODE; give the user's value back so the next
        # run's "auto" decision is not polluted by ours. (Task.init's CLEARML_PROC_MASTER_ID
        # stays: ClearML's exit hook reads it, and without it exits without flushing stdout.)
        if self._env_before is None:
            os.environ.pop("CLEARML_OFFLINE_MODE", None)
        else:
            os.environ["CLEARML_OFFLINE_MODE"] = self._env_before


def _mask_console(task: Task, secrets: set[str]) -> None:
    """Mask secrets in every console line ClearML reports for ``task``, before it is reported.

    ClearML's stdout/stderr capture and its ``report_text`` both end in the task logger's
    private ``_console``; online, what it gets goes to the server as is (offline sessions are
    masked again at close). The terminal itself still shows the original text. A ClearML
    without ``_console`` gets no wrapper (logged at debug level).
    """
    try:  # a private API: a failure here must not stop the run
        logger = task.get_logger()
        console = getattr(logger, "_console", None)
        if not callable(console):
            log.debug("tracking: ClearML's logger has no _console; console lines are not masked")
            return

        def redacting_console(msg: Any, *args: Any, **kwargs: Any) -> Any:
            return console(redact_text(str(msg), secrets), *args, **kwargs)

        setattr(logger, "_console", redacting_console)  # noqa: B010
    except Exception as exc:
        log.debug("tracking: masking ClearML's console failed: %s", exc)


class ClearMLRun(Run):
    """One ClearML task. Reporting goes through ClearML's asynchronous reporter and never raises."""

    def __init__(
        self,
        *,
        task: Task,
        mode: TrackingMode,
        name: str,
        project: str,
        kind: RunKind,
        tags: list[str],
        secrets: set[str],
        offline_folder: Path | None,
        index_file: Path | None,
        restore: _OfflineSwitch,
    ) -> None:
        self._task = task
        self._logger = task.get_logger()
        self._mode = mode
        self.name = name
        self.project = project
        self.kind = kind
        self.tags = tags
        self._secrets = secrets
        self._offline_folder = offline_folder
        self._index_file = index_file
        self._restore = restore
        self._zip: Path | None = None
        self.closed = False

    @property
    def mode(self) -> TrackingMode:
        return self._mode

    @property
    def id(self) -> str | None:
        return str(self._task.id)

    @property
    def offline_zip(self) -> Path | None:
        return self._zip

    @property
    def offline_folder(self) -> Path | None:
        """The live offline session folder (``None`` online)."""
        return self._offline_folder

    @never_raise
    def log_scalar(self, title: str, series: str, value: float, step: int) -> None:
        self._logger.report_scalar(title, series, float(value), int(step))

    @never_raise
    def log_image(
        self, title: str, series: str, image: Image.Image | Path | str, step: int
    ) -> None:
        if isinstance(image, str | Path):
            self._logger.report_image(title, series, iteration=int(step), local_path=str(image))
        else:
            self._logger.report_image(title, series, iteration=int(step), image=image)

    @never_raise
    def log_table(self, title: str, series: str, df: pd.DataFrame, step: int = 0) -> None:
        # ClearML fills empty cells with the string "nan", which pandas 3 deprecates for a
        # float column (pandas 4 raises, and the table would be lost); as objects the cells
        # read the same. A copy: the caller's frame keeps its dtypes.
        table = df.astype(object)
        self._logger.report_table(title, series, iteration=int(step), table_plot=table)

    @never_raise
    def log_plotly(self, title: str, series: str, fig: Any, step: int = 0) -> None:
        self._logger.report_plotly(title, series, figure=fig, iteration=int(step))

    @never_raise
    def upload_artifact(self, name: str, path: Path | str | pd.DataFrame) -> None:
        obj: Any = Path(path) if isinstance(path, str) else path
        self._task.upload_artifact(name, artifact_object=obj, wait_on_upload=False)

    @never_raise
    def log_text(self, text: str) -> None:
        self._logger.report_text(redact_text(text, self._secrets))

    def close(self) -> Path | None:
        """Close the task (milliseconds offline); offline, scrub and return the session zip."""
        global _open_run
        if self.closed:
            return self._zip
        self.closed = True
        started = time.monotonic()
        service = _report_service(self._task)
        try:
            self._task.close()
        except Exception as exc:
            log.warning("tracking: closing ClearML task failed (%s: %s)", type(exc).__name__, exc)
        finally:
            self._restore.exit()
            with _open_lock:
                if _open_run is self:
                    _open_run = None
        _drain(service)
        if self._offline_folder is not None:
            self._zip = self._finish_offline(self._offline_folder)
        log.info(
            "tracking: run %r closed in %.2f s%s",
            self.name,
            time.monotonic() - started,
            f"; offline session {self._zip}" if self._zip else "",
        )
        return self._zip

    def _finish_offline(self, folder: Path) -> Path | None:
        """Mask secrets in the session's text files, (re)write the zip, append to the index."""
        zip_path = folder.with_name(folder.name + ".zip")
        try:
            literals = self._secrets | secret_values()
            for file in folder.rglob("*"):
                if file.is_file() and file.suffix in _TEXT_SUFFIXES:
                    text = file.read_text(encoding="utf-8", errors="surrogateescape")
                    clean = _redact_json_text(text, literals)
                    if clean != text:
                        file.write_text(clean, encoding="utf-8", errors="surrogateescape")
            tmp = zip_path.with_name(zip_path.name + ".tmp")
            with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED, allowZip64=True) as zf:
                for file in sorted(folder.rglob("*")):
                    if file.is_file():
                        zf.write(file, arcname=file.relative_to(folder).as_posix())
            tmp.replace(zip_path)
            if self._index_file is not None:
                entry = {
                    "name": redact_text(self.name),
                    "project": redact_text(self.project),
                    "kind": self.kind,
                    "task_id": self.id,
                    "zip": str(zip_path),
                    "tags": [redact_text(t) for t in self.tags],
                    "mode": self._mode.describe(),
                    "closed_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                }
                with self._index_file.open("a", encoding="utf-8") as fh:
                    fh.write(json.dumps(entry) + "\n")
        except Exception as exc:
            log.warning("tracking: finishing offline session %s failed: %s", folder, exc)
            return zip_path if zip_path.is_file() else None
        return zip_path


def _report_service(task: Task) -> Any:
    """ClearML's background reporter of ``task`` (private; None when it has none)."""
    reporter = getattr(task, "_reporter", None)
    return getattr(reporter, "_report_service", None)


def _drain(service: Any, timeout_s: float = 30.0) -> None:
    """Wait until the reporter thread has written its last events.

    ``Task.close()`` normally stops it; in a process that already closed other tasks it can
    return with the thread still holding events (seen in a long test session: the offline
    zip then lacked ``metrics.jsonl``, written a moment later). Stopping the thread makes it
    write what it holds synchronously; the zip is written after this.
    """
    thread = getattr(service, "_thread", None)
    if not isinstance(thread, threading.Thread) or not thread.is_alive():
        return
    try:
        service._event.set()
        service._flush_event.set()
        thread.join(timeout_s)
        log.debug("tracking: drained ClearML's reporter thread after close")
    except Exception as exc:  # tracking never breaks a run
        log.debug("tracking: draining ClearML's reporter failed: %s", exc)


def _redact_json_text(text: str, literals: set[str]) -> str:
    """Mask secrets in a text file that may hold JSON (literals appear JSON-escaped there)."""
    escaped = {json.dumps(s)[1:-1] for s in literals}
    return redact_text(text, literals | escaped)


def _require_server() -> None:
    """Go online, or raise :class:`TrackingError` when no reachable server is configured."""
    server = detect_server()
    if not server.configured or not server.api_host:
        raise TrackingError("no ClearML server configured (clearml.conf or CLEARML_API_HOST)")
    reach = check_reachable(server.api_host, 10.0)
    if not reach.ok:
        raise TrackingError(
            f"ClearML server {redact_text(server.api_host)} unreachable: {redact_text(reach.detail)}"
        )
    Task.set_offline(False)


class SessionImportError(TrackingError):
    """Some offline session zips could not be imported (each was logged on one line); the others
    were. ``imported`` maps each imported zip to its new task id, ``failed`` to the reason."""

    def __init__(self, imported: dict[Path, str], failed: dict[Path, str]) -> None:
        self.imported = imported
        self.failed = failed
        tried = len(imported) + len(failed)
        super().__init__(
            f"{len(failed)} of {tried} offline session zip(s) not imported "
            f"({len(imported)} imported); see the lines above"
        )


def _one_line(exc: BaseException) -> str:
    """``Type: message`` of an exception on one line, secrets masked (it is printed)."""
    return f"{type(exc).__name__}: {redact_text(' '.join(str(exc).split()))}"


def _fails_every_import(exc: BaseException) -> bool:
    """Whether every further zip would fail the same way: the server refused our credentials, or
    could not be reached, or ClearML has no usable configuration."""
    import requests
    from clearml.backend_api.session.defs import MissingConfigError
    from clearml.backend_api.session.session import LoginError

    fatal = (LoginError, MissingConfigError, requests.ConnectionError, requests.Timeout)
    return isinstance(exc, fatal)


def import_offline_sessions(folder: str | Path, *, force: bool = False) -> dict[Path, str]:
    """Upload every offline session zip under ``folder`` to the configured ClearML server.

    Each imported zip gets a ``<zip>.imported`` marker holding the new task id, so running this
    again skips it (``force=True`` re-imports). Returns ``{zip: task_id}`` of this call.
    Needs a configured, reachable server (``clearml.conf`` or ``CLEARML_*`` variables).

    A zip that fails (corrupt, not a session) is logged on one line and the next one is tried.

    Raises:
        TrackingError: no reachable server, or a failure every zip would meet (login refused,
            connection lost): raised at once, naming the zip.
        SessionImportError: after trying every zip, when some of them failed.
    """
    _require_server()
    imported: dict[Path, str] = {}
    failed: dict[Path, str] = {}
    for zip_path in sorted(Path(folder).rglob("*.zip")):
        marker = zip_path.with_name(zip_path.name + ".imported")
        if marker.exists() and not force:
            log.info("tracking: %s already imported (%s)", zip_path, marker.read_text().strip())
            continue
        try:
            task_id = Task.import_offline_session(str(zip_path))
        except Exception as exc:
            if _fails_every_import(exc):
                raise TrackingError(
                    f"importing {zip_path} failed ({_one_line(exc)}); stopped, as every other "
                    f"zip would fail the same way ({len(imported)} imported before)"
                ) from None
            failed[zip_path] = _one_line(exc)
            log.error("tracking: %s not imported: %s", zip_path, failed[zip_path])
            continue
        if not task_id:
            failed[zip_path] = "ClearML returned no task id"
            log.error("tracking: %s not imported: %s", zip_path, failed[zip_path])
            continue
        marker.write_text(task_id + "\n", encoding="utf-8")
        imported[zip_path] = task_id
        log.info("tracking: imported %s as task %s", zip_path, task_id)
    if failed:
        raise SessionImportError(imported, failed)
    return imported


def enqueue_worker_task(spec: Mapping[str, Any]) -> str:
    """``Task.create`` a sweep worker from ``spec`` (see harness.sweep.launch) and enqueue it on
    ``spec["queue"]`` for ``clearml-agent``. Needs a configured, reachable server; untested
    here (no ClearML server can run in CI), the definition itself is tested offline.
    """
    _require_server()
    task: Task = Task.create(
        project_name=spec["project_name"],
        task_name=spec["task_name"],
        task_type=spec["task_type"],
        add_task_init_call=False,
        detect_repository=False,
    )
    # clearml-agent runs a task without a repository by writing its diff to a file named
    # after the entry point, in a scratch folder, and running it with the binary.
    task.set_script(
        repository="",
        branch="",
        commit="",
        diff=spec["script"],
        working_dir=".",
        entry_point=spec["entry_point"],
        binary="/bin/bash",
    )
    task.set_tags(list(spec["tags"]))
    Task.enqueue(task, queue_name=spec["queue"])
    return str(task.id)
