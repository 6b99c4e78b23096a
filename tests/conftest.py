"""Shared test setup: offline, quiet, and isolated from the user's caches and trackers."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

# Set before any library import reads them: no network retries, no analytics, no phoning home.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("CLEARML_OFFLINE_MODE", "1")
# torch.compile's inductor compiles in a pool of worker processes, one per core by default:
# starting that pool beside the other test process cost `bench --generation`'s test 10 s of its
# 40 (measured); the tests compile tiny graphs, which one thread compiles as fast.
os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")


def _long(item: pytest.Item) -> bool:
    """End-to-end tests (CLI, DVC, worker processes) and tests marked slow: a minute or more
    per module, where most unit modules take seconds."""
    return "e2e" in item.path.parts or item.get_closest_marker("slow") is not None


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Modules with a long test first (stable otherwise): `make test` hands modules to its two
    processes in this order, so the short ones fill the end and neither process idles while
    the other finishes a two-minute module."""
    long_modules = {item.path for item in items if _long(item)}
    items.sort(key=lambda item: item.path not in long_modules)


def _share_the_cores_among_test_processes() -> int | None:
    """Under pytest-xdist, each test process (and every harness subprocess it starts) gets its
    share of the cores by the rule `harness sweep launch --local` gives its workers
    (:func:`~harness.sweep.launch.worker_threads`, which keeps a user's own OMP_NUM_THREADS):
    PyTorch starts one thread per core in every process otherwise, and two workers' spinning
    threads on 2 cores made the suite's subprocess tests about 1.8x slower (measured). Set
    before anything imports torch: libgomp reads the variable when it loads."""
    from harness.sweep.launch import worker_threads  # imports no torch

    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    share = worker_threads(workers) if workers > 1 else None
    if share is not None:
        os.environ["OMP_NUM_THREADS"] = str(share)
    return share


_THREADS_PER_TEST_PROCESS = _share_the_cores_among_test_processes()

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
DREAMBENCH = SHARED / "dreambench"


@pytest.fixture(scope="session")
def threads_per_test_process() -> int | None:
    """The threads each xdist test process was given, or None (serial run, or the caller's
    own OMP_NUM_THREADS)."""
    return _THREADS_PER_TEST_PROCESS


@pytest.fixture(scope="session")
def repo_root() -> Path:
    """The project root (holds params.yaml and experiments/)."""
    return ROOT


@pytest.fixture(scope="session")
def dreambench_dir() -> Path:
    """The shared DreamBench subset; a failure (not a skip) in CI when it is missing."""
    if not (DREAMBENCH / "prompts_and_classes.txt").is_file():
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"shared DreamBench folder missing at {DREAMBENCH} (required in CI)")
        pytest.skip(f"shared DreamBench folder missing at {DREAMBENCH}")
    return DREAMBENCH


@pytest.fixture(scope="session", autouse=True)
def _isolated_caches(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Tiny models and embedding caches live in a per-session folder, never in the user's home."""
    base = tmp_path_factory.mktemp("caches")
    os.environ["HARNESS_CACHE_DIR"] = str(base / "harness")
    os.environ["METRICS_CACHE_DIR"] = str(base / "metrics")


@pytest.fixture(scope="session")
def tiny_sd15(_isolated_caches: None) -> object:
    """The tiny SD 1.x pipeline, loaded once per session (treat as read-only)."""
    from harness.config import ModelConfig
    from harness.models import load_pipeline

    return load_pipeline(ModelConfig(pretrained="tiny://sd15", device="cpu"))


@pytest.fixture(scope="session")
def slurm() -> Iterator[Any]:
    """A real one-node SLURM (tests/e2e/slurm.py), started once for every cluster test that
    asks for it, or a skip naming why there is none."""
    from e2e.slurm import missing_reason, slurm_cluster

    reason = missing_reason()
    if reason is not None:
        pytest.skip(reason)
    try:
        with slurm_cluster() as cluster:
            yield cluster
    except RuntimeError as exc:
        pytest.skip(f"SLURM cannot start on this machine: {exc}")
