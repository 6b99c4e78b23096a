"""The results table says what it holds (issue 11): the checkpoint step by its name, every
training setting of the run (searched or fixed) as a column, and each score once."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd

from harness.config import HarnessConfig
from harness.sweep import run_sweep
from harness.sweep.results import pareto_rows
from harness.sweep.study import _NOT_MEANING

from .fakes import FakeBackend


def _cfg(train: dict[str, Any] | None = None, **sweep: Any) -> HarnessConfig:
    base: dict[str, Any] = {
        "study_name": "cols",
        "n_trials": 2,
        "sampler": "random",
        "pruner": "none",
        "space": {"learning_rate": {"low": 1e-5, "high": 1e-3, "log": True}},
        "inference": {"guidance_scale": [3.0, 7.0], "lora_scale": [1.0]},
    }
    base.update(sweep)
    return HarnessConfig.model_validate(
        {
            "preset": "test",
            "train": {"max_steps": 20, "checkpoint_steps": [10, 20], **(train or {})},
            "sweep": base,
            "tracking": {"mode": "off"},
        }
    )


def _frame(root: Path, cfg: HarnessConfig) -> pd.DataFrame:
    return pd.read_parquet(run_sweep(cfg, root, FakeBackend()).results_parquet)


def test_checkpoint_step_is_named_so(tmp_path: Path) -> None:
    frame = _frame(tmp_path, _cfg())
    assert set(frame["checkpoint_step"]) == {10, 20}
    assert not any(c.endswith(".steps") or c == "steps" for c in frame.columns)
    assert "eval.guidance_scale" in frame.columns  # inference dimensions keep their prefix


def test_every_training_setting_is_a_column(tmp_path: Path) -> None:
    cfg = _cfg()
    frame = _frame(tmp_path, cfg)
    expected = {f"train.{k}" for k in cfg.train.model_dump()} - {
        f"train.{k}" for k in _NOT_MEANING["train"]
    }
    assert expected <= set(frame.columns), expected - set(frame.columns)
    assert "train.output_dir" not in frame.columns
    assert (frame["train.rank"] == cfg.train.rank).all()  # fixed: from the run's config
    assert frame["train.learning_rate"].nunique() == 2  # searched: from the trial
    # Lists are JSON strings (flat in CSV and parquet alike), with the run's effective values.
    assert set(frame["train.checkpoint_steps"]) == {"[10, 20]"}
    assert json.loads(frame["train.target_modules"].iloc[0]) == cfg.train.target_modules
    csv = pd.read_csv(tmp_path / "runs/sweep/results.csv")
    assert list(csv.columns) == list(frame.columns)


def test_two_configurations_never_look_identical(tmp_path: Path) -> None:
    """The same search under two fixed settings: the rows differ by that setting's column."""
    a = _frame(tmp_path / "a", _cfg({"prior_loss_weight": 1.0}))
    b = _frame(tmp_path / "b", _cfg({"prior_loss_weight": 0.5}))
    assert set(a["train.prior_loss_weight"]) == {1.0}
    assert set(b["train.prior_loss_weight"]) == {0.5}
    meaning = [c for c in a.columns if c.startswith(("train.", "eval.", "checkpoint_step"))]
    both = pd.concat([a, b])
    assert not both.duplicated(meaning).any()
    assert (
        both.drop(columns=["train.prior_loss_weight"])
        .duplicated([c for c in meaning if c != "train.prior_loss_weight"])
        .any()
    ), "without the fixed column the two sweeps' rows would look the same"


def test_scores_appear_once_without_objective_duplicates(tmp_path: Path) -> None:
    frame = _frame(tmp_path, _cfg())
    assert not [c for c in frame.columns if c.startswith("objective.")]
    assert {"score.dino", "score.dino_lo", "score.dino_hi", "score.clip_t"} <= set(frame.columns)
    assert len(set(frame.columns)) == len(frame.columns)
    rows = pareto_rows(frame, ["dino", "clip_t"])
    assert rows and [r["score.dino"] for r in rows] == sorted(
        (r["score.dino"] for r in rows), reverse=True
    )


def test_weighted_sweep_adds_its_objective_as_a_score(tmp_path: Path) -> None:
    frame = _frame(tmp_path, _cfg(weights={"dino": 0.7, "clip_t": 0.3}))
    assert not [c for c in frame.columns if c.startswith("objective.")]
    expected = 0.7 * frame["score.dino"] + 0.3 * frame["score.clip_t"]
    assert (frame["score.weighted"] - expected).abs().max() < 1e-12
    assert frame.loc[frame["pareto"], "score.weighted"].item() == frame["score.weighted"].max()


def test_column_order_reads_left_to_right(tmp_path: Path) -> None:
    columns = list(_frame(tmp_path, _cfg()).columns)
    assert columns[:3] == ["point", "run_trial", "run_key"]
    first = {
        kind: min(i for i, c in enumerate(columns) if c.startswith(kind))
        for kind in ("train.", "checkpoint_step", "eval.", "score.", "seconds.", "pareto")
    }
    assert list(first.values()) == sorted(first.values()), first
    for key in ("setting_id", "scheduler", "n_images", "adapter", "adapter_removed", "images_dir"):
        assert key in columns


def test_seconds_per_phase_of_every_point(tmp_path: Path) -> None:
    """The runner times training (proxy excluded) and the proxy per checkpoint; a backend that
    does not split generation from scoring gets ``seconds.evaluate``."""
    frame = _frame(tmp_path, _cfg())
    assert {"seconds.train", "seconds.proxy", "seconds.evaluate"} <= set(frame.columns)
    assert (frame[["seconds.train", "seconds.proxy", "seconds.evaluate"]] >= 0).all().all()
    assert (frame.groupby("run_key")["seconds.train"].nunique() == 1).all()  # the run's, shared
    per_checkpoint = frame.groupby(["run_key", "checkpoint_step"])["seconds.proxy"].nunique()
    assert (per_checkpoint == 1).all()


def test_a_table_write_that_dies_leaves_the_previous_table_whole(
    tmp_path: Path, monkeypatch: Any
) -> None:
    """Every worker rewrites the results table when it finishes: a worker killed (or another
    one writing) mid-write must never leave a torn results.parquet for the evaluate and report
    stages; the previous complete table stays until the new one is whole."""
    import pytest

    from harness.sweep.results import write_results

    old = pd.DataFrame({"run_key": ["a"], "score.dino": [0.5], "pareto": [True]})
    csv, parquet, _ = write_results(old, tmp_path, ["dino"])
    before = (csv.read_bytes(), parquet.read_bytes())

    def dies_halfway(self: pd.DataFrame, path: Any, **kwargs: Any) -> None:
        Path(path).write_bytes(b"PAR1 half a file")
        raise OSError("No space left on device")

    monkeypatch.setattr(pd.DataFrame, "to_parquet", dies_halfway)
    new = pd.DataFrame({"run_key": ["a", "b"], "score.dino": [0.5, 0.7], "pareto": [False, True]})
    with pytest.raises(OSError, match="No space left"):
        write_results(new, tmp_path, ["dino"])
    assert (csv.read_bytes(), parquet.read_bytes()) == before
    pd.testing.assert_frame_equal(pd.read_parquet(parquet), old)
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []
