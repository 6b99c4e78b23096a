"""The report from a synthetic project: every section, numbers equal to the tables', nothing
external, the Markdown summary, and the fallbacks when inputs are missing."""

from __future__ import annotations

import html
import json
import re
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import optuna
import pandas as pd
import pytest
from PIL import Image

from harness.report import ReportError, build_report, write_report
from harness.report.importance import study_from_table
from harness.stages import run_report_stage
from harness.sweep.study import storage_url

from .synthetic import (
    CONFIRMED,
    PROMPTS,
    STUDY,
    FakeGrid,
    Project,
    make_cfg,
    no_grids_module,
    write_project,
)

pytestmark = pytest.mark.usefixtures("fake_grids")

SECTIONS = ["leaderboard", "pareto", "steps", "importance", "grids", "prompts", "paired", "cost"]


def _score(value: float) -> str:
    return f"{value:.3f}"


def _signed(value: float) -> str:
    return f"{round(value, 3) + 0.0:+.3f}"  # a rounded zero is +0.000, never -0.000


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Project, str]]:
    """The default synthetic project and its report page, built once for the module."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(sys.modules, "harness.report.grids", no_grids_module())
        project = write_project(tmp_path_factory.mktemp("built"), make_cfg())
        yield project, _html(project)


def _html(project: Project) -> str:
    path = run_report_stage(project.cfg, project.root)
    assert path == project.root / "reports" / "index.html"
    return path.read_text(encoding="utf-8")


def test_every_section_is_there_with_its_id_and_heading(
    built: tuple[Project, str], parse_report: Any
) -> None:
    text = built[1]
    page = parse_report(text)
    assert list(page.sections) == SECTIONS
    assert all(page.headings[s].strip() for s in SECTIONS)
    header = text[text.index("<header") : text.index("</header>")]
    for fact in (STUDY, "tiny://sd15", "sample", "test", "generated"):
        assert fact in header


def test_leaderboard_numbers_equal_the_evaluate_table(
    built: tuple[Project, str], parse_report: Any
) -> None:
    project, text = built
    cells = parse_report(text).sections["leaderboard"]
    table = project.evaluate
    assert [int(p) for p in table["point"]] == list(CONFIRMED)
    for row in table.to_dict(orient="records"):
        key = str(row["point"])
        assert cells[(key, "selected_by")] == "pareto"
        assert cells[(key, "selection_rank")] == str(row["selection_rank"])
        for m in ("dino", "clip_i", "clip_t"):
            for column in (f"score.{m}", f"confirm.{m}"):
                for suffix in ("", "_lo", "_hi"):
                    assert cells[(key, column + suffix)] == _score(row[column + suffix])
            assert cells[(key, f"shrinkage.{m}")] == _signed(row[f"shrinkage.{m}"])
            # the part of the shrinkage the base model's own does not explain
            assert cells[(key, f"selection_bias.{m}")] == _signed(row[f"selection_bias.{m}"])
        assert row["selection_bias.dino"] == pytest.approx(row["shrinkage.dino"] - 0.02)
        assert row["selection_bias.clip_t"] == pytest.approx(row["shrinkage.clip_t"] + 0.01)
        # the point's settings: the searched learning rate, its step and inference setting
        assert cells[(key, "train.learning_rate")] == f"{row['train.learning_rate']:g}"
        assert cells[(key, "setting_id")] == row["setting_id"]
    assert cells[("train.rank", "value")] == "4"  # a fixed setting
    assert cells[("base model, fresh seeds", "dino")] == "0.512"
    sentence = "own shrinkage under the best point's setting (sweep's seeds - confirmation's): "
    assert sentence + "DINO +0.020, CLIP-I +0.000, CLIP-T -0.010." in html.unescape(text)
    assert cells[("real photos (ceiling)", "dino")] == "0.774"


def test_a_sweep_the_base_model_no_longer_reproduces_is_a_warning_first(
    tmp_path: Path, parse_report: Any
) -> None:
    """The evaluate stage found the base model's scores on the sweep's seeds changed since the
    study stored them: the leaderboard says so before anything else."""
    project = write_project(tmp_path, make_cfg())
    path = project.root / "runs/evaluate/references.json"
    references = json.loads(path.read_text())
    check = {"setting": "g5-u1-t1-n4-ddim", "sweep": {"dino": 0.82}, "now": {"dino": 0.659}}
    references["reproduction"] = {**check, "difference": {"dino": -0.161}, "reproduced": False}
    path.write_text(json.dumps(references))
    text = html.unescape(_html(project))
    leaderboard = text[text.index('id="leaderboard"') :]
    first = leaderboard[leaderboard.index("<p>") + 3 : leaderboard.index("</p>")]
    assert first.startswith("WARNING: the base model on the sweep's seeds (g5-u1-t1-n4-ddim)")
    assert "dino 0.820 in the study, 0.659 now" in first
    references["reproduction"]["reproduced"] = True
    path.write_text(json.dumps(references))
    assert "WARNING" not in _html(project)
    # The base model reproduces, the best point does not (the adapter's way changed).
    what = "the sweep's best point (point 3, run abc step 20)"
    point = {**check, "what": what, "difference": {"dino": -0.161}, "reproduced": False}
    path.write_text(json.dumps({**references, "point_reproduction": point}))
    text = html.unescape(_html(project))
    leaderboard = text[text.index('id="leaderboard"') :]
    first = leaderboard[leaderboard.index("<p>") + 3 : leaderboard.index("</p>")]
    assert first.startswith(f"WARNING: {what} on the sweep's seeds (g5-u1-t1-n4-ddim)")


def test_pareto_steps_and_cost_numbers_equal_the_sweep_table(
    built: tuple[Project, str], parse_report: Any
) -> None:
    project, text = built
    page = parse_report(text)
    sweep = project.sweep.set_index("point")
    pareto = page.sections["pareto"]
    for point in CONFIRMED:
        assert pareto[(str(point), "score.dino")] == _score(sweep.loc[point, "score.dino"])
        assert pareto[(str(point), "score.clip_t_hi")] == _score(
            sweep.loc[point, "score.clip_t_hi"]
        )
    assert {k for k, _ in pareto} == {str(p) for p in CONFIRMED}  # the front only
    steps = page.sections["steps"]
    assert len([1 for _, c in steps if c == "score"]) == 3 * 2  # runs x checkpoint steps
    mean = project.sweep.assign(mean=project.sweep[["score.dino", "score.clip_t"]].mean(axis=1))
    for (key, step), rows in mean.groupby(["run_key", "checkpoint_step"]):
        assert steps[(f"{key}/{step}", "score")] == _score(rows["mean"].max())
    cost = page.sections["cost"]
    assert cost[("11", "score.pres")] == _score(sweep.loc[11, "score.pres"])
    assert cost[("11", "score.div")] == _score(sweep.loc[11, "score.div"])
    assert cost[("11", "score.div_dino")] == _score(sweep.loc[11, "score.div_dino"])
    # point 5 is run-b (CPU, 2 processes x 12.5 s, 4 points), point 2 run-a (GPU); point 11
    # is run-c, whose folder is missing: not recorded
    assert (cost[("5", "device")], cost[("5", "device_s")]) == ("CPU", "25.0")
    assert cost[("5", "device_s_per_point")] == "6.2"
    assert (cost[("11", "device")], cost[("11", "device_s")]) == ("–", "–")
    assert (cost[("2", "device")], cost[("2", "peak_mib")]) == ("GPU", "1003.0")


def test_the_page_is_self_contained(built: tuple[Project, str], parse_report: Any) -> None:
    text = built[1]
    assert not re.search(r"https?://", text)
    assert not re.search(r"<script[^>]*\bsrc\s*=", text, re.I)
    assert not re.search(r"<link[^>]*\bhref\s*=", text, re.I)
    assert "@import" not in text and "url(" not in text
    page = parse_report(text)
    assert len(page.images) == 4  # pareto, steps, importance, per-prompt (no grid here)
    assert all(src.startswith("data:image/png;base64,") for src in page.images)
    assert all(link.startswith("#") for link in page.links)


def test_summary_markdown_has_the_leaderboard(built: tuple[Project, str]) -> None:
    project, text = built
    text = (project.root / "reports" / "summary.md").read_text(encoding="utf-8")
    assert text.startswith(f"# DreamBooth sweep {STUDY}\n")
    assert "## Leaderboard: the confirmed points" in text
    best = project.evaluate.iloc[0]
    row = next(line for line in text.splitlines() if line.startswith("| 1 | 11 |"))
    expected = (
        f"{_score(best['confirm.dino'])} [{_score(best['confirm.dino_lo'])}, "
        f"{_score(best['confirm.dino_hi'])}]"
    )
    assert expected in row and _signed(best["shrinkage.clip_t"]) in row
    assert "http" not in text


def test_paired_verdicts_and_differences(built: tuple[Project, str], parse_report: Any) -> None:
    project, text = built
    cells = parse_report(text).sections["paired"]
    images = project.per_image
    assert images is not None
    best, equal, worse = CONFIRMED

    def diff(other: int, metric: str) -> float:
        pick = images.set_index(["point", "prompt", "seed"])[metric]
        return float((pick.loc[best] - pick.loc[other]).mean())

    # rank 2 has the same DINO offset as rank 1 (noise); rank 3 is 0.1 lower (real)
    assert cells[(str(equal), "verdict.dino")] == "noise"
    assert cells[(str(worse), "verdict.dino")] == "real"
    assert cells[(str(worse), "diff.dino")] == _signed(diff(worse, "dino"))
    assert cells[(str(equal), "diff.clip_t")] == _signed(diff(equal, "clip_t"))
    assert cells[(str(worse), "n_pairs")] == str(len(PROMPTS) * 4)
    lo, hi = float(cells[(str(worse), "diff.dino_lo")]), float(cells[(str(worse), "diff.dino_hi")])
    assert 0 < lo <= 0.1 <= hi


def test_paired_comparison_takes_top_k_points(tmp_path: Path, parse_report: Any) -> None:
    project = write_project(tmp_path, make_cfg(report={"top_k": 2}))
    cells = parse_report(_html(project)).sections["paired"]
    assert {k for k, _ in cells} == {str(CONFIRMED[1])}


def test_prompts_flag_where_the_subject_fails(
    built: tuple[Project, str], parse_report: Any
) -> None:
    project, text = built
    cells = parse_report(text).sections["prompts"]
    snow = "a sks robot in the snow"
    assert "subject" in cells[(snow, "fails")]
    assert cells[("a photo of sks robot", "fails")] == ""
    images = project.per_image
    assert images is not None
    mean = images[(images["point"] == CONFIRMED[0]) & (images["prompt"] == snow)]["dino"].mean()
    assert cells[(snow, "dino")] == _score(mean)


def test_without_per_image_scores_the_sections_say_so(tmp_path: Path, parse_report: Any) -> None:
    project = write_project(tmp_path, make_cfg(), per_image=False)
    text = _html(project)
    page = parse_report(text)
    assert list(page.sections) == SECTIONS
    prompts = text[text.index('<section id="prompts"') :]
    assert "Per-image scores are not recorded" in prompts
    assert page.sections["prompts"][("11", "confirm.dino")] == _score(
        project.evaluate.iloc[0]["confirm.dino"]
    )
    assert "Not available" in text[text.index('<section id="paired"') :]
    # absent paths are named relative to the project root
    assert "runs/evaluate/per_image.parquet" in prompts and str(tmp_path) not in text


def test_missing_cost_and_quality_are_not_recorded(tmp_path: Path) -> None:
    project = write_project(tmp_path, make_cfg(), per_image=False)
    shutil.rmtree(tmp_path / "runs/sweep/runs")
    sweep = project.sweep.drop(columns=["score.pres", "score.div", "score.div_lo", "score.div_hi"])
    sweep.to_parquet(tmp_path / "runs/sweep/results.parquet", index=False)
    text = _html(project)
    cost = text[text.index('<section id="cost"') :]
    assert "PRES: not measured" in cost and "not recorded" in cost
    # no LPIPS weights configured: the paper's DIV is missing, and the line says why
    assert project.cfg.metrics.lpips_weights is None
    assert "DIV: not measured (no LPIPS weights: set metrics.lpips_weights" in cost
    assert "DIV-DINO (diversity: 1 - mean DINO similarity" in cost


def test_no_evaluate_output_is_one_clear_error(tmp_path: Path) -> None:
    project = write_project(tmp_path, make_cfg())
    (tmp_path / "runs/evaluate/results.parquet").unlink()
    with pytest.raises(ReportError, match=r"run `harness evaluate` first") as err:
        build_report(project.cfg, tmp_path)
    assert len(str(err.value).splitlines()) == 1
    assert not (tmp_path / "reports/index.html").exists()


def test_evaluate_output_of_another_study_is_refused(tmp_path: Path) -> None:
    project = write_project(tmp_path, make_cfg())
    (tmp_path / "reports/metrics.json").write_text(json.dumps({"study": "rep-other"}))
    with pytest.raises(ReportError, match="rep-other"):
        build_report(project.cfg, tmp_path)


def test_sweep_tables_of_another_study_are_refused(tmp_path: Path) -> None:
    """An interrupted sweep of another configuration rewrote the tables (and summary.json
    with them) but not metrics.json, which still names the evaluated study."""
    project = write_project(tmp_path, make_cfg())
    summary = tmp_path / "runs/sweep/summary.json"
    summary.write_text(json.dumps({"points": 1, "pareto": [], "study": "rep-interrupted"}))
    with pytest.raises(ReportError, match="rep-interrupted"):
        build_report(project.cfg, tmp_path)


def _png(path: Path, colour: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), colour).save(path)
    return path


@pytest.mark.parametrize("embed", [True, False])
def test_grids_are_labelled_figures_embedded_or_beside_the_page(
    tmp_path: Path, fake_grids: Any, parse_report: Any, embed: bool
) -> None:
    outside = tmp_path / "elsewhere"

    def make(cfg: Any, root: Path, out_dir: Path) -> list[FakeGrid]:
        assert out_dir == root / "reports" / "grids"
        inside = FakeGrid(
            "points", "Confirmed points", _png(out_dir / "p.png", "red"), out_dir / "p.json"
        )
        inside.manifest.write_text("{}")
        far = FakeGrid(
            "baseline", "Base model", _png(outside / "b.png", "blue"), outside / "b.json"
        )
        far.manifest.write_text("{}")
        return [inside, far]

    fake_grids(make)
    project = write_project(tmp_path, make_cfg(report={"embed_images": embed}))
    text = _html(project)
    grids = text[text.index('<section id="grids"') : text.index('<section id="prompts"')]
    assert "Confirmed points" in grids and "Base model" in grids
    page = parse_report(grids)
    if embed:
        assert all(src.startswith("data:image/png;base64,") for src in page.images)
    else:
        assert page.images == ["grids/p.png", "grids/b.png"]
        assert (tmp_path / "reports/grids/b.png").is_file()  # copied beside the page
    assert page.links == ["grids/p.json", "grids/b.json"]
    assert not re.search(r"https?://", text)


def test_importance_from_the_study_or_recomputed_from_the_table(
    tmp_path: Path, parse_report: Any
) -> None:
    project = write_project(tmp_path, make_cfg(), per_image=False)
    text = _html(project)
    importance = text[text.index('<section id="importance"') : text.index('<section id="grids"')]
    assert (
        "importance for a high DINO" in importance and "importance for a high CLIP-T" in importance
    )
    assert "the results table (no study file" in importance
    cells = parse_report(importance).sections["importance"]
    assert ("checkpoint_step", "importance.dino") in cells
    assert ("train.rank", "importance.dino") not in cells  # constant: left out
    # a points study of that name in the sweep's storage is used instead
    study = study_from_table(project.sweep, ["dino", "clip_t"])
    stored = optuna.create_study(
        study_name=STUDY, storage=storage_url(project.cfg, tmp_path), directions=["maximize"] * 2
    )
    stored.add_trials(study.trials)
    text = _html(project)
    assert f"the points study {STUDY}" in text


def test_table_study_keeps_the_varying_parameters() -> None:
    from .synthetic import sweep_table

    study = study_from_table(sweep_table(), ["dino", "clip_t"])
    assert len(study.trials) == 12
    assert set(study.trials[0].params) == {
        "train.learning_rate",
        "checkpoint_step",
        "eval.guidance_scale",
    }


def test_report_reads_only_files(project: Project) -> None:
    run_report_stage(project.cfg, project.root)
    out = sorted(p.name for p in (project.root / "reports").iterdir())
    assert out == ["index.html", "metrics.json", "summary.md"]
    assert not (project.root / "runs/sweep/study.db").exists()  # no study was created


def test_write_report_returns_the_files(project: Project) -> None:
    report = build_report(project.cfg, project.root)
    files = write_report(project.cfg, project.root, report)
    assert files.html.is_file() and files.markdown.is_file()
    assert isinstance(report.leaderboard, pd.DataFrame)
    assert list(report.leaderboard["point"]) == list(CONFIRMED)


def test_a_weighted_sweep_reports_its_weighted_score(tmp_path: Path, parse_report: Any) -> None:
    cfg = make_cfg(sweep={"weights": {"dino": 0.7, "clip_t": 0.3}})
    project = write_project(tmp_path, cfg)
    text = _html(project)
    page = parse_report(text)
    assert list(page.sections) == SECTIONS
    best = project.evaluate.iloc[0]
    cells = page.sections["leaderboard"]
    assert cells[("11", "confirm.weighted")] == _score(best["confirm.weighted"])
    assert "importance for a high weighted score" in text
    assert "score" in {c for _, c in page.sections["steps"]}
