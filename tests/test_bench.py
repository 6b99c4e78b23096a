"""``python -m harness.bench``: every line is a ratio against a named reference (no timings)."""

from __future__ import annotations

import math
import os
import re
import shutil
from pathlib import Path

import pytest
import yaml

from harness.bench import Comparison, main

# "<measured> vs <reference>   <ref>s -> <measured>s   x<ratio> <what the ratio counts>"
LINE = re.compile(
    r"^(?P<name>\S.*? vs \S.*?)\s+(?P<ref>\d+\.\d{3})s -> \s*(?P<measured>\d+\.\d{3})s"
    r"\s+x\s*(?P<ratio>\d+\.\d{2}) (?P<what>\S.*)$"
)
NAMES = [
    "generate batch 2 vs 1",
    "train warm vs cold caches",
    "score warm vs cold real cache",
    "training run vs evaluated point",
]


def test_comparison_line_states_both_times_and_the_ratio() -> None:
    comparison = Comparison("train warm vs cold caches", 3.0, 1.5, "speed-up")
    assert comparison.ratio == 2.0
    line = comparison.line()
    assert line == f"{'train warm vs cold caches':<34}    3.000s ->    1.500s   x  2.00 speed-up"
    assert LINE.match(line)


def test_bench_on_the_tiny_preset_prints_positive_finite_ratios(
    repo_root: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # The benchmark points the cache variables into its work folder: restore them afterwards.
    for name in ("HARNESS_CACHE_DIR", "METRICS_CACHE_DIR"):
        monkeypatch.setenv(name, os.environ.get(name, str(tmp_path / name)))
    # The real default preset, shrunk to the smallest sizes.
    shutil.copytree(repo_root / "experiments", tmp_path / "experiments")
    params = {
        "preset": "tiny-cpu",
        "model": {"device": "cpu"},
        "data": {"sample_images": 4},
        "train": {"max_steps": 2, "checkpoint_steps": [2]},
        "eval": {
            "prompts": ["a photo of {token} {class_name}", "a {token} {class_name} on a table"],
            "images_per_prompt": 1,
            "num_inference_steps": 1,
            "batch_size": 2,
        },
        "metrics": {"bootstrap_samples": 10},
    }
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    main(["-p", str(tmp_path / "params.yaml")])
    lines = capsys.readouterr().out.splitlines()
    matches = [LINE.match(line) for line in lines]
    assert all(matches), lines
    assert [m["name"].rstrip() for m in matches if m] == NAMES  # each names its reference
    for m in matches:
        assert m is not None
        ratio = float(m["ratio"])
        assert math.isfinite(ratio) and ratio > 0, m.string
    assert [m["what"] for m in matches if m] == ["speed-up"] * 3 + ["points per training run"]
