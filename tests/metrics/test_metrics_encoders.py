"""Loading the encoders: tiny random models, local safetensors files, refusals, offline hub."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import open_clip
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from metrics.encoders import (
    ClipEncoder,
    DinoEncoder,
    _hub_safetensors_name,
    load_clip,
    load_dino,
    resolve_device,
)
from metrics.errors import MetricsInputError, WeightsUnavailableError


def test_tiny_dino_embeddings(
    tiny_dino: DinoEncoder, make_image: Callable[..., Image.Image]
) -> None:
    images = [make_image(s, size=(120, 90)) for s in range(5)]
    out = tiny_dino.encode_images(images)
    assert out.shape == (5, 32) and out.dtype == torch.float32
    assert torch.allclose(out.norm(dim=1), torch.ones(5), atol=1e-5)
    # Batching does not change results; a fresh load with the same seed is the same model.
    again = load_dino("tiny://dino", batch_size=1).encode_images(images)
    assert torch.allclose(out, again, atol=1e-5)
    other_seed = load_dino("tiny://dino", seed=1).encode_images(images)
    assert not torch.allclose(out, other_seed, atol=1e-3)
    assert tiny_dino.id == "dino:tiny://dino:seed=0:fp32"


def test_tiny_clip_uses_real_tokenizer_and_preprocess(
    tiny_clip: ClipEncoder, make_image: Callable[..., Image.Image]
) -> None:
    assert tiny_clip.model.token_embedding.num_embeddings == 49408
    text = "a photo of sks dog"
    assert torch.equal(tiny_clip.tokenizer([text]), open_clip.tokenize([text]))
    image = make_image(3, size=(300, 200))
    reference = open_clip.image_transform(224, is_train=False)  # open_clip's own eval preprocess
    assert torch.allclose(tiny_clip.transform(image), reference(image))
    images = tiny_clip.encode_images([image, make_image(4)])
    texts = tiny_clip.encode_texts([text, "a photo of dog", "a dog"])
    assert images.shape == (2, 32) and texts.shape == (3, 32)
    assert torch.allclose(texts.norm(dim=1), torch.ones(3), atol=1e-5)
    assert not torch.allclose(texts[0], texts[1], atol=1e-4)


def test_dino_local_safetensors_round_trip(
    tmp_path: Path, tiny_dino: DinoEncoder, make_image: Callable[..., Image.Image]
) -> None:
    path = tmp_path / "dino.safetensors"
    save_file({k: v.contiguous() for k, v in tiny_dino.model.state_dict().items()}, str(path))
    loaded = load_dino(
        str(path), timm_kwargs={"img_size": 224, "depth": 2, "embed_dim": 32, "num_heads": 2}
    )
    images = [make_image(1), make_image(2)]
    assert torch.allclose(loaded.encode_images(images), tiny_dino.encode_images(images), atol=1e-6)
    assert loaded.id.startswith("dino:vit_small_patch16_224:file-sha256=")
    with pytest.raises(WeightsUnavailableError, match="do not fit"):
        load_dino(str(path))  # full-size ViT-S vs tiny weights


def test_clip_local_safetensors_round_trip(
    tmp_path: Path, tiny_clip: ClipEncoder, make_image: Callable[..., Image.Image]
) -> None:
    path = tmp_path / "clip.safetensors"
    save_file({k: v.contiguous() for k, v in tiny_clip.model.state_dict().items()}, str(path))
    loaded = load_clip("metrics-tiny-clip", str(path), seed=123)  # registered by tiny://clip
    images = [make_image(1)]
    assert torch.allclose(loaded.encode_images(images), tiny_clip.encode_images(images), atol=1e-6)
    assert torch.allclose(
        loaded.encode_texts(["a dog"]), tiny_clip.encode_texts(["a dog"]), atol=1e-6
    )


@pytest.mark.parametrize("suffix", [".pth", ".bin", ".pt"])
def test_pickles_are_refused_unread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, suffix: str
) -> None:
    path = tmp_path / f"weights{suffix}"
    path.write_bytes(b"\x80\x04pickle")

    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("torch.load must never be called")

    monkeypatch.setattr(torch, "load", forbidden)
    with pytest.raises(WeightsUnavailableError, match="refusing to load pickled"):
        load_dino(str(path))
    with pytest.raises(WeightsUnavailableError, match="refusing to load pickled"):
        load_clip("ViT-B-32", str(path))


def test_missing_files_and_unknown_names(tmp_path: Path) -> None:
    with pytest.raises(WeightsUnavailableError, match="not found"):
        load_dino(str(tmp_path / "missing.safetensors"))
    with pytest.raises(WeightsUnavailableError, match="unknown pretrained tag"):
        load_clip("ViT-B-32", "no-such-tag")
    with pytest.raises(WeightsUnavailableError, match="unknown open_clip architecture"):
        load_clip("ViT-Q-99", "openai")
    with pytest.raises(WeightsUnavailableError, match="unknown tiny"):
        load_dino("tiny://clip")


def test_offline_hub_fails_fast_with_a_hint(tmp_path: Path) -> None:
    # conftest sets HF_HUB_OFFLINE=1; an empty hub cache means the weights are not there.
    start = time.monotonic()
    with pytest.raises(WeightsUnavailableError, match=r"\.safetensors") as dino_error:
        load_dino("timm/vit_small_patch16_224.dino", hub_cache_dir=str(tmp_path))
    with pytest.raises(WeightsUnavailableError, match="HF_HUB_OFFLINE") as clip_error:
        load_clip("ViT-B-32", "openai", hub_cache_dir=str(tmp_path))
    # Without HF_HUB_OFFLINE timm retries for ~47 s; normal is ~1 s. Only that hang fails.
    assert time.monotonic() - start < 30
    assert "timm/vit_small_patch16_224.dino/model.safetensors" in str(dino_error.value)
    assert "open_clip_model.safetensors" in str(clip_error.value)
    assert "\n" not in str(dino_error.value) and "\n" not in str(clip_error.value)


@pytest.mark.parametrize(
    ("hub", "repo_id", "filename"),
    [
        # "org/repo/": the repo's default weights; their safetensors file has its own name.
        ("timm/vit_b32.openai/", "timm/vit_b32.openai", "open_clip_model.safetensors"),
        ("laion/b32/open_clip_pytorch_model.bin", "laion/b32", "open_clip_model.safetensors"),
        # "org/repo/file.bin": a named file; only its safetensors sibling is used.
        ("org/repo/weights.bin", "org/repo", "weights.safetensors"),
    ],
)
def test_open_clip_hub_entries_name_their_safetensors(
    hub: str, repo_id: str, filename: str
) -> None:
    assert _hub_safetensors_name(hub) == (repo_id, filename)


def test_device_resolution() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(MetricsInputError, match="invalid device"):
        resolve_device("tpu:x")
    if not torch.cuda.is_available():
        with pytest.raises(MetricsInputError, match="CUDA is not available"):
            resolve_device("cuda")


def test_loading_clip_logs_no_open_clip_info_lines(caplog: pytest.LogCaptureFixture) -> None:
    """open_clip logs its model lookup at INFO on the root logger; a CLI run showed each line
    as ``INFO root: Parsing tokenizer identifier...``. Its warnings still reach the log."""
    import logging

    with caplog.at_level(logging.INFO):
        load_clip("tiny://clip", None, seed=7)
        logging.getLogger().info("still logged")
    assert caplog.messages == ["still logged"], caplog.messages
