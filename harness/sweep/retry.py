"""Retries of a storage that is briefly unreachable (a database restart, a network blip).

Every call a worker makes to the study's database is retried with exponential backoff while
the failure is a lost connection (SQLAlchemy's ``OperationalError``/``InterfaceError``, or a
disconnect), for at most ``sweep.storage_retry_s`` seconds; then it is a :class:`SweepError`
that names the storage (password masked) and says that nothing finished is lost: every
finished run and point is already in the database, the run folders and the results table.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from optuna.storages import RDBStorage
from sqlalchemy.exc import (
    DBAPIError,
    DisconnectionError,
    IntegrityError,
    InterfaceError,
    OperationalError,
    ProgrammingError,
)

from harness.errors import HarnessError

__all__ = [
    "RetryingRDBStorage",
    "StorageUnreachable",
    "is_transient",
    "retry_schema_race",
    "retry_transient",
    "unreachable_in",
]

logger = logging.getLogger(__name__)
_MAX_DELAY_S = 15.0
T = TypeVar("T")


def retry_schema_race(create: Callable[[], T], attempts: int = 6) -> T:
    """``create()`` (something that creates tables in a new database), again when it lost a
    race with another process creating the same tables: workers started together on a fresh
    study all do it (Optuna's schema-version row, PostgreSQL's type names, SQLite's lock). The
    retry finds the tables the winner made."""
    for attempt in range(attempts):
        try:
            return create()
        except (IntegrityError, ProgrammingError, OperationalError) as exc:
            if attempt == attempts - 1 or not _is_schema_race(exc):
                raise
            time.sleep(0.1 * (attempt + 1))
    raise AssertionError("unreachable")


_RACE_WORDS = ("already exists", "duplicate", "unique constraint", "locked")


def _is_schema_race(exc: BaseException) -> bool:
    """Another process created the same table, type or row first (or holds SQLite's lock);
    not a wrong password, a missing database or a host that does not answer."""
    if isinstance(exc, IntegrityError):
        return True
    return any(word in str(exc).lower() for word in _RACE_WORDS)


class StorageUnreachable(HarnessError):
    """The sweep's storage stayed unreachable for longer than ``sweep.storage_retry_s``."""


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and its causes (or, without one, the exception it was raised while handling)."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def is_transient(exc: BaseException) -> bool:
    """A lost or refused connection anywhere in the exception's cause chain."""
    return any(
        isinstance(e, OperationalError | InterfaceError | DisconnectionError)
        or (isinstance(e, DBAPIError) and e.connection_invalidated)
        for e in _chain(exc)
    )


def unreachable_in(exc: BaseException) -> StorageUnreachable | None:
    """The :class:`StorageUnreachable` in ``exc``'s cause chain, if any (Optuna, failing to
    record a trial on a database that is down, raises errors of its own over it)."""
    return next((e for e in _chain(exc) if isinstance(e, StorageUnreachable)), None)


def _first_line(exc: BaseException) -> str:
    cause: BaseException = exc
    while cause.__cause__ is not None:
        cause = cause.__cause__
    text = str(getattr(cause, "orig", None) or cause).strip().splitlines()
    return text[0] if text else type(cause).__name__


# When the last retry window ended without a connection (None: the last call got through).
# The calls that follow a give-up (Optuna recording the stopped trial, the worker's cleanup)
# fail at once instead of each waiting a window of their own.
_gave_up_at: float | None = None


def retry_transient(call: Callable[[], Any], retry_s: float, what: str = "sweep.storage") -> Any:
    """``call()``, retried on transient failures for up to ``retry_s`` seconds (not at all
    within ``retry_s`` of the last time the retries gave up)."""
    global _gave_up_at
    from harness.tracking import redact_text

    delay, deadline = 0.5, time.monotonic() + retry_s
    if _gave_up_at is not None and time.monotonic() - _gave_up_at < retry_s:
        deadline = time.monotonic()
    while True:
        try:
            result = call()
            _gave_up_at = None
            return result
        except Exception as exc:
            if not is_transient(exc):
                raise
            reason = redact_text(_first_line(exc))
            if time.monotonic() + delay > deadline:
                _gave_up_at = time.monotonic()
                raise StorageUnreachable(
                    f"{what}: unreachable for {retry_s:.0f} s ({reason}); every finished run and "
                    "point is stored: run `harness sweep` again once the database is back"
                ) from None
            logger.warning("%s: %s; retrying in %.1f s", what, reason, delay)
            time.sleep(delay)
            delay = min(delay * 2, _MAX_DELAY_S)


def _retrying(name: str) -> Callable[..., Any]:
    """``RDBStorage.<name>`` through :func:`retry_transient` (looked up per call)."""

    def wrapper(self: RetryingRDBStorage, *args: Any, **kwargs: Any) -> Any:
        method = getattr(super(RetryingRDBStorage, self), name)
        return retry_transient(lambda: method(*args, **kwargs), self.retry_s)

    wrapper.__name__ = wrapper.__qualname__ = name
    wrapper.__doc__ = getattr(RDBStorage, name).__doc__
    return wrapper


class RetryingRDBStorage(RDBStorage):
    """Optuna's RDB storage whose calls survive a briefly unreachable database.

    Opening it is not retried: a storage that is wrong from the start fails at once with the
    one-line error of :func:`harness.sweep.study.open_studies`.
    """

    retry_s: float = 120.0


_NOT_WRAPPED = {"get_heartbeat_interval", "get_failed_trial_callback", "remove_session"}
# The private methods other parts of Optuna call on the RDB storage itself, bypassing its
# public ones: its cached storage (every study a worker opens is wrapped in one) adds trials,
# sets parameters and reads trials through these, and its heartbeat reads stale trials.
_PRIVATE_CALLED_FROM_OUTSIDE = {
    "_create_new_trial",
    "_set_trial_param",
    "_get_best_trial_id",
    "_get_trials",
    "_get_stale_trial_ids",
}
for _name, _member in list(vars(RDBStorage).items()):
    if (
        callable(_member)
        and not isinstance(_member, staticmethod | classmethod)
        and not _name.startswith("__")
        and _name not in _NOT_WRAPPED
        and (not _name.startswith("_") or _name in _PRIVATE_CALLED_FROM_OUTSIDE)
    ):
        setattr(RetryingRDBStorage, _name, _retrying(_name))
