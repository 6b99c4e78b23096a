"""The kohya export (``train.export_kohya``), checked through the tool that consumes it.

A kohya file must hold ``<prefix><module path with "_">.lora_down.weight`` / ``.lora_up.weight``
/ ``.alpha`` (a scalar) for every trained module, with kohya's module names: diffusers-style
UNet names for SD 1.x, the original (LDM/sgm) UNet names for SDXL, ``text_model.``-rooted CLIP
names under ``lora_te_`` (SD 1.x) or ``lora_te1_`` / ``lora_te2_`` (SDXL). diffusers'
``load_lora_weights`` on that file must then give the same images as the diffusers-format file.
"""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from peft.utils import get_peft_model_state_dict
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from harness.config import HarnessConfig, ModelConfig
from harness.models import load_pipeline
from harness.train import TrainResult, train_lora
from harness.train.kohya import kohya_module_name

UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "ff.net.2", "conv1"]
TE_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1"]
PROMPT = "a photo of sks dog"


def _cfg(family: str) -> HarnessConfig:
    """Few steps at a high learning rate, alpha != rank, a smaller text-encoder rank."""
    return HarnessConfig.model_validate(
        {
            "preset": "t",
            "model": {"pretrained": f"tiny://{family}", "device": "cpu"},
            "data": {"class_name": "dog", "resolution": 64},
            "train": {
                "max_steps": 2,
                "checkpoint_steps": [],
                "rank": 4,
                "alpha": 8.0,
                "text_encoder_rank": 2,
                "learning_rate": 5e-2,
                "text_encoder_lr": 5e-2,
                "target_modules": UNET_TARGETS,
                "train_text_encoder": True,
                "text_encoder_target_modules": TE_TARGETS,
                "export_kohya": True,
            },
        }
    )


def _train(family: str, tmp_path: Path) -> TrainResult:
    arr = np.zeros((64, 64, 3), dtype=np.uint8)
    arr[..., 0] = np.linspace(0, 255, 64, dtype=np.uint8)[None, :]
    arr[16:48, 16:48] = (30, 200, 90)
    image = tmp_path / "inst.png"
    Image.fromarray(arr).save(image)
    model = load_pipeline(ModelConfig(pretrained=f"tiny://{family}", device="cpu"))
    result = train_lora(_cfg(family), model, [(image, PROMPT)], tmp_path / "run", progress=False)
    assert result.status == "completed", result.reason
    return result


def _peft_modules(result: TrainResult) -> dict[str, set[str]]:
    """Trained module paths per component, from the trainer's own PEFT-format state."""
    state = load_file(str(result.checkpoints[-1].path / "state" / "lora.safetensors"))
    out: dict[str, set[str]] = {}
    for key in state:
        component, name = key.split("::", 1)
        out.setdefault(component, set()).add(name.split(".lora_")[0])
    return out


def _expected_names(family: str, modules: dict[str, set[str]]) -> set[str]:
    """kohya names, derived independently of the exporter (for SDXL: the UNet's LDM names)."""
    te_prefix = {"text_encoder": "lora_te1_" if family == "sdxl" else "lora_te_"}
    te_prefix["text_encoder_2"] = "lora_te2_"
    names = set()
    for component, paths in modules.items():
        for path in paths:
            if component == "unet":
                path = _sdxl_unet_ldm(path) if family == "sdxl" else path
                names.add("lora_unet_" + path.replace(".", "_"))
            else:
                path = path if path.startswith("text_model.") else "text_model." + path
                names.add(te_prefix[component] + path.replace(".", "_"))
    return names


