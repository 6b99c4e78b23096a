"""The README's data walkthrough, run with the real ``dvc`` and ``git`` in a throw-away repo.

``mkdir data/raw/<subject>``, copy photos, ``dvc add data/raw``, commit ``data/raw.dvc`` and
``data/.gitignore``, ``dvc remote add -d storage <dir>``, commit ``.dvc/config``, ``dvc push``; then a second clone
runs ``dvc pull data/raw`` and gets the same photo bytes. (A bare ``dvc pull`` would also ask for
the pipeline's ``data/prepared``, which ``dvc.lock`` names but nobody pushed.)
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Mapping
from pathlib import Path

import pytest
from data_helpers import encode, photo

REPO = Path(__file__).resolve().parents[2]
DVC = REPO / ".venv" / "bin" / "dvc"
PROJECT_FILES = (".gitignore", ".dvcignore", "dvc.yaml", "dvc.lock", "params.yaml")

pytestmark = pytest.mark.slow


def _env(tmp: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        {
            "DVC_NO_ANALYTICS": "1",
            "DVC_SITE_CACHE_DIR": str(tmp / "dvc-site-cache"),
            "HOME": str(tmp / "home"),
            "GIT_CONFIG_NOSYSTEM": "1",
            "GIT_AUTHOR_NAME": "Test",
            "GIT_AUTHOR_EMAIL": "test@example.com",
            "GIT_COMMITTER_NAME": "Test",
            "GIT_COMMITTER_EMAIL": "test@example.com",
        }
    )
    (tmp / "home").mkdir(exist_ok=True)
    return env


def _run(
    args: list[str], cwd: Path, env: Mapping[str, str], check: bool = True
) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        args, cwd=cwd, env=dict(env), capture_output=True, text=True, timeout=180, check=False
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"$ {' '.join(args)} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
        )
    return proc


def _git(cwd: Path, env: Mapping[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return _run(["git", *args], cwd, env)


def _dvc(cwd: Path, env: Mapping[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return _run([str(DVC), *args], cwd, env)


def _project_repo(tmp: Path, env: Mapping[str, str]) -> Path:
    repo = tmp / "project"
    repo.mkdir()
    _git(repo, env, "init", "-q", "-b", "main")
    _git(repo, env, "config", "user.name", "Test")
    _git(repo, env, "config", "user.email", "test@example.com")
    for name in PROJECT_FILES:
        shutil.copy2(REPO / name, repo / name)
    _dvc(repo, env, "init", "-q")
    _git(repo, env, "add", "-A")
    _git(repo, env, "commit", "-q", "-m", "project")
    return repo


def _ignored(repo: Path, env: Mapping[str, str], path: str) -> bool:
    proc = _run(["git", "check-ignore", "-q", "--no-index", path], repo, env, check=False)
    assert proc.returncode in (0, 1), proc.stderr
    return proc.returncode == 0


def test_gitignore_ignores_what_the_pipeline_writes_not_the_raw_data_files(
    tmp_path: Path,
) -> None:
    env = _env(tmp_path)
    repo = tmp_path / "project"
    repo.mkdir()
    _git(repo, env, "init", "-q")
    shutil.copy2(REPO / ".gitignore", repo / ".gitignore")
    for generated in ("data/prepared/sample/manifest.json", "data/sample/sample/00.jpg"):
        assert _ignored(repo, env, generated), generated
    for committed in ("data/raw.dvc", "data/.gitignore", "data/dreambench.dvc"):
        assert not _ignored(repo, env, committed), committed


def test_readme_data_walkthrough_add_push_and_pull_in_a_clone(tmp_path: Path) -> None:
    if not DVC.is_file():
        pytest.skip(f"dvc not installed at {DVC}")
    env = _env(tmp_path)
    repo = _project_repo(tmp_path, env)
    photos = {f"{i:02d}.jpg": encode(photo(i), "JPEG", quality=90) for i in range(3)}
    subject = repo / "data" / "raw" / "my-dog"
    subject.mkdir(parents=True)
    for name, data in photos.items():
        (subject / name).write_bytes(data)

    _dvc(repo, env, "add", "data/raw")
    assert (repo / "data" / ".gitignore").read_text().split() == ["/raw"]
    # The .dvc file and DVC's own .gitignore must be committable; the photos must not be.
    not_ignored = _run(["git", "check-ignore", "-q", "data/raw.dvc"], repo, env, check=False)
    assert not_ignored.returncode == 1, "data/raw.dvc is git-ignored"
    assert _run(["git", "check-ignore", "-q", "data/raw/my-dog/00.jpg"], repo, env).returncode == 0
    _git(repo, env, "add", "data/raw.dvc", "data/.gitignore")
    _git(repo, env, "commit", "-q", "-m", "raw photos")
    tracked = _git(repo, env, "ls-files").stdout.split()
    assert {"data/raw.dvc", "data/.gitignore"} <= set(tracked)
    assert not any(path.startswith("data/raw/") for path in tracked)

    remote = tmp_path / "dvc-remote"
    remote.mkdir()
    _dvc(repo, env, "remote", "add", "-d", "storage", str(remote))
    _git(repo, env, "add", ".dvc/config")
    _git(repo, env, "commit", "-q", "-m", "dvc remote")
    _dvc(repo, env, "push")
    assert any(p.is_file() for p in remote.rglob("*"))

    clone = tmp_path / "clone"
    _git(tmp_path, env, "clone", "-q", str(repo), str(clone))
    assert not (clone / "data" / "raw").exists()
    _dvc(clone, env, "pull", "data/raw")
    pulled = clone / "data" / "raw" / "my-dog"
    assert {p.name: p.read_bytes() for p in pulled.iterdir()} == photos
    status = _git(clone, env, "status", "--porcelain").stdout
    assert status == "", status
