"""``harness export``'s kohya file where kohya has no name for a module."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file


def test_an_adapter_outside_the_sd_layout_exports_without_a_kohya_file(tmp_path: Path) -> None:
    """A module kohya has no name for: the export keeps the diffusers file it copied and says
    why there is no kohya file, instead of failing half-way (nothing done is lost)."""
    from harness.export import _kohya_file

    folder, out = tmp_path / "ckpt", tmp_path / "out"
    folder.mkdir()
    out.mkdir()
    meta = {"unet.r": 2, "unet.lora_alpha": 2}
    save_file(
        {
            "unet.extra_block.to_q.lora.down.weight": torch.zeros(2, 4),
            "unet.extra_block.to_q.lora.up.weight": torch.zeros(4, 2),
        },
        str(folder / "pytorch_lora_weights.safetensors"),
        metadata={"lora_adapter_metadata": json.dumps(meta), "format": "pt"},
    )
    layout = {
        "layers_per_block": 2,
        "block_out_channels": [32, 64],
        "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
    }
    (folder / "checkpoint.json").write_text(json.dumps({"family": "sdxl", "unet_layout": layout}))
    kohya, why = _kohya_file(folder, "pytorch_lora_weights.safetensors", out, "sdxl")
    assert kohya is None and why.startswith("no kohya name:") and "extra_block" in why, why
    assert list(out.iterdir()) == []