def _sdxl_unet_ldm(path: str) -> str:
    """diffusers -> sgm module path for the tiny SDXL UNet (2 blocks, 2 layers per block)."""
    rules = [
        (
            r"^down_blocks\.(\d)\.attentions\.(\d)\.",
            lambda m: f"input_blocks.{3 * int(m[1]) + int(m[2]) + 1}.1.",
        ),
        (
            r"^down_blocks\.(\d)\.resnets\.(\d)\.",
            lambda m: f"input_blocks.{3 * int(m[1]) + int(m[2]) + 1}.0.",
        ),
        (
            r"^up_blocks\.(\d)\.attentions\.(\d)\.",
            lambda m: f"output_blocks.{3 * int(m[1]) + int(m[2])}.1.",
        ),
        (
            r"^up_blocks\.(\d)\.resnets\.(\d)\.",
            lambda m: f"output_blocks.{3 * int(m[1]) + int(m[2])}.0.",
        ),
        (r"^mid_block\.attentions\.0\.", lambda m: "middle_block.1."),
        (r"^mid_block\.resnets\.(\d)\.", lambda m: f"middle_block.{2 * int(m[1])}."),
    ]
    for pattern, repl in rules:
        new = re.sub(pattern, repl, path)
        if new != path:
            return new.replace(".conv1", ".in_layers.2").replace(".conv2", ".out_layers.3")
    raise AssertionError(f"unexpected UNet module {path}")


def _check_keys(family: str, result: TrainResult) -> dict[str, torch.Tensor]:
    """Exact key set, every module with down / up / scalar alpha of the configured value."""
    kohya_file = result.checkpoints[-1].kohya_path
    assert kohya_file is not None and kohya_file.name == "kohya_lora.safetensors"
    with safe_open(str(kohya_file), framework="pt") as handle:  # safetensors, not pickle
        assert handle.metadata()["format"] == "pt"
    kohya = load_file(str(kohya_file))
    names = _expected_names(family, _peft_modules(result))
    suffixes = (".lora_down.weight", ".lora_up.weight", ".alpha")
    assert set(kohya) == {n + s for n in names for s in suffixes}
    pattern = re.compile(
        r"^lora_(unet|te|te1|te2)_[a-z0-9_]+\.(lora_down\.weight|lora_up\.weight|alpha)$"
    )
    assert all(pattern.match(k) for k in kohya)
    for name in names:
        alpha = kohya[name + ".alpha"]
        assert alpha.ndim == 0
        rank = kohya[name + ".lora_down.weight"].shape[0]
        assert kohya[name + ".lora_up.weight"].shape[1] == rank
        # unet: alpha 8 at rank 4; text encoders: rank 2 with the same alpha / rank scale
        assert float(alpha) == (8.0 if name.startswith("lora_unet_") else 4.0), name
        assert rank == (4 if name.startswith("lora_unet_") else 2), name
    # Non-trivial weights, so that a wrong mapping changes the images. SDXL conditions on the
    # penultimate hidden states of its first text encoder: its last layer gets no gradient.
    dead = re.compile(r"^lora_te1_text_model_encoder_layers_1_")
    up = {k: v for k, v in kohya.items() if k.endswith("lora_up.weight")}
    assert all((v.abs().max() > 1e-3) != bool(dead.match(k)) for k, v in up.items())
    return kohya


