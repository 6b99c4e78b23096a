"""experiments/ composed into params.yaml: the same result as DVC's Hydra composition, every
setting present, and errors that name the file a value came from."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml
from dvc.utils.hydra import compose_and_dump
from typer.testing import CliRunner

from harness.cli import app
from harness.compose import (
    available_presets,
    check_params,
    compose,
    compose_params,
    defaults_text,
    dump_params,
)
from harness.config import ConfigError, HarnessConfig, load_config, parse_override


@pytest.fixture
def project(repo_root: Path, tmp_path: Path) -> Path:
    shutil.copytree(repo_root / "experiments", tmp_path / "experiments")
    compose_params(tmp_path)
    return tmp_path


def _hydra(root: Path, overrides: list[str], out: Path) -> str:
    """What `dvc exp run -S …` writes into params.yaml (DVC's own function)."""
    compose_and_dump(out, str(root / "experiments"), None, "config", "", overrides)
    return out.read_text()


@pytest.mark.parametrize("preset", ["tiny-cpu", "sd15-lora", "sdxl-lora"])
def test_composition_is_byte_identical_to_dvcs_hydra(
    repo_root: Path, tmp_path: Path, preset: str
) -> None:
    ours = dump_params(compose(repo_root, preset).data)
    assert ours == _hydra(repo_root, [f"preset={preset}"], tmp_path / "params.yaml")
    assert yaml.safe_load(ours)["preset"] == preset


def test_committed_files_are_in_sync(repo_root: Path) -> None:
    # params.yaml is the composition of experiments/, defaults.yaml the code's defaults.
    assert (repo_root / "params.yaml").read_text() == dump_params(compose(repo_root).data)
    assert (repo_root / "experiments/defaults.yaml").read_text() == defaults_text()
    assert check_params(repo_root / "params.yaml", repo_root) == []


def test_composed_params_hold_every_setting(project: Path) -> None:
    data = yaml.safe_load((project / "params.yaml").read_text())
    full = HarnessConfig(preset="x").to_dict()
    for section, values in full.items():
        if isinstance(values, dict):
            assert set(values) <= set(data[section]), section
    assert "lr_warmup_steps" in data["train"]  # so `dvc exp run -S train.lr_warmup_steps=5` works


def test_a_key_deleted_from_composed_params_stays_deleted(project: Path) -> None:
    # e.g. `dvc exp run -S '~sweep.space.dropout'`: the preset's entry must not come back.
    params = project / "params.yaml"
    data = yaml.safe_load(params.read_text())
    del data["sweep"]["space"]["dropout"]
    params.write_text(yaml.safe_dump(data))
    assert set(load_config(params).sweep.space) == {"learning_rate"}


def test_errors_name_the_file_that_set_the_value(project: Path) -> None:
    preset = project / "experiments/preset/tiny-cpu.yaml"
    preset.write_text(preset.read_text().replace("  rank: 4\n", "  rank: 0\n"))
    compose_params_text = dump_params(compose(project).data)
    (project / "params.yaml").write_text(compose_params_text)
    with pytest.raises(ConfigError) as info:
        load_config(project / "params.yaml")
    assert info.value.problems == [
        "experiments/preset/tiny-cpu.yaml: train.rank: must be >= 1, got 0"
    ]
    text = compose_params_text.replace("  rank: 0\n", "  rank: -3\n")
    (project / "params.yaml").write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(project / "params.yaml")
    assert info.value.problems == [f"{project / 'params.yaml'}: train.rank: must be >= 1, got -3"]


def test_set_preset_recomposes_instead_of_keeping_the_old_presets_values(project: Path) -> None:
    cfg = load_config(project / "params.yaml", overrides=parse_override("preset=sd15-lora"))
    assert (cfg.preset, cfg.train.rank, cfg.data.resolution) == ("sd15-lora", 16, 512)
    assert cfg.model.pretrained == "stable-diffusion-v1-5/stable-diffusion-v1-5"


def test_partial_params_get_a_note_with_the_fix(project: Path) -> None:
    (project / "params.yaml").write_text("preset: tiny-cpu\ntrain:\n  rank: 8\n")
    assert load_config(project / "params.yaml").train.rank == 8  # still fine for the CLI
    (note,) = check_params(project / "params.yaml", project)
    assert "holds only some settings (no data, eval" in note and "harness config compose" in note


def test_a_hand_edit_is_noted_not_refused(project: Path) -> None:
    params = project / "params.yaml"
    params.write_text(params.read_text().replace("  rank: 4\n", "  rank: 6\n", 1))
    note = check_params(params, project)[0]
    assert "train.rank=6 (there: 4)" in note and "harness config compose" in note


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (("tiny-cpu.yaml", "# @package _global_\n", ""), "must start with the line"),
        (("tiny-cpu.yaml", "preset: tiny-cpu\n", "preset: other\n"), "must be 'tiny-cpu'"),
        (("../config.yaml", "  - _self_\n", "  - db: pg\n"), "unsupported entry"),
    ],
)
def test_broken_experiments_are_one_clear_line(
    project: Path, edit: tuple[str, str, str], message: str
) -> None:
    name, old, new = edit
    path = project / "experiments/preset" / name
    assert old in path.read_text()
    path.write_text(path.read_text().replace(old, new))
    with pytest.raises(ConfigError) as info:
        compose(project)
    (problem,) = info.value.problems
    assert problem.startswith("experiments/") and message in problem


