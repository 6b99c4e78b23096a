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


def test_a_damaged_checkpoint_json_is_an_export_error_naming_it(tmp_path: Path) -> None:
    """A ``checkpoint.json`` that is not a JSON object (a truncated write, a hand edit) beside
    the exported adapter: one error naming the file, not a JSON traceback."""
    import pytest

    from harness.export import ExportError, lora_layout

    folder = tmp_path / "step-000010"
    folder.mkdir()
    weights = folder / "pytorch_lora_weights.safetensors"
    save_file({"unet.a.lora.down.weight": torch.zeros(2, 4)}, str(weights))
    for damaged in ('{"family": "sd', "[1, 2]"):
        (folder / "checkpoint.json").write_text(damaged)
        with pytest.raises(ExportError, match=r"step-000010/checkpoint\.json: not a JSON object"):
            lora_layout(weights)
    # Through the export of a point: the earlier export in the way is kept.
    from harness.export import export_point

    earlier = tmp_path / "export" / "README.md"
    earlier.parent.mkdir()
    earlier.write_text("the earlier export")
    with pytest.raises(ExportError, match=r"checkpoint\.json"):
        export_point(
            None, tmp_path, {"adapter": folder.name}, earlier.parent, token="s", class_name="c"
        )  # type: ignore[arg-type]
    assert earlier.read_text() == "the earlier export"
    (folder / "checkpoint.json").write_text('{"family": "sd15"}')
    assert lora_layout(weights) == ("sd15", ["unet"])
