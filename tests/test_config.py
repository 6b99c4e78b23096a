"""The strict config: presets, overrides, and one clear error per bad key."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from harness.config import (
    ConfigError,
    HarnessConfig,
    ParamSpec,
    available_presets,
    load_config,
    parse_override,
    validate_config,
    validation_count,
)


def write_project(tmp_path: Path, params: str, presets: dict[str, str] | None = None) -> Path:
    """A minimal project: params.yaml plus a Hydra config dir, experiments/config.yaml selecting
    the first of experiments/preset/<name>.yaml (each gets the package header and its name)."""
    folder = tmp_path / "experiments" / "preset"
    folder.mkdir(parents=True)
    presets = presets or {"base": "train:\n  rank: 4\n"}
    for name, text in presets.items():
        (folder / f"{name}.yaml").write_text(f"# @package _global_\npreset: {name}\n{text}")
    first = next(iter(presets))
    (tmp_path / "experiments" / "config.yaml").write_text(
        f"defaults:\n  - preset: {first}\n  - _self_\n"
    )
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
    assert errors_of(params) == [
        "experiments/preset/sd15-lora.yaml: train.rank: must be >= 1, got 0"
    ]


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
    assert problem.startswith(f"{params}:3:1: invalid YAML: ")


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


# --- YAML 1.1 booleans for documented words (tracking.mode: off, train.mixed_precision: no) ---


@pytest.mark.parametrize(
    ("body", "section", "key", "expected"),
    [
        ("tracking:\n  mode: off\n", "tracking", "mode", "off"),
        ("tracking:\n  mode: 'off'\n", "tracking", "mode", "off"),
        ("tracking:\n  mode: offline\n", "tracking", "mode", "offline"),
        ("train:\n  mixed_precision: no\n", "train", "mixed_precision", "no"),
        ('train:\n  mixed_precision: "no"\n', "train", "mixed_precision", "no"),
        ("train:\n  mixed_precision: bf16\n", "train", "mixed_precision", "bf16"),
    ],
)
def test_unquoted_off_and_no_are_the_documented_words(
    tmp_path: Path, body: str, section: str, key: str, expected: str
) -> None:
    params = write_project(tmp_path, "preset: base\n" + body)
    cfg = load_config(params)
    assert getattr(getattr(cfg, section), key) == expected


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (
            "tracking:\n  mode: on\n",
            "tracking.mode: must be one of 'auto', 'online', 'offline' or 'off', got True",
        ),
        (
            "train:\n  mixed_precision: yes\n",
            "train.mixed_precision: must be one of 'no', 'fp16' or 'bf16', got True",
        ),
    ],
)
def test_true_is_still_refused_with_the_allowed_values(
    tmp_path: Path, body: str, expected: str
) -> None:
    params = write_project(tmp_path, "preset: base\n" + body)
    (problem,) = errors_of(params)
    assert problem.startswith(f"{params}: {expected}")


def test_off_from_the_command_line(tmp_path: Path) -> None:
    params = write_project(tmp_path, "preset: base\n")
    overrides = {**parse_override("tracking.mode=off")}
    overrides.update(parse_override("train.mixed_precision=no"))
    cfg = load_config(params, overrides={**overrides})
    assert (cfg.tracking.mode, cfg.train.mixed_precision) == ("off", "no")


# --- sweep.space entries and sweep.weights are replaced as a unit, never key-merged ---

SWEEP_PRESET = (
    "sweep:\n"
    "  weights: {dino: 0.7, clip_t: 0.3}\n"
    "  space:\n"
    "    learning_rate: {low: 1.0e-4, high: 5.0e-3, log: true}\n"
    "    rank: {choices: [2, 4]}\n"
)


def test_space_entry_in_params_replaces_the_presets(tmp_path: Path) -> None:
    params = write_project(
        tmp_path,
        "preset: base\nsweep:\n  space:\n    learning_rate: {choices: [1.0e-4, 2.0e-4]}\n",
        {"base": SWEEP_PRESET},
    )
    cfg = load_config(params)
    lr = cfg.sweep.space["learning_rate"]
    assert isinstance(lr, ParamSpec)
    assert (lr.choices, lr.low, lr.high, lr.log) == ([1e-4, 2e-4], None, None, False)
    rank = cfg.sweep.space["rank"]  # untouched entries stay
    assert isinstance(rank, ParamSpec) and rank.choices == [2, 4]


def test_space_entry_replaced_by_a_fixed_value_and_by_the_command_line(tmp_path: Path) -> None:
    params = write_project(
        tmp_path, "preset: base\nsweep:\n  space:\n    rank: 4\n", {"base": SWEEP_PRESET}
    )
    cfg = load_config(
        params, overrides=parse_override("sweep.space.learning_rate={low: 1, high: 2}")
    )
    assert cfg.sweep.space["rank"] == 4
    lr = cfg.sweep.space["learning_rate"]
    assert isinstance(lr, ParamSpec) and (lr.low, lr.high, lr.log) == (1, 2, False)


def test_weights_in_params_replace_the_presets(tmp_path: Path) -> None:
    params = write_project(
        tmp_path, "preset: base\nsweep:\n  weights: {clip_i: 1.0}\n", {"base": SWEEP_PRESET}
    )
    assert load_config(params).sweep.weights == {"clip_i": 1.0}


def test_bad_replaced_space_entry_is_blamed_on_params(tmp_path: Path) -> None:
    params = write_project(
        tmp_path,
        "preset: base\nsweep:\n  space:\n    learning_rate: {low: 1.0}\n",
        {"base": SWEEP_PRESET},
    )
    problems = errors_of(params)
    assert any("a range needs both 'low' and 'high'" in p for p in problems)
    assert all(p.startswith(f"{params}: sweep.space.learning_rate") for p in problems)


# --- section-level errors blame the file that set the offending keys ---


def test_section_error_blames_the_command_line(tmp_path: Path) -> None:
    params = write_project(
        tmp_path, "preset: base\n", {"base": "data:\n  val_fraction: 0.2\n  min_images: 3\n"}
    )
    with pytest.raises(ConfigError) as info:
        load_config(params, overrides=parse_override("data.min_images=1"))
    (problem,) = info.value.problems
    assert problem.startswith("command line: data: val_fraction=0.2 leaves no training image")


def test_section_error_blames_params_over_preset(tmp_path: Path) -> None:
    params = write_project(
        tmp_path,
        "preset: base\ndata:\n  min_images: 1\n",
        {"base": "data:\n  val_fraction: 0.2\n  min_images: 3\n"},
    )
    (problem,) = errors_of(params)
    assert problem.startswith(f"{params}: data: val_fraction=0.2 leaves no training image")


def test_section_error_ignores_unrelated_later_keys(tmp_path: Path) -> None:
    # The preset holds the impossible split; params.yaml only renames the subject.
    params = write_project(
        tmp_path,
        "preset: base\ndata:\n  subject: dog\n",
        {"base": "data:\n  val_fraction: 0.9\n  min_images: 3\n"},
    )
    (problem,) = errors_of(params)
    assert problem.startswith(
        "experiments/preset/base.yaml: data: val_fraction=0.9 leaves no training"
    )


def test_train_section_error_blames_the_command_line(tmp_path: Path) -> None:
    params = write_project(
        tmp_path,
        "preset: base\n",
        {"base": "train:\n  max_steps: 20\n  checkpoint_steps: [10, 20]\n"},
    )
    with pytest.raises(ConfigError) as info:
        load_config(params, overrides=parse_override("train.max_steps=5"))
    (problem,) = info.value.problems
    assert problem.startswith("command line: train: checkpoint_steps [10, 20] outside")


# --- the preset named on the command line wins over params.yaml's ---


def test_preset_override_switches_the_preset(repo_root: Path, tmp_path: Path) -> None:
    params = tmp_path / "params.yaml"
    params.write_text("preset: tiny-cpu\n")
    cfg = load_config(params, overrides=parse_override("preset=sd15-lora"), root=repo_root)
    assert cfg.preset == "sd15-lora"
    assert cfg.model.pretrained == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    assert cfg.train.rank == 16


def test_preset_override_keeps_params_overrides(repo_root: Path, tmp_path: Path) -> None:
    params = tmp_path / "params.yaml"
    params.write_text("preset: tiny-cpu\ntrain:\n  rank: 8\n")
    cfg = load_config(params, overrides=parse_override("preset=sdxl-lora"), root=repo_root)
    assert (cfg.preset, cfg.data.resolution, cfg.train.rank) == ("sdxl-lora", 1024, 8)


def test_unknown_preset_on_the_command_line_is_named(tmp_path: Path) -> None:
    params = write_project(tmp_path, "preset: base\n")
    with pytest.raises(ConfigError) as info:
        load_config(params, overrides=parse_override("preset=nope"))
    assert info.value.problems == ["command line: preset: unknown preset 'nope'; available: base"]


@pytest.mark.parametrize(
    ("space", "message"),
    [
        ({"optimizer": {"choices": ["adamw", "prodgy"]}}, "optimizer='prodgy' is not a valid"),
        ({"rank": {"low": 0, "high": 8}}, "rank=0 is not a valid train.rank"),
        ({"use_dora": "maybe"}, "use_dora='maybe' is not a valid train.use_dora"),
        ({"snr_gamma": {"choices": [None, -1.0]}}, "snr_gamma=-1.0 is not a valid"),
    ],
)
def test_searched_values_must_be_valid_train_values(space: dict[str, Any], message: str) -> None:
    """A typo in a searched value fails at validation, naming the key, not in a later run."""
    with pytest.raises(ConfigError) as err:
        validate_config({"preset": "t", "sweep": {"space": space}})
    assert "sweep.space" in str(err.value) and message in str(err.value)
