"""The CLI: thin commands, one clear line per user error, tracebacks only with --verbose."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
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


def test_help_names_only_commands_that_exist() -> None:
    """The summary line of ``harness --help`` promises nothing that is not a command."""
    import typer.main

    code, out, _ = invoke("--help")
    assert code == 0
    group = typer.main.get_command(app)
    registered = set(group.commands)  # type: ignore[attr-defined]
    summary = out.split("sweep harness:", 1)[1].split(".", 1)[0]
    named = {word.strip(" ,") for word in summary.replace(" and ", ",").split(",")}
    named = {word.split()[0] for word in named if word}
    assert named, out
    assert named <= registered, f"help names {sorted(named - registered)}: not commands"


def _commands(group: object, prefix: str = "") -> list[tuple[str, object]]:
    """Every command and sub-command of a click group, with its full name."""
    found = []
    for name, command in getattr(group, "commands", {}).items():
        found.append((f"{prefix}{name}", command))
        found += _commands(command, f"{prefix}{name} ")
    return found


def test_each_command_lists_as_one_summary_sentence() -> None:
    """``harness --help`` lists each command by its docstring's first paragraph, line breaks
    kept: a summary wrapped over lines in the source broke mid-phrase there ("(naive" /
    "path)"), and reST markup showed as literal backquotes."""
    import typer.main

    commands = _commands(typer.main.get_command(app))
    assert len(commands) > 10
    for name, command in commands:
        summary = (getattr(command, "help", None) or "").strip().split("\n\n")[0]
        assert summary, f"harness {name}: no help"
        assert "\n" not in summary, f"harness {name}: summary spans lines: {summary!r}"
        assert "``" not in summary, f"harness {name}: reST markup in the summary: {summary!r}"
        assert len(summary) <= 100, f"harness {name}: summary over 100 characters: {summary!r}"


def test_a_commands_description_is_wrapped_by_the_terminal_not_the_source() -> None:
    """A docstring paragraph wraps at 100 columns in the source; ``--help`` joins its lines
    and wraps them at the terminal's width (it broke mid-sentence at "example" / "scripts")."""
    wide = CliRunner().invoke(app, ["bench", "--help"], terminal_width=200, env={"COLUMNS": "200"})
    assert wide.exit_code == 0
    lines = [line.strip() for line in wide.stdout.splitlines()]
    assert (
        "Same points, prompts and seeds through both paths (the naive one is what the example "
        "scripts do); the last line is ratio=<naive / harness seconds per point>." in lines
    ), wide.stdout


def test_every_placeholder_of_a_help_text_is_shown() -> None:
    """Help is rendered as markdown, which drops a bare ``<n>`` as an HTML tag ("default:
    runs/export/point-."): each one written in a help text must reach the screen."""
    import re

    import typer.main

    for name, command in _commands(typer.main.get_command(app)):
        texts = [getattr(command, "help", None) or ""]
        texts += [getattr(p, "help", None) or "" for p in getattr(command, "params", [])]
        placeholders = {m for text in texts for m in re.findall(r"<[^<>\s]+>", text)}
        if not placeholders:
            continue
        shown = CliRunner().invoke(app, [*name.split(), "--help"], terminal_width=300)
        flat = re.sub(r"\s+", " ", shown.stdout.replace("│", " "))
        for placeholder in placeholders:
            assert placeholder in flat, f"harness {name} --help: {placeholder} not shown"


def test_a_flag_is_shown_without_a_value_and_an_override_as_key_value() -> None:
    """Typer's help gave every flag a type, ``--dry-run <bool>``, as if it took a value (it is a
    usage error to pass one), and ``-S`` a ``<list[str]>``."""
    import re

    import typer.main

    for name, _command in [("", None), *_commands(typer.main.get_command(app))]:
        shown = CliRunner().invoke(app, [*name.split(), "--help"], terminal_width=200)
        assert shown.exit_code == 0, name
        assert "<bool>" not in shown.stdout, f"harness {name} --help:\n{shown.stdout}"
    top = CliRunner().invoke(app, ["--help"], terminal_width=200).stdout
    assert re.search(r"--verbose\s+-v\s+Debug logging", top), top
    assert re.search(r"--set\s+-S\s+<key=value>\s+Override a config key", top), top


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


