"""``harness export`` on damaged or incomplete stage outputs: one error naming the file (or
what is missing), never a traceback; a torn line of an image manifest is skipped."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from report.synthetic import make_cfg, write_project

from harness.errors import error_text
from harness.export import ExportError, choose_point


@pytest.fixture
def project(tmp_path: Path) -> Path:
    from harness.sweep.study import study_id

    write_project(tmp_path, make_cfg())
    metrics = tmp_path / "runs/sweep/metrics.json"  # the synthetic tables, of this config
    data = {**json.loads(metrics.read_text()), "study": study_id(make_cfg(), tmp_path)}
    metrics.write_text(json.dumps(data))
    return tmp_path


def _choose(project: Path) -> str:
    """The error ``harness export`` (no --point) prints, as its CLI formats it."""
    with pytest.raises(ExportError) as caught:
        choose_point(make_cfg(), project)
    return error_text(caught.value)


@pytest.mark.parametrize("damaged", ["runs/sweep/results.parquet", "runs/evaluate/results.parquet"])
def test_a_damaged_results_table_is_one_error_naming_it(project: Path, damaged: str) -> None:
    path = project / damaged
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])  # a torn write
    (line,) = _choose(project).splitlines()
    assert damaged in line and "unreadable" in line and "harness " in line, line


def test_no_scored_full_protocol_point_says_so(project: Path) -> None:
    """An adaptive sweep stopped before any point reached the full protocol, and no evaluate
    output: nothing to choose from (it was an IndexError)."""
    (project / "runs/evaluate/results.parquet").unlink()
    table = project / "runs/sweep/results.parquet"
    pd.read_parquet(table).assign(fidelity=0.25).to_parquet(table, index=False)
    text = _choose(project)
    assert "no point measured with the full protocol" in text and "--point" in text, text


def test_the_example_image_skips_a_torn_manifest_line(tmp_path: Path) -> None:
    from harness.export import _example

    images = tmp_path / "runs/eval/step-000010/g7.5"
    images.mkdir(parents=True)
    (images / "000-1.png").write_bytes(b"png")
    good = {"file": "000-1.png", "prompt": "a photo of sks toy", "seed": 1}
    (images / "manifest.jsonl").write_text('{"file": "000-0.p\n' + json.dumps(good) + "\n")
    example = _example(tmp_path, {"images_dir": "runs/eval/step-000010/g7.5"})
    assert example == {
        "prompt": "a photo of sks toy",
        "seed": 1,
        "image": "runs/eval/step-000010/g7.5/000-1.png",
    }
