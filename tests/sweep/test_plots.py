"""DVC plots of a sweep (issue 11): the plot data files the sweep writes, and the real consumer,
``dvc plots show`` / ``dvc plots diff``, rendering the project's declared plots with them."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import yaml

from harness.config import HarnessConfig
from harness.sweep import SweepSummary, run_sweep
from harness.sweep.plots import LOSS_FILE, PARETO_FILE, STEPS_FILE, plots_dir
from harness.train import CheckpointInfo, TrainResult

from .fakes import FakeBackend

REPO = Path(__file__).resolve().parents[2]
DVC = REPO / ".venv" / "bin" / "dvc"


class LoggingBackend(FakeBackend):
    """The fake backend, writing ``train_log.jsonl`` as the real trainer does."""

    def train(
        self,
        cfg: HarnessConfig,
        run_dir: Path,
        on_checkpoint: Callable[[CheckpointInfo], bool],
        on_log: Callable[[Mapping[str, Any], int], None],
        on_validation: Callable[[Any], None] | None = None,
    ) -> TrainResult:
        run_dir.mkdir(parents=True, exist_ok=True)
        lines = [
            json.dumps({"step": s, "loss": 1.0 / s, "lr_unet": cfg.train.learning_rate})
            for s in range(1, cfg.train.max_steps + 1)
        ]
        (run_dir / "train_log.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
        return super().train(cfg, run_dir, on_checkpoint, on_log, on_validation)


def _cfg(**sweep: Any) -> HarnessConfig:
    base: dict[str, Any] = {
        "study_name": "plots",
        "n_trials": 3,
        "sampler": "random",
        "pruner": "none",
        "space": {"learning_rate": {"low": 1e-5, "high": 1e-3, "log": True}},
        "inference": {"guidance_scale": [3.0, 7.0], "lora_scale": [0.5, 1.0]},
    }
    base.update(sweep)
    return HarnessConfig.model_validate(
        {
            "preset": "test",
            "train": {"max_steps": 20, "checkpoint_steps": [10, 20]},
            "sweep": base,
            "tracking": {"mode": "off"},
        }
    )


def _sweep(root: Path, **sweep: Any) -> tuple[HarnessConfig, SweepSummary]:
    cfg = _cfg(**sweep)
    return cfg, run_sweep(cfg, root, LoggingBackend())


def _read(root: Path, cfg: HarnessConfig, name: str) -> list[dict[str, Any]]:
    data = json.loads((plots_dir(root / cfg.sweep.dir) / name).read_text(encoding="utf-8"))
    assert isinstance(data, list)
    return data


def test_pareto_file_has_every_point_with_the_front_marked(tmp_path: Path) -> None:
    cfg, summary = _sweep(tmp_path)
    frame = pd.read_parquet(summary.results_parquet)
    rows = _read(tmp_path, cfg, PARETO_FILE)
    assert len(rows) == len(frame) == summary.points
    assert {len(r) for r in rows} == {len(rows[0])}  # same keys in every record (DVC needs it)
    by_point = {r["point"]: r for r in rows}
    for _, row in frame.iterrows():
        got = by_point[row["point"]]
        assert got["subject_score"] == row["score.dino"]
        assert got["prompt_score"] == row["score.clip_t"]
        assert got["pareto"] is bool(row["pareto"])
        assert (got["run_key"], got["checkpoint_step"]) == (row["run_key"], row["checkpoint_step"])
        assert got["subject_metric"] == "dino"
    assert sum(r["pareto"] for r in rows) == len(summary.pareto) > 0


def test_steps_file_has_one_line_per_run_over_checkpoint_steps(tmp_path: Path) -> None:
    cfg, summary = _sweep(tmp_path)
    frame = pd.read_parquet(summary.results_parquet)
    rows = _read(tmp_path, cfg, STEPS_FILE)
    keys = {(r["run_key"], r["checkpoint_step"]) for r in rows}
    assert len(keys) == len(rows) == frame["run_key"].nunique() * 2
    for r in rows:  # the best inference setting of that run at that step
        at = frame[
            (frame["run_key"] == r["run_key"]) & (frame["checkpoint_step"] == r["checkpoint_step"])
        ]
        means = (at["score.dino"] + at["score.clip_t"]) / 2
        assert r["score"] == pytest.approx(means.max())
        assert r["setting_id"] == at.loc[means.idxmax(), "setting_id"]


def test_weighted_steps_score_is_the_weighted_objective(tmp_path: Path) -> None:
    cfg, summary = _sweep(tmp_path, weights={"dino": 0.7, "clip_t": 0.3})
    frame = pd.read_parquet(summary.results_parquet)
    best = frame.groupby(["run_key", "checkpoint_step"])["score.weighted"].max()
    for r in _read(tmp_path, cfg, STEPS_FILE):
        assert r["score"] == pytest.approx(best[(r["run_key"], r["checkpoint_step"])])


def test_loss_file_has_one_curve_per_run_from_its_train_log(tmp_path: Path) -> None:
    cfg, summary = _sweep(tmp_path)
    rows = _read(tmp_path, cfg, LOSS_FILE)
    runs = {r["run_key"] for r in rows}
    assert runs == set(pd.read_parquet(summary.results_parquet)["run_key"])
    for key in runs:
        steps = [r["step"] for r in rows if r["run_key"] == key]
        assert steps == list(range(1, 21))
    assert all(r["loss"] == pytest.approx(1.0 / r["step"]) for r in rows)


def test_plot_files_are_current_after_every_run(tmp_path: Path) -> None:
    """Rewritten with the results table, so a resumed sweep's files cover every worker's runs."""
    cfg, _ = _sweep(tmp_path, n_trials=1)
    assert len({r["run_key"] for r in _read(tmp_path, cfg, LOSS_FILE)}) == 1
    cfg, _ = _sweep(tmp_path, n_trials=2)
    assert len({r["run_key"] for r in _read(tmp_path, cfg, STEPS_FILE)}) == 2
    assert len({r["run_key"] for r in _read(tmp_path, cfg, LOSS_FILE)}) == 2


# --- the real consumer: dvc plots show / diff with the project's plots block and templates ---


def _env(tmp_path: Path) -> dict[str, str]:
    return {
        **os.environ,
        "DVC_NO_ANALYTICS": "1",
        "DVC_SITE_CACHE_DIR": str(tmp_path / "dvc-site"),
        "HOME": str(tmp_path / "home"),
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@example.com",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@example.com",
    }


def _run(args: list[str], cwd: Path, env: dict[str, str]) -> str:
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"$ {' '.join(args)}\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def _declared() -> list[dict[str, Any]]:
    """The project's top-level ``plots:`` block."""
    plots = yaml.safe_load((REPO / "dvc.yaml").read_text(encoding="utf-8"))["plots"]
    assert isinstance(plots, list) and plots
    return plots


