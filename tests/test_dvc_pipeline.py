"""The project's DVC setup, through the real ``dvc`` in a throw-away git repository."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DVC = REPO / ".venv" / "bin" / "dvc"


def _run(args: list[str], cwd: Path, env: dict[str, str]) -> str:
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"$ {' '.join(args)}\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def test_bytecode_never_changes_a_code_dependency(tmp_path: Path) -> None:
    """Python writes ``__pycache__`` next to every imported module of a stage's code deps; with
    the project's ``.dvcignore`` that must not make DVC rerun the stage (or churn dvc.lock)."""
    env = {
        **os.environ,
        "DVC_NO_ANALYTICS": "1",
        "DVC_SITE_CACHE_DIR": str(tmp_path / "site"),
        "HOME": str(tmp_path),
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@example.com",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@example.com",
    }
    repo = tmp_path / "repo"
    (repo / "code").mkdir(parents=True)
    (repo / "code" / "stage.py").write_text("print('ok')\n")
    shutil.copy2(REPO / ".dvcignore", repo / ".dvcignore")
    (repo / "dvc.yaml").write_text(
        "stages:\n  s:\n    cmd: python code/stage.py > out.txt\n    deps: [code]\n"
        "    outs: [out.txt]\n"
    )
    _run(["git", "init", "-q"], repo, env)
    _run([str(DVC), "init", "-q"], repo, env)
    _run([str(DVC), "repro", "-q"], repo, env)
    lock = (repo / "dvc.lock").read_text()
    (repo / "code" / "__pycache__").mkdir()
    (repo / "code" / "__pycache__" / "stage.cpython-311.pyc").write_bytes(b"\x00bytecode")
    (repo / "code" / "old.pyc").write_bytes(b"\x00bytecode")
    assert "up to date" in _run([str(DVC), "status"], repo, env)
    _run([str(DVC), "repro", "-q"], repo, env)
    assert (repo / "dvc.lock").read_text() == lock
    (repo / "code" / "stage.py").write_text("print('changed')\n")  # a real change still counts
    assert "changed deps" in _run([str(DVC), "status"], repo, env)
