"""The report attached to ClearML through the tracker: an offline session with the HTML page
and the Markdown summary as artifacts, the leaderboard table, summary-task tags."""

from __future__ import annotations

import json
import os
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness.stages import run_report_stage

from .synthetic import make_cfg, write_project

CLEARML_VARS = [
    "CLEARML_API_HOST",
    "CLEARML_WEB_HOST",
    "CLEARML_FILES_HOST",
    "CLEARML_API_ACCESS_KEY",
    "CLEARML_API_SECRET_KEY",
    "CLEARML_CONFIG_FILE",
    "CLEARML_OFFLINE_MODE",
    "TRAINS_API_HOST",
    "TRAINS_CONFIG_FILE",
    "TRAINS_OFFLINE_MODE",
]

pytestmark = [
    pytest.mark.usefixtures("fake_grids"),
    pytest.mark.filterwarnings("ignore:'parseAll' argument is deprecated"),
]


@pytest.fixture
def isolated_clearml(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """A fresh HOME and cache, no server configured; the whole environment is given back
    afterwards (an offline ClearML task leaves TRAINS_OFFLINE_MODE and *_PROC_MASTER_ID set,
    which later trackers in this process would read)."""
    saved = dict(os.environ)
    (tmp_path / "home").mkdir()
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    for name in CLEARML_VARS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("CLEARML_CACHE_DIR", str(tmp_path / "clearml-cache"))
    yield
    os.environ.clear()
    os.environ.update(saved)


def test_offline_session_has_the_report_artifacts(tmp_path: Path, isolated_clearml: None) -> None:
    root = tmp_path / "project"
    project = write_project(root, make_cfg(tracking={"mode": "offline"}))
    html = run_report_stage(project.cfg, root)
    zips = sorted((root / "runs" / "clearml" / "offline").glob("*.zip"))
    assert len(zips) == 1
    with zipfile.ZipFile(zips[0]) as zf:
        files = {name: zf.read(name) for name in zf.namelist()}
    task = json.loads(files["task.json"])
    assert task["name"] == "rep/report" and task["type"] == "custom"
    assert set(task["tags"]) == {"sweep:rep", "report", "summary"}  # a summary task
    artifacts = {a["key"]: a for a in task["execution"]["artifacts"]}
    assert set(artifacts) == {"index.html", "summary.md"}
    page = next(data for name, data in files.items() if name.endswith("/index.html"))
    assert page == html.read_bytes()
    events = [
        event
        for line in files.get("metrics.jsonl", b"").decode().splitlines()
        if line.strip()
        for event in (json.loads(line) if line.startswith("[") else [json.loads(line)])
    ]
    assert "leaderboard" in [e["metric"] for e in events if e["type"] == "plot"]


def test_tracking_off_records_nothing(tmp_path: Path) -> None:
    project = write_project(tmp_path, make_cfg())
    assert run_report_stage(project.cfg, tmp_path).is_file()
    assert not (tmp_path / "runs" / "clearml").exists()
