"""A worker's connections to a database server: pooled while it talks, closed while it trains.

A worker talks to the study's database in bursts (sampling a run, claiming it, recording a
point: many statements milliseconds apart), then trains or generates for minutes or hours with
only a heartbeat now and then. SQLAlchemy's pools keep every connection they ever opened until
the engine is disposed; with one pool per engine (two Optuna studies and the claims) and the
heartbeat threads, a worker held about six connections through all of its training, so
PostgreSQL's default ``max_connections`` of 100 admitted about 16 workers, and firewalls cut
the idle ones. Without a pool (``NullPool``) every statement connects anew: ~6 ms each here,
which made a tiny sweep on PostgreSQL 1.6x slower.

:func:`close_when_idle` keeps the pool and closes its idle connections once the engine has not
been used for :data:`IDLE_S`: a burst reuses one connection, and a worker between bursts holds
none.
"""

from __future__ import annotations

import os
import threading
import time
import weakref
from dataclasses import dataclass, field

import sqlalchemy as sa
from sqlalchemy.engine import Engine

__all__ = ["IDLE_S", "close_when_idle"]

IDLE_S = 0.5  # longer than the gaps inside a burst, far shorter than a heartbeat interval


@dataclass
class _Use:
    """How an engine's pool is used: connections checked out now, and when one last came back."""

    out: int = 0
    last: float = field(default_factory=time.monotonic)


class _Closer:
    """One daemon thread per process that closes the idle connections of the watched engines."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.engines: weakref.WeakKeyDictionary[Engine, _Use] = weakref.WeakKeyDictionary()
        self.pid = -1  # the process whose thread runs (a forked child starts its own)

    def watch(self, engine: Engine) -> None:
        with self.lock:
            if engine in self.engines:
                return
            use = self.engines[engine] = _Use()
            if self.pid != os.getpid():
                self.pid = os.getpid()
                threading.Thread(target=self._loop, name="harness-db-idle", daemon=True).start()
        sa.event.listen(engine, "checkout", lambda *_: self._count(use, +1))
        sa.event.listen(engine, "checkin", lambda *_: self._count(use, -1))

    def _count(self, use: _Use, delta: int) -> None:
        with self.lock:
            use.out += delta
            use.last = time.monotonic()

    def _loop(self) -> None:
        while True:
            time.sleep(IDLE_S / 2)
            now = time.monotonic()
            with self.lock:
                idle = [e for e, u in self.engines.items() if u.out <= 0 and now - u.last > IDLE_S]
            for engine in idle:
                # Closes only the connections resting in the pool: one checked out meanwhile
                # stays open, and the pool opens new ones when asked.
                pool = engine.pool
                if isinstance(pool, sa.pool.QueuePool) and pool.checkedin():
                    pool.dispose()


_CLOSER = _Closer()


def close_when_idle(engine: Engine) -> Engine:
    """``engine``, whose pooled connections are closed after :data:`IDLE_S` without use (a
    no-op for SQLite files, where a connection costs nothing on any server)."""
    if engine.dialect.name != "sqlite":
        _CLOSER.watch(engine)
    return engine
