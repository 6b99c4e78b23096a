"""Issue 16, validation images while training (``train.validation_steps``): written at the
right steps with the eval settings, logged to the tracker, and never changing the trajectory."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from harness.config import HarnessConfig
from harness.models import LoadedModel
from harness.train import train_lora
from harness.train.validation import VALIDATION_JSON, ValidationImages


def _cfg(**train: Any) -> HarnessConfig:
    return HarnessConfig.model_validate(
        {
            "preset": "t",
            "model": {"pretrained": "tiny://sd15", "device": "cpu"},
            "data": {"class_name": "dog", "resolution": 64},
            "eval": {"num_inference_steps": 2, "guidance_scale": 4.0, "scheduler": "ddim"},
            "train": {"max_steps": 3, "checkpoint_steps": [3], "learning_rate": 2e-2, **train},
        }
    )


def _photos(tmp_path: Path, n: int = 2) -> list[tuple[Path, str]]:
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        path = tmp_path / f"p{i}.png"
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(path)
        out.append((path, "a photo of sks dog"))
    return out


def _losses(run: Path) -> list[float]:
    lines = (run / "train_log.jsonl").read_text().splitlines()
    return [json.loads(line)["loss"] for line in lines]


@pytest.mark.slow
def test_validation_never_changes_the_trajectory(sd15: LoadedModel, tmp_path: Path) -> None:
    """Dropout (global RNG) and random flips (the trainer's generator) both draw while
    validation generates in between; weights and losses must be those of a run without it."""
    data = _photos(tmp_path)
    train = {"dropout": 0.1, "random_flip": 0.5}
    cache = tmp_path / "cache"
    plain = train_lora(
        _cfg(**train), sd15, data, tmp_path / "plain", progress=False, cache_root=cache
    )
    made: list[ValidationImages] = []
    cfg = _cfg(validation_steps=1, validation_seed=7, **train)
    busy = train_lora(
        cfg,
        sd15,
        data,
        tmp_path / "busy",
        progress=False,
        cache_root=cache,
        on_validation=made.append,
    )
    assert plain.status == busy.status == "completed"
    assert _losses(tmp_path / "busy") == _losses(tmp_path / "plain")
    a = load_file(str(plain.checkpoints[-1].path / "state" / "lora.safetensors"))
    b = load_file(str(busy.checkpoints[-1].path / "state" / "lora.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert busy.config_hash == plain.config_hash  # validation keys are not in the hash

    assert [m.step for m in made] == [1, 2, 3]
    last = made[-1]
    assert [p.name for p in last.images] == ["0-7.png", "1-7.png"]
    assert last.prompts == ("a photo of sks dog", "a sks dog on the beach")
    # The images are the checkpoint's, generated with the eval settings: exactly what
    # generating from the saved step-3 adapter gives for the same seed.
    from harness.generate import generate_images

    again = generate_images(
        sd15,
        templates=cfg.train.validation_prompts,
        token="sks",
        class_name="dog",
        seeds=[7],
        settings=[cfg.eval.setting],
        out_dir=tmp_path / "again",
        adapter=busy.checkpoints[-1].path,
        resolution=64,
        progress=False,
    )
    for record, image in zip(again, last.images, strict=True):
        expected = np.asarray(Image.open(tmp_path / "again" / record.file))
        assert np.array_equal(np.asarray(Image.open(image)), expected)
    # Different steps, different adapters: different images.
    first = np.asarray(Image.open(made[0].images[0]))
    assert not np.array_equal(first, np.asarray(Image.open(last.images[0])))


def test_with_ema_validation_shows_the_average_the_checkpoint_publishes(
    sd15: LoadedModel, tmp_path: Path
) -> None:
    """train.ema_decay: the checkpoint's adapter is the EMA, so validation images at a
    checkpoint step are that adapter's, not the raw weights'."""
    from harness.generate import generate_images

    cfg = _cfg(ema_decay=0.5, validation_steps=3, validation_prompts=["a photo of {token}"])
    made: list[ValidationImages] = []
    run = train_lora(
        cfg, sd15, _photos(tmp_path, 1), tmp_path / "run", progress=False, on_validation=made.append
    )
    (last,) = made
    again = generate_images(
        sd15,
        templates=cfg.train.validation_prompts,
        token="sks",
        class_name="dog",
        seeds=[cfg.train.validation_seed],
        settings=[cfg.eval.setting],
        out_dir=tmp_path / "again",
        adapter=run.checkpoints[-1].path,
        resolution=64,
        progress=False,
    )
    expected = np.asarray(Image.open(tmp_path / "again" / again[0].file))
    assert np.array_equal(np.asarray(Image.open(last.images[0])), expected)


def test_validation_steps_and_the_end(sd15: LoadedModel, tmp_path: Path) -> None:
    cfg = _cfg(max_steps=5, checkpoint_steps=[], validation_steps=2, validation_prompts=["{token}"])
    train_lora(cfg, sd15, _photos(tmp_path, 1), tmp_path / "run", progress=False)
    folder = tmp_path / "run" / "validation"
    assert sorted(p.name for p in folder.iterdir()) == ["step-2", "step-4", "step-5"]
    meta = json.loads((folder / "step-5" / VALIDATION_JSON).read_text())
    assert meta["step"] == 5 and meta["prompts"] == ["sks"] and meta["images"] == ["0-0.png"]
    assert meta["setting"]["scheduler"] == "ddim" and meta["setting"]["num_inference_steps"] == 2
    assert Image.open(folder / "step-5" / "0-0.png").size == (64, 64)


def test_validation_is_off_by_default_and_renames_nothing(
    sd15: LoadedModel, tmp_path: Path
) -> None:
    from harness.sweep.runner import run_key
    from harness.sweep.study import study_id
    from harness.train.fingerprints import config_hash

    train_lora(_cfg(max_steps=1, checkpoint_steps=[]), sd15, _photos(tmp_path, 1), tmp_path / "r")
    assert not (tmp_path / "r" / "validation").exists()
    base, on = _cfg(), _cfg(validation_steps=5, validation_prompts=["a {token}"], validation_seed=3)
    assert (study_id(on), run_key(on), config_hash(on)) == (
        study_id(base),
        run_key(base),
        config_hash(base),
    )


def test_unknown_placeholders_in_validation_prompts_are_refused() -> None:
    from harness.config import ConfigError, validate_config

    with pytest.raises(ConfigError, match="validation_prompts"):
        validate_config({"preset": "t", "train": {"validation_prompts": ["a {subject}"]}})


class _Run:
    """A tracker run that records the images it is given."""

    def __init__(self, images: list[tuple[str, str, int]]) -> None:
        self.images = images

    def __enter__(self) -> _Run:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def log_scalars(self, *args: Any, **kwargs: Any) -> None:
        return None

    def log_image(self, title: str, series: str, image: Any, step: int) -> None:
        assert Path(image).is_file()
        self.images.append((title, series, step))

    def upload_artifact(self, *args: Any) -> None:
        return None


class _Tracker:
    def __init__(self) -> None:
        self.images: list[tuple[str, str, int]] = []

    def preflight(self) -> None:
        return None

    def start_run(self, *args: Any, **kwargs: Any) -> _Run:
        return _Run(self.images)


@pytest.mark.slow
def test_harness_train_writes_and_tracks_validation_images(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``harness prepare`` then ``harness train`` with data.token: auto: the validation
    prompts carry the token prepare chose."""
    from e2e._helpers import new_project
    from typer.testing import CliRunner

    import harness.tracking
    from harness.cli import app

    tracker = _Tracker()
    monkeypatch.setattr(harness.tracking, "create_tracker", lambda *a, **k: tracker)
    project = new_project(
        tmp_path / "proj",
        {
            "data": {"token": "auto", "sample_images": 4},
            "train": {"max_steps": 3, "checkpoint_steps": [3], "validation_steps": 2},
            "eval": {"num_inference_steps": 2},
        },
    )
    runner = CliRunner()
    params = ["-p", str(project / "params.yaml")]
    for command in ("prepare", "train"):
        result = runner.invoke(app, [*params, command])
        assert result.exit_code == 0, result.stdout + result.stderr
    manifest = json.loads((project / "data/prepared/sample/manifest.json").read_text())
    token = manifest["token"]
    assert token != "auto"
    folder = project / "runs" / "train" / "validation"
    assert sorted(p.name for p in folder.iterdir()) == ["step-2", "step-3"]
    for step in (2, 3):
        meta = json.loads((folder / f"step-{step}" / VALIDATION_JSON).read_text())
        assert meta["prompts"] == [f"a photo of {token} toy", f"a {token} toy on the beach"]
        assert all((folder / f"step-{step}" / name).is_file() for name in meta["images"])
    assert [(t, s) for t, _, s in tracker.images] == [("validation", 2)] * 2 + [
        ("validation", 3)
    ] * 2
    assert tracker.images[0][1] == f"0: a photo of {token} toy"
