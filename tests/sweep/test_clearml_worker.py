"""``harness sweep launch --clearml-queue``: the worker task as clearml-agent runs it.

clearml-agent runs a task without a repository by writing its ``script.diff`` to a file named
after ``script.entry_point`` in a scratch folder and running that with ``script.binary``
(clearml_agent/commands/worker.py, ``create_notebook_file``); the task's working directory is
dropped. The worker task is a bash script that goes to the project itself. These tests run it
the way the agent does, and check what the task is made of (no ClearML server can run here).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any, ClassVar

import pytest

from harness.config import HarnessConfig
from harness.sweep.launch import clearml_worker_spec


def _cfg() -> HarnessConfig:
    return HarnessConfig.model_validate(
        {
            "preset": "test",
            "sweep": {"study_name": "cw", "n_trials": 2},
            "tracking": {"mode": "off"},
        }
    )


def _stub_python(folder: Path) -> Path:
    """Stands in for the project's interpreter: prints where and how it was started."""
    stub = folder / "python"
    stub.write_text(
        '#!/bin/bash\necho "cwd=$PWD"\necho "worker=$HARNESS_WORKER_ID"\n'
        'echo "task=${CLEARML_TASK_ID:-unset}"\nfor a in "$@"; do echo "arg=$a"; done\n'
    )
    stub.chmod(0o755)
    return stub


def test_the_agent_runs_the_worker_in_the_project_with_its_arguments(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "my project #1"
    root.mkdir()
    monkeypatch.setattr(sys, "executable", str(_stub_python(tmp_path)))
    spec = clearml_worker_spec(
        _cfg(), root, root / "params.yaml", "gpu", 3, ["sweep.note=a b", "train.rank=8"]
    )
    # What the agent does with a task without repository: diff -> <scratch>/<entry_point>.
    scratch = tmp_path / "venv" / "standalone"
    scratch.mkdir(parents=True)
    (scratch / spec["entry_point"]).write_text(spec["script"], encoding="utf-8")
    done = subprocess.run(
        ["/bin/bash", spec["entry_point"]],
        cwd=scratch,
        env={**os.environ, "CLEARML_TASK_ID": "abc123"},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == f"cwd={root.resolve()}"
    assert lines[1] == "worker=clearml-abc123"
    # The agent's task id names the worker, and is not passed on: with it set, ClearML runs
    # "remotely" and every Task.init returns the worker task (online every run logged into it;
    # offline none was tracked, "ClearML is not configured"). A run is a task of its own.
    assert lines[2] == "task=unset"
    args = [line.removeprefix("arg=") for line in lines[3:]]
    assert args == [
        "-m", "harness", "-p", str((root / "params.yaml").resolve()),
        "-S", "sweep.note=a b", "-S", "train.rank=8", "sweep", "worker",
    ]  # fmt: skip


class _FakeTask:
    """Records what enqueue_worker_task asks of ClearML's Task."""

    made: ClassVar[list[_FakeTask]] = []
    queued: ClassVar[list[tuple[str, str]]] = []

    def __init__(self, **created_with: Any) -> None:
        self.created_with, self.id = created_with, f"t{len(self.made)}"
        self.script: dict[str, Any] = {}
        self.tags: list[str] = []

    @classmethod
    def create(cls, **kwargs: Any) -> _FakeTask:
        task = cls(**kwargs)
        cls.made.append(task)
        return task

    def set_script(self, **script: Any) -> None:
        self.script = script

    def set_tags(self, tags: list[str]) -> None:
        self.tags = tags

    @classmethod
    def enqueue(cls, task: _FakeTask, queue_name: str) -> None:
        cls.queued.append((task.id, queue_name))


def test_the_task_is_the_worker_script_run_with_bash(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from harness.tracking import clearml_backend

    monkeypatch.setattr(clearml_backend, "Task", _FakeTask)
    monkeypatch.setattr(clearml_backend, "_require_server", lambda: None)
    spec = clearml_worker_spec(_cfg(), tmp_path, tmp_path / "params.yaml", "gpu", 0)
    assert clearml_backend.enqueue_worker_task(spec) == "t0"
    (task,) = _FakeTask.made
    created = task.created_with
    assert created["task_name"] == "cw/worker-0" and created["task_type"] == "training"
    assert task.script == {
        "repository": "",
        "branch": "",
        "commit": "",
        "diff": spec["script"],
        "working_dir": ".",
        "entry_point": spec["entry_point"],
        "binary": "/bin/bash",
    }
    assert task.tags == ["sweep:cw", "worker"] and _FakeTask.queued == [("t0", "gpu")]
