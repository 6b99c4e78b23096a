"""A tiny offline run through the real ClearML SDK: assert concrete entries of the session zip."""

from __future__ import annotations

import json
import logging
import os
import time
import warnings
from pathlib import Path
from typing import Any

import pandas as pd
import plotly.graph_objects as go
import pytest
from PIL import Image

from harness.config import HarnessConfig, TrackingConfig
from harness.tracking import NullRun, create_tracker, default_tags

CONFIG: dict[str, Any] = HarnessConfig(preset="tiny-cpu").to_dict()


def _params(task: dict[str, Any]) -> dict[str, str]:
    return {k: v["value"] for k, v in task["hyperparams"]["config"].items()}


def test_tiny_offline_run_records_config_scalars_images_tables_artifacts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, read_session: Any, read_zip: Any
) -> None:
    monkeypatch.delenv("CLEARML_OFFLINE_MODE", raising=False)
    tracker = create_tracker(TrackingConfig(project="sweep-dog"), tmp_path)
    assert tracker.mode == "offline"
    assert "no ClearML server configured" in tracker.mode.reason

    run = tracker.start_run("trial-0", config=CONFIG, tags=default_tags(CONFIG))
    assert run.mode == "offline" and not run.mode.is_fallback
    for step, loss in enumerate([0.9, 0.7, 0.5], start=1):
        run.log_scalar("loss", "train", loss, step)
    run.log_scalars({"lr/unet": 1e-4, "throughput_it_s": 3.5}, step=3, title="train")
    run.log_image("samples/step-10", "prompt-0", Image.new("RGB", (16, 16), "red"), step=10)
    grid = tmp_path / "grid.png"
    Image.new("RGB", (8, 8), "blue").save(grid)
    run.log_image("samples/step-10", "prompt-1", grid, step=10)
    table = pd.DataFrame(
        {"prompt": ["a sks dog", "a sks dog on the beach"], "clip_t": [0.31, 0.27]}
    )
    run.log_table("per_prompt", "step-10", table, step=10)
    run.log_plotly("pareto", "front", go.Figure(go.Scatter(x=[0.5, 0.6], y=[0.3, 0.2])))
    adapter = tmp_path / "pytorch_lora_weights.safetensors"
    adapter.write_bytes(b"\0" * 64)
    run.upload_artifact("adapter", adapter)
    run.upload_artifact("results", table)
    assert run.offline_zip is None

    started = time.monotonic()
    zip_path = run.close()
    # Only a real hang fails this: with ClearML's reporting subprocess a close waits ~10 s
    # (what the harness switches off); a loaded 2-core CI machine needs ~1 s at worst.
    assert time.monotonic() - started < 8.0, "closing an offline task waited for the reporter"
    assert zip_path is not None and zip_path == run.offline_zip
    assert zip_path.parent == tmp_path / "runs" / "clearml" / "offline"
    assert run.close() == zip_path  # idempotent

    task, events = read_session(zip_path)
    assert task["name"] == "trial-0"
    assert task["type"] == "training"
    assert set(task["tags"]) == {"subject:sample", "preset:tiny-cpu", "model:tiny://sd15"}
    params = _params(task)
    assert params["train/rank"] == "4"
    assert params["train/learning_rate"] == "0.0001"
    assert params["data/subject"] == "sample"
    assert params["data/token"] == "sks"  # the DreamBooth identifier is not a secret
    assert params["tracking/project"] == "dreambooth-sweep"

    scalars = {
        (e["metric"], e["variant"], e["iter"]): e["value"]
        for e in events
        if e["type"] == "training_stats_scalar"
    }
    assert scalars[("loss", "train", 1)] == pytest.approx(0.9)
    assert scalars[("loss", "train", 3)] == pytest.approx(0.5)
    assert scalars[("lr", "unet", 3)] == pytest.approx(1e-4)
    assert scalars[("train", "throughput_it_s", 3)] == pytest.approx(3.5)

    images = [e for e in events if e["type"] == "training_debug_image"]
    assert {(e["metric"], e["variant"], e["iter"]) for e in images} == {
        ("samples/step-10", "prompt-0", 10),
        ("samples/step-10", "prompt-1", 10),
    }
    files = read_zip(zip_path)
    assert sum(1 for name in files if "/metrics/samples" in name) == 2

    plots = {
        (e["metric"], e["variant"]): json.loads(e["plot_str"])
        for e in events
        if e["type"] == "plot"
    }
    cells = plots[("per_prompt", "step-10")]["data"][0]["cells"]["values"]
    assert cells == [["a sks dog", "a sks dog on the beach"], [0.31, 0.27]]
    assert plots[("pareto", "front")]["data"][0]["x"] == [0.5, 0.6]

    artifacts = {a["key"]: a for a in task["execution"]["artifacts"]}
    assert set(artifacts) == {"adapter", "results"}
    assert any(name.endswith("pytorch_lora_weights.safetensors") for name in files)

    index = (tmp_path / "runs" / "clearml" / "sessions.jsonl").read_text().splitlines()
    entry = json.loads(index[-1])
    assert entry["zip"] == str(zip_path) and entry["name"] == "trial-0"


