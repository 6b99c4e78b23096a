"""The pipeline as a DVC user drives it, in a fresh git repository: ``dvc repro`` runs every
stage and a second one nothing; ``dvc exp run -S`` changes any setting (composed from
``experiments/`` by DVC's Hydra integration) and never reports another configuration's results;
``dvc exp show``, ``dvc params diff``, ``dvc metrics show`` and ``dvc plots show`` read what
the stages declare; the evaluate stage confirms the chosen points on fresh seeds."""

from __future__ import annotations

import json
import math
import shutil
import sqlite3
import subprocess
from pathlib import Path
from typing import Any

import optuna
import pandas as pd
import pytest

from ._dvc_project import dvc, dvc_project, git, run_ok
from ._helpers import VENV_BIN, retrained_tiny_cache

pytestmark = pytest.mark.slow

_EXPERIMENTS = ("report-only", "changed", "back", "sd15")


def _rows(exp_show: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """``{name or rev: data}`` for every commit and experiment row of ``dvc exp show --json``."""
    out: dict[str, dict[str, Any]] = {}
    for row in exp_show:
        if row.get("rev") == "workspace":
            continue
        out[row.get("name") or row["rev"]] = row["data"]
        for group in row.get("experiments") or []:
            for rev in group.get("revs") or []:
                out[rev.get("name") or rev["rev"]] = rev["data"]
    return out


def _metrics(data: dict[str, Any]) -> dict[str, Any]:
    metrics = data["metrics"]["reports/metrics.json"]
    assert "error" not in metrics, metrics
    return dict(metrics["data"])


def _params(data: dict[str, Any]) -> dict[str, Any]:
    return dict(data["params"]["params.yaml"]["data"])


@pytest.fixture(scope="module")
def reproduced(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str], str]:
    """The project after its first `dvc repro`, committed: (repo, env, the repro's output).
    Shared by the tests below (one pipeline run, the slow part); each leaves it as it found it
    or works on a copy."""
    tmp_path = tmp_path_factory.mktemp("dvc")
    repo, env = dvc_project(tmp_path)
    first = dvc(repo, env, "repro")
    git(repo, env, "add", "-A")
    git(repo, env, "commit", "-q", "-m", "sweep results")
    return repo, env, first


def test_dvc_repro_runs_every_stage_then_nothing_and_dvc_reads_it_all(
    reproduced: tuple[Path, dict[str, str], str], tmp_path: Path
) -> None:
    repo, env, first = reproduced
    for stage in ("resolve", "prepare", "sweep", "evaluate", "report"):
        assert f"Running stage '{stage}'" in first, first[-4000:]
    assert "2 training runs (2 completed, 0 pruned, 0 failed)" in first  # closing lines kept
    metrics = json.loads((repo / "reports/metrics.json").read_text())
    assert metrics["points_confirmed"] >= 1
    for name in ("dino", "clip_i", "clip_t"):  # side by side, with the shrinkage
        assert metrics["shrinkage"][name] == pytest.approx(
            metrics["sweep"][name] - metrics["confirm"][name], abs=1e-9
        )

    _check_report(repo, tmp_path)

    second = dvc(repo, env, "repro")
    for stage in ("prepare", "sweep", "evaluate", "report"):
        assert f"Running stage '{stage}'" not in second
        assert f"Stage '{stage}' didn't change, skipping" in second, second[-4000:]
    assert git(repo, env, "status", "--porcelain").strip() == ""  # nothing churns
    assert json.loads(dvc(repo, env, "metrics", "show", "--json"))
    (data,) = _rows(json.loads(dvc(repo, env, "exp", "show", "--json"))).values()
    committed = _metrics(data)
    assert committed["confirm"]["dino"] == metrics["confirm"]["dino"]
    assert committed["baseline"]["dino"] == metrics["baseline"]["dino"]
    assert committed["selection_bias"]["dino"] == metrics["selection_bias"]["dino"]
    assert _params(data)["train"]["lr_warmup_steps"] == 0  # every setting is a param

    dvc(repo, env, "plots", "show", "-o", str(tmp_path / "plots"))
    html = (tmp_path / "plots/index.html").read_text()
    for plot in ("pareto_front", "score_vs_checkpoint_step", "training_loss"):
        assert plot in html

    # A preset edit, recomposed: DVC sees the key and knows which stages it concerns.
    preset = repo / "experiments/preset/tiny-cpu.yaml"
    try:
        preset.write_text(preset.read_text().replace("  rank: 4\n", "  rank: 6\n"))
        run_ok([str(VENV_BIN / "harness"), "config", "compose"], repo, env)
        diff = json.loads(dvc(repo, env, "params", "diff", "--json"))
        rank = diff["params.yaml"]["train.rank"]
        assert (rank["old"], rank["new"]) == (4, 6)
        status = dvc(repo, env, "status")
        assert "sweep:" in status and "prepare:" not in status
    finally:  # the next test starts from the committed project
        git(repo, env, "checkout", "--", "experiments", "params.yaml")