def show_json(project: Path, *options: str) -> dict:
    code, out, err = invoke(
        "-p", str(project / "params.yaml"), *options, "config", "show", "--json"
    )
    assert code == 0, err
    return json.loads(out)


def test_unquoted_tracking_off_and_mixed_precision_no(project: Path) -> None:
    (project / "params.yaml").write_text(
        "preset: tiny-cpu\ntracking:\n  mode: off\ntrain:\n  mixed_precision: no\n"
    )
    code, out, err = invoke("-p", str(project / "params.yaml"), "config", "validate")
    assert code == 0, err
    assert out.strip() == "ok: preset tiny-cpu, model tiny://sd15"
    data = show_json(project)
    assert (data["tracking"]["mode"], data["train"]["mixed_precision"]) == ("off", "no")


def test_set_tracking_off_on_the_command_line(project: Path) -> None:
    data = show_json(project, "-S", "tracking.mode=off", "-S", "train.mixed_precision=no")
    assert (data["tracking"]["mode"], data["train"]["mixed_precision"]) == ("off", "no")


def test_set_tracking_on_is_refused_with_the_allowed_values(project: Path) -> None:
    code, _, err = invoke(
        "-p", str(project / "params.yaml"), "-S", "tracking.mode=on", "config", "validate"
    )
    assert code == 2
    (line,) = err.strip().splitlines()
    assert line.startswith(
        "error: command line: tracking.mode: must be one of 'auto', 'online', 'offline' or 'off', "
        "got True"
    )


def test_space_entry_in_params_replaces_the_presets_range(project: Path) -> None:
    (project / "params.yaml").write_text(
        "preset: tiny-cpu\nsweep:\n  space:\n    learning_rate: {choices: [0.001, 0.002]}\n"
    )
    space = show_json(project)["sweep"]["space"]
    assert space["learning_rate"] == {
        "choices": [0.001, 0.002],
        "low": None,
        "high": None,
        "log": False,
        "step": None,
    }
    assert space["dropout"]["choices"] == [0.0, 0.1]  # the preset's other entries stay
    space = show_json(project, "-S", "sweep.space.rank={low: 2, high: 8}")["sweep"]["space"]
    assert (space["rank"]["choices"], space["rank"]["low"], space["rank"]["high"]) == (None, 2, 8)


def test_a_mapping_or_list_is_read_as_dvc_exp_run_s_reads_it(project: Path) -> None:
    """``dvc exp run -S`` reads a value with Hydra's grammar, where ``{dino:0.7}`` is a mapping;
    YAML reads it as the key ``dino:0.7``. The README's own ``dvc exp run`` examples have no
    spaces, so the same ``-S`` given to ``harness`` must mean the same."""
    weights = show_json(project, "-S", "sweep.weights={dino:0.7,clip_t:0.3}")["sweep"]["weights"]
    assert weights == {"dino": 0.7, "clip_t": 0.3}
    entry = "sweep.space.learning_rate={choices:[1e-4,2e-4],low:null,high:null}"
    space = show_json(project, "-S", entry)["sweep"]["space"]["learning_rate"]
    assert (space["choices"], space["low"], space["high"]) == ([1e-4, 2e-4], None, None)
    steps = show_json(project, "-S", "train.checkpoint_steps=[5,10]")["train"]["checkpoint_steps"]
    assert steps == [5, 10]
    quoted = show_json(project, "-S", 'eval.prompts=["a {token} {class_name}, at night"]')
    assert quoted["eval"]["prompts"] == ["a {token} {class_name}, at night"]
    # What neither grammar reads (unquoted braces in a list) is one line naming the item.
    bad = "eval.prompts=[a {token} {class_name}]"
    code, _, err = invoke("-p", str(project / "params.yaml"), "-S", bad, "config", "show")
    assert code == 2 and err.startswith(f"error: command line: {bad!r}: invalid"), err


