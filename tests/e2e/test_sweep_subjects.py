"""Issue 15: a sweep across the four shared DreamBench subjects through the CLI, as a user runs
it (`harness prepare`, `sweep`, `evaluate`, `report` on the real tiny models), and a subject
whose photos all fail stopping the sweep before anything trains."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from harness.data.sample import make_sample_subject

from ._helpers import cli_env, new_project, run_cli, tail

SUBJECTS = {"backpack": "backpack", "cat2": "cat", "dog": "dog", "teapot": "teapot"}
LIVE = {"cat2", "dog"}
POINTS = 1  # 1 checkpoint x 1 inference setting (kept small: 4 subjects on 2 CPU cores)
ONE_SETTING = {"guidance_scale": [3.0], "lora_scale": [1.0]}


def _overrides(bench: Path, **data: object) -> dict[str, object]:
    return {
        "data": {
            "source": "dreambench",
            "dreambench_dir": str(bench),
            "subjects": "all",
            "min_side": 64,
            **data,
        },
        "train": {"checkpoint_steps": [4]},
        "sweep": {
            "study_name": "e2e-subjects",
            "n_trials": 1,
            "keep_adapters": "all",
            "inference": ONE_SETTING,
        },
        # The DreamBooth paper's protocol, one image per prompt (the paper's 4 cost too much here).
        "evaluate": {"top_k": 1, "protocol": "dreambench", "images_per_prompt": 1},
        "report": {"bootstrap_samples": 100},
    }


def test_a_sweep_over_four_dreambench_subjects_scores_each_point_by_their_mean(
    tmp_path: Path, dreambench_dir: Path
) -> None:
    project = new_project(tmp_path / "project", _overrides(dreambench_dir))
    env, log = cli_env(tmp_path / "home"), tmp_path / "cli.log"
    for args in (["prepare"], ["sweep"], ["evaluate"], ["report"]):
        done = run_cli(project, args, env, log, timeout=400)
        assert done.returncode == 0, tail(log)

    # Every subject prepared with its own class and DreamBench's prompt list for its kind.
    manifests = {
        name: json.loads((project / "data/prepared" / name / "manifest.json").read_text())
        for name in SUBJECTS
    }
    for name, noun in SUBJECTS.items():
        assert manifests[name]["class_name"] == noun
        prompts = manifests[name]["prompts"]
        assert len(prompts) == 25
        assert ("a {token} {class_name} wearing a red hat" in prompts) == (name in LIVE)
        assert ("a {token} {class_name} on top of a mirror" in prompts) == (name not in LIVE)

    # One training run per subject for the one configuration.
    (run_dir,) = (project / "runs/sweep/runs").glob("*/*")
    for name in SUBJECTS:
        checkpoints = run_dir / "subjects" / name / "checkpoints"
        assert sorted(p.name for p in checkpoints.iterdir()) == ["step-000004"]

    assert "each run trained on 4 subjects, every score their mean" in log.read_text()
    assert json.loads((project / "runs/sweep/metrics.json").read_text())["subjects"] == 4

    # The aggregated score of every point is the mean of its per-subject scores.
    frame = pd.read_csv(project / "runs/sweep/results.csv")
    assert len(frame) == POINTS and (frame["subjects"] == 4).all()
    table = pd.read_csv(project / "runs/sweep/subjects.csv")
    assert len(table) == POINTS * 5
    for _, rows in table.groupby("point"):
        per = rows[rows["subject"] != "mean"]
        assert sorted(per["subject"]) == sorted(SUBJECTS)
        point = frame[frame["point"] == rows["point"].iloc[0]].iloc[0]
        for metric in ("dino", "clip_i", "clip_t"):
            assert point[f"score.{metric}"] == pytest.approx(per[f"score.{metric}"].mean())

    # Each subject's images were generated with its own class noun.
    images = pd.read_parquet(project / "runs/sweep/per_image.parquet")
    for name, noun in SUBJECTS.items():
        mine = images[images["subject"] == name]
        assert len(mine) == POINTS * 2 and mine["prompt"].str.contains(f"sks {noun}").all()

    # The evaluate stage re-scored the chosen point on every subject; the report shows them.
    confirmed = pd.read_parquet(project / "runs/evaluate/results.parquet")
    assert len(confirmed) == 1
    confirmed_images = pd.read_parquet(project / "runs/evaluate/per_image.parquet")
    assert set(confirmed_images["subject"]) == set(SUBJECTS)
    summary = (project / "reports" / "summary.md").read_text(encoding="utf-8")
    assert "4 subjects (scores: the mean over them): backpack, cat2, dog, teapot" in summary
    subjects = summary.split("## Subjects")[1].split("\n## ")[0]
    for name in SUBJECTS:  # a row per subject, base model and confirmed point side by side
        assert any(line.startswith(f"| {name} |") for line in subjects.splitlines()), subjects
    assert f"point {confirmed['point'].iloc[0]}: weakest on" in subjects
    paper = summary.split("## DreamBench table")[1].split("\n## ")[0]
    assert "| Real images |" in paper and "| Base model (no adapter) |" in paper
    assert "mean over 4 subject(s), DreamBench prompts, 1 image(s) per prompt" in paper
    # The base-versus-LoRA grid shows every subject, each column one subject's prompt and seed.
    grid = json.loads((project / "reports/grids/base_vs_lora.json").read_text(encoding="utf-8"))
    assert {value[0] for value in grid["columns"]["values"]} == set(SUBJECTS)

    # evaluate.protocol dreambench: each subject's own 25 DreamBench prompts (one image each
    # here, the paper's 4 by default), for the chosen point and the base model alike.
    for name in SUBJECTS:
        mine = confirmed_images[confirmed_images["subject"] == name]
        assert mine.groupby("baseline")["template"].nunique().to_dict() == {False: 25, True: 25}
        hat = mine["template"].eq("a {token} {class_name} wearing a red hat").any()
        assert hat == (name in LIVE)

    point = int(confirmed["point"].iloc[0])
    _check_export(project, env, log, point, table, confirmed_images)


def _check_export(
    project: Path, env: dict[str, str], log: Path, point: int, table: Any, images: Any
) -> None:
    """``harness export`` of the chosen multi-subject point: one complete export per subject
    (its own adapter, token, class noun, image, and sweep, confirmed and base-model scores),
    which diffusers' LoRA loader reads, and an index README."""
    from diffusers import StableDiffusionPipeline

    done = run_cli(project, ["export"], env, log, timeout=120)
    assert done.returncode == 0, tail(log)
    out = project / "runs/export" / f"point-{point}"
    assert f"exported point {point} (4 subjects) to runs/export/point-{point}" in log.read_text()
    index = (out / "README.md").read_text(encoding="utf-8")
    rows = table[(table["point"] == point) & (table["subject"] != "mean")]
    for name, noun in SUBJECTS.items():
        mine = rows[rows["subject"] == name].iloc[0]
        folder = out / name
        weights = folder / "pytorch_lora_weights.safetensors"
        adapter = project / mine["adapter"] / "pytorch_lora_weights.safetensors"
        assert weights.read_bytes() == adapter.read_bytes()
        assert StableDiffusionPipeline.lora_state_dict(str(folder))[0]  # diffusers reads it
        info = json.loads((folder / "inference.json").read_text(encoding="utf-8"))
        assert (info["token"], info["class_name"], info["point"]) == ("sks", noun, point)
        assert info["instance_prompt"] == f"a photo of sks {noun}"
        for metric in ("dino", "clip_i", "clip_t"):  # the subject's own, not the mean
            assert info["scores"]["sweep"][metric] == pytest.approx(mine[f"score.{metric}"])
            for kind, is_base in (("confirmed", False), ("base", True)):
                own = images[(images["subject"] == name) & (images["baseline"] == is_base)]
                assert info["scores"][kind][metric] == pytest.approx(own[metric].mean())
        assert info["example"]["image"].startswith(str(mine["images_dir"]))
        assert (folder / "example.png").is_file() and (folder / "kohya_lora.safetensors").is_file()
        assert f"# DreamBooth LoRA: sks {noun}" in (folder / "README.md").read_text()
        assert f"| {name} | `{name}/` | {noun} |" in index, index