def test_the_evaluate_stage_confirms_the_chosen_points_on_fresh_seeds(
    reproduced: tuple[Path, dict[str, str], str],
) -> None:
    """What `dvc repro`'s evaluate stage wrote: the chosen points re-scored on fresh seeds and
    the held-out prompt, side by side with their sweep scores, and reports/metrics.json."""
    repo, _, first = reproduced
    sweep = pd.read_parquet(repo / "runs/sweep/results.parquet")
    assert json.loads((repo / "runs/sweep/metrics.json").read_text())["points"] == len(sweep)
    output = first.split("Running stage 'evaluate'", 1)[1]
    assert "shrinkage" in output and "runs/evaluate/results.csv" in output

    table = pd.read_csv(repo / "runs/evaluate/results.csv")
    assert 1 <= len(table) <= 2 and table["selection_rank"].tolist() == [*range(1, len(table) + 1)]
    for metric in ("dino", "clip_i", "clip_t"):
        for column in (f"score.{metric}", f"confirm.{metric}", f"shrinkage.{metric}"):
            assert table[column].map(math.isfinite).all(), column
        shrink = table[f"score.{metric}"] - table[f"confirm.{metric}"]
        assert (shrink - table[f"shrinkage.{metric}"]).abs().max() < 1e-9
    # Each row's sweep scores are its point's, from the sweep's table.
    merged = table.merge(sweep, on="point", suffixes=("", ".sweep"))
    assert (merged["score.dino"] == merged["score.dino.sweep"]).all()
    assert (merged["checkpoint_step"] == merged["checkpoint_step.sweep"]).all()

    # Fresh seeds (the sweep used seed 0 only) on the held-out prompt, one image per point.
    for row in table.to_dict(orient="records"):
        manifest = repo / row["confirm.images_dir"] / "manifest.jsonl"
        entries = [json.loads(line) for line in manifest.read_text().splitlines()]
        assert [e["seed"] for e in entries] == [1]
        assert [e["prompt"] for e in entries] == ["a sks toy in the snow"]
        assert (repo / row["adapter"]).is_dir()  # keep_adapters: best kept what was needed

    metrics = json.loads((repo / "reports/metrics.json").read_text())
    best = table.iloc[0]
    assert metrics["best_point"] == best["point"]
    for metric in ("dino", "clip_i", "clip_t"):
        assert math.isclose(metrics["sweep"][metric], best[f"score.{metric}"])
        assert math.isclose(metrics["confirm"][metric], best[f"confirm.{metric}"])
        assert math.isclose(metrics["shrinkage"][metric], best[f"shrinkage.{metric}"])
        # The base model on the sweep's seeds and prompt as well: its own drop is not selection.
        base_drop = best[f"baseline_sweep.{metric}"] - best[f"baseline.{metric}"]
        assert math.isclose(best[f"shrinkage_base.{metric}"], base_drop, abs_tol=1e-9)
        assert math.isclose(
            metrics["selection_bias"][metric], best[f"shrinkage.{metric}"] - base_drop, abs_tol=1e-9
        )
        # Random tiny models: an image depends on its prompt and seed, hardly on the LoRA, so
        # the held-out prompt moves CLIP-T by about 0.16 for every model alike. That is
        # shrinkage (of the base model too), not selection.
        assert abs(metrics["selection_bias"][metric]) < 0.01
        assert metrics["confirm"][f"{metric}_lo"] <= metrics["confirm"][metric] + 1e-9
        assert math.isfinite(metrics["baseline"][metric])
    assert set(metrics["real_ceiling"]) == {"dino", "clip_i"}
    assert metrics["shrinkage"]["clip_t"] > 0.1  # yet a large shrinkage: see above
    # The base model generated again where the study stored it gives the study's scores.
    assert metrics["sweep_reproduced"] is True
    assert max(map(abs, metrics["sweep_baseline_difference"].values())) < 1e-6
    # And the sweep's best point, generated again on the sweep's seeds, gives its own scores.
    assert max(map(abs, metrics["sweep_point_difference"].values())) < 1e-6
    assert "WARNING: the" not in output  # (ClearML logs warnings of its own)
    assert "NVML" not in output  # ClearML's "no GPU stats" warning on a CPU machine is dropped


