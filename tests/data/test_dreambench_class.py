"""DreamBench subjects with a preset made for the sample subject: the dataset's class wins.

The tiny-cpu preset sets ``data.class_name: toy`` (the sample subject's class). A DreamBench
subject's class comes from ``prompts_and_classes.txt``: captions, the prior-preservation class
prompt and ``harness generate`` must all say "dog" for the dog, never "toy".
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
from e2e._helpers import new_project
from typer.testing import CliRunner

from harness.cli import app
from harness.config import HarnessConfig, load_config
from harness.data import load_prepared, prepare_subject
from harness.data.loader import with_subject
from harness.data.source import parse_dreambench_file
from harness.errors import HarnessError
from harness.train import class_prompt_for

runner = CliRunner()


def bench_overrides(dreambench_dir: Path, subject: str, **data: Any) -> dict[str, Any]:
    return {
        "data": {
            "source": "dreambench",
            "dreambench_dir": str(dreambench_dir),
            "subject": subject,
            **data,
        }
    }


def bench_project(tmp_path: Path, dreambench_dir: Path, subject: str, **more: Any) -> Path:
    overrides = bench_overrides(dreambench_dir, subject)
    for section, values in more.items():
        overrides.setdefault(section, {}).update(values)
    return new_project(tmp_path / "proj", overrides)


def config_of(project: Path) -> HarnessConfig:
    return load_config(project / "params.yaml")


def invoke(project: Path, *args: str) -> tuple[int, str, str]:
    result = runner.invoke(app, ["-p", str(project / "params.yaml"), *args])
    return result.exit_code, result.stdout, result.stderr


def flat(text: str) -> str:
    """Console output with rich's line wrapping undone."""
    return " ".join(text.split())


@pytest.mark.parametrize(("subject", "noun"), [("dog", "dog"), ("teapot", "teapot")])
def test_dataset_class_wins_over_the_presets_class_in_captions(
    tmp_path: Path, dreambench_dir: Path, subject: str, noun: str
) -> None:
    project = bench_project(tmp_path, dreambench_dir, subject)
    cfg = config_of(project)
    assert cfg.data.class_name == "toy"  # the tiny-cpu preset's, for the sample subject
    result = prepare_subject(cfg.data, project, progress=False)
    prepared = load_prepared(result.out_dir)
    assert prepared.class_name == noun
    assert prepared.train_captions == [f"a photo of sks {noun}"] * len(prepared.train)
    assert not any("toy" in c for c in prepared.train_captions)
    manifest = json.loads(result.manifest_path.read_text())
    assert manifest["class_name"] == noun
    overridden = [w for w in result.warnings if "data.class_name" in w]
    assert len(overridden) == 1
    assert "'toy'" in overridden[0] and f"'{noun}'" in overridden[0]
    assert overridden[0] in manifest["warnings"]


def test_prepare_cli_captions_the_dog_as_a_dog(tmp_path: Path, dreambench_dir: Path) -> None:
    project = bench_project(tmp_path, dreambench_dir, "dog")
    code, out, err = invoke(project, "prepare")
    assert code == 0, out + err
    manifest = json.loads((project / "data/prepared/dog/manifest.json").read_text())
    assert {r["caption"] for r in manifest["images"]} == {"a photo of sks dog"}
    assert "warning:" in err and "data.class_name 'toy'" in flat(err)


def test_no_warning_when_the_config_agrees_with_the_dataset(
    tmp_path: Path, dreambench_dir: Path
) -> None:
    project = new_project(
        tmp_path / "proj", bench_overrides(dreambench_dir, "dog", class_name="dog")
    )
    result = prepare_subject(config_of(project).data, project, progress=False)
    assert not [w for w in result.warnings if "data.class_name" in w]
    unset = new_project(tmp_path / "unset", bench_overrides(dreambench_dir, "dog", class_name=None))
    result = prepare_subject(config_of(unset).data, unset, progress=False)
    assert load_prepared(result.out_dir).class_name == "dog"
    assert not [w for w in result.warnings if "data.class_name" in w]


