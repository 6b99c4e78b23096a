"""Model loading from every kind of reference, family detection, and fast offline failure."""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch

from harness.config import ModelConfig
from harness.models import (
    LoadedModel,
    ModelLoadError,
    WeightsFileError,
    detect_family,
    load_pipeline,
    parse_model_ref,
)
from harness.models.ldm import ldm_unet_module_name
from harness.models.tiny import build_clip_tokenizer, tiny_pipeline_dir

from .single_file import save_sd15_single_file, unet_to_ldm


def generate(loaded: LoadedModel, seed: int, prompt: str = "a photo of sks toy") -> np.ndarray:
    generator = torch.Generator("cpu").manual_seed(seed)
    out = loaded.pipeline(
        prompt, num_inference_steps=2, guidance_scale=5.0, generator=generator, output_type="np"
    )
    return np.asarray(out.images[0])


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_tiny_sd15_is_sd15(tiny_sd15: Any) -> None:
    assert tiny_sd15.family == "sd15"
    assert tiny_sd15.ref.kind == "tiny"
    assert tiny_sd15.pipeline.unet.config.block_out_channels == (32, 64) or list(
        tiny_sd15.pipeline.unet.config.block_out_channels
    ) == [32, 64]
    assert tiny_sd15.pipeline.text_encoder.config.hidden_size == 32


def test_tiny_sdxl_is_sdxl() -> None:
    loaded = load_pipeline(ModelConfig(pretrained="tiny://sdxl", device="cpu"))
    assert loaded.family == "sdxl"
    assert loaded.pipeline.text_encoder_2 is not None
    image = generate(loaded, seed=0)
    assert image.shape == (64, 64, 3)


def test_tiny_generates_deterministic_64px(tiny_sd15: Any) -> None:
    first, again, other = generate(tiny_sd15, 7), generate(tiny_sd15, 7), generate(tiny_sd15, 8)
    assert first.shape == (64, 64, 3)
    assert np.array_equal(first, again)
    assert not np.allclose(first, other)


def test_tiny_is_seeded_and_cached_on_disk() -> None:
    folder = tiny_pipeline_dir("sd15")
    assert (folder / "model_index.json").is_file()
    assert list(folder.glob("unet/*.safetensors"))
    assert not list(folder.rglob("*.bin")), "weights must be safetensors only"
    assert tiny_pipeline_dir("sd15") == folder  # second call reuses the cache


def test_offline_tokenizer_matches_clip_ids(tmp_path: Path) -> None:
    import open_clip

    ours = build_clip_tokenizer(tmp_path)
    reference = open_clip.get_tokenizer("ViT-B-32")
    text = "a photo of sks dog on the beach"
    ids = ours(text)["input_ids"]
    expected = reference([text])[0].tolist()
    assert ids == expected[: len(ids)]  # open_clip pads with 0, HF CLIP with <|endoftext|>
    assert ids[0] == 49406 and ids[-1] == 49407 and len(ids) == 10
    assert ours.model_max_length == 77


def test_the_bpe_table_and_file_are_open_clips_without_importing_it() -> None:
    """harness.clip_bpe finds open_clip's vocabulary and rebuilds its byte table (in id order)
    without importing the package, whose import loads torch."""
    from open_clip.tokenizer import bytes_to_unicode as reference_table
    from open_clip.tokenizer import default_bpe

    from harness.clip_bpe import bytes_to_unicode, clip_bpe_file

    assert list(bytes_to_unicode().items()) == list(reference_table().items())
    assert clip_bpe_file() == Path(default_bpe())


def test_local_diffusers_folder(tiny_sd15: Any, tmp_path: Path) -> None:
    folder = tmp_path / "my-model"
    shutil.copytree(tiny_pipeline_dir("sd15"), folder)
    loaded = load_pipeline(ModelConfig(pretrained=str(folder), device="cpu"))
    assert loaded.ref.kind == "local_dir"
    assert loaded.family == "sd15"
    assert same_weights(loaded.pipeline.unet, tiny_sd15.pipeline.unet)


