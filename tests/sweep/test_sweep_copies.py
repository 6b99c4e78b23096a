"""Two copies of one project on one shared study (``dvc exp run --temp``/``--queue`` with an
absolute ``sweep.storage``, or a project copied or moved): each copy deletes and reads only
the run folders under its own root."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from harness.sweep import run_sweep

from .fakes import FakeBackend
from .test_sweep_logic import make_cfg


def _checkpoints(root: Path) -> set[Path]:
    return {p.relative_to(root) for p in (root / "runs/sweep/runs").rglob("checkpoints/step-*")}


def test_a_sweep_in_one_copy_keeps_the_adapters_of_another(tmp_path: Path) -> None:
    """The study recorded each run's absolute folder; copy B's sweep (its budget spent, nothing
    trained) deleted every checkpoint of copy A, the ones A's evaluate and export need too."""
    storage = f"sqlite:///{tmp_path / 'shared' / 'study.db'}"
    (tmp_path / "shared").mkdir()
    first, second = tmp_path / "a", tmp_path / "b"
    cfg = make_cfg(tmp_path, n_trials=3, keep_adapters="best", storage=storage)
    run_sweep(cfg, first, FakeBackend())
    kept = _checkpoints(first)
    assert kept, "the selected points keep their adapters"
    shutil.copytree(first, second)
    again = FakeBackend()
    run_sweep(cfg, second, again)
    assert again.trained == []
    assert _checkpoints(first) == kept
    assert _checkpoints(second) == kept


def test_the_loss_curves_come_from_the_runs_under_this_root(tmp_path: Path) -> None:
    """A project moved after its sweep plots the loss logs it holds, not the old location's."""
    old, new = tmp_path / "old", tmp_path / "new"
    cfg = make_cfg(tmp_path, n_trials=2)
    run_sweep(cfg, old, FakeBackend())
    for run in (old / "runs/sweep/runs").glob("*/*"):  # the log a real training run writes
        (run / "train_log.jsonl").write_text('{"step": 1, "loss": 0.5}\n', encoding="utf-8")
    shutil.move(old, new)
    run_sweep(cfg, new, FakeBackend())
    losses = json.loads((new / "runs/sweep/plots/loss.json").read_text())
    assert sorted(row["loss"] for row in losses) == [0.5, 0.5]


def test_evaluate_refuses_the_table_of_an_interrupted_sweep_of_another_configuration(
    tmp_path: Path,
) -> None:
    """Sweep A finished (its metrics.json); sweep B, another inference grid, stopped after one
    run: the results table is B's (rewritten after every run), metrics.json still A's. The
    evaluate stage of A read the study from metrics.json and confirmed B's points as A's."""
    from harness.sweep.confirm import EvaluateError, read_sweep_results

    first = make_cfg(tmp_path, n_trials=1)
    run_sweep(first, tmp_path, FakeBackend())
    assert not read_sweep_results(first, tmp_path).empty
    finished = (tmp_path / "runs/sweep/metrics.json").read_text()
    other = make_cfg(tmp_path, n_trials=1, inference={"guidance_scale": [5.0]})
    run_sweep(other, tmp_path, FakeBackend())
    (tmp_path / "runs/sweep/metrics.json").write_text(finished)  # B stopped before its end
    with pytest.raises(EvaluateError, match=r"holds study 't-.*harness sweep"):
        read_sweep_results(first, tmp_path)


def test_writers_with_the_same_process_id_never_share_a_temporary_file(tmp_path: Path) -> None:
    """Workers on two hosts (or in two containers) can have the same process id and share
    ``sweep.dir``: with temporary names made of the pid alone, one renamed the other's
    half-written table into place and the other's rename failed (FileNotFoundError). Two
    threads of one process stand in for them here."""
    from concurrent.futures import ThreadPoolExecutor

    from harness.sweep._files import replaced_together

    table, summary = tmp_path / "results.csv", tmp_path / "summary.json"

    def write(writer: int) -> None:
        for attempt in range(40):
            with replaced_together(table, summary) as (csv, js):
                csv.write_text(f"{writer},{attempt}\n" * 200)
                js.write_text(json.dumps({"writer": writer, "attempt": attempt}))

    with ThreadPoolExecutor(2) as pool:
        for done in [pool.submit(write, n) for n in range(2)]:
            done.result()
    assert json.loads(summary.read_text())["attempt"] == 39
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.csv", "summary.json"]
