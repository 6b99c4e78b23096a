"""The content-hash embedding cache (safetensors files)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors import safe_open

from metrics.cache import EmbeddingCache, default_cache_dir, encode_cached
from metrics.images import ImageInput, image_sha256


class CountingEncoder:
    """A fake encoder: records what it was asked to encode."""

    def __init__(self) -> None:
        self.calls: list[int] = []

    def __call__(self, images: Sequence[ImageInput]) -> torch.Tensor:
        self.calls.append(len(images))
        # A deterministic "embedding" derived from the content hash.
        rows = [torch.tensor([int(image_sha256(i)[k : k + 4], 16) for k in (0, 4)]) for i in images]
        return torch.nn.functional.normalize(torch.stack(rows).float(), dim=-1)


def test_second_call_does_not_encode(
    tmp_path: Path, image_dir: Callable[[str, list[int]], Path]
) -> None:
    paths = sorted(image_dir("real", [1, 2, 3]).iterdir())
    cache = EmbeddingCache(tmp_path / "cache")
    encoder = CountingEncoder()
    first = encode_cached(encoder, "enc-a", paths, cache)
    assert encoder.calls == [3]
    second = encode_cached(encoder, "enc-a", paths, cache)
    assert encoder.calls == [3]  # nothing encoded the second time
    assert torch.equal(first, second)
    assert first.shape == (3, 2)


def test_only_misses_are_encoded_in_input_order(
    tmp_path: Path, image_dir: Callable[[str, list[int]], Path]
) -> None:
    paths = sorted(image_dir("real", [1, 2, 3]).iterdir())
    cache = EmbeddingCache(tmp_path / "cache")
    encoder = CountingEncoder()
    encode_cached(encoder, "enc", paths[:2], cache)
    out = encode_cached(encoder, "enc", [paths[2], paths[0], paths[2]], cache)
    assert encoder.calls == [2, 1]  # the new image once, despite appearing twice
    assert torch.equal(out, encoder([paths[2], paths[0], paths[2]]))


def test_keys_are_content_and_encoder(
    tmp_path: Path, make_image: Callable[..., Image.Image]
) -> None:
    cache = EmbeddingCache(tmp_path)
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    make_image(5).save(a)
    make_image(5).save(b)  # same content, other name: a hit
    encoder = CountingEncoder()
    encode_cached(encoder, "enc", [a], cache)
    encode_cached(encoder, "enc", [b], cache)
    assert encoder.calls == [1]
    encode_cached(encoder, "other-encoder", [a], cache)  # another model: a miss
    assert encoder.calls == [1, 1]
    make_image(6).save(a)  # edited photo: a miss
    encode_cached(encoder, "enc", [a], cache)
    assert encoder.calls == [1, 1, 1]


def test_entries_are_safetensors_with_metadata(
    tmp_path: Path, make_image: Callable[..., Image.Image]
) -> None:
    cache = EmbeddingCache(tmp_path)
    image = make_image(1)
    encode_cached(CountingEncoder(), "enc-x", [image], cache)
    path = cache.path("enc-x", image_sha256(image))
    assert path.suffix == ".safetensors" and path.is_file()
    with safe_open(str(path), framework="pt") as handle:
        assert handle.metadata() == {"encoder_id": "enc-x", "image_sha256": image_sha256(image)}
        assert handle.get_tensor("embedding").shape == (2,)


def test_damaged_entry_is_recomputed(
    tmp_path: Path, make_image: Callable[..., Image.Image]
) -> None:
    cache = EmbeddingCache(tmp_path)
    image = make_image(2)
    encoder = CountingEncoder()
    expected = encode_cached(encoder, "enc", [image], cache)
    cache.path("enc", image_sha256(image)).write_bytes(b"not safetensors")
    assert torch.equal(encode_cached(encoder, "enc", [image], cache), expected)
    assert encoder.calls == [1, 1]


def test_default_cache_dir_from_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("METRICS_CACHE_DIR", str(tmp_path / "c"))
    assert default_cache_dir() == tmp_path / "c"
    assert EmbeddingCache().root == tmp_path / "c"
    monkeypatch.delenv("METRICS_CACHE_DIR")
    assert default_cache_dir() == Path("~/.cache/harness-metrics").expanduser()