def test_runs_in_sequence_summary_run_and_no_leaked_global_state(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, read_session: Any
) -> None:
    monkeypatch.delenv("CLEARML_OFFLINE_MODE", raising=False)
    from harness.tracking.clearml_backend import Task  # to check that our switch is undone

    subprocess_flag = Task._report_subprocess_enabled
    tracker = create_tracker(TrackingConfig(mode="offline"), tmp_path)
    with tracker.start_run("trial-1", config={"train": {"rank": 8}}, tags=[]) as first:
        first.log_scalar("loss", "train", 0.25, 1)
        busy = tracker.start_run("clash", config={}, tags=[])  # ClearML: one open task
        assert isinstance(busy, NullRun) and busy.mode == "off"
    summary = tracker.start_run(
        "sweep-summary", config={"n_trials": 2}, tags=["sweep"], kind="summary", project="sw"
    )
    summary.log_table("leaderboard", "all", pd.DataFrame({"trial": [0, 1], "dino": [0.6, 0.5]}))
    summary_zip = summary.close()

    assert first.offline_zip and summary_zip and first.offline_zip != summary_zip
    task, events = read_session(summary_zip)
    assert task["type"] == "custom" and "summary" in task["tags"]
    assert [e["metric"] for e in events if e["type"] == "plot"] == ["leaderboard"]
    # our offline switch is undone: the user's environment and ClearML's defaults are back
    assert "CLEARML_OFFLINE_MODE" not in os.environ
    assert Task._report_subprocess_enabled == subprocess_flag


def test_off_mode_records_nothing(tmp_path: Path) -> None:
    tracker = create_tracker(TrackingConfig(mode="off"), tmp_path)
    with tracker.start_run("x", config={"a": 1}, tags=["t"]) as run:
        run.log_scalars({"loss": 1.0}, step=0)
        run.log_table("t", "s", pd.DataFrame({"a": [1]}))
    assert run.mode == "off" and run.close() is None and run.offline_zip is None
    assert not (tmp_path / "runs").exists()


