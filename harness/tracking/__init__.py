"""Experiment tracking that never blocks a run: ClearML online when configured, offline by default.

Everything in the harness speaks to the small :class:`Tracker` / :class:`Run` interface;
``clearml`` itself is imported by :mod:`harness.tracking.clearml_backend` only, and only when a
tracker other than ``off`` is created.

Example:
    >>> from pathlib import Path
    >>> from harness.config import TrackingConfig
    >>> tracker = create_tracker(TrackingConfig(mode="off"), Path("."))
    >>> with tracker.start_run("trial-0", config={"train": {"rank": 4}}, tags=[]) as run:
    ...     run.log_scalar("loss", "train", 0.5, step=1)
    >>> run.mode, run.mode.reason
    ('off', "tracking.mode is 'off'")
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .base import NullRun, NullTracker, Run, RunKind, Tracker, TrackingError, TrackingMode
from .secrets import (
    RedactingFilter,
    install_log_redaction,
    is_secret_key,
    redact_text,
    scrub_secrets,
)
from .server import Reachability, check_reachable

if TYPE_CHECKING:
    from harness.config import TrackingConfig

__all__ = [
    "NullRun",
    "NullTracker",
    "Reachability",
    "RedactingFilter",
    "Run",
    "RunKind",
    "Tracker",
    "TrackingError",
    "TrackingMode",
    "check_reachable",
    "create_tracker",
    "default_tags",
    "enqueue_worker_task",
    "import_offline_sessions",
    "install_log_redaction",
    "is_secret_key",
    "redact_text",
    "scrub_secrets",
]

log = logging.getLogger("harness.tracking")


def create_tracker(cfg: TrackingConfig, root: Path) -> Tracker:
    """The tracker for ``cfg.mode``; offline sessions go under ``root / cfg.offline_dir``.

    Cheap and offline (no network): the reachability probe runs in ``start_run``.

    Raises:
        TrackingError: only with ``cfg.strict`` when ``cfg.mode == "online"`` and no server is
            configured (an unreachable server is reported by ``start_run``).
    """
    if cfg.mode == "off":
        return NullTracker()
    from .clearml_backend import ClearMLTracker

    tracker = ClearMLTracker(cfg, Path(root))
    log.info("tracking: %s", tracker.mode.describe())
    return tracker


def default_tags(config: Mapping[str, Any]) -> list[str]:
    """``["subject:<s>", "preset:<p>", "model:<m>"]`` from a resolved config dict."""
    data = config.get("data") or {}
    model = config.get("model") or {}
    pairs = [
        ("subject", data.get("subject")),
        ("preset", config.get("preset")),
        ("model", model.get("pretrained")),
    ]
    return [f"{key}:{redact_text(str(value))}" for key, value in pairs if value]


def import_offline_sessions(folder: str | Path, *, force: bool = False) -> dict[Path, str]:
    """Upload the offline session zips under ``folder`` to the configured ClearML server.

    See :func:`harness.tracking.clearml_backend.import_offline_sessions` (a zip that fails is
    logged and skipped; :class:`TrackingError` at the end when any failed).
    """
    from .clearml_backend import import_offline_sessions as _import

    return _import(folder, force=force)


def enqueue_worker_task(spec: Mapping[str, Any]) -> str:
    """Create a ClearML task from a worker definition and enqueue it; returns its id.

    See :func:`harness.tracking.clearml_backend.enqueue_worker_task`.
    """
    from .clearml_backend import enqueue_worker_task as _enqueue

    return _enqueue(spec)
