"""Issue 6: a real tiny sweep (HarnessBackend, tiny models) yields many points per training run."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from safetensors.torch import load_file

from harness.config import load_config
from harness.data import load_prepared
from harness.generate import LORA_WEIGHTS, adapter_loaded
from harness.stages import prepared_subject_dir, run_resolve, run_sweep_stage

from ._helpers import cli_env, clone_project, retrained_tiny_cache

N_RUNS = 4
STEPS = {2, 4}
GUIDANCE = {3.0, 7.5}  # from the tiny-cpu preset's sweep.inference grid
LORA_SCALES = {0.6, 1.0}
PROMPTS = 2


def test_tiny_sweep_points_tables_adapters_and_images(
    prepared_template: Path, tmp_path: Path, tiny_sd15: Any
) -> None:
    root = clone_project(
        prepared_template,
        tmp_path / "project",
        {"sweep": {"study_name": "e2e-tiny", "keep_adapters": "pareto"}},
    )
    cfg = load_config(root / "params.yaml")
    run_resolve(cfg, root)
    summary = run_sweep_stage(cfg, root, progress=False)

    # Runs versus points: every run trained once, evaluated at 2 steps x 4 settings.
    n_settings = len(GUIDANCE) * len(LORA_SCALES)
    assert (summary.runs_total, summary.runs_completed) == (N_RUNS, N_RUNS)
    assert summary.points == N_RUNS * len(STEPS) * n_settings > summary.runs_completed
    frame = pd.read_parquet(summary.results_parquet)
    assert len(frame) == summary.points
    assert frame["run_key"].nunique() == N_RUNS
    assert set(frame["checkpoint_step"]) == STEPS
    assert set(frame["eval.guidance_scale"]) == GUIDANCE
    assert set(frame["eval.lora_scale"]) == LORA_SCALES
    assert not frame.duplicated(["run_key", "checkpoint_step", "setting_id"]).any()
    assert (frame.groupby("run_key").size() == len(STEPS) * n_settings).all()
    assert (frame["n_images"] == PROMPTS).all()
    for metric in ("dino", "clip_i", "clip_t"):
        values = frame[f"score.{metric}"]
        assert values.notna().all() and values.map(math.isfinite).all()
        assert (frame[f"score.{metric}_lo"] <= values + 1e-9).all()
        assert (values <= frame[f"score.{metric}_hi"] + 1e-9).all()
    assert not [c for c in frame.columns if c.startswith("objective.")]  # scores appear once
    # Seconds per phase: the real backend splits generation from scoring.
    for phase in ("train", "proxy", "generate", "score"):
        assert (frame[f"seconds.{phase}"] > 0).all(), phase
    assert "seconds.evaluate" not in frame.columns

    csv = pd.read_csv(summary.results_csv)
    assert csv.shape == frame.shape and list(csv.columns) == list(frame.columns)

    # DVC plot files: every point, and each run's loss curve from the trainer's own log.
    plots = root / "runs/sweep/plots"
    assert len(json.loads((plots / "pareto.json").read_text())) == len(frame)
    assert len(json.loads((plots / "steps.json").read_text())) == N_RUNS * len(STEPS)
    loss = json.loads((plots / "loss.json").read_text())
    assert {r["run_key"] for r in loss} == set(frame["run_key"])
    assert len(loss) == N_RUNS * max(STEPS) and all(math.isfinite(r["loss"]) for r in loss)

    # The sweep's own metrics; reports/metrics.json is the evaluate stage's (test_evaluate_tiny).
    metrics = json.loads((root / "runs/sweep/metrics.json").read_text())
    assert not (root / "reports/metrics.json").exists()
    assert metrics["runs"] == metrics["runs_completed"] == N_RUNS
    assert metrics["runs_pruned"] == metrics["runs_failed"] == 0
    assert metrics["points"] == len(frame)
    assert metrics["pareto_points"] == int(frame["pareto"].sum()) == len(summary.pareto) > 0
    assert metrics["best"]["dino"] == frame["score.dino"].max()
    assert metrics["best"]["clip_t"] == frame["score.clip_t"].max()

    # keep_adapters: pareto -> exactly the Pareto points' checkpoints survive, and the rows of
    # the others say so instead of pointing at a deleted folder.
    (runs_dir,) = (root / "runs/sweep/runs").iterdir()  # runs/<study>/<run key>
    all_adapters = {
        (runs_dir / key / "checkpoints" / f"step-{step:06d}").resolve()
        for key, step in zip(frame["run_key"], frame["checkpoint_step"], strict=True)
    }
    assert frame.loc[frame["pareto"], "adapter"].notna().all()
    pareto_adapters = {(root / a).resolve() for a in frame.loc[frame["pareto"], "adapter"]}
    kept = {p.resolve() for p in runs_dir.glob("*/checkpoints/step-*")}
    assert len(all_adapters) == N_RUNS * len(STEPS)
    assert kept == pareto_adapters
    assert len(kept) < len(all_adapters), "no checkpoint was removed by keep_adapters=pareto"
    assert not any(p.exists() for p in all_adapters - pareto_adapters)
    listed = {(root / a).resolve() for a in frame["adapter"].dropna()}
    assert listed == kept
    assert frame["adapter_removed"].sum() == frame["adapter"].isna().sum() > 0
    pipeline = tiny_sd15.pipeline
    for adapter in sorted(kept):
        weights = load_file(str(adapter / LORA_WEIGHTS))
        assert weights and all("lora" in key for key in weights)
        assert all(t.numel() > 0 and bool(t.isfinite().all()) for t in weights.values())
        with adapter_loaded(pipeline, adapter) as active:
            assert active and any(pipeline.get_list_adapters().values())
        assert not any(pipeline.get_list_adapters().values())

    # A point's images folder has its own manifest; the metrics CLI reproduces its DINO.
    row = frame.loc[frame["pareto"]].iloc[0]
    images_dir = root / row["images_dir"]
    manifest = images_dir / "manifest.jsonl"
    entries = [json.loads(line) for line in manifest.read_text().splitlines() if line]
    assert len(entries) == row["n_images"] == PROMPTS
    assert all((images_dir / e["file"]).is_file() for e in entries)
    assert {e["prompt"] for e in entries} == {"a photo of sks toy", "a sks toy on the beach"}

    subject = load_prepared(prepared_subject_dir(cfg, root))
    # data.reference: all -> train and val photos; the CLI takes one folder, so gather them.
    real = tmp_path / "reference"
    real.mkdir()
    for path in subject.reference:
        shutil.copy2(path, real / f"{path.parent.name}-{path.name}")
    assert len(list(real.iterdir())) == 5
    out = tmp_path / "cli-scores.json"
    cmd = [
        sys.executable, "-m", "metrics", "score",
        "--real", str(real), "--generated", str(images_dir), "--prompts", str(manifest),
        "--json", str(out),
        "--dino-model", cfg.metrics.dino_model, "--clip-model", cfg.metrics.clip_model,
        "--clip-pretrained", "none", "--token", subject.token,
        "--class-name", subject.class_name or "toy",
        "--identifier-policy", cfg.metrics.identifier_policy,
        "--bootstrap-samples", str(cfg.metrics.bootstrap_samples), "--seed", str(cfg.seed),
    ]  # fmt: skip
    proc = subprocess.run(
        cmd, env=cli_env(tmp_path / "home"), capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    scores = json.loads(out.read_text())
    assert {"means", "ci95", "per_prompt", "per_image", "metadata"} <= set(scores)
    assert scores["metadata"]["n_real"] == 5 and scores["metadata"]["n_generated"] == PROMPTS
    assert abs(scores["means"]["dino"] - row["score.dino"]) < 1e-6
    assert abs(scores["means"]["clip_i"] - row["score.clip_i"]) < 1e-6
    assert abs(scores["means"]["clip_t"] - row["score.clip_t"]) < 1e-6


def test_a_late_worker_with_other_weights_stops_at_its_first_run(
    prepared_template: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker that found nothing to do loads no model; when a run turns up after all (a dead
    worker's, to retry), it loads them then, and other weights than the study's stop it there:
    the run goes back to the queue and the study keeps its points."""

    import harness.sweep.runner as runner
    from harness.sweep import open_studies
    from harness.sweep.environment import MODEL_ATTR
    from harness.sweep.study import SweepError

    root = clone_project(
        prepared_template, tmp_path / "project", {"sweep": {"study_name": "late", "n_trials": 1}}
    )
    cfg = load_config(root / "params.yaml")
    run_resolve(cfg, root)
    run_sweep_stage(cfg, root, progress=False)
    runs = open_studies(cfg, root).runs
    stored = runs.user_attrs[MODEL_ATTR]
    assert stored["model"] == cfg.model.pretrained and len(stored["weights"]) == 64
    points = len(pd.read_parquet(root / "runs/sweep/results.parquet"))
    # This worker's tiny model: retrained a little (its own model cache).
    cache = retrained_tiny_cache(tmp_path / "other-cache")
    monkeypatch.setenv("HARNESS_CACHE_DIR", str(cache))

    more = cfg.model_copy(update={"sweep": cfg.sweep.model_copy(update={"n_trials": 2})})
    asked: list[bool] = []

    def no_work(*_: Any) -> bool:
        asked.append(True)
        return False

    monkeypatch.setattr(runner, "has_work", no_work)
    with pytest.raises(SweepError, match=r"run 1 \(.*these weights are not those study") as e:
        run_sweep_stage(more, root, progress=False)
    assert asked == [True]  # the lazy path: no work at the start
    assert f"(the study's: {stored['weights'][:12]})" in str(e.value)
    runs = open_studies(more, root).runs
    done, stopped, queued = runs.trials
    assert (done.state.name, stopped.state.name, queued.state.name) == (
        "COMPLETE",
        "FAIL",
        "WAITING",
    )
    assert (
        stopped.user_attrs["interrupted"] is True
        and "weights" in stopped.user_attrs["interrupt_reason"]
    )
    assert queued.user_attrs["retry_of"] == stopped.number  # for a worker with the right ones
    assert len(pd.read_parquet(root / "runs/sweep/results.parquet")) == points