def test_reporting_errors_never_reach_training(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    run = create_tracker(TrackingConfig(mode="offline"), tmp_path).start_run(
        "trial", config={}, tags=[]
    )

    def boom(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("reporter exploded")

    run._logger.report_scalar = boom  # type: ignore[attr-defined]
    with caplog.at_level(logging.WARNING, logger="harness.tracking"):
        run.log_scalar("loss", "train", 1.0, 0)
        run.log_scalar("loss", "train", 1.0, 1)
    assert sum("reporter exploded" in r.getMessage() for r in caplog.records) == 1
    assert run.close() is not None


def test_closing_a_run_gives_the_console_back(tmp_path: Path) -> None:
    """ClearML replaces sys.stdout/sys.stderr to capture the console; after close, what the CLI
    writes (the sweep's closing lines, an ``error:`` line) must reach the real streams again.

    This test once passed only after another test's in-process task had left its
    ``CLEARML_PROC_MASTER_ID`` in the environment: the subprocess then got a stub, no task, no
    console capture. Click's own default streams, first resolved after a task, still lose
    their lines (ClearML leaves ``sys.__stdout__`` patched); ``harness.cli.echo`` names the
    stream, and is what the CLI uses for every line."""
    script = f"""
import sys
from pathlib import Path
from harness.cli import echo
from harness.config import TrackingConfig
from harness.tracking import create_tracker
before = (sys.stdout, sys.stderr)
tracker = create_tracker(TrackingConfig(mode="offline"), Path({str(tmp_path)!r}))
run = tracker.start_run("trial-0", config={{}}, tags=[])
print("tracked:", type(run).__name__)
run.close()
assert (sys.stdout, sys.stderr) == before, (sys.stdout, sys.stderr)
echo("closing line on stdout")
echo("closing line on stderr", err=True)
"""
    stdout, stderr = _run_python_streams(script, tmp_path)  # pipes: where the bug showed
    assert "tracked: ClearMLRun" in stdout.splitlines()  # a real task captured the console
    assert "closing line on stdout" in stdout.splitlines()
    assert "closing line on stderr" in stderr.splitlines()


def test_the_zip_has_every_scalar_when_close_leaves_the_reporter_running(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, read_session: Any
) -> None:
    """What a long test session showed: ClearML's close() returned with its reporter thread
    still holding the run's events, and the zip lacked metrics.jsonl. Simulated by a close that
    neither flushes nor stops the reporter (and a reporter thread that only writes when told)."""
    from clearml import Task
    from clearml.backend_interface.metrics.reporter import BackgroundReportService, Reporter

    monkeypatch.setattr(Reporter, "stop", lambda self: None)
    monkeypatch.setattr(Reporter, "wait_for_events", lambda self, timeout=None: None)
    monkeypatch.setattr(Task, "flush", lambda self, wait_for_uploads=False: True)
    monkeypatch.setattr(BackgroundReportService, "flush", lambda self: None)
    tracker = create_tracker(TrackingConfig(mode="offline"), tmp_path)
    run = tracker.start_run("trial-0", config={"train": {"rank": 2}}, tags=[])
    service = run._task._reporter._report_service  # type: ignore[attr-defined]
    service._wait_timeout = 3600  # the thread writes only when stopped or flushed
    run.log_scalar("loss", "train", 0.25, 7)
    zip_path = run.close()
    assert zip_path is not None
    _, events = read_session(zip_path)
    assert {(e["metric"], e["variant"], e["iter"], e["value"]) for e in events if "value" in e} >= {
        ("loss", "train", 7, 0.25)
    }


def test_the_repository_is_detected_inside_task_init_not_in_a_racing_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ClearML's default detects the git repository in a thread that reloads the task under its
    edit lock; it raced the summary run's first artifact upload, and `dvc repro` hung with both
    waiting on that lock (seen once under `make demo`). The repository is detected in
    ``Task.init`` itself, and ClearML's default is given back after the run."""
    import threading

    monkeypatch.delenv("CLEARML_OFFLINE_MODE", raising=False)
    from harness.tracking.clearml_backend import Task

    before = Task.__dict__["_Task__detect_repo_async"]
    tracker = create_tracker(TrackingConfig(mode="offline"), tmp_path)
    run = tracker.start_run("sweep-summary", config={}, tags=[], kind="summary", project="sw")
    racing = [t for t in threading.enumerate() if "_update_repository" in t.name]
    run.upload_artifact("results", pd.DataFrame({"trial": [0]}))  # what hung
    assert run.close()
    assert racing == []
    assert Task.__dict__["_Task__detect_repo_async"] is before


def test_a_table_with_missing_scores_is_logged_as_it_is_without_pandas_deprecations(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, read_session: Any
) -> None:
    """A results table has empty float cells (a cheap rung's point has no full-protocol score).
    ClearML's ``report_table`` fills NaN with a string, which pandas 3 deprecates for a float
    column ("will raise" in pandas 4, where the table would silently be missing: tracking never
    raises). The table must arrive whole, with no deprecation on the way."""
    monkeypatch.delenv("CLEARML_OFFLINE_MODE", raising=False)
    run = create_tracker(TrackingConfig(mode="offline"), tmp_path).start_run(
        "trial", config={}, tags=[]
    )
    table = pd.DataFrame(
        {"point": [1, 2], "dino": [0.5, float("nan")], "fidelity": ["full", "rung-0"]}
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run.log_table("results", "all", table)
    zip_path = run.close()
    deprecations = [w for w in caught if issubclass(w.category, DeprecationWarning | FutureWarning)]
    assert not deprecations, [str(w.message) for w in deprecations]
    assert table["dino"].dtype == "float64"  # the caller's frame is not changed

    assert zip_path is not None
    _, events = read_session(zip_path)
    (plot,) = [json.loads(e["plot_str"]) for e in events if e["type"] == "plot"]
    cells = plot["data"][0]["cells"]["values"]
    assert cells == [[1, 2], [0.5, "nan"], ["full", "rung-0"]]


def test_a_run_on_a_machine_without_an_nvidia_driver_prints_no_gpu_monitoring_noise(
    tmp_path: Path,
) -> None:
    """On a machine without an NVIDIA driver (CPU runs, the demo) ClearML's resource monitor
    printed ``WARNING - Could not fetch GPU stats: NVML Shared Library Not Found`` and, three
    samples later, "GPU monitoring failed getting GPU reading, switching off GPU monitoring"
    into every run's output: there are no GPU stats to fetch there. Run as a user's process
    does, long enough for the monitor's third sample; CPU and memory are still monitored."""

    script = f"""
import time
from pathlib import Path
from harness.config import TrackingConfig
from harness.tracking import create_tracker
run = create_tracker(TrackingConfig(mode="offline"), Path({str(tmp_path)!r})).start_run(
    "trial-0", config={{}}, tags=[]
)
time.sleep(3.0)  # the monitor samples twice a second; ClearML gave up after three failures
print("monitor:", type(run._task._resource_monitor).__name__, run._task._resource_monitor._gpustat)
print("zip:", run.close())
"""
    output = _run_python(script, tmp_path)
    assert "zip: " in output and ".zip" in output
    if _loads("libnvidia-ml.so.1"):
        pytest.skip("this machine has an NVIDIA driver: ClearML polls its GPUs as before")
    assert "monitor: _ResourceMonitor None" in output  # ours, with GPU polling off
    assert "NVML" not in output
    assert "GPU monitoring failed" not in output


def _loads(library: str) -> bool:
    """Whether this machine has the shared library (an NVIDIA driver installs NVML's)."""
    import ctypes

    try:
        ctypes.CDLL(library)
    except OSError:
        return False
    return True


@pytest.mark.parametrize("master", ["1:", "1:0123456789abcdef0123456789abcdef"])
def test_a_run_started_by_a_process_that_ran_a_clearml_task_is_a_task_of_its_own(
    tmp_path: Path, master: str, read_session: Any
) -> None:
    """ClearML marks a process that ran a task with ``CLEARML_PROC_MASTER_ID=<pid>:<task id>``
    and its children inherit it (a notebook or script with a ClearML task that runs `dvc repro`
    or `harness sweep`). ``Task.init`` in the child then returned a stub (no task id: "could
    not start ClearML run (TypeError ... StubObject); not tracked") or attached to the parent's
    task (every run logged into somebody else's task). A harness run is a task of its own."""
    script = f"""
from pathlib import Path
from harness.config import TrackingConfig
from harness.tracking import create_tracker
run = create_tracker(TrackingConfig(mode="offline"), Path({str(tmp_path)!r})).start_run(
    "trial-0", config={{"train": {{"rank": 4}}}}, tags=[]
)
run.log_scalar("loss", "train", 0.5, 1)
print("zip:", run.close())
"""
    output = _run_python(script, tmp_path, CLEARML_PROC_MASTER_ID=master)
    assert "not tracked" not in output, output[-3000:]
    (zip_line,) = [line for line in output.splitlines() if line.startswith("zip: ")]
    task, events = read_session(Path(zip_line.removeprefix("zip: ")))
    assert task["name"] == "trial-0" and task["id"] != master.partition(":")[2]
    assert [e["value"] for e in events if e["type"] == "training_stats_scalar"] == [0.5]


def _run_python(script: str, tmp_path: Path, **env: str) -> str:
    """The output (stdout, then stderr) of :func:`_run_python_streams`."""
    return "".join(_run_python_streams(script, tmp_path, **env))


def _run_python_streams(script: str, tmp_path: Path, **env: str) -> tuple[str, str]:
    """``python -c script`` as a user's process (its own HOME and ClearML cache, none of the
    ClearML task variables an in-process test left in this environment, plus ``env``):
    stdout and stderr, both pipes; the script must succeed."""
    import subprocess
    import sys

    clean = {k: v for k, v in os.environ.items() if "PROC_MASTER_ID" not in k}
    clean.update(HOME=str(tmp_path), CLEARML_CACHE_DIR=str(tmp_path / "cache"), **env)
    proc = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        env=clean,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    return proc.stdout, proc.stderr
