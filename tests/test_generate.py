"""Batched generation: determinism, batching independence, adapter swap and LoRA scales."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from harness.config import InferenceSetting
from harness.errors import HarnessError
from harness.generate import format_prompt, generate_images
from harness.models import WeightsFileError

FAST = InferenceSetting(guidance_scale=5.0, num_inference_steps=2, scheduler="ddim")


def random_lora(pipeline: Any, out_dir: Path, seed: int = 0) -> Path:
    """Save a UNet LoRA with non-zero random weights in diffusers' format."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    unet = copy.deepcopy(pipeline.unet)
    unet.add_adapter(
        LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    )
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in unet.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
    state = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    StableDiffusionPipeline.save_lora_weights(out_dir, unet_lora_layers=state)
    return out_dir


def pixels(out_dir: Path, record: Any) -> np.ndarray:
    return np.asarray(Image.open(out_dir / record.file))


def run(loaded: Any, out: Path, **kwargs: Any) -> list[Any]:
    defaults: dict[str, Any] = {
        "templates": ["a photo of {token} {class_name}", "a {token} {class_name} in the snow"],
        "token": "sks",
        "class_name": "toy",
        "seeds": [0, 1],
        "settings": [FAST],
        "out_dir": out,
        "progress": False,
    }
    defaults.update(kwargs)
    return generate_images(loaded, **defaults)


def test_manifest_and_files(tiny_sd15: Any, tmp_path: Path) -> None:
    records = run(tiny_sd15, tmp_path)
    assert len(records) == 4
    lines = [json.loads(x) for x in (tmp_path / "manifest.jsonl").read_text().splitlines()]
    assert [r["file"] for r in lines] == [r.file for r in records]
    first = lines[0]
    assert first["prompt"] == "a photo of sks toy"
    assert first["template"] == "a photo of {token} {class_name}"
    assert (first["seed"], first["guidance_scale"], first["num_inference_steps"]) == (0, 5.0, 2)
    assert first["setting_id"] == FAST.id and first["adapter"] is None
    assert Image.open(tmp_path / first["file"]).size == (64, 64)


def test_deterministic_and_independent_of_batching(tiny_sd15: Any, tmp_path: Path) -> None:
    one = run(tiny_sd15, tmp_path / "a", batch_size=1)
    four = run(tiny_sd15, tmp_path / "b", batch_size=4)
    again = run(tiny_sd15, tmp_path / "c", batch_size=4)
    for a, b, c in zip(one, four, again, strict=True):
        assert a.file == b.file == c.file
        assert np.array_equal(pixels(tmp_path / "b", b), pixels(tmp_path / "c", c))
        # Another batch size only changes float rounding (BLAS), never the noise: +-2 levels.
        diff = np.abs(pixels(tmp_path / "a", a).astype(int) - pixels(tmp_path / "b", b).astype(int))
        assert diff.max() <= 2
    # Different seeds really give different images.
    assert not np.array_equal(pixels(tmp_path / "a", one[0]), pixels(tmp_path / "a", one[1]))


def test_lora_scale_zero_equals_base_and_adapter_is_removed(tiny_sd15: Any, tmp_path: Path) -> None:
    lora = random_lora(tiny_sd15.pipeline, tmp_path / "lora")
    base = run(tiny_sd15, tmp_path / "base", seeds=[3])
    zero = InferenceSetting(
        guidance_scale=5.0, num_inference_steps=2, scheduler="ddim", lora_scale=0.0
    )
    scaled = run(tiny_sd15, tmp_path / "lora-out", seeds=[3], settings=[zero, FAST], adapter=lora)
    assert np.array_equal(
        pixels(tmp_path / "base", base[0]), pixels(tmp_path / "lora-out", scaled[0])
    )
    assert not np.array_equal(
        pixels(tmp_path / "base", base[0]), pixels(tmp_path / "lora-out", scaled[2])
    )
    assert not any("lora" in key for key in tiny_sd15.pipeline.unet.state_dict())
    again = run(tiny_sd15, tmp_path / "again", seeds=[3])
    assert np.array_equal(pixels(tmp_path / "base", base[0]), pixels(tmp_path / "again", again[0]))


def test_schedulers_switch_and_restore(tiny_sd15: Any, tmp_path: Path) -> None:
    before = type(tiny_sd15.pipeline.scheduler)
    settings = [
        InferenceSetting(num_inference_steps=2, scheduler=s) for s in ("dpmsolver++", "euler")
    ]
    records = run(
        tiny_sd15, tmp_path, templates=["a {token} {class_name}"], seeds=[0], settings=settings
    )
    assert {r.setting.scheduler for r in records} == {"dpmsolver++", "euler"}
    assert type(tiny_sd15.pipeline.scheduler) is before


def test_missing_adapter_is_a_clear_error(tiny_sd15: Any, tmp_path: Path) -> None:
    with pytest.raises(HarnessError, match="LoRA weights not found"):
        run(tiny_sd15, tmp_path, adapter=tmp_path / "nope")


@pytest.mark.parametrize("name", ["a.bin", "a.ckpt", "a.pt", "a.pth", "a.safetensors", "dir"])
def test_pickle_adapter_refused_without_unpickling(
    tiny_sd15: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    weights = tmp_path / name
    if name == "dir":  # a checkpoint folder whose weights are a renamed pickle
        weights.mkdir()
        weights = weights / "pytorch_lora_weights.safetensors"
    torch.save({"unet.x.lora.down.weight": torch.zeros(2, 2)}, weights)

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("torch.load reached")

    monkeypatch.setattr(torch, "load", refuse)
    with pytest.raises(WeightsFileError, match=rf"^adapter: {re.escape(str(weights))}: "):
        run(tiny_sd15, tmp_path / "out", adapter=tmp_path / name)
    assert not any(tiny_sd15.pipeline.get_list_adapters().values())
    assert not (tmp_path / "out" / "manifest.jsonl").exists()


def test_format_prompt_both_placeholder_styles() -> None:
    assert format_prompt("a {token} {class_name}", "sks", "dog") == "a sks dog"
    assert format_prompt("a {0} {1} on the beach", "sks", "dog") == "a sks dog on the beach"
    with pytest.raises(HarnessError, match="unknown placeholder"):
        format_prompt("a {subject}", "sks", "dog")
