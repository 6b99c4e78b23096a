"""Claims and worker slots: many workers on one study, each training configuration trained once.

Optuna's samplers may hand two workers the same configuration (the same seed, a race on a grid
cell, a small discrete space). Before a run trains, its worker *claims* the run key in the
study's own database: one row per ``(study, run key)``, inserted atomically (primary key), in
the same transaction as the budget counter's guarded update. So

* a configuration already running or finished is never trained again (the new trial is
  recorded as a duplicate of the holder and costs no budget);
* ``sweep.n_trials`` holds across every worker: a claim past the budget is refused;
* the retry of an interrupted or dead run takes the claim over (a guarded update), so exactly
  one trial holds a run key at a time and the run resumes from its own folder.

Workers also hold a *slot* (``harness_sweep_workers``): its index seeds the worker's sampler (slot
0 keeps ``sweep.seed``, so one worker is reproducible), its host and heartbeat feed
``harness sweep status`` and the refusal of a SQLite file shared by several machines.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import sqlalchemy as sa
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError

from harness.outputs import temporary_beside
from harness.sweep.pooling import close_when_idle
from harness.sweep.retry import retry_schema_race

__all__ = [
    "Claim",
    "ClaimOutcome",
    "Claims",
    "FileClaims",
    "SqlClaims",
    "WorkerSlot",
    "engine_options",
    "journal_path",
    "open_claims",
    "worker_identity",
]

log = logging.getLogger(__name__)

_META = sa.MetaData()
CLAIMS = sa.Table(
    "harness_run_claims",
    _META,
    sa.Column("study", sa.String(512), primary_key=True),
    sa.Column("run_key", sa.String(128), primary_key=True),
    sa.Column("trial", sa.Integer, nullable=False),
    sa.Column("worker", sa.String(512), nullable=False),
    sa.Column("claimed_at", sa.Float, nullable=False),
)
BUDGETS = sa.Table(
    "harness_sweep_budgets",
    _META,
    sa.Column("study", sa.String(512), primary_key=True),
    sa.Column("used", sa.Integer, nullable=False),
)
# Values a study fixes once, the first writer's standing (the model weights' identity).
SETTLED = sa.Table(
    "harness_sweep_settled",
    _META,
    sa.Column("study", sa.String(512), primary_key=True),
    sa.Column("name", sa.String(128), primary_key=True),
    sa.Column("value", sa.Text, nullable=False),
)
WORKERS = sa.Table(
    "harness_sweep_workers",
    _META,
    sa.Column("study", sa.String(512), primary_key=True),
    sa.Column("slot", sa.Integer, primary_key=True),
    sa.Column("worker", sa.String(512), nullable=False),
    sa.Column("host", sa.String(255), nullable=False),
    sa.Column("pid", sa.Integer, nullable=False),
    sa.Column("started_at", sa.Float, nullable=False),
    sa.Column("seen_at", sa.Float, nullable=False),
)


def worker_identity() -> str:
    """``HARNESS_WORKER_ID`` (set by the launchers) or ``<host>:<pid>``."""
    return os.environ.get("HARNESS_WORKER_ID") or f"{socket.gethostname()}:{os.getpid()}"


@dataclass(frozen=True)
class Claim:
    """Who holds a run key."""

    run_key: str
    trial: int
    worker: str
    claimed_at: float


@dataclass(frozen=True)
class ClaimOutcome:
    """The answer to a claim: ``claimed``, ``taken`` (``holder`` has it) or ``budget`` (spent)."""

    status: Literal["claimed", "taken", "budget"]
    holder: Claim | None = None


@dataclass(frozen=True)
class WorkerSlot:
    """A registered worker of one study."""

    slot: int
    worker: str
    host: str
    pid: int
    started_at: float
    seen_at: float

    def alive(self, now: float, grace_s: float) -> bool:
        return now - self.seen_at <= grace_s


class Claims:
    """Run claims, the budget counter and worker slots of one study (see the module doc)."""

    study: str

    def claim(self, run_key: str, trial: int, worker: str, limit: int | None) -> ClaimOutcome:
        """Claim ``run_key`` for ``trial`` and one unit of budget (``limit``: ``n_trials``)."""
        raise NotImplementedError

    def take_over(self, run_key: str, from_trial: int, to_trial: int, worker: str) -> bool:
        """Move the claim of an interrupted or dead run to its retry (one winner)."""
        raise NotImplementedError

    def holder(self, run_key: str) -> Claim | None:
        """The current holder of ``run_key``, if any."""
        raise NotImplementedError

    def all(self) -> list[Claim]:
        """Every claim of the study, oldest first."""
        raise NotImplementedError

    def used(self) -> int:
        """Budget units spent (one per claimed run key)."""
        raise NotImplementedError

    def adopt(self, claims: dict[str, int]) -> None:
        """Record runs a study made before claims existed (``{run key: trial}``, a run may
        have several keys), once; the budget counts each run once."""
        raise NotImplementedError

    def settle(self, name: str, value: str) -> str:
        """Store ``value`` under ``name`` unless a value is stored; return the stored one. Of
        workers settling at the same moment exactly one value stands (an insert on a primary
        key; a locked file), which Optuna's study attributes (last write wins) cannot give."""
        raise NotImplementedError

    def register(self, worker: str, grace_s: float) -> WorkerSlot:
        """Take the lowest slot that no live worker holds (a dead worker's slot is reused)."""
        raise NotImplementedError

    def beat(self, slot: int) -> None:
        """The worker of ``slot`` is alive."""
        raise NotImplementedError

    def leave(self, slot: int) -> None:
        """The worker of ``slot`` ended cleanly (its slot is free at once)."""
        raise NotImplementedError

    def workers(self) -> list[WorkerSlot]:
        """Every slot ever held in this study (live or not)."""
        raise NotImplementedError

    @contextlib.contextmanager
    def heartbeat(self, slot: int, interval_s: float) -> Iterator[None]:
        """Beat ``slot`` every ``interval_s`` in a daemon thread while the block runs."""
        stop = threading.Event()

        def loop() -> None:
            while not stop.wait(interval_s):
                try:
                    self.beat(slot)
                except Exception as exc:  # a missed beat is retried; the main loop reports
                    log.debug("worker heartbeat failed: %s", exc)

        thread = threading.Thread(target=loop, name="harness-worker-heartbeat", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join(timeout=interval_s + 5)


class SqlClaims(Claims):
    """Run claims, the budget counter and worker slots of one study, in an SQL database.

    ``url`` is the study's storage URL (SQLite for one machine, PostgreSQL or MySQL for many).
    """

    def __init__(
        self, url: str, study: str, *, engine: Engine | None = None, retry_s: float = 120.0
    ) -> None:
        self.study = study
        self.retry_s = retry_s
        self.engine = engine or _engine(url)
        self.dialect = self.engine.dialect.name
        _create_tables(self.engine)

    # -- run claims -------------------------------------------------------------------------
    def claim(self, run_key: str, trial: int, worker: str, limit: int | None) -> ClaimOutcome:
        """Claim ``run_key`` for ``trial`` and one unit of budget (``limit``: ``n_trials``)."""
        self._ensure_budget_row()
        try:
            with self.engine.begin() as conn:
                holder = self._holder(conn, run_key)
                if holder is not None:
                    return ClaimOutcome("taken", holder)
                used = BUDGETS.c.used
                update = sa.update(BUDGETS).where(BUDGETS.c.study == self.study)
                if limit is not None:
                    update = update.where(used < limit)
                if conn.execute(update.values(used=used + 1)).rowcount != 1:
                    return ClaimOutcome("budget")
                conn.execute(
                    sa.insert(CLAIMS).values(
                        study=self.study,
                        run_key=run_key,
                        trial=trial,
                        worker=worker,
                        claimed_at=time.time(),
                    )
                )
        except IntegrityError:
            # Another worker inserted the same key between our read and our insert; the budget
            # increment was rolled back with it.
            with self.engine.connect() as conn:
                return ClaimOutcome("taken", self._holder(conn, run_key))
        return ClaimOutcome("claimed")

    def take_over(self, run_key: str, from_trial: int, to_trial: int, worker: str) -> bool:
        """Move the claim of an interrupted or dead run to its retry (one winner)."""
        with self.engine.begin() as conn:
            result = conn.execute(
                sa.update(CLAIMS)
                .where(
                    CLAIMS.c.study == self.study,
                    CLAIMS.c.run_key == run_key,
                    CLAIMS.c.trial == from_trial,
                )
                .values(trial=to_trial, worker=worker, claimed_at=time.time())
            )
            return bool(result.rowcount == 1)

    def holder(self, run_key: str) -> Claim | None:
        """The current holder of ``run_key``, if any."""
        with self.engine.connect() as conn:
            return self._holder(conn, run_key)

    def all(self) -> list[Claim]:
        """Every claim of the study, oldest first."""
        with self.engine.connect() as conn:
            rows = conn.execute(
                sa.select(CLAIMS).where(CLAIMS.c.study == self.study).order_by(CLAIMS.c.claimed_at)
            ).all()
        return [Claim(r.run_key, r.trial, r.worker, r.claimed_at) for r in rows]

    def used(self) -> int:
        """Budget units spent (one per claimed run key)."""
        with self.engine.connect() as conn:
            value = conn.execute(
                sa.select(BUDGETS.c.used).where(BUDGETS.c.study == self.study)
            ).scalar()
        return int(value or 0)

    def adopt(self, claims: dict[str, int]) -> None:
        """Record runs a study made before claims existed (``{run key: trial}``, a run may
        have several keys), once; the budget counts each run once."""
        for run_key, trial in claims.items():
            with contextlib.suppress(IntegrityError), self.engine.begin() as conn:
                conn.execute(
                    sa.insert(CLAIMS).values(
                        study=self.study,
                        run_key=run_key,
                        trial=trial,
                        worker="adopted",
                        claimed_at=time.time(),
                    )
                )
        self._ensure_budget_row()
        with self.engine.begin() as conn:
            # One unit per run: an old run may be held under two keys (runner._current_key).
            count = conn.execute(
                sa.select(sa.func.count(sa.distinct(CLAIMS.c.trial))).where(
                    CLAIMS.c.study == self.study
                )
            ).scalar()
            conn.execute(
                sa.update(BUDGETS)
                .where(BUDGETS.c.study == self.study, BUDGETS.c.used < int(count or 0))
                .values(used=int(count or 0))
            )

    def settle(self, name: str, value: str) -> str:
        """Store ``value`` under ``name`` unless a value is stored; return the stored one."""
        with contextlib.suppress(IntegrityError), self.engine.begin() as conn:
            conn.execute(sa.insert(SETTLED).values(study=self.study, name=name, value=value))
        with self.engine.connect() as conn:
            stored = conn.execute(
                sa.select(SETTLED.c.value).where(
                    SETTLED.c.study == self.study, SETTLED.c.name == name
                )
            ).scalar()
        return str(stored)

    def _holder(self, conn: sa.Connection, run_key: str) -> Claim | None:
        row = conn.execute(
            sa.select(CLAIMS).where(CLAIMS.c.study == self.study, CLAIMS.c.run_key == run_key)
        ).first()
        return None if row is None else Claim(row.run_key, row.trial, row.worker, row.claimed_at)

    def _ensure_budget_row(self) -> None:
        with contextlib.suppress(IntegrityError), self.engine.begin() as conn:
            exists = conn.execute(
                sa.select(BUDGETS.c.used).where(BUDGETS.c.study == self.study)
            ).first()
            if exists is None:
                conn.execute(sa.insert(BUDGETS).values(study=self.study, used=0))

    # -- worker slots -----------------------------------------------------------------------
    def register(self, worker: str, grace_s: float) -> WorkerSlot:
        """Take the lowest slot that no live worker holds (a dead worker's slot is reused)."""
        host, pid = socket.gethostname(), os.getpid()
        for slot in range(10_000):
            now = time.time()
            try:
                with self.engine.begin() as conn:
                    row = conn.execute(
                        sa.select(WORKERS).where(
                            WORKERS.c.study == self.study, WORKERS.c.slot == slot
                        )
                    ).first()
                    values = dict(worker=worker, host=host, pid=pid, started_at=now, seen_at=now)
                    if row is None:
                        conn.execute(
                            sa.insert(WORKERS).values(study=self.study, slot=slot, **values)
                        )
                    elif now - row.seen_at > grace_s:
                        taken = conn.execute(
                            sa.update(WORKERS)
                            .where(
                                WORKERS.c.study == self.study,
                                WORKERS.c.slot == slot,
                                WORKERS.c.seen_at == row.seen_at,
                            )
                            .values(**values)
                        )
                        if taken.rowcount != 1:
                            continue
                    else:
                        continue
            except IntegrityError:
                continue
            return WorkerSlot(slot, worker, host, pid, now, now)
        raise RuntimeError("no free worker slot")  # pragma: no cover - 10,000 live workers

    def beat(self, slot: int) -> None:
        """The worker of ``slot`` is alive."""
        with self.engine.begin() as conn:
            conn.execute(
                sa.update(WORKERS)
                .where(WORKERS.c.study == self.study, WORKERS.c.slot == slot)
                .values(seen_at=time.time())
            )

    def leave(self, slot: int) -> None:
        """The worker of ``slot`` ended cleanly (its slot is free at once)."""
        with self.engine.begin() as conn:
            conn.execute(
                sa.update(WORKERS)
                .where(WORKERS.c.study == self.study, WORKERS.c.slot == slot)
                .values(seen_at=0.0)
            )

    def workers(self) -> list[WorkerSlot]:
        """Every slot ever held in this study (live or not)."""
        with self.engine.connect() as conn:
            rows = conn.execute(
                sa.select(WORKERS).where(WORKERS.c.study == self.study).order_by(WORKERS.c.slot)
            ).all()
        return [WorkerSlot(r.slot, r.worker, r.host, r.pid, r.started_at, r.seen_at) for r in rows]


class FileClaims(Claims):
    """The same records in a JSON file beside a journal storage file, guarded by Optuna's
    journal file lock (an ``O_EXCL`` lock file, safe on shared file systems)."""

    def __init__(self, journal: Path, study: str) -> None:
        from optuna.storages.journal import JournalFileOpenLock

        self.study = study
        folder = journal.with_name(journal.name + ".harness")
        folder.mkdir(parents=True, exist_ok=True)
        self.path = folder / f"{study}.json"
        self._lock = JournalFileOpenLock(str(self.path))

    @contextlib.contextmanager
    def _state(self, write: bool = True) -> Iterator[dict[str, Any]]:
        while not self._lock.acquire():  # acquire() retries; False only after its grace period
            time.sleep(0.05)
        try:
            state: dict[str, Any] = {"claims": {}, "used": 0, "workers": {}}
            if self.path.is_file():
                state = json.loads(self.path.read_text(encoding="utf-8"))
            yield state
            if write:
                tmp = temporary_beside(self.path)
                tmp.write_text(json.dumps(state, indent=1), encoding="utf-8")
                tmp.replace(self.path)
        finally:
            self._lock.release()

    def claim(self, run_key: str, trial: int, worker: str, limit: int | None) -> ClaimOutcome:
        with self._state() as state:
            held = state["claims"].get(run_key)
            if held is not None:
                return ClaimOutcome("taken", _claim(run_key, held))
            if limit is not None and state["used"] >= limit:
                return ClaimOutcome("budget")
            state["used"] += 1
            state["claims"][run_key] = {"trial": trial, "worker": worker, "claimed_at": time.time()}
        return ClaimOutcome("claimed")

    def take_over(self, run_key: str, from_trial: int, to_trial: int, worker: str) -> bool:
        with self._state() as state:
            held = state["claims"].get(run_key)
            if held is None or held["trial"] != from_trial:
                return False
            held.update(trial=to_trial, worker=worker, claimed_at=time.time())
        return True

    def holder(self, run_key: str) -> Claim | None:
        with self._state(write=False) as state:
            held = state["claims"].get(run_key)
        return None if held is None else _claim(run_key, held)

    def all(self) -> list[Claim]:
        with self._state(write=False) as state:
            claims = [_claim(k, v) for k, v in state["claims"].items()]
        return sorted(claims, key=lambda c: c.claimed_at)

    def used(self) -> int:
        with self._state(write=False) as state:
            return int(state["used"])

    def adopt(self, claims: dict[str, int]) -> None:
        with self._state() as state:
            for run_key, trial in claims.items():
                state["claims"].setdefault(
                    run_key, {"trial": trial, "worker": "adopted", "claimed_at": time.time()}
                )
            runs = {held["trial"] for held in state["claims"].values()}
            state["used"] = max(state["used"], len(runs))

    def settle(self, name: str, value: str) -> str:
        with self._state() as state:
            return str(state.setdefault("settled", {}).setdefault(name, value))

    def register(self, worker: str, grace_s: float) -> WorkerSlot:
        host, pid, now = socket.gethostname(), os.getpid(), time.time()
        with self._state() as state:
            slots = state["workers"]
            slot = 0
            while str(slot) in slots and now - slots[str(slot)]["seen_at"] <= grace_s:
                slot += 1
            slots[str(slot)] = {
                "worker": worker,
                "host": host,
                "pid": pid,
                "started_at": now,
                "seen_at": now,
            }
        return WorkerSlot(slot, worker, host, pid, now, now)

    def beat(self, slot: int) -> None:
        with self._state() as state:
            if str(slot) in state["workers"]:
                state["workers"][str(slot)]["seen_at"] = time.time()

    def leave(self, slot: int) -> None:
        with self._state() as state:
            if str(slot) in state["workers"]:
                state["workers"][str(slot)]["seen_at"] = 0.0

    def workers(self) -> list[WorkerSlot]:
        with self._state(write=False) as state:
            rows = sorted(state["workers"].items(), key=lambda kv: int(kv[0]))
        return [WorkerSlot(int(k), **v) for k, v in rows]


def _claim(run_key: str, held: dict[str, Any]) -> Claim:
    return Claim(run_key, int(held["trial"]), str(held["worker"]), float(held["claimed_at"]))


def open_claims(url: str, study: str, retry_s: float = 120.0) -> Claims:
    """The claims of ``study`` in the storage at ``url`` (SQL database or journal file); a
    database briefly unreachable is retried for ``retry_s`` seconds (harness.sweep.retry)."""
    journal = journal_path(url)
    if journal is not None:
        return FileClaims(journal, study)
    return SqlClaims(url, study, retry_s=retry_s)


def _with_retries(cls: type[SqlClaims]) -> type[SqlClaims]:
    """Every public method of ``cls`` through :func:`harness.sweep.retry.retry_transient`."""
    for name in (
        "claim",
        "take_over",
        "holder",
        "all",
        "used",
        "adopt",
        "settle",
        "register",
        "beat",
        "leave",
        "workers",
    ):
        method = getattr(cls, name)

        def wrapper(self: SqlClaims, *args: Any, _method: Any = method, **kwargs: Any) -> Any:
            from harness.sweep.retry import retry_transient

            return retry_transient(lambda: _method(self, *args, **kwargs), self.retry_s)

        wrapper.__name__ = wrapper.__qualname__ = name
        wrapper.__doc__ = method.__doc__
        setattr(cls, name, wrapper)
    return cls


_with_retries(SqlClaims)


def journal_path(url: str) -> Path | None:
    """The file of a ``journal:///<path>`` storage URL (None for database URLs)."""
    if not url.startswith("journal:"):
        return None
    path = url.removeprefix("journal:")
    path = path[2:] if path.startswith("//") else path
    return Path(path).expanduser()


def engine_options(url: str) -> dict[str, Any]:
    """SQLAlchemy engine options of every connection to a study's database (both Optuna
    studies and the claims).

    SQLite: wait up to 60 s for the file's lock (workers on one machine write the same file).
    A database server: check a pooled connection before use (the server may have restarted;
    see :mod:`harness.sweep.pooling` for when idle ones are closed) and, on PostgreSQL, name
    it ``harness <worker id>``, so ``pg_stat_activity`` shows which worker holds it.
    """
    if url.startswith("sqlite"):
        return {"connect_args": {"timeout": 60}}
    options: dict[str, Any] = {"pool_pre_ping": True}
    if url.startswith("postgresql"):
        # At most NAMEDATALEN - 1 = 63 bytes; PostgreSQL would truncate it anyway.
        name = f"harness {worker_identity()}".encode()[:63].decode(errors="ignore")
        options["connect_args"] = {"application_name": name}
    return options


def _engine(url: str) -> Engine:
    return close_when_idle(sa.create_engine(url, **engine_options(url)))


def _create_tables(engine: Engine) -> None:
    """Create the tables once; two workers creating them at the same moment is fine."""
    retry_schema_race(lambda: _META.create_all(engine, checkfirst=True))
