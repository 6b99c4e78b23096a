"""The report attached to ClearML through the tracker: an offline session with the HTML page
and the Markdown summary as artifacts, the leaderboard table, summary-task tags.

The tracked run is made by ``harness report`` in a subprocess: an offline ClearML task leaves
process-wide state behind (environment variables, its console capture), which would leak into
later tests of this process.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from e2e._helpers import imported_modules

from harness.stages import run_report_stage

from .synthetic import make_cfg, write_project

PARAMS = "preset: tiny-cpu\ntracking:\n  mode: offline\nsweep:\n  study_name: rep\n"


def _environment(tmp_path: Path) -> dict[str, str]:
    """This process's environment without any ClearML server or switch, in a fresh HOME."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CLEARML_", "TRAINS_"))}
    (tmp_path / "home").mkdir()
    env.update(HOME=str(tmp_path / "home"), CLEARML_CACHE_DIR=str(tmp_path / "clearml-cache"))
    return env


def _read(zip_path: Path) -> tuple[dict[str, bytes], list[dict[str, object]]]:
    with zipfile.ZipFile(zip_path) as zf:
        files = {name: zf.read(name) for name in zf.namelist()}
    events: list[dict[str, object]] = []
    for line in files.get("metrics.jsonl", b"").decode().splitlines():
        if line.strip():
            chunk = json.loads(line)
            events.extend(chunk if isinstance(chunk, list) else [chunk])
    return files, events


def test_offline_session_has_the_report_artifacts(repo_root: Path, tmp_path: Path) -> None:
    root = tmp_path / "project"
    write_project(root, make_cfg(tracking={"mode": "offline"}))
    shutil.copytree(repo_root / "experiments", root / "experiments")
    (root / "params.yaml").write_text(PARAMS, encoding="utf-8")
    # -X importtime: the report stage reads tables and images only; importing torch would
    # cost each `dvc repro` of a report setting several seconds of CPU.
    command = ["-X", "importtime", "-m", "harness", "-p", str(root / "params.yaml"), "report"]
    proc = subprocess.run(
        [sys.executable, *command],
        cwd=root,
        env=_environment(tmp_path),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "report: reports/index.html"
    # The harness' own imports, up to the tracked run: ClearML itself may import torch while it
    # closes the task (seen in a fresh clone: torch.utils.tensorboard, from its bindings).
    imported = imported_modules(proc.stderr.split("INFO harness.tracking:")[0])
    assert "harness.report" in imported
    assert not imported & {"torch", "diffusers", "transformers", "open_clip"}, "heavy imports"
    zips = sorted((root / "runs" / "clearml" / "offline").glob("*.zip"))
    assert len(zips) == 1
    files, events = _read(zips[0])
    task = json.loads(files["task.json"])
    assert task["name"] == "rep/report" and task["type"] == "custom"
    assert set(task["tags"]) == {"sweep:rep", "report", "summary"}  # a summary task
    artifacts = {a["key"]: a for a in task["execution"]["artifacts"]}
    assert set(artifacts) == {"index.html", "summary.md"}
    page = next(data for name, data in files.items() if name.endswith("/index.html"))
    assert page == (root / "reports" / "index.html").read_bytes()
    assert "leaderboard" in [e["metric"] for e in events if e["type"] == "plot"]


@pytest.mark.usefixtures("fake_grids")
def test_tracking_off_records_nothing(tmp_path: Path) -> None:
    project = write_project(tmp_path, make_cfg())
    assert run_report_stage(project.cfg, tmp_path).is_file()
    assert not (tmp_path / "runs" / "clearml").exists()
