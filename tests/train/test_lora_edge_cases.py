"""Trainer edge cases: LoRA target modules that match nothing, and the kohya files of the
checkpoints written before a resume."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from harness.models import LoadedModel
from harness.train import CheckpointInfo, TrainingError, train_lora
from harness.train.lora import attached_lora
from tests.train.conftest import tiny_train_config


def _image(tmp_path: Path) -> list[tuple[Path, str]]:
    arr = np.zeros((64, 64, 3), dtype=np.uint8)
    arr[16:48, 16:48] = (200, 40, 90)
    path = tmp_path / "inst.png"
    Image.fromarray(arr).save(path)
    return [(path, "a photo of sks dog")]


def _state(model: LoadedModel) -> dict[str, Any]:
    """What attaching must leave as it was: module classes and trainable flags."""
    pipe = model.pipeline
    return {
        name: (
            sorted({type(m).__name__ for m in getattr(pipe, name).modules()}),
            sorted(k for k, p in getattr(pipe, name).named_parameters() if p.requires_grad),
            bool(getattr(getattr(pipe, name), "peft_config", None)),
        )
        for name in ("unet", "text_encoder")
    }


@pytest.mark.parametrize(
    ("train", "key", "missing"),
    [
        (
            {"target_modules": ["to_qq", "conv9"]},
            "train.target_modules",
            "'to_qq', 'conv9' match no layer of the unet",
        ),
        (
            {"train_text_encoder": True, "text_encoder_target_modules": ["to_q", "to_k"]},
            "train.text_encoder_target_modules",
            "'to_q', 'to_k' match no layer of the text_encoder",
        ),
        (
            {"target_modules": ["attn"]},
            "train.target_modules",
            "'attn' matches no layer of the unet (UNet2DConditionModel)",
        ),
    ],
    ids=["unet", "text_encoder", "one_name"],
)
def test_target_modules_matching_nothing_name_the_key(
    sd15: LoadedModel, train: dict[str, Any], key: str, missing: str
) -> None:
    cfg = tiny_train_config(**train)
    before = _state(sd15)
    with pytest.raises(TrainingError) as info, attached_lora(sd15, cfg.train):
        pass
    message = str(info.value)
    assert "\n" not in message, message
    assert message.startswith(f"{key}: "), message
    assert missing in message, message
    # The model is left as it was, and a correct config attaches afterwards.
    assert _state(sd15) == before
    with attached_lora(sd15, tiny_train_config(train_text_encoder=True).train) as lora:
        assert lora.parameters("unet") and lora.parameters("text_encoder")
    assert _state(sd15) == before


def test_failed_attach_leaves_a_pipeline_with_its_own_adapter_as_it_was() -> None:
    from peft import LoraConfig

    from harness.config import ModelConfig
    from harness.models import load_pipeline

    model = load_pipeline(ModelConfig(pretrained="tiny://sd15", device="cpu"))
    unet = model.pipeline.unet
    unet.add_adapter(LoraConfig(r=2, target_modules=["to_k"]), adapter_name="other")
    before = _state(model)
    bad = tiny_train_config(target_modules=["nope"]).train
    with (
        pytest.raises(TrainingError, match=r"^train\.target_modules: 'nope' matches no layer"),
        attached_lora(model, bad),
    ):
        pass
    assert list(unet.peft_config) == ["other"] and _state(model) == before
    with attached_lora(model, tiny_train_config().train) as lora:
        assert lora.parameters("unet")
    assert list(unet.peft_config) == ["other"] and _state(model) == before


def test_train_lora_with_unknown_target_modules_fails_in_one_line(
    sd15: LoadedModel, tmp_path: Path
) -> None:
    with pytest.raises(TrainingError, match=r"^train\.target_modules: 'to_qq' matches no layer"):
        train_lora(
            tiny_train_config(target_modules=["to_qq"]), sd15, _image(tmp_path), tmp_path / "run"
        )


def test_target_modules_matching_partly_train_what_matched(sd15: LoadedModel) -> None:
    # peft fails only when nothing matches; a partial match is not an error.
    with attached_lora(
        sd15, tiny_train_config(target_modules=["to_q", "no_such_layer"]).train
    ) as lora:
        assert lora.parameters("unet")


def test_checkpoints_before_a_resume_keep_their_kohya_file(
    sd15: LoadedModel, tmp_path: Path
) -> None:
    cfg = tiny_train_config(
        max_steps=4, checkpoint_steps=[2, 4], export_kohya=True, learning_rate=1e-2
    )
    data = _image(tmp_path)
    run = tmp_path / "run"

    def crash(info: CheckpointInfo) -> None:
        raise RuntimeError(f"simulated crash after step {info.step}")

    with pytest.raises(RuntimeError, match="simulated crash"):
        train_lora(cfg, sd15, data, run, on_checkpoint=crash, progress=False)
    first = run / "checkpoints" / "step-000002" / "kohya_lora.safetensors"
    assert first.is_file()
    resumed = train_lora(cfg, sd15, data, run, progress=False)
    assert resumed.status == "completed" and resumed.resumed_from == 2
    assert [(c.step, c.kohya_path) for c in resumed.checkpoints] == [
        (2, first),
        (4, run / "checkpoints" / "step-000004" / "kohya_lora.safetensors"),
    ]
    recorded = json.loads((run / "result.json").read_text())["checkpoints"]
    assert [c["kohya_path"] for c in recorded] == [str(c.kohya_path) for c in resumed.checkpoints]
