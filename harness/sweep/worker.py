"""One sweep worker: its slot in the study, its sampler seed, its heartbeat, and dead peers.

A worker registers in the study's claims store (harness.sweep.claims) and keeps its slot alive
with a heartbeat thread. The slot index seeds the worker's sampler, so two workers never replay
the same random draws (slot 0 keeps ``sweep.seed``: one worker is reproducible). A run whose
worker stopped beating is *dead*: any live worker fails it, which queues its retry, and the
retry resumes from the run's last checkpoint. This works on every storage, the journal file
included (Optuna's own run heartbeat exists for databases only).
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import optuna
from optuna.trial import FrozenTrial, TrialState

from harness.config import HarnessConfig
from harness.sweep.claims import Claim, Claims, WorkerSlot, worker_identity
from harness.sweep.study import Studies, SweepError, make_sampler, safe_storage_url

__all__ = ["RunningRuns", "Worker"]

logger = logging.getLogger(__name__)
# A claim older than its worker name's live slot is a dead predecessor's; this much older only
# in case the claiming host's clock was stepped back between registering and claiming.
_CLOCK_SLACK_S = 1.0


@dataclass
class Worker:
    """This process's membership in a study."""

    name: str
    slot: WorkerSlot
    claims: Claims
    grace_s: float
    interval_s: float

    @classmethod
    def join(cls, cfg: HarnessConfig, studies: Studies, claims: Claims) -> Worker:
        """Register, refuse a SQLite file shared across machines, seed this worker's sampler.

        Raises:
            SweepError: when live workers of this study run on another host and the storage is
                a SQLite file.
        """
        interval = float(cfg.sweep.heartbeat_interval_s)
        grace = float(cfg.sweep.grace_period_s or 2 * interval)
        name = worker_identity()
        slot = claims.register(name, grace)
        worker = cls(name, slot, claims, grace, interval)
        if studies.storage_url.startswith("sqlite"):
            worker._refuse_other_hosts(studies.storage_url)
        resumed = len(studies.runs.get_trials(deepcopy=False))
        studies.runs.sampler = make_sampler(cfg, resumed_runs=resumed, worker_slot=slot.slot)
        logger.info("worker %s joins study %s as slot %d", name, studies.name, slot.slot)
        return worker

    def _refuse_other_hosts(self, url: str) -> None:
        now = time.time()
        others = sorted(
            {
                w.host
                for w in self.claims.workers()
                if w.slot != self.slot.slot
                and w.alive(now, self.grace_s)
                and w.host != self.slot.host
            }
        )
        if others:
            self.claims.leave(self.slot.slot)
            raise SweepError(
                f"sweep.storage: {safe_storage_url(url)} is a SQLite file, for one machine only, "
                f"and workers of this study run on {', '.join(others)} too; use a PostgreSQL or "
                "MySQL URL (sweep.storage or HARNESS_SWEEP_STORAGE) or a journal file on a "
                "shared file system (journal:///<path>/study.log)"
            )

    @contextlib.contextmanager
    def alive(self) -> Iterator[None]:
        """Beat while the block runs; free the slot at the end (also after errors)."""
        try:
            with self.claims.heartbeat(self.slot.slot, self.interval_s):
                yield
        finally:
            with contextlib.suppress(Exception):
                self.claims.leave(self.slot.slot)

    def _live_workers(self) -> dict[str, float]:
        """Each live worker name and the start of its oldest live slot (this one included)."""
        now, host = time.time(), self.slot.host
        live = {self.name: self.slot.started_at}
        for w in self.claims.workers():
            if w.alive(now, self.grace_s) and not (w.host == host and pid_gone(w.pid)):
                live[w.worker] = min(live.get(w.worker, w.started_at), w.started_at)
        return live

    def _claim_live(self, claim: Claim, live_workers: dict[str, float]) -> bool:
        """Is the worker process that made ``claim`` still alive?

        By name, and the claim must be younger than that name's live slot: SLURM requeues a
        task whose node failed under the same array id (``HARNESS_WORKER_ID``), and the dead
        worker's claim, under the requeued one's name, would otherwise look alive for ever.
        Both times come from the claiming host's clock (a worker registers before it claims).
        """
        started = live_workers.get(claim.worker)
        return started is not None and claim.claimed_at >= started - _CLOCK_SLACK_S

    def running(self, study: optuna.Study) -> RunningRuns:
        """The RUNNING trials of ``study``, split into dead ones and a count of live ones.

        A claimed run is live while its worker beats (on this host: while its process exists);
        an unclaimed one (the milliseconds between a trial's start and its claim, or a run of
        an older study) is dead once older than the grace period, and counts as live before
        that only while another worker is alive.
        """
        now = time.time()
        live_workers = self._live_workers()
        owner = {c.trial: c for c in self.claims.all()}
        others_alive = len(live_workers) > 1
        dead: list[FrozenTrial] = []
        live = 0
        for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            claim = owner.get(trial.number)
            started = trial.datetime_start.timestamp() if trial.datetime_start else now
            if claim is not None:
                if self._claim_live(claim, live_workers):
                    live += 1
                else:
                    dead.append(trial)
            elif now - started > self.grace_s:
                dead.append(trial)
            elif others_alive:
                live += 1
        return RunningRuns(dead, live)


class RunningRuns(NamedTuple):
    """What :meth:`Worker.running` found: runs whose worker is gone, and runs still going."""

    dead: list[FrozenTrial]
    live: int


def pid_gone(pid: int) -> bool:
    """Is there no live process ``pid`` on this machine? A zombie (a worker killed with -9
    whose parent has not reaped it yet) is gone: ``os.kill(pid, 0)`` succeeds on it."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # someone else's process: it exists
        return False
    return _zombie(pid)


def _zombie(pid: int) -> bool:
    """The process's state in ``/proc`` is Z (Linux; elsewhere: not known, so no)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text(encoding="ascii", errors="replace")
    except OSError:
        return False
    # "pid (comm) state ...": comm may hold spaces and parentheses, the state follows the last.
    fields = stat.rsplit(")", 1)[-1].split()
    return bool(fields) and fields[0] == "Z"
