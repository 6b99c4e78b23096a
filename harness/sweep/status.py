"""``harness sweep status``: where a shared study stands (runs by state, workers, budget)."""

from __future__ import annotations

import socket
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from optuna.trial import FrozenTrial, TrialState

from harness.config import HarnessConfig
from harness.sweep.claims import WorkerSlot, open_claims
from harness.sweep.environment import ENVIRONMENT_ATTR, MODEL_ATTR, differences
from harness.sweep.space import run_budget
from harness.sweep.study import (
    BUDGET_ATTR,
    WORKER_ATTR,
    existing_studies,
    given_up_runs,
    safe_storage_url,
    storage_url,
    study_id,
)
from harness.sweep.worker import pid_gone

__all__ = ["SweepStatus", "sweep_status"]


@dataclass
class SweepStatus:
    """Counts of one study, read from its storage (nothing is changed)."""

    study: str
    storage: str
    states: dict[str, int]
    skipped: int
    budget: int | None
    used: int
    # This command's own budget, where its config differs from the workers' (None: the same).
    caller_budget: str | None = None
    workers: list[WorkerSlot] = field(default_factory=list)
    runs_by_worker: dict[str, Counter[str]] = field(default_factory=dict)
    grace_s: float = 120.0
    started: bool = True
    queued: list[str] = field(default_factory=list)  # "run 4, the retry of run 2 (reason)"
    given_up: dict[int, str] = field(default_factory=dict)  # run -> why it is not retried
    # "runs 3, 4 made with diffusers 0.43.0 (the study's: 0.42.1)": other package versions.
    environments: list[str] = field(default_factory=list)
    # "tiny://sd15, weights 957a803440a9": the weights the study was started with.
    model: str | None = None

    @property
    def left(self) -> int | None:
        """Runs that may still start (None: no run-count budget)."""
        return None if self.budget is None else max(self.budget - self.used, 0)

    @staticmethod
    def _on_this_host_and_gone(worker: WorkerSlot) -> bool:
        return worker.host == socket.gethostname() and pid_gone(worker.pid)

    def _alive(self, worker: WorkerSlot, now: float) -> bool:
        """Beating, and on this machine its process exists (a worker killed with -9 beats no
        more, but its last beat is fresh for up to the grace period)."""
        return worker.alive(now, self.grace_s) and not self._on_this_host_and_gone(worker)

    def lines(self) -> list[str]:
        """The report, one line each."""
        if not self.started:
            return [
                f"study {self.study} in {self.storage}: not started (no run of this configuration yet)"
            ]
        now = time.time()
        states = ", ".join(f"{n} {s.lower()}" for s, n in sorted(self.states.items())) or "none"
        left = "no run budget" if self.left is None else f"{self.left} of {self.budget} runs left"
        if self.caller_budget is not None:
            left += (
                f" (the workers' sweep.n_trials; this command's config says {self.caller_budget})"
            )
        out = [
            f"study {self.study} in {self.storage}",
            f"runs: {states}"
            + (f" (+{self.skipped} duplicate draws skipped)" if self.skipped else ""),
            f"budget: {self.used} runs claimed, {left}",
            f"workers: {sum(self._alive(w, now) for w in self.workers)} live",
        ]
        out += [f"queued: {line}" for line in self.queued]
        out += [f"failed: run {n}, {why}" for n, why in sorted(self.given_up.items())]
        out += [f"model: {self.model}"] if self.model else []
        out += [f"environment: {line}" for line in self.environments]
        for w in self.workers:
            alive = self._alive(w, now)
            seen = "live" if alive else f"gone (last seen {max(now - w.seen_at, 0):.0f} s ago)"
            if not alive and w.seen_at <= 0:
                seen = "left"  # released on a clean exit (seen_at 0), not a lost heartbeat
            elif not alive and w.alive(now, self.grace_s):
                seen = "gone (its process has exited)"
            runs = self.runs_by_worker.get(w.worker, Counter())
            done = ", ".join(f"{n} {s}" for s, n in sorted(runs.items())) or "no runs"
            out.append(f"  slot {w.slot}: {w.worker} on {w.host} pid {w.pid}: {seen}; {done}")
        return out


