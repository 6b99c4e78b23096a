"""Bad input found by a review run as a user: each is one line naming the file or key (no
traceback), and nothing runs on a config that silently means something else."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from harness.cli import app
from harness.compose import compose_params


@pytest.fixture
def project(repo_root: Path, tmp_path: Path) -> Path:
    shutil.copytree(repo_root / "experiments", tmp_path / "experiments")
    compose_params(tmp_path)
    return tmp_path


def _run(project: Path, *args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, ["-p", str(project / "params.yaml"), *args])
    return result.exit_code, result.stdout, result.stderr


def _one_error(project: Path, *args: str) -> str:
    code, _, err = _run(project, *args)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), (code, err)
    return lines[0]


def test_a_repeated_section_in_params_is_refused_not_half_applied(project: Path) -> None:
    """A second ``train:`` block appended to params.yaml replaced the whole section (YAML keeps
    the last), so the preset's learning rate silently fell back to the code default."""
    params = project / "params.yaml"
    params.write_text(params.read_text() + "train:\n  rank: 8\n")
    line = _one_error(project, "config", "validate")
    n = len(params.read_text().splitlines())
    assert (
        line
        == f"error: {params}:{n - 1}: duplicate key 'train' (first at line "
        + (line.split("(first at line ", 1)[1])
    )
    assert line.endswith("); merge the two")


@pytest.mark.parametrize(
    ("key", "template", "placeholder"),
    [
        ("data.caption_template", "a photo of {token} {clas}", "clas"),
        ("train.class_prompt", "a photo of {clss}", "clss"),
        ("eval.prompts", ["a {tokn} {class_name}"], "tokn"),
        ("evaluate.prompts", ["a {token} {class_name} {"], "{"),
    ],
)
def test_a_prompt_template_with_a_typo_is_a_config_error(
    project: Path, key: str, template: object, placeholder: str
) -> None:
    """Caught before anything trains: a typo'd ``eval.prompts`` used to pass validation, then
    every run of a sweep trained and failed at its evaluation."""
    import json

    line = _one_error(project, "-S", f"{key}={json.dumps(template)}", "config", "validate")
    assert f"command line: {key}: " in line and placeholder in line, line


def test_a_malformed_override_value_is_one_line(project: Path) -> None:
    line = _one_error(project, "-S", "train.rank=[1", "config", "validate")
    assert line.startswith("error: command line: 'train.rank=[1': invalid YAML value"), line


def test_error_text_is_printed_as_is_not_as_rich_markup(project: Path) -> None:
    odd = project / "x[/y]" / "params.yaml"
    line = _one_error(project, "-p", str(odd), "config", "validate")
    assert line == f"error: {odd}: file not found"


def test_a_value_of_the_wrong_type_is_blamed_on_params_yaml(project: Path) -> None:
    """``rank: 4.0`` equals the preset's 4, but it is params.yaml's value that is wrong."""
    params = project / "params.yaml"
    text = params.read_text()
    assert "  rank: 4\n" in text
    params.write_text(text.replace("  rank: 4\n", "  rank: 4.0\n", 1))
    line = _one_error(project, "config", "validate")
    assert line.startswith(f"error: {params}: train.rank: "), line


@pytest.mark.parametrize(
    ("params", "problem"),
    [
        ("folder", "is a directory"),
        ("latin1", "not UTF-8"),
    ],
)
def test_an_unreadable_params_file_is_one_line(project: Path, params: str, problem: str) -> None:
    path = project / params
    if params == "folder":
        path.mkdir()
    else:
        path.write_bytes("preset: tiny-cpu\n# caf\xe9\n".encode("latin-1"))
    result = CliRunner().invoke(app, ["-p", str(path), "config", "validate"])
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1, result.stderr
    assert lines[0].startswith(f"error: {path}: ") and problem in lines[0], lines[0]


def test_a_file_system_error_is_one_line_naming_the_path(project: Path) -> None:
    """An output folder that is a file: the OSError was a traceback."""
    (project / "a-file").write_text("x")
    code, _, err = _run(project, "-S", f"data.prepared_dir={project / 'a-file'}", "prepare")
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, err
    assert lines[0].startswith("error: ") and "a-file" in lines[0], lines[0]


@pytest.mark.parametrize(
    ("override", "key", "problem"),
    [
        # Was deduplicated without a word, while a repeated scheduler was an error.
        ("sweep.inference.guidance_scale=[3.0, 7.5, 3.0]", "sweep.inference.guidance_scale", "3.0"),
        (
            "sweep.inference.num_inference_steps=[20, 20]",
            "sweep.inference.num_inference_steps",
            "20",
        ),
        ("sweep.space.rank={choices: [4, 8, 4]}", "sweep.space.rank", "4"),
        # A negative weight rewarded a worse score; all zeros made every point equal.
        ("sweep.weights={dino: 0.7, clip_t: -0.3}", "sweep.weights", "-0.3"),
        ("sweep.weights={dino: 0, clip_t: 0}", "sweep.weights", "above 0"),
    ],
)
def test_grid_repeats_and_meaningless_weights_are_config_errors(
    project: Path, override: str, key: str, problem: str
) -> None:
    line = _one_error(project, "-S", override, "config", "validate")
    assert f"command line: {key}" in line and problem in line, line