def test_with_subject_gives_prior_preservation_the_dataset_class(
    tmp_path: Path, dreambench_dir: Path
) -> None:
    for name, class_name in (("preset", "toy"), ("unset", None)):  # tiny-cpu's, sd15-lora's
        project = new_project(
            tmp_path / name,
            {
                **bench_overrides(dreambench_dir, "dog", class_name=class_name),
                "train": {"prior_preservation": True},
            },
        )
        cfg = config_of(project)
        subject = load_prepared(prepare_subject(cfg.data, project, progress=False).out_dir)
        fixed = with_subject(cfg, subject)
        assert fixed.data.class_name == "dog"
        assert class_prompt_for(fixed) == "a photo of dog"
        # Everything else is the same config; the input is left untouched (frozen model).
        assert fixed.model_dump(exclude={"data": {"class_name"}}) == cfg.model_dump(
            exclude={"data": {"class_name"}}
        )
        assert cfg.data.class_name == class_name
        if class_name is None:
            with pytest.raises(HarnessError, match=r"prior preservation needs data\.class_name"):
                class_prompt_for(cfg)


def test_with_subject_keeps_the_config_when_the_subject_has_no_class(
    tmp_path: Path, dreambench_dir: Path
) -> None:
    project = bench_project(tmp_path, dreambench_dir, "dog")
    cfg = config_of(project)
    subject = load_prepared(prepare_subject(cfg.data, project, progress=False).out_dir)
    classless = type(subject)(**{**vars(subject), "class_name": None})
    assert with_subject(cfg, classless) is cfg


@pytest.mark.slow
def test_train_cli_prior_preservation_on_a_dreambench_subject(
    tmp_path: Path, dreambench_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    project = bench_project(
        tmp_path,
        dreambench_dir,
        "dog",
        train={
            "prior_preservation": True,
            "num_class_images": 1,
            "class_inference_steps": 1,
            "max_steps": 2,
            "checkpoint_steps": [2],
        },
    )
    code, out, err = invoke(project, "prepare")
    assert code == 0, out + err
    cache = Path(os.environ["HARNESS_CACHE_DIR"])
    before = set(cache.glob("class-images/*/meta.json"))
    code, out, err = invoke(project, "train")
    assert code == 0, out + err
    assert "completed: 2/2 steps" in out
    made = set(cache.glob("class-images/*/meta.json")) - before
    prompts = {json.loads(p.read_text())["prompt"] for p in made}
    if not made:  # generated earlier in this session: find the set that training used
        prompts = {
            json.loads(p.read_text())["prompt"] for p in cache.glob("class-images/*/meta.json")
        }
    assert "a photo of dog" in prompts and "a photo of toy" not in prompts
    result = json.loads((project / "runs/train/result.json").read_text())
    assert result["status"] == "completed"


def test_generate_cli_uses_the_dataset_prompts_and_class(
    tmp_path: Path, dreambench_dir: Path
) -> None:
    project = bench_project(
        tmp_path,
        dreambench_dir,
        "dog",
        eval={"prompt_source": "dataset", "images_per_prompt": 1, "num_inference_steps": 1},
    )
    code, out, err = invoke(project, "prepare")
    assert code == 0, out + err
    gen = tmp_path / "gen"
    code, out, err = invoke(project, "generate", "--out", str(gen))
    assert code == 0, out + err
    records = [json.loads(line) for line in (gen / "manifest.jsonl").read_text().splitlines()]
    _, _, live = parse_dreambench_file(dreambench_dir / "prompts_and_classes.txt")
    expected = [t.replace("{token}", "sks").replace("{class_name}", "dog") for t in live]
    assert len(expected) == 25
    assert [r["prompt"] for r in records] == expected
    assert [r["template"] for r in records] == live
    assert f"generated {len(expected)} images" in out


def test_generate_cli_config_prompts_get_the_dataset_class(
    tmp_path: Path, dreambench_dir: Path
) -> None:
    project = bench_project(
        tmp_path,
        dreambench_dir,
        "dog",
        eval={
            "prompts": ["a photo of {token} {class_name}"],
            "images_per_prompt": 1,
            "num_inference_steps": 1,
        },
    )
    code, out, err = invoke(project, "prepare")
    assert code == 0, out + err
    gen = tmp_path / "gen"
    code, out, err = invoke(project, "generate", "--out", str(gen))
    assert code == 0, out + err
    records = [json.loads(line) for line in (gen / "manifest.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in records] == ["a photo of sks dog"]


def test_generate_cli_dataset_prompts_need_a_prepared_subject(
    tmp_path: Path, dreambench_dir: Path
) -> None:
    project = bench_project(tmp_path, dreambench_dir, "dog", eval={"prompt_source": "dataset"})
    code, out, err = invoke(project, "generate", "--out", str(tmp_path / "gen"))
    assert code == 2, out + err
    assert "no manifest.json" in flat(err) and "prepare" in flat(err)
    assert not (tmp_path / "gen").exists()
