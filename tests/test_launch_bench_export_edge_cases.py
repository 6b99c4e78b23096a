"""Edge cases of the SLURM script, the export's base model, and ``harness bench``: a project
path sbatch would split, a relative local model in the model card, a subject folder of the
project read from the bench's temporary folder, the harness's seconds per point as wall clock,
and ``python -m harness.bench`` taking every global option."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from PIL import Image, ImageDraw
from safetensors.torch import save_file
from sweep.test_workers_logic import _launch_cfg
from test_bench import _in_process, _tiny_params
from typer.testing import CliRunner

from harness.cli import app
from harness.config import HarnessConfig, InferenceSetting
from harness.sweep.launch import LaunchError, slurm_script

runner = CliRunner()

# A project folder sbatch's own #SBATCH parser would mangle unquoted: a space splits the
# value, `#` starts a comment, quotes group, `%` is a filename pattern.
AWKWARD = "my proj #1 %x 'q' \"d\""


# -- 1. the sbatch script in a folder with spaces -------------------------------------------
def _sbatch_words(rest: str) -> list[str]:
    """The arguments sbatch reads from the text after ``#SBATCH``, by the rules of its
    ``_get_argument`` (src/sbatch/opt.c): whitespace separates arguments unless quoted (``"``
    or ``'``), a backslash takes the next character literally, an unquoted ``#`` ends the line,
    an unmatched quote is fatal."""
    words: list[str] = []
    i, n = 0, len(rest)
    while True:
        while i < n and rest[i].isspace():
            i += 1
        if i >= n:
            return words
        word, quote, escaped, started = [], "", False, i
        while i < n and (quote or not rest[i].isspace()):
            char = rest[i]
            i += 1
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
                continue
            elif quote:
                if char == quote:
                    quote = ""
                    continue
            elif char in "\"'":
                quote = char
                continue
            elif char == "#":
                i = n  # the rest of the line is a comment
                break
            word.append(char)
        assert not quote, f"sbatch: unmatched {quote} in {rest!r}"
        if i > started and word:
            words.append("".join(word))


def _sbatch_options(text: str) -> dict[str, str]:
    """``{--option: value}`` of a script's #SBATCH lines, as sbatch reads them; an argument
    that is no ``--key=value`` (a word split off a value) is what sbatch calls an invalid
    directive."""
    options: dict[str, str] = {}
    for line in text.splitlines():
        if not line.startswith("#SBATCH"):
            continue
        for word in _sbatch_words(line.removeprefix("#SBATCH")):
            key, sep, value = word.partition("=")
            assert sep and key.startswith("--"), f"sbatch: invalid directive {word!r} in {line!r}"
            options[key] = value
    return options


def _expand_pattern(name: str, job: str, task: str) -> str:
    """The file name sbatch makes of an ``--output`` pattern (``%A``, ``%a``, ``%%``)."""
    assert "\\" not in name, "a backslash turns off every replacement"
    codes = {"%": "%", "A": job, "a": task}
    return re.sub(r"%(.)", lambda m: codes.get(m[1], m[0]), name)


def test_sbatch_reads_the_log_path_and_job_name_of_a_folder_with_spaces(tmp_path: Path) -> None:
    """Unquoted, ``--output=/tmp/my proj #1 .../slurm-%A_%a.out`` was two arguments, the second
    no option at all (sbatch: "Invalid directive found in batch script"), and a `%x` in the
    folder's name would have been replaced by the job name."""
    root = tmp_path / AWKWARD
    cfg = _launch_cfg(tmp_path, slurm={"partition": "gpu a", "account": "lab#2", "mem": "8G"})
    options = _sbatch_options(slurm_script(cfg, root, root / "params.yaml", 2))
    logs = (root / cfg.sweep.dir / "launch").resolve()
    assert _expand_pattern(options["--output"], "7", "1") == f"{logs}/slurm-7_1.out"
    assert options["--job-name"] == f"{cfg.sweep.study_name}-sweep"
    assert (options["--partition"], options["--account"]) == ("gpu a", "lab#2")
    assert options["--array"] == "0-1" and options["--mem"] == "8G"


def test_a_log_folder_with_a_backslash_is_refused_naming_it(tmp_path: Path) -> None:
    """sbatch turns off every ``%`` replacement of a file name holding a backslash (and drops
    the backslashes): the array's tasks would all write one file in a folder that does not
    exist, so the launch says so instead."""
    root = tmp_path / "back\\slash"
    cfg = _launch_cfg(tmp_path)
    with pytest.raises(LaunchError, match=r"backslash"):
        slurm_script(cfg, root, root / "params.yaml", 2)


@pytest.mark.cluster
def test_a_real_sbatch_runs_the_script_of_a_folder_with_spaces(tmp_path: Path, slurm: Any) -> None:
    """The generated script, its worker swapped for an echo, submitted to a real SLURM from a
    project folder with a space, a ``#`` and a ``%``: accepted, and each task's log is where
    the script says."""
    root = tmp_path / "my proj #1 %x"
    root.mkdir()
    cfg = _launch_cfg(tmp_path, slurm={"gpus_per_task": 0, "cpus_per_task": 1})
    text = slurm_script(cfg, root, root / "params.yaml", 1)
    body = text.rstrip("\n").splitlines()
    assert body[-1].startswith("exec ")
    script = root / "job.sbatch"
    script.write_text("\n".join([*body[:-1], 'echo "task ran in $PWD"', ""]), encoding="utf-8")
    (root / cfg.sweep.dir / "launch").mkdir(parents=True)
    done = slurm.run("sbatch", "--parsable", str(script))
    assert done.returncode == 0, done.stderr
    job = done.stdout.strip().split(";")[0]
    deadline = time.monotonic() + 120
    while slurm.jobs() and time.monotonic() < deadline:
        time.sleep(0.5)
    log = root / cfg.sweep.dir / "launch" / f"slurm-{job}_0.out"
    assert log.is_file(), sorted(str(p) for p in tmp_path.rglob("slurm-*"))
    assert f"task ran in {root}" in log.read_text(encoding="utf-8")


# -- 2. the export's base model -------------------------------------------------------------
def _export_info(cfg: HarnessConfig, root: Path) -> dict[str, Any]:
    """``inference.json`` of a point of ``cfg``, with what :func:`export_point` adds for the
    card."""
    from harness.export import inference_info

    row = {"point": 3, "run_key": "k", "checkpoint_step": 2, "setting_id": "s"}
    info = inference_info(cfg, root, row, InferenceSetting(), "sks", "dog", None)
    return {**info, "family": "sd15", "lora_components": ["unet"], "kohya": False}


def _card_base(card: str) -> tuple[str, str]:
    """The base model of a model card: its front matter's and its snippet's ``BASE``."""
    front = re.search(r"^base_model: (.+)$", card, re.M)
    snippet = re.search(r"^BASE = (.+)$", card, re.M)
    assert front and snippet, card
    return json.loads(front[1]), str(eval(snippet[1]))


def test_a_relative_local_base_model_is_exported_as_an_absolute_path(tmp_path: Path) -> None:
    """``model.pretrained: models/sd15`` (a diffusers folder of the project) was written as
    typed: the card's snippet runs in ``runs/export/point-<n>/``, where ``models/sd15`` is no
    folder, and diffusers took it for a hub id."""
    from harness.export import model_card

    root = tmp_path / "proj"
    (root / "models" / "sd15").mkdir(parents=True)
    (root / "models" / "sd15" / "model_index.json").write_text("{}")
    cfg = HarnessConfig.model_validate({"preset": "t", "model": {"pretrained": "models/sd15"}})
    info = _export_info(cfg, root)
    expected = str((root / "models" / "sd15").resolve())
    assert (info["base_model"], info["base_model_kind"]) == (expected, "local_dir")
    assert _card_base(model_card(info)) == (expected, expected)
    # The study is the sweep's: its model reference as configured.
    from harness.sweep.study import study_id

    assert info["study"] == study_id(cfg, root)


def test_a_relative_single_file_and_its_config_folder_are_exported_absolute(
    tmp_path: Path,
) -> None:
    """A ``.safetensors`` base model and a local ``model.single_file_config`` folder: both are
    read by the snippet from the export folder, so both are absolute; a hub id stays."""
    import torch

    from harness.export import model_card

    root = tmp_path / "proj"
    (root / "models" / "sd15-config").mkdir(parents=True)
    save_file({"w": torch.zeros(1)}, str(root / "models" / "base.safetensors"))
    model = {"pretrained": "models/base.safetensors", "single_file_config": "models/sd15-config"}
    cfg = HarnessConfig.model_validate({"preset": "t", "model": model})
    info = _export_info(cfg, root)
    weights = str((root / "models" / "base.safetensors").resolve())
    config = str((root / "models" / "sd15-config").resolve())
    assert (info["base_model"], info["base_model_kind"]) == (weights, "single_file")
    assert info["single_file_config"] == config
    card = model_card(info)
    assert _card_base(card) == (weights, weights)
    assert f"config={config!r}" in card, card
    hub = {**model, "single_file_config": "org/sd15-config"}
    cfg = HarnessConfig.model_validate({"preset": "t", "model": hub})
    assert _export_info(cfg, root)["single_file_config"] == "org/sd15-config"


# -- 3. the bench reads the project's subject -----------------------------------------------
def _photos(folder: Path, n: int) -> list[Path]:
    """``n`` distinct 96 px JPEGs (distinct enough that no two are near-duplicates)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        image = Image.new("RGB", (96, 96), ((i * 67) % 256, (i * 131) % 256, (i * 29) % 256))
        draw = ImageDraw.Draw(image)
        draw.rectangle([8 + 9 * i, 10, 40 + 9 * i, 60 + 4 * i], fill=(255 - 40 * i, 200, 30 * i))
        draw.ellipse([50, 12 * i % 60, 80, 12 * i % 60 + 30], fill=(20 * i, 255 - 30 * i, 90))
        paths.append(folder / f"photo_{i:02d}.jpg")
        image.save(paths[-1], quality=95)
    return paths


def _subject_project(root: Path, source: str) -> dict[str, Any]:
    """A project whose subject ``subj`` (4 photos) is in the project, at a relative path:
    ``folder`` (data/raw/subj), ``dvc-linked`` (the same, each photo a link into the
    project's DVC cache, as ``dvc checkout`` with symlinks leaves it) or ``dreambench``
    (bench-data/subj with its prompts_and_classes.txt); the data section of its params."""
    if source == "dreambench":
        _photos(root / "bench-data" / "subj", 4)
        (root / "bench-data" / "prompts_and_classes.txt").write_text(
            "subject_name,class\nsubj,toy\n\nObject Prompts\n"
            "'a {0} {1} on a table'.format(unique_token, class_token),\n"
        )
        return {"source": "dreambench", "dreambench_dir": "bench-data", "subject": "subj"}
    photos = _photos(root / "data" / "raw" / "subj", 4)
    if source == "dvc-linked":
        cache = root / ".dvc" / "cache" / "files" / "md5" / "ab"
        cache.mkdir(parents=True)
        for photo in photos:
            photo.rename(cache / photo.name)
            photo.symlink_to(cache / photo.name)
    return {"source": "folder", "subject": "subj", "class_name": "toy"}


@pytest.mark.parametrize("source", ["folder", "dvc-linked", "dreambench"])
def test_the_bench_prepares_the_projects_own_subject(
    tmp_path: Path, repo_root: Path, monkeypatch: pytest.MonkeyPatch, source: str
) -> None:
    """``harness bench`` with ``data.source: folder`` or ``dreambench`` at a relative path:
    the subject was looked up in the bench's temporary folder ("subject folder not found").
    The bench itself is swapped for its first step, preparing the subject (seconds)."""
    import shutil

    import harness.bench
    from harness.bench import _inputs

    root = tmp_path / "proj"
    root.mkdir()
    shutil.copytree(repo_root / "experiments", root / "experiments")
    params = {**_tiny_params(), "data": _subject_project(root, source)}
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    seen: list[int] = []

    def first_step(cfg: HarnessConfig, work: Path, repeats: int = 3) -> list[str]:
        inputs = _inputs(cfg, work)
        seen.append(len(inputs.subject.train) + len(inputs.subject.val))
        assert root.resolve() not in work.resolve().parents  # it works elsewhere
        return ["ratio=1.0"]

    monkeypatch.setattr(harness.bench, "run_bench", first_step)
    monkeypatch.chdir(tmp_path)  # not the project: the params file says where it is
    result = runner.invoke(app, ["-p", str(root / "params.yaml"), "bench"])
    assert result.exit_code == 0, result.output
    assert seen == [4] and result.stdout.strip().endswith("ratio=1.0")
    assert not (root / "data" / "prepared").exists(), "prepared in the bench's folder only"


# -- 4. the harness's seconds per point are wall clock ---------------------------------------
def test_the_harness_seconds_per_point_count_work_outside_the_timed_phases(
    tmp_path: Path, repo_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The harness path summed its measured phases (training, each point's generation and
    scoring); work in the sweep backend's evaluation outside those timers (grids, manifests,
    adaptive bookkeeping) was left out, while the naive path was wall clock. A delay injected
    there now shows in the figure; the phases stay as they were for the split."""
    from harness.bench import _setup
    from harness.bench.paths import harness_path
    from harness.sweep.backend import HarnessBackend

    delay, calls = 0.4, []
    evaluate = HarnessBackend.evaluate

    def slow_evaluate(self: HarnessBackend, *args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        time.sleep(delay)  # outside the generate and score timers
        return evaluate(self, *args, **kwargs)

    monkeypatch.setattr(HarnessBackend, "evaluate", slow_evaluate)
    inputs, loaded, scorer = _setup(_in_process(tmp_path, repo_root, monkeypatch), tmp_path / "w")
    run = harness_path(inputs, loaded, scorer, tmp_path / "w" / "harness")
    phases = run.train_s + run.generate_s + run.score_s
    assert calls and run.points == 4
    assert run.per_point_s * run.points >= phases + len(calls) * delay, (run, len(calls))
    assert run.total_s >= phases + len(calls) * delay


# -- 5. python -m harness.bench takes every global option ------------------------------------
@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        ("-S preset=tiny-adaptive --repeats 1", "-S preset=tiny-adaptive bench --repeats 1"),
        (
            "--repeats 2 --set train.rank=8 -v -p x.yaml --agreement",
            "--set train.rank=8 -v -p x.yaml bench --repeats 2 --agreement",
        ),
        (
            "--set=a=1 -Sb=2 --verbose --params=y.yaml -pz.yaml --generation",
            "--set=a=1 -Sb=2 --verbose --params=y.yaml -pz.yaml bench --generation",
        ),
        ("--reference ddim:50 --agreement", "bench --reference ddim:50 --agreement"),
    ],
    ids=["set-short", "set-long-and-verbose", "attached-values", "bench-options-only"],
)
def test_cli_args_put_every_global_option_before_bench(argv: str, expected: str) -> None:
    from harness.bench import cli_args

    assert cli_args(argv.split()) == expected.split()


def test_the_module_entry_point_takes_set_overrides(
    tmp_path: Path, repo_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``python -m harness.bench -S preset=tiny-adaptive --repeats 1`` failed: "No such option:
    -S". The bench gets the overridden config and the repeats."""
    import shutil

    import harness.bench

    shutil.copytree(repo_root / "experiments", tmp_path / "experiments")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(_tiny_params()))
    got: list[tuple[int, int]] = []

    def fake(cfg: HarnessConfig, work: Path, repeats: int = 3) -> list[str]:
        got.append((cfg.train.rank, repeats))
        return ["ratio=1.0"]

    monkeypatch.setattr(harness.bench, "run_bench", fake)
    params = str(tmp_path / "params.yaml")
    with pytest.raises(SystemExit) as exit_:
        harness.bench.main(["-S", "train.rank=8", "--repeats", "1", "-p", params, "-v"])
    assert exit_.value.code in (0, None)
    assert got == [(8, 1)]
