"""Dotted ``-S`` overrides below an atomic path, YAML syntax errors, and unknown keys in list
items: the config errors and merges a user meets from the command line."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml
from test_config import SWEEP_PRESET, errors_of, write_project
from typer.testing import CliRunner

from harness.cli import app
from harness.config import (
    ConfigError,
    ParamSpec,
    combine_overrides,
    load_config,
    parse_override,
)


def combined(*items: str) -> dict[str, Any]:
    """Several ``-S`` combined as ``harness.cli.load()`` combines them (a deep update)."""

    def update(into: dict[str, Any], new: dict[str, Any]) -> None:
        for key, value in new.items():
            if isinstance(value, dict) and isinstance(into.get(key), dict):
                update(into[key], value)
            else:
                into[key] = value

    merged: dict[str, Any] = {}
    for item in items:
        update(merged, parse_override(item))
    return merged


def plain_types(value: Any) -> set[type]:
    """Every mapping and list type inside ``value``."""
    if isinstance(value, dict):
        return {type(value)}.union(*(plain_types(v) for v in value.values()))
    if isinstance(value, list):
        return {list}.union(*(plain_types(v) for v in value))
    return set()


@pytest.fixture
def project(repo_root: Path, tmp_path: Path) -> Path:
    """The repo's presets and a params.yaml selecting tiny-cpu (as tests/test_cli.py's)."""
    shutil.copytree(repo_root / "experiments", tmp_path / "experiments")
    (tmp_path / "params.yaml").write_text("preset: tiny-cpu\n")
    return tmp_path


# --- 1. a dotted -S below an atomic path sets that leaf only ---


def test_dotted_override_below_weights_keeps_the_other_weights(tmp_path: Path) -> None:
    params = write_project(tmp_path, "preset: base\n", {"base": SWEEP_PRESET})
    cfg = load_config(params, overrides=parse_override("sweep.weights.dino=0.5"))
    assert cfg.sweep.weights == {"dino": 0.5, "clip_t": 0.3}


def test_override_ending_at_weights_still_replaces_them(tmp_path: Path) -> None:
    params = write_project(tmp_path, "preset: base\n", {"base": SWEEP_PRESET})
    cfg = load_config(params, overrides=parse_override("sweep.weights={dino: 0.5}"))
    assert cfg.sweep.weights == {"dino": 0.5}
    cfg = load_config(params, overrides=parse_override("sweep={weights: {clip_i: 1.0}}"))
    assert cfg.sweep.weights == {"clip_i": 1.0}


def test_dotted_override_below_a_space_entry_keeps_its_range(tmp_path: Path) -> None:
    params = write_project(tmp_path, "preset: base\n", {"base": SWEEP_PRESET})
    cfg = load_config(params, overrides=parse_override("sweep.space.learning_rate.low=1e-5"))
    lr = cfg.sweep.space["learning_rate"]
    assert isinstance(lr, ParamSpec)
    assert (lr.low, lr.high, lr.log) == (1e-5, 5e-3, True)


def test_several_dotted_overrides_of_one_mapping_combine(tmp_path: Path) -> None:
    preset = SWEEP_PRESET.replace("{dino: 0.7, clip_t: 0.3}", "{dino: 0.7, clip_t: 0.3, clip_i: 0}")
    params = write_project(tmp_path, "preset: base\n", {"base": preset})
    overrides = combined("sweep.weights.dino=0.6", "sweep.weights.clip_t=0.4")
    cfg = load_config(params, overrides=overrides)
    assert cfg.sweep.weights == {"dino": 0.6, "clip_t": 0.4, "clip_i": 0.0}


def test_dotted_override_after_a_whole_replacement_adds_to_it(tmp_path: Path) -> None:
    params = write_project(tmp_path, "preset: base\n", {"base": SWEEP_PRESET})
    overrides = combined("sweep.weights={clip_i: 1.0}", "sweep.weights.dino=0.5")
    cfg = load_config(params, overrides=overrides)
    assert cfg.sweep.weights == {"clip_i": 1.0, "dino": 0.5}


def test_dotted_override_of_an_unset_atomic_mapping_creates_it(tmp_path: Path) -> None:
    params = write_project(tmp_path, "preset: base\n")
    cfg = load_config(params, overrides=parse_override("sweep.weights.clip_i=1"))
    assert cfg.sweep.weights == {"clip_i": 1.0}
    assert plain_types(cfg.to_dict()) <= {dict, list}


def test_dotted_override_below_adaptive_evaluation_after_a_preset_switch(
    repo_root: Path, tmp_path: Path
) -> None:
    params = tmp_path / "params.yaml"
    params.write_text("preset: tiny-cpu\n")
    overrides = combined("preset=tiny-adaptive", "sweep.evaluation.keep_fraction=0.3")
    cfg = load_config(params, overrides=overrides, root=repo_root)
    evaluation = cfg.sweep.evaluation
    assert not isinstance(evaluation, str)
    assert evaluation.keep_fraction == 0.3
    assert [(r.prompts, r.images_per_prompt) for r in evaluation.rungs] == [(1, 1)]


@pytest.mark.parametrize(
    ("items", "weights"),
    [
        (("sweep.weights.dino=0.6", "sweep.weights.clip_t=0.4"), {"dino": 0.6, "clip_t": 0.4}),
        (("sweep.weights.clip_i=0.5",), {"dino": 0.7, "clip_t": 0.3, "clip_i": 0.5}),
        (("sweep.weights={clip_i: 1.0}", "sweep.weights.dino=0.5"), {"clip_i": 1.0, "dino": 0.5}),
        # The later mapping written whole replaces the earlier dotted key's, and the preset's.
        (("sweep.weights.clip_i=0.5", "sweep.weights={dino: 1.0}"), {"dino": 1.0}),
    ],
)
def test_combined_overrides_apply_in_order(
    tmp_path: Path, items: tuple[str, ...], weights: dict[str, float]
) -> None:
    params = write_project(tmp_path, "preset: base\n", {"base": SWEEP_PRESET})
    cfg = load_config(params, overrides=combine_overrides(items))
    assert cfg.sweep.weights == weights


def test_combined_overrides_merge_outside_atomic_paths(tmp_path: Path) -> None:
    params = write_project(tmp_path, "preset: base\n", {"base": SWEEP_PRESET})
    items = ("train.rank=8", "train={alpha: 4}", "sweep.space.rank.choices=[4, 8]")
    cfg = load_config(params, overrides=combine_overrides(items))
    assert (cfg.train.rank, cfg.train.alpha) == (8, 4)
    rank = cfg.sweep.space["rank"]
    assert isinstance(rank, ParamSpec) and rank.choices == [4, 8]


def test_bad_dotted_leaf_is_blamed_on_the_command_line(tmp_path: Path) -> None:
    params = write_project(tmp_path, "preset: base\n", {"base": SWEEP_PRESET})
    with pytest.raises(ConfigError) as info:
        load_config(params, overrides=parse_override("sweep.space.learning_rate.low=1"))
    (problem,) = info.value.problems
    assert problem.startswith("command line: sweep.space.learning_rate: low=1")


def test_cli_config_show_merges_dotted_overrides(project: Path) -> None:
    result = CliRunner().invoke(
        app,
        [
            "-p",
            str(project / "params.yaml"),
            "-S",
            "sweep.space.learning_rate.low=2e-4",
            "-S",
            "sweep.weights.dino=0.7",
            "-S",
            "sweep.weights.clip_t=0.3",
            "config",
            "show",
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    sweep = json.loads(result.stdout)["sweep"]
    assert sweep["space"]["learning_rate"] == {
        "choices": None,
        "low": 2e-4,
        "high": 5e-3,
        "log": True,
        "step": None,
    }
    assert sweep["weights"] == {"dino": 0.7, "clip_t": 0.3}


def test_cli_config_show_yaml_has_no_python_tags(project: Path) -> None:
    result = CliRunner().invoke(
        app, ["-p", str(project / "params.yaml"), "-S", "sweep.weights.dino=1", "config", "show"]
    )
    assert result.exit_code == 0, result.output
    assert "!!python" not in result.stdout
    assert yaml.safe_load(result.stdout)["sweep"]["weights"] == {"dino": 1.0}


# --- 2. invalid YAML is one line: file:line:col ---


def test_invalid_yaml_is_one_line_with_line_and_column(tmp_path: Path) -> None:
    params = write_project(tmp_path, "preset: base\ntrain: [unclosed\n")
    (problem,) = errors_of(params)
    assert "\n" not in problem and "<unicode string>" not in problem
    assert problem.startswith(f"{params}:3:1: invalid YAML: ")
    assert "expected ',' or ']'" in problem


def test_invalid_yaml_in_a_preset_names_the_preset(tmp_path: Path) -> None:
    params = write_project(tmp_path, "preset: base\n", {"base": "train:\n\trank: 4\n"})
    (problem,) = errors_of(params)
    preset = tmp_path / "experiments" / "preset" / "base.yaml"
    # Line 4 of the file: write_project puts a two-line header first.
    assert problem.startswith(f"{preset}:4:1: invalid YAML: ")
    assert "\n" not in problem and "<unicode string>" not in problem


def test_yaml_control_character_gives_line_and_column(tmp_path: Path) -> None:
    params = write_project(tmp_path, "preset: base\nseed: \x01\n")
    (problem,) = errors_of(params)
    assert problem.startswith(f"{params}:2:7: invalid YAML: ")
    assert "\n" not in problem and "<unicode string>" not in problem


# --- 3. an unknown key in a list item lists the item's keys ---


def test_unknown_key_in_a_rung_lists_the_rung_keys(tmp_path: Path) -> None:
    params = write_project(
        tmp_path,
        "preset: base\nsweep:\n  evaluation:\n    keep_fraction: 0.5\n"
        "    rungs: [{prompts: 1, promts: 2}]\n",
    )
    (problem,) = errors_of(params)
    assert problem == (
        f"{params}: sweep.evaluation.rungs.0.promts: unknown key (did you mean 'prompts'?); "
        "allowed: images_per_prompt, prompts"
    )


@pytest.mark.parametrize(("interval", "grace"), [(60, 30), (60, 60)])
def test_a_grace_period_within_one_heartbeat_is_refused(
    tmp_path: Path, interval: int, grace: int
) -> None:
    """A live worker beats once per interval: with a grace period no longer than that, the
    other workers took it for dead between two beats and retried its run while it trained."""
    params = write_project(tmp_path, "preset: base\n", {"base": SWEEP_PRESET})
    heartbeat = [f"sweep.heartbeat_interval_s={interval}", f"sweep.grace_period_s={grace}"]
    with pytest.raises(ConfigError) as info:
        load_config(params, overrides=combine_overrides(heartbeat))
    (problem,) = info.value.problems
    assert "sweep.grace_period_s" in problem and "heartbeat_interval_s" in problem
    ok = combine_overrides([f"sweep.heartbeat_interval_s={interval}", "sweep.grace_period_s=90"])
    assert load_config(params, overrides=ok).sweep.grace_period_s == 90
