"""Edge cases of the embedding cache and the CLI: what the cache key covers, unwritable cache
folders and unwritable ``--json`` destinations."""

from __future__ import annotations

import io
import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from metrics.api import Scorer
from metrics.cache import EmbeddingCache, encode_cached
from metrics.cli import main
from metrics.encoders import DinoEncoder, load_dino
from metrics.images import image_sha256

TINY = ["--dino-model", "tiny://dino", "--clip-model", "tiny://clip", "--clip-pretrained", "none"]
TINY_DINO_KWARGS = {"img_size": 224, "depth": 2, "embed_dim": 32, "num_heads": 2}


def palette_image(indices: np.ndarray, palette_seed: int) -> Image.Image:
    """A ``P``-mode image with the given palette indices and a seeded random palette."""
    image = Image.fromarray(indices, mode="P")
    palette = np.random.default_rng(palette_seed).integers(0, 256, size=256 * 3, dtype=np.uint8)
    image.putpalette(palette.tobytes())
    return image


def oriented(image: Image.Image, orientation: int) -> Image.Image:
    """``image`` re-opened from a PNG whose EXIF says ``orientation`` (1: upright)."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", exif=exif.tobytes())
    buffer.seek(0)
    reopened = Image.open(buffer)
    reopened.load()
    return reopened


def test_palette_images_with_other_palettes_get_their_own_embeddings(
    tmp_path: Path, tiny_dino: DinoEncoder
) -> None:
    indices = np.random.default_rng(0).integers(0, 256, size=(6, 6), dtype=np.uint8)
    indices = np.kron(indices, np.ones((16, 16), dtype=np.uint8))  # blocks: structure
    first, second = palette_image(indices, 1), palette_image(indices, 2)
    assert first.tobytes() == second.tobytes()  # same indices, different colours
    uncached = torch.cat([tiny_dino.encode_images([first]), tiny_dino.encode_images([second])])
    assert not torch.allclose(uncached[0], uncached[1])
    cache = EmbeddingCache(tmp_path / "cache")
    together = encode_cached(tiny_dino.encode_images, tiny_dino.id, [first, second], cache)
    assert torch.allclose(together, uncached, atol=1e-6)
    # Read back from the cache, one at a time and in the other order.
    for image, expected in ((second, uncached[1]), (first, uncached[0])):
        cached = encode_cached(tiny_dino.encode_images, tiny_dino.id, [image], cache)
        assert torch.allclose(cached[0], expected, atol=1e-6)


def test_exif_orientation_is_part_of_the_key(
    tmp_path: Path, tiny_dino: DinoEncoder, make_image: Callable[..., Image.Image]
) -> None:
    upright, rotated = oriented(make_image(3), 1), oriented(make_image(3), 6)
    assert upright.tobytes() == rotated.tobytes()  # same stored pixels, EXIF differs
    assert image_sha256(upright) != image_sha256(rotated)
    uncached = torch.cat([tiny_dino.encode_images([upright]), tiny_dino.encode_images([rotated])])
    cache = EmbeddingCache(tmp_path / "cache")
    cached = encode_cached(tiny_dino.encode_images, tiny_dino.id, [upright, rotated], cache)
    assert torch.allclose(cached, uncached, atol=1e-6)


def test_in_memory_key_is_what_the_encoder_sees(make_image: Callable[..., Image.Image]) -> None:
    image = make_image(4)
    # The same picture as RGB and as an opaque RGBA copy: the encoder sees one image.
    assert image_sha256(image) == image_sha256(image.convert("RGBA"))
    assert image_sha256(image) != image_sha256(make_image(5))


def test_local_dino_id_covers_timm_kwargs(
    tmp_path: Path, tiny_dino: DinoEncoder, make_image: Callable[..., Image.Image]
) -> None:
    path = tmp_path / "dino.safetensors"
    save_file({k: v.contiguous() for k, v in tiny_dino.model.state_dict().items()}, str(path))
    cls_token = load_dino(str(path), timm_kwargs=TINY_DINO_KWARGS)
    pooled_kwargs = {**TINY_DINO_KWARGS, "global_pool": "avg", "fc_norm": False}
    pooled = load_dino(str(path), timm_kwargs=pooled_kwargs)
    images = [make_image(1)]
    # Same weights file, another pooling: other embeddings, so another cache key.
    assert not torch.allclose(cls_token.encode_images(images), pooled.encode_images(images))
    assert cls_token.id != pooled.id
    assert cls_token.id.startswith("dino:vit_small_patch16_224:file-sha256=")


def test_unwritable_cache_warns_once_and_returns_embeddings(
    tmp_path: Path, tiny_dino: DinoEncoder, caplog: pytest.LogCaptureFixture
) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    cache = EmbeddingCache(blocker / "cache")  # mkdir under a file: NotADirectoryError
    images = [np.full((32, 32, 3), value, dtype=np.uint8) for value in (10, 120, 250)]
    pils = [Image.fromarray(array) for array in images]
    with caplog.at_level(logging.WARNING, logger="metrics.cache"):
        out = encode_cached(tiny_dino.encode_images, tiny_dino.id, pils, cache)
        again = encode_cached(tiny_dino.encode_images, tiny_dino.id, pils, cache)
    assert torch.allclose(out, tiny_dino.encode_images(pils), atol=1e-6)
    assert torch.equal(out, again)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and str(blocker) in warnings[0].getMessage()


def test_scorer_with_unwritable_cache_still_scores(
    tmp_path: Path,
    scorer_factory: Callable[..., Scorer],
    image_dir: Callable[[str, list[int]], Path],
) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    scorer = scorer_factory(cache_dir=str(blocker / "cache"))
    real = sorted(image_dir("real", [1, 2]).iterdir())
    generated = sorted(image_dir("gen", [10, 11]).iterdir())
    result = scorer.score(real, generated)
    assert result.dino is not None and result.clip_i is not None


def _score_args(image_dir: Callable[[str, list[int]], Path], json_out: Path) -> list[str]:
    real, generated = image_dir("real", [1, 2]), image_dir("gen", [10, 11])
    return [
        "score",
        "--real",
        str(real),
        "--generated",
        str(generated),
        "--json",
        str(json_out),
        "--bootstrap-samples",
        "20",
        *TINY,
    ]


def test_cli_json_under_a_file_fails_before_scoring(
    tmp_path: Path,
    image_dir: Callable[[str, list[int]], Path],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")

    def no_scoring(*args: object, **kwargs: object) -> None:
        raise AssertionError("scored although --json cannot be written")

    monkeypatch.setattr(Scorer, "score", no_scoring)
    assert main(_score_args(image_dir, blocker / "out" / "scores.json")) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "--json" in lines[0]
    assert str(blocker) in lines[0]
    assert captured.out == ""


def test_cli_json_that_is_a_folder_fails_before_scoring(
    tmp_path: Path, image_dir: Callable[[str, list[int]], Path], capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "a-folder"
    folder.mkdir()
    assert main(_score_args(image_dir, folder)) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert len(captured.err.strip().splitlines()) == 1 and "--json" in captured.err


def test_cli_json_write_failure_at_the_end_keeps_the_printed_scores(
    tmp_path: Path,
    image_dir: Callable[[str, list[int]], Path],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    out = tmp_path / "results" / "scores.json"
    score = Scorer.score

    def score_then_block(self: Scorer, *args: object, **kwargs: object) -> object:
        result = score(self, *args, **kwargs)  # type: ignore[arg-type]
        out.mkdir(parents=True)  # the destination became a folder while scoring
        return result

    monkeypatch.setattr(Scorer, "score", score_then_block)
    assert main(_score_args(image_dir, out)) == 2
    captured = capsys.readouterr()
    assert "DreamBooth metrics" in captured.out and "DINO" in captured.out
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and str(out) in lines[0]
    assert "Traceback" not in captured.err


def test_cli_json_in_a_new_folder_still_works(
    tmp_path: Path, image_dir: Callable[[str, list[int]], Path]
) -> None:
    out = tmp_path / "new" / "deeper" / "scores.json"
    assert main(_score_args(image_dir, out)) == 0
    assert out.is_file()


def test_cli_with_unwritable_cache_dir_scores_and_warns_once(
    tmp_path: Path,
    image_dir: Callable[[str, list[int]], Path],
    caplog: pytest.LogCaptureFixture,
) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    out = tmp_path / "scores.json"
    args = [*_score_args(image_dir, out), "--cache-dir", str(blocker / "cache")]
    with caplog.at_level(logging.WARNING, logger="metrics.cache"):
        assert main(args) == 0
    assert out.is_file()
    assert len([r for r in caplog.records if r.name == "metrics.cache"]) == 1
