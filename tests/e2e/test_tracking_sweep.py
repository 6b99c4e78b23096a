"""Issue 7: a tracked tiny sweep records one offline ClearML session per training run plus a
summary session with concrete values, and no secret reaches any file or console output."""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import pandas as pd
import pytest
from optuna.trial import TrialState

from ._helpers import cli_env, clone_project, run_cli, tail
from .conftest import Postgres, postgres_missing_reason

STUDY = "e2e-tracked"
N_RUNS = 2
STEPS = (2, 4)
VALIDATION_PROMPT = "a {token} {class_name} on the moon"
DB_PASSWORD = "Pw-s3cret-42"
API_SECRET = "supersecretkey123456"
HF_TOKEN = "hf_abcdefghijklmnop1234"
SECRETS = (DB_PASSWORD, API_SECRET, HF_TOKEN)


@dataclass(frozen=True)
class TrackedSweep:
    base: Path  # everything the sweep could write: the project, HOME, ClearML cache, the log
    project: Path
    log: Path
    storage: str
    postgres: bool

    @property
    def study(self) -> str:
        """The Optuna study of the project's config (``<sweep.study_name>-<fingerprint>``)."""
        from harness.config import load_config
        from harness.sweep.study import study_id

        return study_id(load_config(self.project / "params.yaml"), self.project)

    @property
    def sessions(self) -> list[dict[str, Any]]:
        index = self.project / "runs/clearml/sessions.jsonl"
        return [json.loads(line) for line in index.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def tracked_sweep(
    prepared_template: Path, tmp_path_factory: pytest.TempPathFactory, request: Any
) -> TrackedSweep:
    """``harness resolve`` + ``harness sweep`` (CLI subprocesses) with offline tracking, secrets
    in the environment and a password in ``sweep.storage`` (PostgreSQL when available)."""
    base = tmp_path_factory.mktemp("tracked")
    project = base / "project"
    postgres = postgres_missing_reason() is None
    if postgres:
        server: Postgres = request.getfixturevalue("postgres_server")
        storage = server.url(DB_PASSWORD)
    else:  # the tracking test still runs; the secrets test fails (CI) or skips on its own
        storage = f"sqlite:///{project / 'runs/sweep/study.db'}"
    clone_project(
        prepared_template,
        project,
        {
            "tracking": {"mode": "offline", "offline_dir": "runs/clearml"},
            # One validation image per run after its last step (the tracker's "validation").
            "train": {"validation_steps": STEPS[-1], "validation_prompts": [VALIDATION_PROMPT]},
            "sweep": {
                "study_name": STUDY,
                "n_trials": N_RUNS,
                "storage": storage,
                "inference": {"guidance_scale": [3.0, 7.5], "lora_scale": [1.0]},
            },
        },
    )
    # PWD as a shell sets it after `cd project` (dvc repro / harness run from the project root).
    env = cli_env(
        base / "home",
        {"CLEARML_API_SECRET_KEY": API_SECRET, "HF_TOKEN": HF_TOKEN, "PWD": str(project)},
    )
    log = base / "console.log"
    for command in (["resolve"], ["sweep"]):
        proc = run_cli(project, command, env, log, timeout=180)
        assert proc.returncode == 0, tail(log, 80)
    return TrackedSweep(base, project, log, storage, postgres)


def _session(path: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    with zipfile.ZipFile(path) as zf:
        task = json.loads(zf.read("task.json"))
        lines = (
            zf.read("metrics.jsonl").decode().splitlines()
            if "metrics.jsonl" in zf.namelist()
            else []
        )
    events: list[dict[str, Any]] = []
    for line in lines:
        if line.strip():
            chunk = json.loads(line)
            events.extend(chunk if isinstance(chunk, list) else [chunk])
    return task, events


def _scalars(events: list[dict[str, Any]]) -> dict[tuple[str, str, int], float]:
    return {
        (e["metric"], e["variant"], int(e["iter"])): float(e["value"])
        for e in events
        if e.get("type") == "training_stats_scalar"
    }


def _hyperparams(task: dict[str, Any]) -> dict[str, str]:
    return {k: v["value"] for k, v in task["hyperparams"]["config"].items()}


def test_closing_lines_reach_a_redirected_stdout(tracked_sweep: TrackedSweep) -> None:
    """``harness sweep > file`` with tracking on: ClearML's console capture must not swallow the
    sweep's closing lines (the run count, result paths and Pareto points)."""
    text = tracked_sweep.log.read_text()
    assert f"{N_RUNS} training runs ({N_RUNS} completed, 0 pruned, 0 failed) -> " in text
    assert "results: " in text and "results.parquet" in text
    assert "  pareto: run " in text


def test_one_offline_session_per_run_with_config_scalars_images_and_tables(
    tracked_sweep: TrackedSweep,
) -> None:
    sweep = tracked_sweep
    sessions = sweep.sessions
    train = [s for s in sessions if s["kind"] == "train"]
    summary = [s for s in sessions if s["kind"] == "summary"]
    assert (len(train), len(summary)) == (N_RUNS, 1), sessions
    assert all(Path(s["zip"]).is_file() for s in sessions)
    assert len({s["zip"] for s in sessions}) == len(sessions)

    runs = optuna.load_study(study_name=f"{sweep.study}.runs", storage=sweep.storage)
    trials = {t.number: t for t in runs.get_trials(states=(TrialState.COMPLETE,))}
    assert len(trials) == N_RUNS
    frame = pd.read_parquet(sweep.project / "runs/sweep/results.parquet")
    assert len(frame) == N_RUNS * len(STEPS) * 2

    seen = set()
    for entry in train:
        match = re.fullmatch(rf"{STUDY}/run-(\d{{4}})-([0-9a-f]{{12}})", entry["name"])
        assert match, entry["name"]
        trial = trials[int(match[1])]
        key = match[2]
        assert trial.user_attrs["run_key"] == key
        seen.add(trial.number)
        task, events = _session(Path(entry["zip"]))
        assert task["name"] == entry["name"] and task["type"] == "training"
        assert {
            "subject:sample",
            "preset:tiny-cpu",
            "model:tiny://sd15",
            f"sweep:{STUDY}",
        } <= set(task["tags"])
        params = _hyperparams(task)
        assert float(params["train/dropout"]) == trial.params["train.dropout"]
        assert float(params["train/learning_rate"]) == trial.params["train.learning_rate"]
        assert params["train/max_steps"] == "4" and params["data/token"] == "sks"

        scalars = _scalars(events)
        log_lines = (Path(trial.user_attrs["run_dir"]) / "train_log.jsonl").read_text()
        losses = {r["step"]: r["loss"] for r in map(json.loads, log_lines.splitlines())}
        assert sorted(losses) == [1, 2, 3, 4]
        for step, loss in losses.items():
            assert scalars[("train", "loss", step)] == pytest.approx(loss, abs=1e-6)
        for step in STEPS:
            for metric in ("dino", "clip_t"):
                assert 0.0 <= scalars[("proxy", metric, step)] <= 1.0
        rows = frame[frame["run_key"] == key]
        assert len(rows) == len(STEPS) * 2
        for _, row in rows.iterrows():
            at = (f"eval/{row['setting_id']}", "dino", int(row["checkpoint_step"]))
            assert abs(scalars[at] - row["score.dino"]) < 1e-6
            at = (f"eval/{row['setting_id']}", "clip_t", int(row["checkpoint_step"]))
            assert abs(scalars[at] - row["score.clip_t"]) < 1e-6

        images = {
            (e["metric"], e["variant"], int(e["iter"]))
            for e in events
            if e.get("type") == "training_debug_image"
        }
        samples = {(f"samples/{s}", step) for s in set(rows["setting_id"]) for step in STEPS}
        assert {(title, step) for title, _, step in images} - {("validation", STEPS[-1])} == samples
        # The run's validation image, as `harness train` logs it; also on disk in the run.
        assert ("validation", "0: a sks toy on the moon", STEPS[-1]) in images
        run_dir = Path(trial.user_attrs["run_dir"])
        assert (run_dir / f"validation/step-{STEPS[-1]}/validation.json").is_file()
    assert seen == set(trials)

    task, events = _session(Path(summary[0]["zip"]))
    assert task["type"] == "custom" and {"summary", f"sweep:{STUDY}"} <= set(task["tags"])
    plots = {e["metric"]: json.loads(e["plot_str"]) for e in events if e.get("type") == "plot"}
    assert {"leaderboard", "pareto front", "parallel coordinates dino"} <= set(plots)
    cells = plots["leaderboard"]["data"][0]["cells"]["values"]
    assert all(len(column) == len(frame) for column in cells)
    assert plots["pareto front"]["data"], "empty Pareto front plot"
    scalars = _scalars(events)
    assert scalars[("sweep", "points", 0)] == len(frame)
    assert scalars[("sweep", "runs", 0)] == N_RUNS
    # What the study was started with, beside its config: the packages and the model weights.
    params = _hyperparams(task)
    assert params["provenance/environment/diffusers"] == importlib.metadata.version("diffusers")
    assert params["provenance/model/model"] == "tiny://sd15"
    assert re.fullmatch("[0-9a-f]{64}", params["provenance/model/weights"])
    summary_json = json.loads((sweep.project / "runs/sweep/summary.json").read_text())
    assert summary_json["model"]["weights"] == params["provenance/model/weights"]


def test_per_prompt_table_logged_per_setting_and_step(tracked_sweep: TrackedSweep) -> None:
    """Each run session holds the per-prompt score table of every setting at every step.

    Fails today: harness/evaluate.py reads ``result.per_prompt``, but ``metrics.ScoreResult``
    names those rows ``prompts``, so the table is always empty and never logged.
    """
    frame = pd.read_parquet(tracked_sweep.project / "runs/sweep/results.parquet")
    for entry in (s for s in tracked_sweep.sessions if s["kind"] == "train"):
        _, events = _session(Path(entry["zip"]))
        key = entry["name"].rsplit("-", 1)[-1]
        settings = set(frame.loc[frame["run_key"] == key, "setting_id"])
        tables = {
            (e["metric"], int(e["iter"])): json.loads(e["plot_str"])
            for e in events
            if e.get("type") == "plot"
        }
        assert set(tables) == {(f"per-prompt/{s}", step) for s in settings for step in STEPS}
        for table in tables.values():
            prompts = table["data"][0]["cells"]["values"][0]
            assert sorted(prompts) == ["a photo of sks toy", "a sks toy on the beach"]


def test_summary_artifact_path_is_not_masked(tracked_sweep: TrackedSweep) -> None:
    """The summary session's ``results`` artifact points at the real file (import needs it).

    Fails today: secrets.py treats the PWD variable as a password ("pwd"), so every path under
    the working directory is replaced by ``***`` in the session's task.json.
    """
    (summary,) = (s for s in tracked_sweep.sessions if s["kind"] == "summary")
    task, _ = _session(Path(summary["zip"]))
    artifacts = {a["key"]: a for a in task["execution"]["artifacts"]}
    uri = artifacts["results"]["uri"]
    assert "***" not in uri and uri.endswith("artifacts/results/results.parquet")
    assert Path(uri).is_file()


def _texts(base: Path) -> list[tuple[str, bytes]]:
    """Every file under ``base`` (zip members read one by one), as (name, bytes)."""
    out: list[tuple[str, bytes]] = []
    for path in sorted(base.rglob("*")):
        if not path.is_file() or path.is_symlink():
            continue
        data = path.read_bytes()
        out.append((str(path), data))
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as zf:
                out.extend((f"{path}!{name}", zf.read(name)) for name in zf.namelist())
    return out


def test_no_secret_in_any_file_or_output(
    tracked_sweep: TrackedSweep, postgres_server: Postgres
) -> None:
    sweep = tracked_sweep
    assert sweep.postgres and sweep.storage.startswith("postgresql+psycopg2://")
    # The password really was in the configuration, and the study really lives in PostgreSQL.
    resolved = json.loads((sweep.project / "runs/resolved/sweep.json").read_text())
    assert resolved["sweep"]["storage"] == (
        f"postgresql+psycopg2://postgres:***@127.0.0.1:{postgres_server.port}/harness"
    )
    assert not (sweep.project / "runs/sweep/study.db").exists()
    assert len(optuna.load_study(study_name=sweep.study, storage=sweep.storage).trials) == 8
    assert DB_PASSWORD in (sweep.project / "params.yaml").read_text()  # the user's own input

    files = [
        (name, data)
        for name, data in _texts(sweep.base)
        if not name.endswith(os.sep + "params.yaml")
    ]
    assert any("sessions.jsonl" in name for name, _ in files)
    assert sum(1 for name, _ in files if name.endswith("!task.json")) == N_RUNS + 1
    assert any(name.endswith("results.csv") for name, _ in files)
    leaks = [
        (secret, name)
        for secret in SECRETS
        for name, data in files
        if secret.encode() in data or secret.encode("utf-16-le") in data
    ]
    assert leaks == [], f"secrets leaked: {leaks}"
    assert sweep.log.stat().st_size > 0


def test_a_plain_worker_writes_its_runs_and_no_summary_task(
    prepared_template: Path, tmp_path: Path
) -> None:
    """N ``harness sweep worker`` processes made N summary tasks; ``harness sweep`` writes the
    one summary task (afterwards, or itself a worker). That ``harness sweep > file`` on the
    finished study (what ``dvc exp run`` does when it reruns the stage) trains nothing and
    still prints its closing lines: they were lost after the summary task's offline session
    when nothing had been printed before it."""
    project = clone_project(
        prepared_template,
        tmp_path / "project",
        {
            "tracking": {"mode": "offline", "offline_dir": "runs/clearml"},
            # One validation image per run after its last step (the tracker's "validation").
            "train": {"validation_steps": STEPS[-1], "validation_prompts": [VALIDATION_PROMPT]},
            "sweep": {"study_name": "e2e-worker-tracked", "n_trials": 1},
        },
    )
    env = cli_env(tmp_path / "home", {"PWD": str(project)})
    log = tmp_path / "console.log"
    index = project / "runs/clearml/sessions.jsonl"

    def kinds() -> list[str]:
        return [json.loads(line)["kind"] for line in index.read_text().splitlines() if line]

    worker = run_cli(project, ["sweep", "worker"], env, log, timeout=180)
    assert worker.returncode == 0, tail(log, 80)
    assert kinds() == ["train"]
    summary = run_cli(project, ["sweep"], env, log, timeout=180)
    assert summary.returncode == 0, tail(log, 80)
    assert kinds() == ["train", "summary"]
    text = log.read_text().split("$ harness sweep\n")[-1]
    assert "1 training run (1 completed, 0 pruned, 0 failed) -> " in text, text
    assert "study e2e-worker-tracked" in text and ": optuna-dashboard" in text, text
    assert "results: " in text and "  pareto: run " in text, text