def test_a_study_scored_by_other_models_is_flagged_by_dvc_repro(
    reproduced: tuple[Path, dict[str, str], str], tmp_path: Path
) -> None:
    """After an upgrade that changes the images or their scores, `dvc repro` reruns the sweep
    stage, which resumes the study: its points are not trained or scored again (with the
    budget spent no pipeline is even loaded), so the sweep's scores are the old code's. The
    evaluate stage generates the base model again where the study stored it (eval's setting,
    the sweep's seeds) and says that the two differ. Simulated here by the study holding other
    baseline scores, as older code would have stored."""
    repo = tmp_path / "project"
    shutil.copytree(reproduced[0], repo, symlinks=True)
    env = reproduced[1]
    storage = f"sqlite:///{repo / 'runs/sweep/study.db'}"
    (study,) = [
        study
        for name in optuna.get_all_study_names(storage)
        if "references" in (study := optuna.load_study(study_name=name, storage=storage)).user_attrs
    ]
    references = study.user_attrs["references"]
    before = references["baseline"]["dino"]
    references["baseline"]["dino"] = before + 0.2
    study.set_user_attr("references", references)
    # The packages it was started with (every run records them too).
    environment = study.user_attrs["environment"]
    assert all(t.user_attrs["environment"] == environment for t in study.trials)
    installed = environment["diffusers"]
    older = {**environment, "diffusers": "0.0.1"}
    study.set_user_attr("environment", older)
    # Where the first worker's versions were settled (harness.sweep.claims), too.
    with sqlite3.connect(repo / "runs/sweep/study.db") as db:
        rows = db.execute(
            "UPDATE harness_sweep_settled SET value = ? WHERE name = 'environment'",
            (json.dumps(older, sort_keys=True),),
        ).rowcount
    assert rows == 1
    # And the weights it was started with (a digest of the tiny model's files).
    weights = study.user_attrs["model"]
    assert weights["model"] == "tiny://sd15" and len(weights["weights"]) == 64
    study.set_user_attr("model", {**weights, "weights": "0" * 64})

    output = dvc(repo, env, "repro", "--force")  # as after an upgrade: every stage reruns
    assert "Running stage 'sweep'" in output and "Running stage 'evaluate'" in output
    # The sweep stage's worker joins the study (no run left, so no model loads) and warns
    # (a log line: stderr, which run_ok puts after stdout).
    changed = f"diffusers {installed} (the study's: 0.0.1)"
    name = study.study_name.removesuffix(".runs")  # as metrics.json's `study` names it
    assert f"packages differ from those study {name} was started with: {changed}" in (output)
    warning = f"dino {before + 0.2:.3f} in the study, {before:.3f} now"
    evaluate = output.split("Running stage 'evaluate'", 1)[1]
    assert "WARNING: the base model on the sweep's seeds" in evaluate and warning in evaluate
    assert f"packages changed since the study began: {changed}" in evaluate
    moved = f"weights {weights['weights'][:12]} (the study's: {'0' * 12})"
    assert f"the model's weights changed since the study began: {moved}" in evaluate
    assert "sweep.study_name" in evaluate
    metrics = json.loads((repo / "reports/metrics.json").read_text())
    assert metrics["sweep_reproduced"] is False
    assert metrics["sweep_baseline_difference"]["dino"] == pytest.approx(-0.2, abs=1e-9)
    report = (repo / "reports/index.html").read_text()
    assert warning in report.replace("&#x27;", "'")
    shown = json.loads(dvc(repo, env, "metrics", "show", "--json"))
    (workspace,) = shown.values()
    assert workspace["data"]["reports/metrics.json"]["data"]["sweep_reproduced"] is False


