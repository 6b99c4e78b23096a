"""A worker's pooled database connections are closed when idle and reused within a burst."""

from __future__ import annotations

import time
from pathlib import Path

import sqlalchemy as sa

from harness.sweep import pooling


def _wait(condition: object, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():  # type: ignore[operator]
            return True
        time.sleep(0.05)
    return False


def test_idle_connections_are_closed_and_the_engine_still_works(tmp_path: Path) -> None:
    # A file database with a real QueuePool stands in for a server (close_when_idle itself
    # skips SQLite, whose connections cost nothing).
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'db.sqlite'}", poolclass=sa.pool.QueuePool)
    pooling._CLOSER.watch(engine)
    pool = engine.pool
    assert isinstance(pool, sa.pool.QueuePool)
    with engine.connect() as conn:
        conn.execute(sa.text("CREATE TABLE t (x INTEGER)"))
        conn.commit()
        held = conn.connection.dbapi_connection
        time.sleep(pooling.IDLE_S * 3)  # checked out: never closed, however long it is held
        assert conn.execute(sa.text("SELECT count(*) FROM t")).scalar() == 0
    assert pool.checkedin() == 1
    # A burst: statements closer together than IDLE_S reuse the one pooled connection.
    for _ in range(5):
        with engine.connect() as conn:
            assert conn.connection.dbapi_connection is held
        time.sleep(pooling.IDLE_S / 5)
    assert _wait(lambda: pool.checkedin() == 0), "the idle connection was not closed"
    with engine.begin() as conn:  # reopened on demand
        conn.execute(sa.text("INSERT INTO t VALUES (1)"))
        assert conn.connection.dbapi_connection is not held
    assert _wait(lambda: pool.checkedin() == 0)
    engine.dispose()


def test_sqlite_engines_are_left_alone(tmp_path: Path) -> None:
    engine = pooling.close_when_idle(sa.create_engine(f"sqlite:///{tmp_path / 'db.sqlite'}"))
    assert engine not in pooling._CLOSER.engines
