"""A project in a fresh git + DVC repository, as a DVC user has it, and the commands run in
it: shared by the DVC end-to-end test modules."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import yaml

from ._helpers import BASE_OVERRIDES, REPO, VENV_BIN, cli_env, deep_merge

__all__ = ["OVERRIDES", "dvc", "dvc_project", "git", "run_ok"]

PROJECT = (".gitignore", ".dvcignore", "dvc.yaml", "experiments", "harness", "metrics", "reports")
# The user's own overrides in experiments/config.yaml: the shrunk tiny preset, 2 runs of 2 points.
HELD_OUT = ["a {token} {class_name} in the snow"]  # the evaluate stage's own prompt
OVERRIDES = deep_merge(
    BASE_OVERRIDES,
    {
        "sweep": {
            "n_trials": 2,
            "keep_adapters": "best",
            "inference": {"guidance_scale": [5.0], "lora_scale": [1.0]},
        },
        "tracking": {"mode": "offline"},
        "evaluate": {"top_k": 2, "prompts": HELD_OUT},
    },
)


def run_ok(args: list[str], cwd: Path, env: dict[str, str]) -> str:
    proc = subprocess.run(
        args, cwd=cwd, env=env, capture_output=True, text=True, timeout=600, check=False
    )
    assert proc.returncode == 0, f"$ {' '.join(args)}\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"
    return proc.stdout + proc.stderr


def dvc(cwd: Path, env: dict[str, str], *args: str) -> str:
    return run_ok([str(VENV_BIN / "dvc"), *args], cwd, env)


def git(cwd: Path, env: dict[str, str], *args: str) -> str:
    return run_ok(["git", *args], cwd, env)


def dvc_project(
    tmp_path: Path, overrides: dict[str, Any] | None = None
) -> tuple[Path, dict[str, str]]:
    """The project's files in a fresh git + DVC repository, the user's overrides (OVERRIDES and
    ``overrides``) written into experiments/config.yaml and params.yaml composed with
    `harness config compose`."""
    repo = tmp_path / "project"
    repo.mkdir()
    for name in PROJECT:
        source = REPO / name
        if source.is_dir():
            shutil.copytree(source, repo / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(source, repo / name)
    config = repo / "experiments/config.yaml"
    user = deep_merge(OVERRIDES, overrides or {})
    config.write_text(config.read_text() + yaml.safe_dump(user, sort_keys=False))
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
    run_ok([str(VENV_BIN / "harness"), "config", "compose"], repo, env)
    git(repo, env, "init", "-q", "-b", "main")
    dvc(repo, env, "init", "-q")
    shutil.copy2(REPO / ".dvc/config", repo / ".dvc/config")  # hydra composition on
    shutil.copytree(REPO / ".dvc/plots", repo / ".dvc/plots")  # the plot templates
    git(repo, env, "add", "-A")
    git(repo, env, "commit", "-q", "-m", "project")
    return repo, env