def sweep_status(cfg: HarnessConfig, root: Path) -> SweepStatus:
    """The status of the study of ``cfg``, read only: a study that does not exist yet is
    reported as not started, and not created."""
    studies = existing_studies(cfg, root)
    if studies is None:
        return SweepStatus(
            study=study_id(cfg, root),
            storage=safe_storage_url(storage_url(cfg, root)),
            states={},
            skipped=0,
            budget=run_budget(cfg),
            used=0,
            started=False,
        )
    claims = open_claims(studies.storage_url, studies.name)
    trials = studies.runs.get_trials(deepcopy=False)
    skipped = [t for t in trials if "duplicate_of" in t.user_attrs or "not_run" in t.user_attrs]
    skipped_numbers = {t.number for t in skipped}
    states = Counter(t.state.name for t in trials if t.number not in skipped_numbers)
    by_trial = {c.trial: c.worker for c in claims.all()}
    per_worker: dict[str, Counter[str]] = {}
    for t in trials:
        # Each attempt for the worker it ran under (a retry moves the claim, not the attempt).
        owner = t.user_attrs.get(WORKER_ATTR) or by_trial.get(t.number)
        if owner is not None:
            per_worker.setdefault(owner, Counter())[t.state.name.lower()] += 1
    mine = run_budget(cfg)
    budget = studies.runs.user_attrs.get(BUDGET_ATTR, mine)  # what the workers hold it to
    return SweepStatus(
        study=studies.name,
        storage=safe_storage_url(studies.storage_url),
        states=dict(states),
        skipped=len(skipped),
        budget=budget,
        used=claims.used(),
        caller_budget=None if mine == budget else ("no run budget" if mine is None else str(mine)),
        workers=claims.workers(),
        runs_by_worker=per_worker,
        grace_s=float(cfg.sweep.grace_period_s or 2 * cfg.sweep.heartbeat_interval_s),
        queued=_queued(trials),
        given_up=given_up_runs(studies.runs),
        environments=_other_environments(trials, studies.runs.user_attrs.get(ENVIRONMENT_ATTR)),
        model=_model_line(studies.runs.user_attrs.get(MODEL_ATTR)),
    )


def _model_line(identity: Any) -> str | None:
    """``tiny://sd15, weights 957a803440a9`` (a hub model: its full commit, which
    ``model.revision`` takes) for the study's stored weights identity, if any."""
    if not isinstance(identity, dict):
        return None
    parts = [str(identity.get("model", "?"))]
    for key, value in sorted(identity.items()):  # commit, weights, config_* (no torch import)
        if key != "model":
            parts.append(f"{key} {value if key.endswith('commit') else str(value)[:12]}")
    return ", ".join(parts)


def _other_environments(trials: list[FrozenTrial], study: Any) -> list[str]:
    """One line per set of package versions other than the study's, with the runs made so
    (harness.sweep.environment; runs from before it was recorded are not counted)."""
    if not isinstance(study, dict):
        return []
    runs: dict[str, list[int]] = {}
    for t in trials:
        mine = t.user_attrs.get(ENVIRONMENT_ATTR)
        found = differences(study, mine) if isinstance(mine, dict) else []
        if found:
            runs.setdefault(", ".join(found), []).append(t.number)
    return [
        f"run{'s' if len(numbers) > 1 else ''} {', '.join(map(str, numbers))} made with {what}"
        for what, numbers in runs.items()
    ]


def _queued(trials: list[FrozenTrial]) -> list[str]:
    """The runs waiting to start first, each with why its original stopped (Ctrl-C, a lost
    worker, the user error that stopped the sweep)."""
    out = []
    for t in trials:
        if t.state != TrialState.WAITING:
            continue
        # Ours for an interrupted run; Optuna's heartbeat callback for a dead worker's.
        original = t.user_attrs.get("retry_of", t.system_attrs.get("failed_trial"))
        if not isinstance(original, int) or not 0 <= original < len(trials):
            out.append(f"run {t.number}")
            continue
        reason = trials[original].user_attrs.get("interrupt_reason")
        if reason is None and "retry_of" not in t.user_attrs:
            reason = "its worker stopped beating"
        why = f" ({str(reason).splitlines()[0]})" if reason else ""
        out.append(f"run {t.number}, the retry of run {original}{why}")
    return out
