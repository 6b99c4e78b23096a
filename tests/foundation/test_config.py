"""The strict config: presets, overrides, and one clear error per bad key."""

from __future__ import annotations

from pathlib import Path

import pytest

from harness.config import (
    ConfigError,
    HarnessConfig,
    available_presets,
    load_config,
    parse_override,
    validation_count,
)


def write_project(tmp_path: Path, params: str, presets: dict[str, str] | None = None) -> Path:
    """A minimal project: params.yaml plus experiments/<name>.yaml files."""
    (tmp_path / "experiments").mkdir()
    for name, text in (presets or {"base": "train:\n  rank: 4\n"}).items():
        (tmp_path / "experiments" / f"{name}.yaml").write_text(text)
    params_file = tmp_path / "params.yaml"
    params_file.write_text(params)
    return params_file


def errors_of(params_file: Path) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config(params_file)
    return info.value.problems


def test_repo_params_load(repo_root: Path) -> None:
    cfg = load_config(repo_root / "params.yaml")
    assert isinstance(cfg, HarnessConfig)
    assert cfg.preset == "tiny-cpu"
    assert cfg.model.pretrained == "tiny://sd15"
    assert cfg.train.learning_rate == pytest.approx(1e-3)
    assert cfg.data.resolution == 64


@pytest.mark.parametrize("preset", ["tiny-cpu", "sd15-lora", "sdxl-lora"])
def test_every_shipped_preset_validates(repo_root: Path, tmp_path: Path, preset: str) -> None:
    assert preset in available_presets(repo_root)
    params = tmp_path / "params.yaml"
    params.write_text(f"preset: {preset}\n")
    cfg = load_config(params, root=repo_root)
    assert cfg.preset == preset


def test_all_presets_found_validate(repo_root: Path, tmp_path: Path) -> None:
    names = available_presets(repo_root)
    assert len(names) >= 3
    for name in names:
        params = tmp_path / f"{name}.yaml"
        params.write_text(f"preset: {name}\n")
        load_config(params, root=repo_root)


def test_sdxl_preset_values(repo_root: Path, tmp_path: Path) -> None:
    params = tmp_path / "p.yaml"
    params.write_text("preset: sdxl-lora\n")
    cfg = load_config(params, root=repo_root)
    assert cfg.data.resolution == 1024
    assert cfg.model.dtype == "bfloat16"
    assert cfg.train.gradient_checkpointing is True


def test_params_override_preset(tmp_path: Path) -> None:
    params = write_project(tmp_path, "preset: base\ntrain:\n  rank: 8\n  learning_rate: 2e-4\n")
    cfg = load_config(params)
    assert cfg.train.rank == 8
    # YAML 1.1 reads 2e-4 as a string; our loader reads it as the float a user means.
    assert cfg.train.learning_rate == pytest.approx(2e-4)


def test_error_names_preset_file_and_key(tmp_path: Path) -> None:
    params = write_project(tmp_path, "preset: sd15-lora\n", {"sd15-lora": "train:\n  rank: 0\n"})
    assert errors_of(params) == ["experiments/sd15-lora.yaml: train.rank: must be >= 1, got 0"]


def test_error_names_params_file_when_override_is_bad(tmp_path: Path) -> None:
    params = write_project(tmp_path, "preset: base\ntrain:\n  rank: -2\n")
    assert errors_of(params) == [f"{params}: train.rank: must be >= 1, got -2"]


def test_unknown_key_suggests_the_right_one(tmp_path: Path) -> None:
    params = write_project(tmp_path, "preset: base\ntrain:\n  lerning_rate: 0.1\n")
    (problem,) = errors_of(params)
    assert problem.startswith(
        f"{params}: train.lerning_rate: unknown key (did you mean 'learning_rate'?)"
    )