def _sample(pipe: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """(prompt embeddings, image) for a fixed seed: two steps at 64 px."""
    with torch.no_grad():
        embeds = pipe.encode_prompt(
            PROMPT, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False
        )[0]
    generator = torch.Generator().manual_seed(0)
    image = pipe(PROMPT, num_inference_steps=2, generator=generator, output_type="pt").images
    return embeds, image


def _compare_loaders(family: str, result: TrainResult, kohya_file: Path | None = None) -> None:
    """Same embeddings and images from the kohya file (the run's, or ``kohya_file``) as from
    the diffusers file; not base."""
    pipe = load_pipeline(ModelConfig(pretrained=f"tiny://{family}", device="cpu")).pipeline
    base = _sample(pipe)
    ckpt = result.checkpoints[-1]
    pipe.load_lora_weights(ckpt.path, adapter_name="diffusers")
    reference = _sample(pipe)
    pipe.unload_lora_weights()
    assert torch.equal(_sample(pipe)[1], base[1])
    pipe.load_lora_weights(str(kohya_file or ckpt.kohya_path), adapter_name="kohya")
    components = {c for c, names in pipe.get_list_adapters().items() if "kohya" in names}
    expected = {"unet", "text_encoder"} | ({"text_encoder_2"} if family == "sdxl" else set())
    assert components == expected
    kohya = _sample(pipe)
    pipe.unload_lora_weights()
    width = reference[0].shape[-1] // len(expected - {"unet"})
    for i in range(len(expected - {"unet"})):  # each text encoder's part of the embeddings
        part = slice(i * width, (i + 1) * width)
        assert (reference[0][..., part] - base[0][..., part]).abs().max() > 1e-3, i
    assert (reference[1] - base[1]).abs().max() > 1e-3, "LoRA had no effect on the image"
    torch.testing.assert_close(kohya[0], reference[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(kohya[1], reference[1], rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def sd15_run(tmp_path_factory: pytest.TempPathFactory) -> TrainResult:
    """One tiny SD 1.x run shared by this module's tests (UNet and text encoder trained)."""
    return _train("sd15", tmp_path_factory.mktemp("sd15"))


@pytest.fixture(scope="module")
def sdxl_run(tmp_path_factory: pytest.TempPathFactory) -> TrainResult:
    """One tiny SDXL run (UNet and both text encoders trained)."""
    return _train("sdxl", tmp_path_factory.mktemp("sdxl"))


def test_sd15_kohya_keys(sd15_run: TrainResult) -> None:
    kohya = _check_keys("sd15", sd15_run)
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight" in kohya
    assert "lora_te_text_model_encoder_layers_1_mlp_fc1.alpha" in kohya
    assert "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_k.alpha" in kohya
    assert "lora_unet_mid_block_attentions_0_proj_in.lora_up.weight" in kohya
    assert "lora_unet_up_blocks_1_resnets_2_conv1.lora_down.weight" in kohya


def test_sd15_kohya_file_gives_same_images_as_diffusers_file(sd15_run: TrainResult) -> None:
    _compare_loaders("sd15", sd15_run)


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_diffusers_file_keeps_every_trained_module(
    family: str, sd15_run: TrainResult, sdxl_run: TrainResult
) -> None:
    """Mixed targets (attention, proj_in, ff, resnet conv) all survive ``load_lora_weights``."""
    result = sd15_run if family == "sd15" else sdxl_run
    state = load_file(str(result.checkpoints[-1].path / "state" / "lora.safetensors"))
    pipe = load_pipeline(ModelConfig(pretrained=f"tiny://{family}", device="cpu")).pipeline
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # peft: "additional target modules"
        pipe.load_lora_weights(result.checkpoints[-1].path, adapter_name="d")
    for component in {k.split("::")[0] for k in state}:
        loaded = get_peft_model_state_dict(getattr(pipe, component), adapter_name="d")
        trained = {
            k.split("::", 1)[1]: v for k, v in state.items() if k.startswith(component + "::")
        }
        assert loaded.keys() == trained.keys(), component
        for key, value in trained.items():
            torch.testing.assert_close(loaded[key], value, rtol=0, atol=0, msg=key)


def test_sdxl_kohya_keys(sdxl_run: TrainResult) -> None:
    kohya = _check_keys("sdxl", sdxl_run)
    assert "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight" in kohya
    assert "lora_te2_text_model_encoder_layers_1_mlp_fc1.alpha" in kohya
    assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_k.alpha" in kohya
    assert "lora_unet_middle_block_1_proj_in.lora_up.weight" in kohya
    assert "lora_unet_output_blocks_5_0_in_layers_2.lora_down.weight" in kohya


def test_sdxl_kohya_file_gives_same_images_as_diffusers_file(sdxl_run: TrainResult) -> None:
    _compare_loaders("sdxl", sdxl_run)


def _through_diffusers_converter(pipe: Any, kohya_names: list[str]) -> dict[str, set[str]]:
    """Module paths per component that diffusers' kohya loader makes of ``kohya_names``."""
    from diffusers.utils import convert_state_dict_to_diffusers, convert_state_dict_to_peft
    from diffusers.utils.state_dict_utils import convert_unet_state_dict_to_peft

    fake = {}
    for name in kohya_names:
        fake |= {f"{name}.{s}": torch.zeros(1) for s in ("lora_down.weight", "lora_up.weight")}
        fake[f"{name}.alpha"] = torch.tensor(1.0)
    state = type(pipe).lora_state_dict(fake, unet_config=pipe.unet.config)[0]
    out: dict[str, set[str]] = {}
    for component in ("unet", "text_encoder", "text_encoder_2"):
        part = {
            k.removeprefix(component + "."): v
            for k, v in state.items()
            if k.startswith(component + ".")
        }
        if not part:
            continue
        if component == "unet":  # what UNet2DConditionModel.load_lora_adapter does
            part = part if "lora_A" in next(iter(part)) else convert_unet_state_dict_to_peft(part)
        else:  # what _load_lora_into_text_encoder does
            part = convert_state_dict_to_peft(convert_state_dict_to_diffusers(part))
            if not hasattr(getattr(pipe, component), "text_model"):
                part = {k.removeprefix("text_model."): v for k, v in part.items()}
        paths = {
            k.replace(".processor.", ".").split(".lora_A.")[0] for k in part if ".lora_A." in k
        }
        out[component] = paths
    return out


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_every_module_name_round_trips_through_diffusers_kohya_converter(family: str) -> None:
    """Not only the trained targets: every Linear / Conv2d of the UNet and text encoders."""
    pipe = load_pipeline(ModelConfig(pretrained=f"tiny://{family}", device="cpu")).pipeline
    components = ["unet", "text_encoder"] + (["text_encoder_2"] if family == "sdxl" else [])
    layers = (torch.nn.Linear, torch.nn.Conv2d)
    modules = {
        c: {n for n, m in getattr(pipe, c).named_modules() if isinstance(m, layers)}
        for c in components
    }
    names = [
        kohya_module_name(c, path, family, pipe.unet.config)
        for c, paths in modules.items()
        for path in sorted(paths)
    ]
    assert len(set(names)) == len(names)
    assert _through_diffusers_converter(pipe, names) == modules


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_a_diffusers_file_converts_to_the_kohya_file_training_writes(
    family: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """``harness export`` converts a run's diffusers file when the run did not set
    ``train.export_kohya``: the same tensors and alphas as the file training writes (SDXL's
    sgm names from the UNet layout its checkpoint.json records), and diffusers' loader gives
    the diffusers file's images from it."""
    from harness.train.kohya import kohya_from_diffusers

    result: TrainResult = request.getfixturevalue(f"{family}_run")
    ckpt = result.checkpoints[-1]
    layout = json.loads((ckpt.path / "checkpoint.json").read_text())["unet_layout"]
    weights = ckpt.path / "pytorch_lora_weights.safetensors"
    out = kohya_from_diffusers(weights, tmp_path / "kohya.safetensors", family, layout)
    ours, theirs = load_file(str(out)), load_file(str(ckpt.kohya_path))
    assert sorted(ours) == sorted(theirs)
    assert all(torch.equal(ours[k], theirs[k]) for k in ours), family
    _compare_loaders(family, result, out)


def test_dora_and_a_layoutless_sdxl_file_are_refused_naming_the_file(
    sdxl_run: TrainResult, tmp_path: Path
) -> None:
    """DoRA has no kohya form (diffusers' loader drops its magnitudes): refused, not a file
    that loads as another adapter; an SDXL file without the UNet layout cannot be named."""
    from harness.train.kohya import KohyaUnsupported, kohya_from_diffusers

    weights = sdxl_run.checkpoints[-1].path / "pytorch_lora_weights.safetensors"
    with pytest.raises(KohyaUnsupported, match="UNet layout") as layoutless:
        kohya_from_diffusers(weights, tmp_path / "k.safetensors", "sdxl", None)
    assert str(weights) in str(layoutless.value)
    with safe_open(str(weights), framework="pt") as handle:
        metadata, names = handle.metadata(), handle.keys()
        tensors = {k: handle.get_tensor(k) for k in names}
    meta = json.loads(metadata["lora_adapter_metadata"])
    meta["unet.use_dora"] = True
    dora = tmp_path / "dora.safetensors"
    save_file(tensors, str(dora), metadata={**metadata, "lora_adapter_metadata": json.dumps(meta)})
    with pytest.raises(KohyaUnsupported, match="unet is a DoRA adapter"):
        kohya_from_diffusers(dora, tmp_path / "k.safetensors", "sdxl", {"layers_per_block": 2})
    assert not (tmp_path / "k.safetensors").exists()
