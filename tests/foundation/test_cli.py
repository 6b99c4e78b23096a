"""The CLI: thin commands, one clear line per user error, tracebacks only with --verbose."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from harness.cli import app

runner = CliRunner()


@pytest.fixture
def project(repo_root: Path, tmp_path: Path) -> Path:
    shutil.copytree(repo_root / "experiments", tmp_path / "experiments")
    (tmp_path / "params.yaml").write_text("preset: tiny-cpu\n")
    return tmp_path


def invoke(*args: str) -> tuple[int, str, str]:
    result = runner.invoke(app, list(args))
    return result.exit_code, result.stdout, result.stderr


def test_help_lists_commands() -> None:
    code, out, _ = invoke("--help")
    assert code == 0
    for command in ("config", "model-info", "resolve", "prepare", "train", "generate", "sweep"):
        assert command in out
    for command in ("prepare", "train", "generate", "sweep", "resolve"):
        code, out, _ = invoke(command, "--help")
        assert code == 0 and "Usage" in out


def test_validate_ok(project: Path) -> None:
    code, out, _ = invoke("-p", str(project / "params.yaml"), "config", "validate")
    assert code == 0
    assert out.strip() == "ok: preset tiny-cpu, model tiny://sd15"


def test_show_json_applies_overrides(project: Path) -> None:
    code, out, _ = invoke(
        "-p", str(project / "params.yaml"), "-S", "train.rank=8", "config", "show", "--json"
    )
    assert code == 0
    assert json.loads(out)["train"]["rank"] == 8


def test_bad_config_is_one_line_exit_2(project: Path) -> None:
    (project / "params.yaml").write_text("preset: tiny-cpu\ntrain:\n  rank: 0\n")
    code, _, err = invoke("-p", str(project / "params.yaml"), "config", "validate")
    assert code == 2
    assert err.strip().splitlines() == [
        f"error: {project / 'params.yaml'}: train.rank: must be >= 1, got 0"
    ]
    assert "Traceback" not in err


def test_missing_params_file(tmp_path: Path) -> None:
    code, _, err = invoke("-p", str(tmp_path / "nope.yaml"), "config", "validate")
    assert code == 2
    assert err.strip() == f"error: {tmp_path / 'nope.yaml'}: file not found"


def test_verbose_shows_traceback(project: Path) -> None:
    (project / "params.yaml").write_text("preset: tiny-cpu\ntrain:\n  rank: 0\n")
    code, _, err = invoke("-p", str(project / "params.yaml"), "--verbose", "config", "validate")
    assert code == 2
    assert "Traceback" in err and "ConfigError" in err


def test_prepare_without_data_names_the_folder(project: Path) -> None:
    code, _, err = invoke(
        "-p",
        str(project / "params.yaml"),
        "-S",
        "data.source=folder",
        "-S",
        "data.subject=ghost",
        "prepare",
    )
    assert code == 2
    assert "data/raw/ghost" in err and "Traceback" not in err


def test_sweep_without_prepared_data_fails_before_loading_models(project: Path) -> None:
    code, _, err = invoke("-p", str(project / "params.yaml"), "sweep")
    assert code == 2
    assert "data/prepared/sample" in err and "Traceback" not in err


def test_model_info_and_console_script(project: Path) -> None:
    harness = Path(sys.executable).with_name("harness")
    done = subprocess.run(
        [str(harness), "-p", str(project / "params.yaml"), "model-info"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    info = json.loads(done.stdout)
    assert (info["family"], info["kind"], info["device"]) == ("sd15", "tiny", "cpu")
