"""``harness report`` and the ``report`` config section."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from harness.cli import app
from harness.config import ConfigError, ReportConfig, validate_config
from harness.sweep.runner import run_key
from harness.sweep.study import study_id

from .synthetic import make_cfg, write_project

pytestmark = pytest.mark.usefixtures("fake_grids")

PARAMS = "preset: tiny-cpu\ntracking:\n  mode: 'off'\nsweep:\n  study_name: rep\n"


def _params(repo_root: Path, root: Path) -> Path:
    shutil.copytree(repo_root / "experiments", root / "experiments")
    params = root / "params.yaml"
    params.write_text(PARAMS, encoding="utf-8")
    return params


def test_cli_without_evaluate_output_is_one_line_exit_2(repo_root: Path, tmp_path: Path) -> None:
    params = _params(repo_root, tmp_path)
    result = CliRunner().invoke(app, ["-p", str(params), "report"])
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ") and "run `harness evaluate` first" in lines[0]
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "reports" / "index.html").exists()


def test_cli_writes_the_report_and_prints_its_path_last(
    repo_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    params = _params(repo_root, tmp_path)
    write_project(tmp_path, make_cfg())
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["-p", str(params), "report"])
    assert result.exit_code == 0, result.output
    lines = result.stdout.strip().splitlines()
    assert lines[-1] == "report: reports/index.html"
    assert "summary: reports/summary.md" in lines
    assert (tmp_path / "reports" / "index.html").is_file()


def test_report_section_is_strict_with_defaults() -> None:
    assert ReportConfig().model_dump() == {
        "dir": "reports",
        "title": None,
        "top_k": 5,
        "image_size": 128,
        "embed_images": True,
        "bootstrap_samples": 2000,
        "seed": 0,
    }
    with pytest.raises(ConfigError) as err:
        validate_config({"preset": "t", "report": {"top_k": 1, "embbed_images": False}})
    problems = str(err.value)
    assert "report.top_k: must be >= 2" in problems
    assert "report.embbed_images: unknown key (did you mean 'embed_images'?)" in problems


def test_report_settings_change_no_study_and_no_run() -> None:
    """Report-only params: the study identity and the training runs ignore them, so changing
    one reruns only the report stage (no other dvc.yaml stage lists ``report``)."""
    base = make_cfg()
    changed = make_cfg(
        report={"top_k": 3, "title": "x", "image_size": 64, "embed_images": False, "seed": 4}
    )
    assert study_id(base) == study_id(changed)
    assert run_key(base) == run_key(changed)


# The files `harness report` reads (at the default folders).
INPUTS = (
    "runs/evaluate/references.json",
    "runs/sweep/metrics.json",
    "reports/metrics.json",
    "runs/evaluate/results.parquet",
    "runs/sweep/results.parquet",
    "runs/evaluate/per_image.parquet",
)


def test_every_file_the_report_reads_is_a_dependency_of_its_dvc_stage(repo_root: Path) -> None:
    """``dvc repro`` reruns the report after a change of an input only if dvc.yaml lists it
    (reports/metrics.json was missing)."""
    stage = yaml.safe_load((repo_root / "dvc.yaml").read_text(encoding="utf-8"))["stages"]
    folders = {"${sweep.dir}": "runs/sweep", "${evaluate.dir}": "runs/evaluate"}
    deps = set()
    for dep in stage["report"]["deps"]:
        for template, folder in folders.items():
            dep = dep.replace(template, folder)
        deps.add(dep)
    assert set(INPUTS) - deps == set()


@pytest.mark.parametrize("damaged", INPUTS)
def test_a_damaged_input_is_one_error_naming_it_and_the_old_report_stays(
    repo_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, damaged: str
) -> None:
    """A torn write (a full disk, a killed stage), a merge conflict in the git-tracked
    reports/metrics.json: one line naming the file and the stage that writes it."""
    params = _params(repo_root, tmp_path)
    write_project(tmp_path, make_cfg())
    monkeypatch.chdir(tmp_path)
    earlier = tmp_path / "reports" / "index.html"
    earlier.write_text("the earlier report")
    path = tmp_path / damaged
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    result = CliRunner().invoke(app, ["-p", str(params), "report"])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert lines[0].startswith("error: ") and damaged in lines[0], lines[0]
    assert "harness " in lines[0], lines[0]  # which stage to run again
    assert earlier.read_text() == "the earlier report"