def test_local_sdxl_folder_detected_from_configs(tmp_path: Path) -> None:
    # The folder's name says sd15: detection must come from the components, not the name.
    folder = tmp_path / "stable-diffusion-v1-5"
    shutil.copytree(tiny_pipeline_dir("sdxl"), folder)
    assert load_pipeline(ModelConfig(pretrained=str(folder), device="cpu")).family == "sdxl"


def test_single_file_roundtrip(tiny_sd15: Any, tmp_path: Path) -> None:
    path = save_sd15_single_file(tiny_sd15.pipeline, tmp_path / "model.safetensors")
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        keys = set(handle.keys())
    assert "model.diffusion_model.input_blocks.0.0.weight" in keys
    assert "first_stage_model.encoder.mid.attn_1.q.weight" in keys
    cfg = ModelConfig(
        pretrained=str(path), device="cpu", single_file_config=str(tiny_pipeline_dir("sd15"))
    )
    loaded = load_pipeline(cfg)
    assert loaded.ref.kind == "single_file"
    assert loaded.family == "sd15"
    for name in ("unet", "vae", "text_encoder"):
        assert same_weights(getattr(loaded.pipeline, name), getattr(tiny_sd15.pipeline, name)), name
    assert np.array_equal(generate(loaded, 3), generate(tiny_sd15, 3))


def test_ldm_unet_module_name_matches_the_single_file_layout(tiny_sd15: Any) -> None:
    unet = tiny_sd15.pipeline.unet
    config = dict(unet.config)
    assert (
        ldm_unet_module_name("down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_k", config)
        == "input_blocks.4.1.transformer_blocks.0.attn1.to_k"
    )
    assert ldm_unet_module_name("down_blocks.0.resnets.0.conv1", config) == (
        "input_blocks.1.0.in_layers.2"
    )
    assert ldm_unet_module_name("mid_block.attentions.0", config) == "middle_block.1"
    # Module by module, the same names as the exported checkpoint's parameters.
    state = unet.state_dict()
    exported = unet_to_ldm(state, config)
    for key, ldm_key in zip(state, exported, strict=True):
        module, _, param = key.rpartition(".")
        assert ldm_key == f"model.diffusion_model.{ldm_unet_module_name(module, config)}.{param}"
    with pytest.raises(KeyError, match="no LDM name"):
        ldm_unet_module_name("not_a_block.0", config)


def test_pickle_checkpoints_refused(tmp_path: Path) -> None:
    ckpt = tmp_path / "model.ckpt"
    ckpt.write_bytes(b"not even read")
    with pytest.raises(ModelLoadError, match=r"pickle-based checkpoints \(\.ckpt\).*refused"):
        parse_model_ref(str(ckpt))


def test_renamed_pickle_and_truncated_single_files_refused(tiny_sd15: Any, tmp_path: Path) -> None:
    fake = tmp_path / "fake.safetensors"
    torch.save({"model.diffusion_model.x": torch.zeros(1)}, fake)
    with pytest.raises(
        WeightsFileError, match=r"^model\.pretrained: .*fake\.safetensors: not a valid"
    ):
        parse_model_ref(str(fake))
    real = save_sd15_single_file(tiny_sd15.pipeline, tmp_path / "model.safetensors")
    real.write_bytes(real.read_bytes()[:-100])
    with pytest.raises(WeightsFileError, match="truncated"):
        load_pipeline(ModelConfig(pretrained=str(real), device="cpu"))


def test_folder_with_only_bin_weights_refused(tiny_sd15: Any, tmp_path: Path) -> None:
    folder = tmp_path / "pickled"
    tiny_sd15.pipeline.save_pretrained(folder, safe_serialization=False)
    assert list(folder.rglob("*.bin"))
    with pytest.raises(ModelLoadError, match="safetensors"):
        load_pipeline(ModelConfig(pretrained=str(folder), device="cpu"))