def test_hydra_prefixes_delete_and_add_keys_as_dvc_exp_run_s_does(project: Path) -> None:
    """The README's ``dvc exp run -S '~sweep.space.dropout' -S '+sweep.space.dropout=...'``
    given to ``harness``: ``~`` deletes (the entry is no longer searched; a setting falls back
    to its default), ``+``/``++`` set, and a mapping set after a deletion keeps nothing old."""
    preset = show_json(project)
    assert "dropout" in preset["sweep"]["space"] and preset["train"]["learning_rate"] != 1e-4
    cfg = show_json(project, "-S", "~sweep.space.dropout", "-S", "~train.learning_rate")
    assert "dropout" not in cfg["sweep"]["space"] and "learning_rate" in cfg["sweep"]["space"]
    assert cfg["train"]["learning_rate"] == 1e-4  # the code's default
    new = "+sweep.space.dropout={choices:[0.0,0.2]}"
    space = show_json(project, "-S", "~sweep.space.dropout", "-S", new)["sweep"]["space"]
    assert space["dropout"]["choices"] == [0.0, 0.2]
    # Dotted keys after the deletion start a new entry: the preset's choices are gone.
    dotted = ("~sweep.space.dropout", "sweep.space.dropout.low=0", "sweep.space.dropout.high=.3")
    options = [arg for item in dotted for arg in ("-S", item)]
    entry = show_json(project, *options)["sweep"]["space"]["dropout"]
    assert (entry["choices"], entry["low"], entry["high"]) == (None, 0.0, 0.3)
    assert show_json(project, "-S", "++train.rank=8")["train"]["rank"] == 8
    params = str(project / "params.yaml")
    code, _, err = invoke("-p", params, "-S", "~train.rank=4", "config", "validate")
    assert code == 2 and "'~train.rank=4': write ~KEY, without a value" in err, err
    code, _, err = invoke("-p", params, "-S", "~preset", "config", "validate")
    assert code == 2 and "~preset: a preset cannot be deleted; -S preset=<name>" in err, err


def test_weights_in_params_replace_the_presets(project: Path) -> None:
    preset = yaml.safe_load((project / "experiments/preset/tiny-cpu.yaml").read_text())
    preset["sweep"]["weights"] = {"dino": 0.7, "clip_t": 0.3}
    preset["preset"] = "weighted"
    text = "# @package _global_\n" + yaml.safe_dump(preset)
    (project / "experiments/preset/weighted.yaml").write_text(text)
    (project / "params.yaml").write_text("preset: weighted\nsweep:\n  weights: {clip_i: 1.0}\n")
    assert show_json(project)["sweep"]["weights"] == {"clip_i": 1.0}


def test_section_error_from_the_command_line_blames_the_command_line(project: Path) -> None:
    code, _, err = invoke(
        "-p", str(project / "params.yaml"), "-S", "data.min_images=1", "config", "validate"
    )
    assert code == 2
    (line,) = err.strip().splitlines()
    assert line.startswith(
        "error: command line: data: val_fraction=0.2 leaves no training image when only "
        "min_images=1"
    )


def test_set_preset_switches_the_preset(project: Path) -> None:
    data = show_json(project, "-S", "preset=sd15-lora")
    assert data["preset"] == "sd15-lora"
    assert data["model"]["pretrained"] == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    assert data["train"]["rank"] == 16
    code, out, _ = invoke(
        "-p", str(project / "params.yaml"), "-S", "preset=sd15-lora", "config", "validate"
    )
    assert code == 0
    assert out.strip() == "ok: preset sd15-lora, model stable-diffusion-v1-5/stable-diffusion-v1-5"


def test_set_unknown_preset_is_blamed_on_the_command_line(project: Path) -> None:
    code, _, err = invoke(
        "-p", str(project / "params.yaml"), "-S", "preset=nope", "config", "validate"
    )
    assert code == 2
    assert err.strip() == (
        "error: command line: preset: unknown preset 'nope'; available: sd15-bench, sd15-lora, "
        "sdxl-lora, tiny-adaptive, tiny-cpu"
    )