def test_unknown_section(tmp_path: Path) -> None:
    params = write_project(tmp_path, "preset: base\ntrian:\n  rank: 2\n")
    (problem,) = errors_of(params)
    assert problem.startswith(f"{params}: trian: unknown key (did you mean 'train'?)")


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ("train:\n  rank: '4'\n", "train.rank: expected int, got str '4'"),
        ("train:\n  learning_rate: -1.0e-4\n", "train.learning_rate: must be > 0.0, got -0.0001"),
        ("eval:\n  guidance_scale: -1\n", "eval.guidance_scale: must be >= 0.0, got -1"),
        (
            "model:\n  dtype: float8\n",
            "model.dtype: must be one of 'float32', 'bfloat16' or 'float16', got 'float8'",
        ),
        (
            "train:\n  train_text_encoder: 'yes'\n",
            "train.train_text_encoder: expected bool, got str 'yes'",
        ),
        ("data:\n  resolution: 100\n", "data.resolution: must be a multiple of 8, got 100"),
    ],
)
def test_wrong_types_and_values(tmp_path: Path, body: str, expected: str) -> None:
    params = write_project(tmp_path, "preset: base\n" + body)
    assert errors_of(params) == [f"{params}: {expected}"]


def test_split_that_leaves_no_training_image(tmp_path: Path) -> None:
    params = write_project(tmp_path, "preset: base\ndata:\n  val_fraction: 0.9\n  min_images: 3\n")
    (problem,) = errors_of(params)
    assert problem.startswith(f"{params}: data: val_fraction=0.9 leaves no training image")


def test_checkpoint_steps_beyond_max_steps(tmp_path: Path) -> None:
    params = write_project(
        tmp_path, "preset: base\ntrain:\n  max_steps: 10\n  checkpoint_steps: [5, 20]\n"
    )
    (problem,) = errors_of(params)
    assert "checkpoint_steps [20] outside 1..max_steps=10" in problem


def test_all_problems_reported_at_once(tmp_path: Path) -> None:
    params = write_project(
        tmp_path, "preset: base\ntrain:\n  rank: 0\neval:\n  guidance_scale: -3\n"
    )
    problems = errors_of(params)
    assert len(problems) == 2
    assert {p.split(": ")[1] for p in problems} == {"train.rank", "eval.guidance_scale"}


def test_unknown_preset_lists_available(tmp_path: Path) -> None:
    params = write_project(tmp_path, "preset: nope\n")
    (problem,) = errors_of(params)
    assert problem == f"{params}: preset: unknown preset 'nope'; available: base"


def test_invalid_yaml_names_file(tmp_path: Path) -> None:
    params = write_project(tmp_path, "preset: base\ntrain: [unclosed\n")
    (problem,) = errors_of(params)
    assert problem.startswith(f"{params}: invalid YAML")


def test_config_is_immutable(repo_root: Path) -> None:
    cfg = load_config(repo_root / "params.yaml")
    with pytest.raises(ValueError, match="frozen"):
        cfg.train.rank = 99  # type: ignore[misc]


def test_command_line_override_is_named(tmp_path: Path) -> None:
    params = write_project(tmp_path, "preset: base\n")
    cfg = load_config(params, overrides=parse_override("train.rank=16"))
    assert cfg.train.rank == 16
    with pytest.raises(ConfigError, match=r"^command line: train.rank: must be >= 1, got 0$"):
        load_config(params, overrides=parse_override("train.rank=0"))


def test_parse_override_types() -> None:
    assert parse_override("a.b.c=1e-4") == {"a": {"b": {"c": 1e-4}}}
    assert parse_override("x=[1, 2]") == {"x": [1, 2]}
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        parse_override("novalue")


@pytest.mark.parametrize(
    ("n", "fraction", "expected"),
    [(5, 0.2, 1), (10, 0.2, 2), (4, 0.0, 0), (3, 0.5, 2), (1, 0.2, 1)],
)
def test_validation_count(n: int, fraction: float, expected: int) -> None:
    assert validation_count(n, fraction) == expected