def test_offline_hub_id_fails_fast(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = ModelConfig(pretrained="someone/not-cached-model", cache_dir=str(tmp_path), device="cpu")
    started = time.perf_counter()
    with pytest.raises(ModelLoadError) as info:
        load_pipeline(cfg)
    # Bounded far above normal (~1 s) and below a real retry loop (~47 s): only a hang fails.
    assert time.perf_counter() - started < 25.0
    message = str(info.value)
    assert "'someone/not-cached-model' is not in the local Hugging Face cache" in message
    assert "local diffusers folder" in message
    # Why it is offline, and no advice to set what is already set.
    assert "HF_HUB_OFFLINE is set" in message and "Set HF_HUB_OFFLINE" not in message


def test_unreachable_hub_fails_fast_without_offline_flag(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import socket

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    with socket.socket() as sock:  # a loopback port that nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    started = time.perf_counter()
    with pytest.raises(ModelLoadError, match="hub cannot be reached") as info:
        load_pipeline(ModelConfig(pretrained="org/model", cache_dir=str(tmp_path), device="cpu"))
    assert "Set HF_HUB_OFFLINE=1 to use only the cache" in str(info.value)
    # Bounded far above normal (~1 s) and below a real retry loop (~47 s): only a hang fails.
    assert time.perf_counter() - started < 25.0


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("tiny://sd3", "unknown tiny model 'tiny://sd3'"),
        ("./no/such/model.safetensors", "file not found"),
        ("not a model", "neither an existing diffusers folder"),
    ],
)
def test_bad_references(value: str, message: str) -> None:
    with pytest.raises(ModelLoadError, match=message):
        parse_model_ref(value)


def test_folder_without_model_index(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match=r"no model_index\.json"):
        parse_model_ref(str(tmp_path))


def test_hub_id_parsed_without_loading() -> None:
    ref = parse_model_ref("stabilityai/stable-diffusion-xl-base-1.0")
    assert (ref.kind, ref.value) == ("hub", "stabilityai/stable-diffusion-xl-base-1.0")


def test_cuda_requested_without_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ModelLoadError, match="no CUDA device"):
        load_pipeline(ModelConfig(pretrained="tiny://sd15", device="cuda"))


def test_detect_family_from_configs_only() -> None:
    unet_xl = SimpleNamespace(config={"addition_embed_type": "text_time"})
    unet_sd = SimpleNamespace(config={"addition_embed_type": None})
    xl = SimpleNamespace(unet=unet_xl, text_encoder=object(), text_encoder_2=object())
    sd = SimpleNamespace(unet=unet_sd, text_encoder=object(), text_encoder_2=None)
    assert detect_family(xl) == "sdxl"
    assert detect_family(sd) == "sd15"
    with pytest.raises(ModelLoadError, match="unsupported architecture"):
        detect_family(SimpleNamespace(unet=unet_xl, text_encoder=object(), text_encoder_2=None))


def test_loading_shows_no_per_component_bars(capfd: pytest.CaptureFixture[str]) -> None:
    """diffusers' "Loading pipeline components" and transformers' "Loading weights" bars repeat
    on every load of a sweep; loading prints none, and leaves the libraries' setting as it was."""
    from diffusers.utils import logging as diffusers_logging

    load_pipeline(ModelConfig(pretrained="tiny://sd15", device="cpu"))
    err = capfd.readouterr().err
    assert "Loading pipeline components" not in err and "Loading weights" not in err, err
    assert diffusers_logging.is_progress_bar_enabled()


def test_attention_runs_through_torch_sdpa() -> None:
    """Every attention of a loaded pipeline is torch's scaled_dot_product_attention (flash or
    memory-efficient kernels on CUDA): diffusers' AttnProcessor2_0 and transformers' "sdpa"."""
    loaded = load_pipeline(ModelConfig(pretrained="tiny://sd15", device="cpu"))
    for component in (loaded.pipeline.unet, loaded.pipeline.vae):
        assert {type(p).__name__ for p in component.attn_processors.values()} == {
            "AttnProcessor2_0"
        }
    assert loaded.pipeline.text_encoder.config._attn_implementation == "sdpa"
