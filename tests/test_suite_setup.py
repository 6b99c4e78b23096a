"""The test suite's own setup: parallel test processes share the cores instead of fighting."""

from __future__ import annotations

import subprocess
import sys

import pytest


def test_each_test_process_and_its_subprocesses_get_a_share_of_the_cores(
    threads_per_test_process: int | None,
) -> None:
    if threads_per_test_process is None:
        pytest.skip("only with several xdist test processes and no OMP_NUM_THREADS of the caller")
    import torch

    assert torch.get_num_threads() == threads_per_test_process
    child = subprocess.run(
        [sys.executable, "-c", "import torch; print(torch.get_num_threads())"],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    assert int(child.stdout) == threads_per_test_process
