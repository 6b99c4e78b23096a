"""``harness bench``: both paths over the same points, interleaved repeats, median/min/max
figures and a machine-readable last line."""

from __future__ import annotations

import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from harness.bench.stats import Figure, interleaved

FIGURE = re.compile(
    r"^(?P<name>\S.*?, (?P<path>naive|harness))\s+(?P<median>\S+) (?P<unit>\S+)\s+"
    r"\(min (?P<min>\S+), max (?P<max>\S+), n=(?P<n>\d+)\)$"
)


def test_interleaved_warms_up_then_alternates_the_order() -> None:
    calls: list[str] = []
    runs = {name: (lambda name=name: calls.append(name) or len(calls)) for name in ("a", "b")}
    out = interleaved(runs, repeats=3)
    assert calls == ["a", "b", "a", "b", "b", "a", "a", "b"]  # warm-up, then A B, B A, A B
    assert out == {"a": [3, 6, 7], "b": [4, 5, 8]}  # the warm-up results are dropped
    with pytest.raises(ValueError):
        interleaved(runs, repeats=0)


def test_figure_is_the_median_with_min_and_max() -> None:
    figure = Figure("seconds per evaluated point, naive", "s", (3.0, 1.0, 10.0))
    assert figure.median == 3.0
    match = FIGURE.match(figure.line())
    assert match and (match["min"], match["max"], match["n"]) == ("1", "10", "3")


def _tiny_params() -> dict[str, object]:
    """The default preset at its smallest: 2 checkpoints x 2 settings, 2 prompts, 1 seed."""
    return {
        "preset": "tiny-cpu",
        "data": {"sample_images": 3},
        "train": {"max_steps": 2, "checkpoint_steps": [1, 2]},
        "eval": {
            "prompts": ["a photo of {token} {class_name}", "a {token} {class_name} on a table"],
            "images_per_prompt": 1,
            "batch_size": 2,
        },
        "sweep": {
            "inference": {
                "guidance_scale": [3.0, 7.5],
                "lora_scale": [1.0],
                "num_inference_steps": [1],
            }
        },
        "metrics": {"bootstrap_samples": 10},
    }


def test_harness_bench_on_the_tiny_preset(repo_root: Path, tmp_path: Path) -> None:
    """Through the CLI, as a user runs it: every figure for both paths, positive and finite,
    the same number of points, and ``ratio=`` last."""
    shutil.copytree(repo_root / "experiments", tmp_path / "experiments")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(_tiny_params()))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HOME": str(tmp_path / "home")}
    proc = subprocess.run(
        [sys.executable, "-m", "harness", "-p", "params.yaml", "bench", "--repeats", "1"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert lines[0].startswith("4 points per path (2 checkpoints x 2 inference settings)"), lines
    assert "2 prompts x 1 seeds" in lines[0] and "device cpu" in lines[0]
    figures = [FIGURE.match(line) for line in lines[1:-1]]
    assert all(figures), lines
    names = [m["name"] for m in figures if m]
    for title in (
        "seconds per evaluated point",
        "training steps/s",
        "generation images/s",
        "scoring images/s",
    ):
        assert f"{title}, naive" in names and f"{title}, harness" in names, names
    for m in figures:
        assert m is not None and m["n"] == "1"  # one timed pass (the minimum), for speed
        low, median, high = float(m["min"]), float(m["median"]), float(m["max"])
        assert math.isfinite(median) and 0 < low <= median <= high, m.string
    last = re.fullmatch(r"ratio=(\d+\.\d+)", lines[-1])
    assert last and float(last[1]) > 0, lines[-1]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_bench_on_cuda_names_the_card_and_reports_peak_memory(
    repo_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The CUDA path: synchronised timings, the card's name and each path's peak memory."""
    from harness.bench import run_bench
    from harness.config import load_config

    for name in ("HARNESS_CACHE_DIR", "METRICS_CACHE_DIR"):  # the bench points them at its folder
        monkeypatch.setenv(name, os.environ.get(name, str(tmp_path / name)))
    shutil.copytree(repo_root / "experiments", tmp_path / "experiments")
    params = {**_tiny_params(), "model": {"device": "cuda"}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    lines = run_bench(load_config(tmp_path / "params.yaml"), tmp_path / "work", repeats=1)
    assert f"device cuda ({torch.cuda.get_device_name(0)})" in lines[0]
    peaks = [FIGURE.match(line) for line in lines if line.startswith("peak CUDA memory")]
    assert [m["path"] for m in peaks if m] == ["naive", "harness"]
    assert all(m and float(m["median"]) > 0 for m in peaks)


def test_module_entry_point_fails_in_one_line_on_a_missing_params_file(tmp_path: Path) -> None:
    """``python -m harness.bench`` is the ``harness bench`` command: a bad params file is one
    line naming it, not a traceback."""
    proc = subprocess.run(
        [sys.executable, "-m", "harness.bench", "-p", str(tmp_path / "nope.yaml")],
        cwd=tmp_path,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr, proc.stderr
    assert "nope.yaml" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
