"""The small tracker interface the trainer and the sweep speak to, and its no-op implementation.

Nothing here imports ``clearml``; the ClearML implementation lives in
:mod:`harness.tracking.clearml_backend` only.
"""

from __future__ import annotations

import abc
import functools
import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal, ParamSpec, TypeVar

from harness.errors import HarnessError

if TYPE_CHECKING:
    import pandas as pd
    from PIL import Image

__all__ = ["NullRun", "NullTracker", "Run", "RunKind", "Tracker", "TrackingError", "TrackingMode"]

log = logging.getLogger("harness.tracking")

RunKind = Literal["train", "summary"]
ModeName = Literal["online", "offline", "off"]

P = ParamSpec("P")
R = TypeVar("R")


class TrackingError(HarnessError, RuntimeError):
    """Tracking cannot run as configured (``tracking.strict: true``, or an import without a
    reachable server); a user error, printed as one line by the command lines."""


class TrackingMode(str):
    """The effective tracking mode, a plain string (``"online"``, ``"offline"``, ``"off"``) that
    also carries ``reason``: why this mode was chosen, e.g. why a fallback happened.

    Example:
        >>> mode = TrackingMode("offline", "no ClearML server configured")
        >>> mode == "offline", mode.reason
        (True, 'no ClearML server configured')
    """

    reason: str

    def __new__(cls, value: ModeName, reason: str = "") -> TrackingMode:
        if value not in ("online", "offline", "off"):
            raise ValueError(f"unknown tracking mode {value!r}")
        obj = super().__new__(cls, value)
        obj.reason = reason
        return obj

    @property
    def is_fallback(self) -> bool:
        """True when the mode is not the one configured (e.g. unreachable server -> offline)."""
        return self.reason.startswith("fallback")

    def describe(self) -> str:
        """``"offline (no ClearML server configured)"``."""
        return f"{self} ({self.reason})" if self.reason else str(self)


def never_raise(func: Callable[P, R]) -> Callable[P, R | None]:
    """Tracking must never break training: log a warning (once per method) instead of raising."""
    warned: set[str] = set()

    @functools.wraps(func)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R | None:
        try:
            return func(*args, **kwargs)
        except Exception as exc:
            if func.__qualname__ not in warned:
                warned.add(func.__qualname__)
                log.warning(
                    "tracking: %s failed (%s: %s); training goes on, further failures of this "
                    "call are logged at debug level",
                    func.__qualname__,
                    type(exc).__name__,
                    exc,
                )
            else:
                log.debug("tracking: %s failed again", func.__qualname__, exc_info=True)
            return None

    return wrapper


class Run(abc.ABC):
    """One tracked run (a ClearML task). All reporting calls are cheap and never raise.

    Use as a context manager, or call :meth:`close` when done::

        with tracker.start_run("trial-3", config=cfg.to_dict(), tags=["subject:dog"]) as run:
            run.log_scalar("loss", "train", 0.12, step=10)
    """

    @property
    @abc.abstractmethod
    def mode(self) -> TrackingMode:
        """Effective mode of this run; ``run.mode.reason`` says why (e.g. a fallback)."""

    @property
    def offline_zip(self) -> Path | None:
        """The offline session zip (only after :meth:`close`, only in offline mode)."""
        return None

    @property
    def id(self) -> str | None:
        """Tracker-side id of the run (ClearML task id), if any."""
        return None

    @abc.abstractmethod
    def log_scalar(self, title: str, series: str, value: float, step: int) -> None:
        """One point of the scalar plot ``title``, line ``series``."""

    def log_scalars(self, values: Mapping[str, Any], step: int, *, title: str = "train") -> None:
        """Several scalars at once: ``{"loss": 0.1, "lr/unet": 1e-4}``; a key ``"a/b"`` goes to
        plot ``a`` series ``b``, any other key to plot ``title`` series ``key``. Values that are
        not numbers (``None``, booleans, strings of a log record) are skipped."""
        for key, value in values.items():
            if isinstance(value, bool) or not isinstance(value, int | float):
                continue
            plot, _, series = key.rpartition("/")
            self.log_scalar(plot or title, series, value, step)

    @abc.abstractmethod
    def log_image(
        self, title: str, series: str, image: Image.Image | Path | str, step: int
    ) -> None:
        """A debug image (e.g. the sample grid of one prompt at one checkpoint)."""

    @abc.abstractmethod
    def log_table(self, title: str, series: str, df: pd.DataFrame, step: int = 0) -> None:
        """A table (e.g. per-prompt scores)."""

    @abc.abstractmethod
    def log_plotly(self, title: str, series: str, fig: Any, step: int = 0) -> None:
        """A plotly figure (``plotly.graph_objects.Figure`` or its dict)."""

    @abc.abstractmethod
    def upload_artifact(self, name: str, path: Path | str | pd.DataFrame) -> None:
        """Attach a file or folder (adapter safetensors, results table) or a DataFrame."""

    def log_text(self, text: str) -> None:  # noqa: B027 - optional, a no-op by default
        """A line in the run's console log (secrets are masked)."""

    @abc.abstractmethod
    def close(self) -> Path | None:
        """Finish the run; returns the offline session zip when offline. Idempotent."""

    def __enter__(self) -> Run:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class Tracker(abc.ABC):
    """Creates runs. Obtain one with :func:`harness.tracking.create_tracker`."""

    @property
    @abc.abstractmethod
    def mode(self) -> TrackingMode:
        """The mode new runs will (try to) use."""

    @abc.abstractmethod
    def start_run(
        self,
        name: str,
        *,
        config: Mapping[str, Any],
        tags: Sequence[str] = (),
        kind: RunKind = "train",
        project: str | None = None,
    ) -> Run:
        """Start a run: ``config`` (the resolved config) is scrubbed of secrets and connected as
        hyperparameters; ``project`` defaults to the configured one (name it after the sweep)."""

    def preflight(self) -> TrackingMode:
        """The mode runs would get now, checked within the configured timeout.

        Call it once before long work: with ``tracking.strict`` an unusable server raises
        ``TrackingError`` here, before any model loads, instead of after training.
        """
        return self.mode


class NullRun(Run):
    """Accepts everything, records nothing."""

    def __init__(self, reason: str = "tracking disabled") -> None:
        self._mode = TrackingMode("off", reason)

    @property
    def mode(self) -> TrackingMode:
        return self._mode

    def log_scalar(self, title: str, series: str, value: float, step: int) -> None:
        pass

    def log_image(
        self, title: str, series: str, image: Image.Image | Path | str, step: int
    ) -> None:
        pass

    def log_table(self, title: str, series: str, df: pd.DataFrame, step: int = 0) -> None:
        pass

    def log_plotly(self, title: str, series: str, fig: Any, step: int = 0) -> None:
        pass

    def upload_artifact(self, name: str, path: Path | str | pd.DataFrame) -> None:
        pass

    def close(self) -> Path | None:
        return None


class NullTracker(Tracker):
    """``tracking.mode: off``."""

    def __init__(self, reason: str = "tracking.mode is 'off'") -> None:
        self._mode = TrackingMode("off", reason)

    @property
    def mode(self) -> TrackingMode:
        return self._mode

    def start_run(
        self,
        name: str,
        *,
        config: Mapping[str, Any],
        tags: Sequence[str] = (),
        kind: RunKind = "train",
        project: str | None = None,
    ) -> Run:
        return NullRun(self._mode.reason)
