"""Claims, budget and worker slots: one winner per run key and per budget unit, also when many
processes race for them at the same moment (SQLite file and journal-side JSON file)."""

from __future__ import annotations

import multiprocessing as mp
import time
from pathlib import Path

import pytest

from harness.sweep.claims import FileClaims, SqlClaims, journal_path, open_claims

KINDS = ["sql", "file"]


def _claims(kind: str, tmp_path: Path, study: str = "s") -> SqlClaims | FileClaims:
    if kind == "sql":
        return SqlClaims(f"sqlite:///{tmp_path / 'study.db'}", study)
    return FileClaims(tmp_path / "study.log", study)


@pytest.mark.parametrize("kind", KINDS)
def test_a_run_key_is_claimed_once_and_costs_one_budget_unit(kind: str, tmp_path: Path) -> None:
    claims = _claims(kind, tmp_path)
    assert claims.claim("k1", 0, "w0", limit=2).status == "claimed"
    again = claims.claim("k1", 1, "w1", limit=2)
    assert again.status == "taken" and again.holder is not None
    assert (again.holder.trial, again.holder.worker) == (0, "w0")
    assert claims.used() == 1
    assert claims.claim("k2", 2, "w1", limit=2).status == "claimed"
    assert claims.claim("k3", 3, "w1", limit=2).status == "budget"
    assert claims.used() == 2
    assert claims.claim("k3", 3, "w1", limit=None).status == "claimed"  # a retry: no limit
    assert [c.run_key for c in claims.all()] == ["k1", "k2", "k3"]


@pytest.mark.parametrize("kind", KINDS)
def test_take_over_moves_a_claim_to_exactly_one_retry(kind: str, tmp_path: Path) -> None:
    claims = _claims(kind, tmp_path)
    claims.claim("k", 4, "dead", limit=None)
    assert claims.take_over("k", 4, 7, "w1")
    assert not claims.take_over("k", 4, 8, "w2"), "a second retry took the same run"
    holder = claims.holder("k")
    assert holder is not None and (holder.trial, holder.worker) == (7, "w1")
    assert claims.used() == 1


@pytest.mark.parametrize("kind", KINDS)
def test_studies_do_not_share_claims(kind: str, tmp_path: Path) -> None:
    a, b = _claims(kind, tmp_path, "a"), _claims(kind, tmp_path, "b")
    assert a.claim("k", 0, "w", limit=1).status == "claimed"
    assert b.claim("k", 0, "w", limit=1).status == "claimed"


@pytest.mark.parametrize("kind", KINDS)
def test_adopt_counts_the_runs_of_an_older_study(kind: str, tmp_path: Path) -> None:
    claims = _claims(kind, tmp_path)
    claims.adopt({"k1": 0, "k2": 1})
    claims.adopt({"k1": 0, "k2": 1})  # idempotent
    assert claims.used() == 2
    assert claims.claim("k1", 5, "w", limit=3).status == "taken"
    claims.adopt({"k1": 0, "k1-as-keyed-now": 0, "k2": 1})  # one run, two keys
    assert claims.used() == 2
    assert claims.claim("k1-as-keyed-now", 5, "w", limit=3).status == "taken"
    assert claims.claim("k3", 5, "w", limit=3).status == "claimed"


@pytest.mark.parametrize("kind", KINDS)
def test_slots_are_reused_only_after_the_grace_period(kind: str, tmp_path: Path) -> None:
    claims = _claims(kind, tmp_path)
    first = claims.register("w0", grace_s=60)
    second = claims.register("w1", grace_s=60)
    assert (first.slot, second.slot) == (0, 1)
    claims.leave(first.slot)  # a clean exit frees the slot at once
    assert claims.register("w2", grace_s=60).slot == 0
    assert [w.worker for w in claims.workers()] == ["w2", "w1"]


def _race(kind: str, folder: str, key: str, start: float, out: mp.Queue) -> None:  # type: ignore[type-arg]
    claims = _claims(kind, Path(folder))
    while time.time() < start:
        time.sleep(0.001)
    results = [claims.claim(f"{key}-{i}", i, key, limit=5).status for i in range(4)]
    results.append(claims.claim("shared", 100, key, limit=5).status)
    out.put((key, results))


@pytest.mark.parametrize("kind", KINDS)
def test_racing_processes_never_exceed_the_budget_or_share_a_key(kind: str, tmp_path: Path) -> None:
    """Four processes claim 4 own keys and one shared key each at the same moment, budget 5:
    exactly 5 claims win, the shared key at most once."""
    _claims(kind, tmp_path)  # tables created before the race
    ctx = mp.get_context("fork")  # fork: no re-import of the project in each child
    out: mp.Queue = ctx.Queue()  # type: ignore[type-arg]
    start = time.time() + 1.0
    procs = [
        ctx.Process(target=_race, args=(kind, str(tmp_path), f"w{i}", start, out)) for i in range(4)
    ]
    for p in procs:
        p.start()
    results = dict(out.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=30)
    statuses = [s for r in results.values() for s in r]
    assert statuses.count("claimed") == 5, results
    assert sum(r[-1] == "claimed" for r in results.values()) <= 1, results
    claims = _claims(kind, tmp_path)
    assert claims.used() == 5 and len(claims.all()) == 5


def test_open_claims_picks_the_store_from_the_url(tmp_path: Path) -> None:
    journal = f"journal://{tmp_path / 'j' / 'study.log'}"
    assert journal_path(journal) == tmp_path / "j" / "study.log"
    assert journal_path("sqlite:///x.db") is None
    assert isinstance(open_claims(journal, "s"), FileClaims)
    assert isinstance(open_claims(f"sqlite:///{tmp_path / 'x.db'}", "s"), SqlClaims)