def _plot_repo(tmp_path: Path) -> tuple[Path, dict[str, str], dict[str, str]]:
    """A git + DVC repo holding the project's plots block, its templates and a sweep's plot
    files at their declared paths; returns it, its env and ``{plot id: data file}``."""
    repo, env = tmp_path / "repo", _env(tmp_path)
    repo.mkdir()
    _run(["git", "init", "-q"], repo, env)
    _run([str(DVC), "init", "-q"], repo, env)
    shutil.copytree(REPO / ".dvc" / "plots", repo / ".dvc" / "plots")
    plots = _declared()
    (repo / "dvc.yaml").write_text(yaml.safe_dump({"plots": plots}, sort_keys=False))
    cfg, _ = _sweep(tmp_path / "sweep")
    # The paths are templated from params.yaml (`${sweep.dir}`), as in the project.
    (repo / "params.yaml").write_text(yaml.safe_dump({"sweep": {"dir": cfg.sweep.dir}}))
    source = plots_dir(tmp_path / "sweep" / cfg.sweep.dir)
    files: dict[str, str] = {}
    for entry in plots:
        ((plot_id, props),) = entry.items()
        (template,) = props["y"]  # one data file per plot
        path = template.replace("${sweep.dir}", cfg.sweep.dir)
        files[plot_id] = path
        (repo / path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source / Path(path).name, repo / path)
    return repo, env, files


def _shown(repo: Path, env: dict[str, str], *args: str) -> dict[str, Any]:
    shown = json.loads(_run([str(DVC), "plots", *args, "--json"], repo, env))
    assert not shown.get("errors"), shown["errors"]
    return dict(shown["data"])


def test_declared_plots_are_the_three_sweep_plots(tmp_path: Path) -> None:
    plots = {k: v for entry in _declared() for k, v in entry.items()}
    assert {"pareto_front", "score_vs_checkpoint_step", "training_loss"} <= set(plots)
    for props in plots.values():
        assert (REPO / ".dvc" / "plots" / f"{props['template']}.json").is_file()
        assert all(str(p).startswith("${sweep.dir}/plots/") for p in props["y"])


@pytest.mark.slow
def test_dvc_plots_show_renders_each_declared_plot_with_data(tmp_path: Path) -> None:
    repo, env, files = _plot_repo(tmp_path)
    data = _shown(repo, env, "show")
    assert set(files) <= set(data)
    for plot_id, path in files.items():
        (rendered,) = data[plot_id]
        spec = rendered["content"]
        points = spec["data"]["values"]
        written = json.loads((repo / path).read_text())
        assert len(points) == len(written) > 0, plot_id
        assert all(p["rev"] == "workspace" for p in points)
        # Coloured by training run, not by file or revision; no DVC anchor left unfilled.
        assert "run_key" in json.dumps(spec) and "<DVC_METRIC" not in json.dumps(spec)
    out = tmp_path / "html"
    _run([str(DVC), "plots", "show", "-o", str(out)], repo, env)
    html = (out / "index.html").read_text()
    for plot_id in files:
        assert plot_id in html
    assert html.count('"run_key"') >= len(files)


@pytest.mark.slow
def test_dvc_plots_diff_shows_both_revisions(tmp_path: Path) -> None:
    repo, env, files = _plot_repo(tmp_path)
    _run(["git", "add", "-A"], repo, env)
    _run(["git", "commit", "-q", "-m", "sweep"], repo, env)
    loss = repo / files["training_loss"]
    rows = json.loads(loss.read_text())
    loss.write_text(json.dumps([{**r, "loss": r["loss"] / 2} for r in rows]))
    data = _shown(repo, env, "diff", "HEAD")
    (rendered,) = data["training_loss"]
    assert set(rendered["revisions"]) == {"HEAD", "workspace"}
    values = rendered["content"]["data"]["values"]
    assert len(values) == 2 * len(rows)
    assert "rev" in json.dumps(rendered["content"]["encoding"])  # revisions stay apart
