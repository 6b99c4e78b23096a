"""``dvc repro`` as a user runs it: every stage in a fresh git repository, a second ``dvc repro``
that does nothing, and metrics that ``dvc metrics show`` and ``dvc exp show`` read per commit."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from ._helpers import REPO, VENV_BIN, cli_env, write_params

pytestmark = pytest.mark.slow

PROJECT = (".gitignore", ".dvcignore", "dvc.yaml", "experiments", "harness", "metrics", "reports")


def _run(args: list[str], cwd: Path, env: dict[str, str]) -> str:
    proc = subprocess.run(
        args, cwd=cwd, env=env, capture_output=True, text=True, timeout=600, check=False
    )
    assert proc.returncode == 0, f"$ {' '.join(args)}\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"
    return proc.stdout + proc.stderr


def _dvc(cwd: Path, env: dict[str, str], *args: str) -> str:
    return _run([str(VENV_BIN / "dvc"), *args], cwd, env)


def _git(cwd: Path, env: dict[str, str], *args: str) -> str:
    return _run(["git", *args], cwd, env)


def _project(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    repo = tmp_path / "project"
    repo.mkdir()
    for name in PROJECT:
        source = REPO / name
        if source.is_dir():
            shutil.copytree(source, repo / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(source, repo / name)
    write_params(repo, {"sweep": {"n_trials": 2}, "tracking": {"mode": "offline"}})
    env = cli_env(
        tmp_path / "home",
        {
            "DVC_NO_ANALYTICS": "1",
            "DVC_SITE_CACHE_DIR": str(tmp_path / "dvc-site"),
            "GIT_AUTHOR_NAME": "t",
            "GIT_AUTHOR_EMAIL": "t@example.com",
            "GIT_COMMITTER_NAME": "t",
            "GIT_COMMITTER_EMAIL": "t@example.com",
        },
    )
    _git(repo, env, "init", "-q", "-b", "main")
    _dvc(repo, env, "init", "-q")
    _git(repo, env, "add", "-A")
    _git(repo, env, "commit", "-q", "-m", "project")
    return repo, env


def _commit_metrics(exp_show: list[dict[str, Any]]) -> dict[str, Any]:
    """The metrics ``dvc exp show --json`` reports for the checked-out commit's row."""
    for row in exp_show:
        if row.get("rev") != "workspace":
            metrics = row["data"]["metrics"]["reports/metrics.json"]
            assert "error" not in metrics, metrics
            return dict(metrics["data"])
    raise AssertionError(f"no commit row in {exp_show}")


def test_dvc_repro_runs_every_stage_then_nothing_and_dvc_reads_the_metrics(
    tmp_path: Path,
) -> None:
    repo, env = _project(tmp_path)
    first = _dvc(repo, env, "repro")
    for stage in ("resolve", "prepare", "sweep"):
        assert f"Running stage '{stage}'" in first, first[-4000:]
    assert "2 training runs (2 completed, 0 pruned, 0 failed)" in first  # closing lines kept
    metrics = json.loads((repo / "reports/metrics.json").read_text())
    assert metrics["runs_completed"] == 2 and metrics["points"] > 2

    second = _dvc(repo, env, "repro")
    assert "Running stage 'prepare'" not in second and "Running stage 'sweep'" not in second
    assert "Stage 'sweep' didn't change, skipping" in second, second[-4000:]

    _git(repo, env, "add", "-A")
    _git(repo, env, "commit", "-q", "-m", "sweep results")
    assert _git(repo, env, "status", "--porcelain").strip() == ""  # nothing churns
    shown = json.loads(_dvc(repo, env, "metrics", "show", "--json"))
    assert shown  # read from the committed file
    committed = _commit_metrics(json.loads(_dvc(repo, env, "exp", "show", "--json")))
    assert committed["best"]["dino"] == metrics["best"]["dino"]
    assert committed["baseline"]["dino"] == metrics["baseline"]["dino"]