def test_a_subject_whose_photos_all_fail_stops_the_sweep_before_training(tmp_path: Path) -> None:
    bench = tmp_path / "bench"
    make_sample_subject(bench / "good", 5, seed=1)
    (bench / "broken").mkdir(parents=True)
    for i in range(5):
        (bench / "broken" / f"{i:02d}.jpg").write_bytes(b"not a jpeg")
    (bench / "prompts_and_classes.txt").write_text(
        "Classes\nsubject_name,class\ngood,toy\nbroken,toy\n\n"
        "Object Prompts\nprompt_list = [\n'a {0} {1}'.format(unique_token, class_token)\n]\n"
        "Live Subject Prompts\nprompt_list = [\n'a {0} {1}'.format(unique_token, class_token)\n]\n",
        encoding="utf-8",
    )
    project = new_project(tmp_path / "project", _overrides(bench))
    env, log = cli_env(tmp_path / "home"), tmp_path / "cli.log"

    prepared = run_cli(project, ["prepare"], env, log, timeout=120)
    text = log.read_text()
    assert prepared.returncode == 2, tail(log)
    errors = [line for line in text.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "subject 'broken'" in errors[0], text
    assert "(1 other(s) prepared)" in errors[0]
    assert (project / "data/prepared/good/manifest.json").is_file()  # nothing done is lost
    assert "Traceback" not in text

    log.write_text("")
    swept = run_cli(project, ["sweep"], env, log, timeout=120)
    text = log.read_text()
    assert swept.returncode == 2, tail(log)
    errors = [line for line in text.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "subject 'broken'" in errors[0], text
    assert not (project / "runs/sweep/runs").exists()  # nothing trained
