"""The evaluate stage scores the base model under each confirmed point's guidance, steps and
scheduler: the report compares a point with the base model under its own setting."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from harness.report.grids import make_grids
from harness.report.prompts import per_prompt
from harness.report.subjects import base_columns, per_subject, weak_subjects
from harness.sweep.per_image import EVALUATE_IMAGE_SCHEMA, write_table

from .test_grids import PROMPTS, _confirmed_rows, make_cfg

G3, G7 = "g3-u1-t1-n4-dpmsolver++", "g7.5-u1-t1-n4-dpmsolver++"


def _rows(root: Path, point: int, setting: str, base: str, clip_t: float) -> list[dict[str, Any]]:
    """One point's (or with ``point`` -1 the base model's) images of two prompts at seed 20."""
    folder = "runs/evaluate/baseline" if point == -1 else f"runs/evaluate/point-{point:05d}"
    rows = _confirmed_rows(root, point, folder, list(PROMPTS), (20,), None, setting)
    for row in rows:
        row.update(clip_i=0.5, clip_t=clip_t, baseline_setting=base)
    return rows


@pytest.fixture
def two_baselines(tmp_path: Path) -> pd.DataFrame:
    """Point 7 at guidance 3 (best), point 3 at guidance 7.5; the base model under both."""
    rows = _rows(tmp_path, 7, "g3-u0.6-t1-n4-dpmsolver++", G3, 0.25)
    rows += _rows(tmp_path, 3, "g7.5-u1-t1-n4-dpmsolver++", G7, 0.30)
    # Not in the points' order: the rows are matched by setting, not by position.
    rows += _rows(tmp_path, -1, G7, G7, 0.35) + _rows(tmp_path, -1, G3, G3, 0.20)
    write_table(rows, EVALUATE_IMAGE_SCHEMA, tmp_path / "runs/evaluate/per_image.parquet")
    table = pd.DataFrame({"point": [7, 3], "selection_rank": [1, 2]})
    table.to_parquet(tmp_path / "runs/evaluate/results.parquet", index=False)
    return pd.DataFrame(rows)


def test_per_prompt_compares_each_point_with_its_own_baseline(
    two_baselines: pd.DataFrame,
) -> None:
    best = per_prompt(two_baselines, 7, "dino", "clip_t")
    assert best["base.clip_t"].tolist() == pytest.approx([0.20, 0.20])
    assert best["diff.clip_t"].tolist() == pytest.approx([0.05, 0.05])
    other = per_prompt(two_baselines, 3, "dino", "clip_t")
    assert other["base.clip_t"].tolist() == pytest.approx([0.35, 0.35])


def test_base_vs_lora_shows_the_base_model_at_the_best_points_setting(
    tmp_path: Path, two_baselines: pd.DataFrame
) -> None:
    (figure,) = make_grids(make_cfg(), tmp_path, tmp_path / "grids")
    manifest = json.loads(figure.manifest.read_text())
    base_cells = [c for c in manifest["cells"] if c["point"] == -1]
    assert base_cells and all(f"/images/{G3}/" in c["image"] for c in base_cells)


def test_per_subject_compares_each_point_with_its_own_baseline(
    two_baselines: pd.DataFrame,
) -> None:
    """Not the mean of both base settings (0.275): each point beside the base model under its
    own guidance, the best point's as ``base``."""
    frame = two_baselines.assign(subject="dog")
    table = per_subject(frame, "clip_t", [7, 3]).set_index("subject")
    assert list(table.columns) == ["base", "point 7", f"base at {G7}", "point 3"]
    assert table.loc["dog"].tolist() == pytest.approx([0.20, 0.25, 0.35, 0.30])
    # Point 3 is worse than its own base model (0.30 < 0.35), point 7 better than its (0.20).
    weak = weak_subjects(table.reset_index(), [7, 3], base_columns(frame, [7, 3]))
    assert "better than the base model on every subject" in weak[0]
    assert "no better than the base model on `dog`" in weak[1]