def test_a_worker_with_retrained_weights_is_refused_and_the_study_is_kept(
    reproduced: tuple[Path, dict[str, str], str], tmp_path: Path
) -> None:
    """The same `model.pretrained`, other weights (a hub repository's main moved, a local
    checkpoint was replaced; here the tiny model's UNet, retrained a little): a worker that
    would add runs to the study is refused before it trains, in one line that says why and
    what to do; the study and its results are as they were."""

    repo = tmp_path / "project"
    shutil.copytree(reproduced[0], repo, symlinks=True)
    cache = retrained_tiny_cache(tmp_path / "cache")
    env = {**reproduced[1], "HARNESS_CACHE_DIR": str(cache)}
    storage = f"sqlite:///{repo / 'runs/sweep/study.db'}"
    names = optuna.get_all_study_names(storage)
    trials = {
        name: len(optuna.load_study(study_name=name, storage=storage).trials) for name in names
    }
    results = (repo / "runs/sweep/results.csv").read_bytes()
    more = "sweep.n_trials=3"  # one run more than the study has: this worker has work
    proc = subprocess.run(
        [str(VENV_BIN / "harness"), "-S", more, "sweep"],
        cwd=repo,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 2, proc.stdout + proc.stderr  # a user error, as the others
    assert "Traceback" not in proc.stderr and "run/s" not in proc.stderr  # no sweep bar above
    assert "model.pretrained 'tiny://sd15': these weights are not those study" in proc.stderr
    assert "(weights " in proc.stderr and "-S sweep.study_name=<new name>" in proc.stderr
    after = {
        name: len(optuna.load_study(study_name=name, storage=storage).trials) for name in names
    }
    assert after == trials
    assert (repo / "runs/sweep/results.csv").read_bytes() == results


def test_harness_export_writes_a_lora_whose_card_reproduces_the_best_point(
    reproduced: tuple[Path, dict[str, str], str], tmp_path: Path, tiny_sd15: Any
) -> None:
    """`harness export` after `dvc repro`: the confirmed best point's adapter, setting and
    scores, and a model card whose diffusers snippet, run by itself in a copy of the folder,
    gives the image the harness generates for that point, prompt and seed."""
    import re

    import numpy as np
    from PIL import Image

    from harness.config import InferenceSetting
    from harness.generate import generate_images

    repo, env, _ = reproduced
    proc = subprocess.run(
        [str(VENV_BIN / "harness"), "export"],
        cwd=repo, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    best = pd.read_csv(repo / "runs/evaluate/results.csv").iloc[0]
    folder = repo / f"runs/export/point-{best['point']}"
    assert f"exported point {best['point']} to runs/export/point-{best['point']}" in proc.stdout
    info = json.loads((folder / "inference.json").read_text())
    assert (info["point"], info["setting_id"]) == (best["point"], best["setting_id"])
    assert info["family"] == "sd15" and "unet" in info["lora_components"]
    assert info["scores"]["confirmed"]["dino"] == pytest.approx(best["confirm.dino"])
    assert info["scores"]["base"]["clip_t"] == pytest.approx(best["baseline.clip_t"])
    weights = "pytorch_lora_weights.safetensors"
    assert (folder / weights).read_bytes() == (repo / best["adapter"] / weights).read_bytes()

    code = re.search(r"```python\n(.*?)```", (folder / "README.md").read_text(), re.S)
    assert code is not None
    user = tmp_path / "user"
    shutil.copytree(folder, user)
    ran = subprocess.run(
        [str(VENV_BIN / "python"), "-c", code.group(1)],
        cwd=user, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert ran.returncode == 0, ran.stderr[-3000:]
    sample = np.asarray(Image.open(user / "sample.png").convert("RGB"), dtype=int)

    example = info["example"]
    setting = InferenceSetting(
        guidance_scale=info["guidance_scale"],
        lora_scale=info["lora_scale"],
        text_encoder_lora_scale=info["text_encoder_lora_scale"] or 1.0,
        num_inference_steps=info["num_inference_steps"],
        scheduler=info["scheduler"],
    )
    (made,) = generate_images(
        tiny_sd15, templates=[example["prompt"]], token=info["token"],
        class_name=info["class_name"], seeds=[example["seed"]], settings=[setting],
        out_dir=tmp_path / "harness", adapter=folder, resolution=info["resolution"],
        batch_size=1,
    )  # fmt: skip
    harness = np.asarray(Image.open(tmp_path / "harness" / made.file).convert("RGB"), dtype=int)
    assert np.abs(sample - harness).max() <= 2  # the same image, to float rounding
    # The run set no train.export_kohya: the export converted the diffusers file, and
    # diffusers' loader reads it as the same adapter (A1111 and ComfyUI read this layout).
    assert info["kohya"] is True and "kohya_not_written" not in info, info
    (from_kohya,) = generate_images(
        tiny_sd15, templates=[example["prompt"]], token=info["token"],
        class_name=info["class_name"], seeds=[example["seed"]], settings=[setting],
        out_dir=tmp_path / "kohya", adapter=folder / "kohya_lora.safetensors",
        resolution=info["resolution"], batch_size=1,
    )  # fmt: skip
    kohya = np.asarray(Image.open(tmp_path / "kohya" / from_kohya.file).convert("RGB"), dtype=int)
    assert np.abs(kohya - harness).max() <= 2
    # ... and the point's own image (generated in a batch: a few levels apart at most).
    shown = np.asarray(Image.open(folder / "example.png").convert("RGB"), dtype=int)
    assert np.abs(sample - shown).mean() < 1.5

    wrong = subprocess.run(
        [str(VENV_BIN / "harness"), "export", "--point", "99999"],
        cwd=repo, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert wrong.returncode == 2 and "Traceback" not in wrong.stderr, wrong.stderr[-2000:]
    assert "--point 99999: no such point" in wrong.stderr


def _check_report(repo: Path, tmp_path: Path) -> None:
    """The report `dvc repro` wrote: every section, renders in a real headless Chromium with no
    console error, no network request and every image decoded; a screenshot is kept."""
    from report.browser import artifacts_dir, open_in_browser, require_chromium

    html = repo / "reports/index.html"
    text = html.read_text()
    for section in ("leaderboard", "pareto", "steps", "importance", "grids", "prompts"):
        assert f'<section id="{section}"' in text, section
    for section in ("paired", "cost"):
        assert f'<section id="{section}"' in text, section
    assert "http://" not in text and "https://" not in text
    assert "| " in (repo / "reports/summary.md").read_text()  # the leaderboard table
    require_chromium()
    page = open_in_browser(html, screenshot=artifacts_dir("report") / "dvc-repro-first-screen.png")
    assert page.problems() == []
    assert page.images and all(image["natural_width"] > 0 for image in page.images)


def test_dvc_exp_run_set_param_trains_anew_and_switching_back_resumes(
    reproduced: tuple[Path, dict[str, str], str], tmp_path: Path
) -> None:
    # On a copy of the reproduced project (its study included): the committed results are the
    # base experiment; what is under test is which stages rerun and which study each
    # experiment's results come from.
    repo = tmp_path / "project"
    shutil.copytree(reproduced[0], repo, symlinks=True)
    env = reproduced[1]
    report_only = dvc(
        repo,
        env,
        "exp",
        "run",
        "-n",
        "report-only",
        "-S",
        "report.top_k=3",
        "-S",
        "report.dir=site",
    )
    assert "Running stage 'report'" in report_only
    for stage in ("prepare", "sweep", "evaluate"):  # a report setting reruns only the report
        assert f"Running stage '{stage}'" not in report_only, report_only[-3000:]
    # The stage's outputs follow report.dir (dvc.yaml templates them from params.yaml).
    assert (repo / "site" / "index.html").is_file() and (repo / "site" / "summary.md").is_file()
    # Two training settings as a DVC user sets them (plain -S, no '+'): trained, not the old
    # results again (one run: the budget is not part of the study's identity).
    changed = dvc(
        repo,
        env,
        "exp",
        "run",
        "-n",
        "changed",
        "-S",
        "train.rank=8",
        "-S",
        "train.lr_warmup_steps=2",
        "-S",
        "sweep.n_trials=1",
    )
    assert "1 training run (1 completed" in changed and "Running stage 'prepare'" not in changed
    # Composed again from experiments/: the base. DVC may restore the sweep's outputs from its
    # run cache or rerun the stage, which then resumes the base study (the counts below).
    dvc(repo, env, "exp", "run", "-n", "back")

    rows = _rows(json.loads(dvc(repo, env, "exp", "show", "--json")))
    rows["base"] = rows.pop(next(name for name in rows if name not in _EXPERIMENTS))
    assert _params(rows["changed"])["train"]["rank"] == 8
    assert _params(rows["changed"])["train"]["lr_warmup_steps"] == 2
    studies = {name: _metrics(rows[name])["study"] for name in ("base", "changed", "back")}
    assert studies["base"] != studies["changed"]
    assert studies["back"] == studies["base"]
    assert _metrics(rows["back"])["confirm"] == _metrics(rows["base"])["confirm"]
    assert _metrics(rows["changed"])["sweep"] != _metrics(rows["base"])["sweep"]
    storage = f"sqlite:///{repo / 'runs/sweep/study.db'}"
    runs = {  # `back` resumed the base study: nothing trained twice
        name: len(optuna.load_study(study_name=f"{studies[name]}.runs", storage=storage).trials)
        for name in ("base", "changed")
    }
    assert runs == {"base": 2, "changed": 1}

    # Another preset (`-S preset=sd15-lora`) is composed by DVC's own Hydra function exactly as
    # `harness config compose` does: tests/test_compose.py, without a fourth `dvc exp run`.
