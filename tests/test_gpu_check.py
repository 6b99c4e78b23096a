"""``.ci/gpu-check``, the CUDA check for a lent GPU machine, dry-run here: every step named
runs and is summarised; the CUDA tests skip and the CUDA benchmarks stop with one clear line."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(torch.cuda.is_available(), reason="a dry run needs a machine without CUDA"),
]


def _dry_run(repo_root: Path, out: Path, *steps: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHON": sys.executable, "GPU_CHECK_INSTALL": "0", "OUT": str(out)}
    return subprocess.run(
        ["bash", str(repo_root / ".ci/gpu-check"), *steps],
        cwd=out,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def test_the_gpu_check_script_runs_the_steps_named_and_summarises_them(
    repo_root: Path, tmp_path: Path
) -> None:
    """A device session is 15 minutes and a call 10, so the check splits into calls by step:
    each step named runs, in the order named, after `env`; an unknown step is refused before
    anything runs."""
    proc = _dry_run(repo_root, tmp_path, "generation", "tests", "bench")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = (tmp_path / "summary.txt").read_text().splitlines()
    assert [line.split(":")[0] for line in summary] == ["env", "generation", "gpu-tests", "bench"]
    assert summary[0].startswith("env: torch ") and "no CUDA device" in summary[0]
    # Every CUDA test was collected (no missing file, no import error) and skipped.
    tests = (tmp_path / "gpu-tests.log").read_text()
    assert summary[2].startswith("gpu-tests: rc=0"), tests[-2000:]
    counts = re.search(r"(\d+) skipped, \d+ deselected in", tests)
    assert counts and int(counts[1]) >= 7 and "error" not in tests.splitlines()[-1], tests[-2000:]
    for name, line in (("generation", summary[1]), ("bench", summary[3])):
        assert line.startswith(f"{name}: rc=2"), summary
        log = (tmp_path / f"{name}.log").read_text()
        assert "model.device: 'cuda' requested but no CUDA device is available" in log, log
        assert "Traceback" not in log, log
    (tmp_path / "bad").mkdir()
    bad = _dry_run(repo_root, tmp_path / "bad", "benhc")
    assert bad.returncode == 2 and "unknown step: benhc (tests, bench, generation)" in bad.stdout
    assert not (tmp_path / "bad" / "env.log").exists()
