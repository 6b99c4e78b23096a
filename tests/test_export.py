"""``harness export``'s model card for SDXL: its diffusers snippet scales every component of
the adapter (``text_encoder_2`` included) as the sweep did, so diffusers alone gives the
harness's image. (The SD 1.x card is checked end to end after ``dvc repro`` in
tests/e2e/test_dvc_repro.py.)"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

from harness.config import HarnessConfig, InferenceSetting, ModelConfig
from harness.export import lora_layout, model_card
from harness.generate import LORA_WEIGHTS, generate_images
from harness.models import load_pipeline
from harness.models.tiny import tiny_pipeline_dir
from harness.sweep.confirm import METRICS
from harness.train import train_lora

pytestmark = pytest.mark.slow


def _strong_text_encoder_lora(path: Path) -> None:
    """Give the text encoders' LoRA up-projections of ``path`` large random values, in place:
    two training steps leave them near zero, and the test needs their scale to show."""
    generator = torch.Generator().manual_seed(0)
    with safe_open(str(path), framework="pt") as handle:
        metadata, names = handle.metadata(), handle.keys()
        tensors = {k: handle.get_tensor(k) for k in names}
    for key, value in tensors.items():
        if key.startswith("text_encoder") and ("lora_B" in key or ".up." in key):
            tensors[key] = torch.randn(value.shape, generator=generator).to(value.dtype)
    save_file(tensors, str(path), metadata=metadata)


def _trained_sdxl_adapter(tmp_path: Path) -> Path:
    """A tiny SDXL LoRA on the UNet and both text encoders, its checkpoint folder."""
    photo = tmp_path / "photo.png"
    arr = np.zeros((64, 64, 3), dtype=np.uint8)
    arr[16:48, 16:48] = (200, 40, 90)
    Image.fromarray(arr).save(photo)
    cfg = HarnessConfig.model_validate(
        {
            "preset": "t",
            "model": {"pretrained": "tiny://sdxl", "device": "cpu"},
            "data": {"class_name": "dog", "resolution": 64},
            "train": {
                "max_steps": 2,
                "checkpoint_steps": [2],
                "train_text_encoder": True,
                "learning_rate": 1e-2,
            },
        }
    )
    model = load_pipeline(cfg.model)
    result = train_lora(
        cfg, model, [(photo, "a photo of sks dog")], tmp_path / "run", progress=False
    )
    assert result.status == "completed", result.reason
    folder = result.checkpoints[-1].path
    _strong_text_encoder_lora(folder / LORA_WEIGHTS)
    return folder


def _pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=int)


def test_the_sdxl_card_scales_both_text_encoders_as_the_sweep_did(tmp_path: Path) -> None:
    """The card's snippet set only ``unet`` and ``text_encoder``: diffusers left
    ``text_encoder_2`` at scale 1.0 where the sweep had scored 0.25, another image."""
    folder = _trained_sdxl_adapter(tmp_path)
    family, components = lora_layout(folder / LORA_WEIGHTS)
    assert (family, components) == ("sdxl", ["text_encoder", "text_encoder_2", "unet"])

    setting = InferenceSetting(
        guidance_scale=5.0, lora_scale=0.8, text_encoder_lora_scale=0.25, num_inference_steps=2
    )
    info = {
        "base_model": str(tiny_pipeline_dir("sdxl")),
        "base_model_kind": "tiny",
        "revision": None,
        "variant": None,
        "family": family,
        "lora_components": components,
        "instance_prompt": "a photo of sks dog",
        "token": "sks",
        "class_name": "dog",
        "example": {"prompt": "a photo of sks dog", "seed": 3},
        "guidance_scale": setting.guidance_scale,
        "num_inference_steps": setting.num_inference_steps,
        "scheduler": setting.scheduler,
        "lora_scale": setting.lora_scale,
        "text_encoder_lora": True,
        "text_encoder_lora_scale": setting.text_encoder_lora_scale,
        "resolution": 64,
        "point": 0,
        "checkpoint_step": 2,
        "setting_id": setting.id,
        "study": "s",
        "run_key": "k",
        "scores": {kind: dict.fromkeys(METRICS, 0.5) for kind in ("sweep", "confirmed", "base")},
        "training": {},
        "kohya": False,
    }
    card = model_card(info)
    code = re.search(r"```python\n(.*?)```", card, re.S)
    assert code is not None and "'text_encoder_2': 0.25" in code.group(1), card
    user = tmp_path / "user"
    shutil.copytree(folder, user)
    ran = subprocess.run(
        [sys.executable, "-c", code.group(1)],
        cwd=user, env={**os.environ}, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert ran.returncode == 0, ran.stderr[-3000:]
    sample = _pixels(user / "sample.png")

    loaded = load_pipeline(ModelConfig(pretrained="tiny://sdxl", device="cpu"))
    images = {}
    for te_scale in (0.25, 1.0):
        out = tmp_path / f"harness-{te_scale}"
        (made,) = generate_images(
            loaded, templates=["a photo of {token} {class_name}"], token="sks",
            class_name="dog", seeds=[3],
            settings=[setting.model_copy(update={"text_encoder_lora_scale": te_scale})],
            out_dir=out, adapter=folder, resolution=64, batch_size=1,
        )  # fmt: skip
        images[te_scale] = _pixels(out / made.file)
    # The text encoders' scale shows in the image (else this test could not fail) ...
    assert np.abs(images[1.0] - images[0.25]).max() > 8
    # ... and the snippet gives the sweep's image, to float rounding.
    assert np.abs(sample - images[0.25]).max() <= 2