def test_unknown_preset_lists_the_available_ones(project: Path) -> None:
    with pytest.raises(ConfigError) as info:
        compose(project, "nope", "command line")
    assert info.value.problems == [
        "command line: preset: unknown preset 'nope'; available: "
        + ", ".join(available_presets(project))
    ]


def test_a_preset_that_is_not_utf8_is_one_error_naming_it(project: Path) -> None:
    """Written by PowerShell's `>` (UTF-16): the config error of that file, not a
    UnicodeDecodeError traceback from the header check."""
    preset = project / "experiments/preset/tiny-cpu.yaml"
    preset.write_text(preset.read_text(encoding="utf-8"), encoding="utf-16")
    with pytest.raises(ConfigError) as info:
        compose(project, "tiny-cpu", "command line")
    assert any("tiny-cpu.yaml" in p and "UTF-8" in p for p in info.value.problems), info.value


def test_harness_config_compose_writes_what_dvc_would(project: Path, tmp_path: Path) -> None:
    config = project / "experiments/config.yaml"
    config.write_text(config.read_text() + "train:\n  rank: 8\n")
    result = CliRunner().invoke(app, ["-p", str(project / "params.yaml"), "config", "compose"])
    assert result.exit_code == 0, result.output
    assert f"wrote {project / 'params.yaml'}" in result.output
    written = (project / "params.yaml").read_text()
    assert written == _hydra(project, [], tmp_path / "hydra.yaml")
    assert yaml.safe_load(written)["train"]["rank"] == 8


def test_overriding_a_searched_training_setting_is_noted(project: Path) -> None:
    params = project / "params.yaml"
    data = yaml.safe_load(params.read_text())
    searched = next(iter(data["sweep"]["space"]))
    data["train"][searched] = 0.123
    params.write_text(dump_params(data))
    notes = check_params(params, project)
    assert any(f"sweep.space.{searched} searches it" in note for note in notes), notes
    # The fix as Hydra takes it under `dvc exp run` (a plain `.choices=` merges into the
    # preset's low/high and is refused).
    fix = f"-S '~sweep.space.{searched}' -S '+sweep.space.{searched}={{choices:[...]}}'"
    assert any(fix in note for note in notes), notes


def test_choices_over_a_presets_range_is_one_line_with_the_fix(
    project: Path, tmp_path: Path
) -> None:
    """experiments/config.yaml giving ``choices`` for an entry the preset searches as a range:
    Hydra merges the two mappings key by key (DVC writes ``{low, high, log, choices}``), so the
    message must name the file that added ``choices``, say so once, and give the fix that
    works in a Hydra file; the fix must then compose, in Hydra too."""
    config = project / "experiments/config.yaml"
    base = config.read_text()
    entry = "sweep:\n  space:\n    learning_rate: {choices: [1.0e-4, 1.0e-3]%s}\n"
    config.write_text(base + entry % "")
    merged = yaml.safe_load(_hydra(project, [], tmp_path / "merged.yaml"))
    assert set(merged["sweep"]["space"]["learning_rate"]) == {"low", "high", "log", "choices"}
    result = CliRunner().invoke(app, ["-p", str(project / "params.yaml"), "config", "compose"])
    assert result.exit_code == 2
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("error: experiments/config.yaml: sweep.space.learning_rate: "), line
    assert "'choices' and a 'low'/'high' range" in line and "low: null, high: null" in line

    config.write_text(base + entry % ", low: null, high: null")
    result = CliRunner().invoke(app, ["-p", str(project / "params.yaml"), "config", "compose"])
    assert result.exit_code == 0, result.output
    written = (project / "params.yaml").read_text()
    assert written == _hydra(project, [], tmp_path / "hydra.yaml")
    spec = load_config(project / "params.yaml").sweep.space["learning_rate"]
    assert spec.choices == [1.0e-4, 1.0e-3] and spec.low is None  # type: ignore[union-attr]


def test_a_space_entry_of_the_wrong_shape_is_one_line(project: Path) -> None:
    """A mapping is a search spec: its errors are the spec's alone, not one per scalar type."""
    params = project / "params.yaml"
    data = yaml.safe_load(params.read_text())
    data["sweep"]["space"]["dropout"] = {"choises": [0.0, 0.1]}
    params.write_text(dump_params(data))
    with pytest.raises(ConfigError) as info:
        load_config(params)
    (problem,) = info.value.problems
    assert problem.startswith(f"{params}: sweep.space.dropout.choises: unknown key"), problem
    assert "did you mean 'choices'" in problem
