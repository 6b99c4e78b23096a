"""Issue 16, SDXL micro-conditioning: the UNet sees each photo's own original size and crop
(diffusers' ``train_dreambooth_lora_sdxl.py`` convention), mirrored photos their own crop,
class images the target size; SD 1.x runs and old caches are unaffected."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from harness.config import DataConfig, HarnessConfig, ModelConfig
from harness.data.loader import load_prepared
from harness.data.prepare import prepare_subject
from harness.models import LoadedModel, load_pipeline
from harness.train import train_lora
from harness.train.fingerprints import data_hash, hashed_time_ids
from harness.train.microcond import PhotoGeometry, photo_geometry, time_ids

RES = 64


def _diffusers_ids(width: int, height: int, res: int, flip: bool = False) -> tuple[int, ...]:
    """What diffusers' DreamBooth SDXL script computes for a centre crop: resize the shorter
    side to ``res``, flip, centre-crop; the crop's corner in the resized pixels."""
    scale = res / min(width, height)
    rw, rh = round(width * scale), round(height * scale)
    top, left = max(0, round((rh - res) / 2)), max(0, round((rw - res) / 2))
    return (height, width, top, left, res, res)


@pytest.mark.parametrize("size", [(300, 200), (180, 240), (64, 64), (1000, 250)])
def test_centre_crops_give_diffusers_time_ids(size: tuple[int, int]) -> None:
    w, h = size
    side = min(w, h)
    box = ((w - side) // 2, (h - side) // 2, (w - side) // 2 + side, (h - side) // 2 + side)
    geom = PhotoGeometry((w, h), box, (RES, RES))
    ids = time_ids(geom, RES)
    expected = _diffusers_ids(w, h, RES)
    assert ids[:2] == expected[:2] and ids[4:] == (RES, RES)
    assert all(abs(a - b) <= 1 for a, b in zip(ids[2:4], expected[2:4], strict=True))
    # A centred crop's mirror image is centred too (to a resized pixel).
    assert abs(time_ids(geom, RES, flip=True)[3] - ids[3]) <= 1


def test_an_off_centre_crop_and_its_mirror_image() -> None:
    # The left 200 x 200 of a 300 x 200 photo: resized 96 x 64, crop at x 0; mirrored, the
    # same pixels sit at the right edge: 96 - 0 - 64 = 32.
    geom = PhotoGeometry((300, 200), (0, 0, 200, 200), (RES, RES))
    assert time_ids(geom, RES) == (200, 300, 0, 0, RES, RES)
    assert time_ids(geom, RES, flip=True) == (200, 300, 0, 32, RES, RES)
    # crop="none": the prepared image keeps its aspect (96 x 64); the trainer centre-crops it.
    whole = PhotoGeometry((300, 200), (0, 0, 300, 200), (96, 64))
    assert time_ids(whole, RES) == (200, 300, 0, 16, RES, RES)
    # Prepared at another resolution than the trainer's: the same crop, other pixels.
    assert time_ids(geom, 128) == (200, 300, 0, 0, 128, 128)


def _prepared(tmp_path: Path, sizes: list[tuple[int, int]]) -> Any:
    raw = tmp_path / "data" / "raw" / "subj"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i, (w, h) in enumerate(sizes):
        pixels = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(raw / f"p{i}.png")
    cfg = DataConfig.model_validate(
        {
            "source": "folder",
            "subject": "subj",
            "class_name": "toy",
            "resolution": RES,
            "min_side": 32,
            "min_images": 1,
            "val_fraction": 0.0,
            "dedupe_threshold": 0,
        }
    )
    prepare_subject(cfg, tmp_path, progress=False)
    return load_prepared(tmp_path / "data" / "prepared" / "subj")


def _cfg(**train: Any) -> HarnessConfig:
    return HarnessConfig.model_validate(
        {
            "preset": "t",
            "model": {"pretrained": "tiny://sdxl", "device": "cpu"},
            "data": {"resolution": RES, "class_name": "toy"},
            "train": {"max_steps": 2, "checkpoint_steps": [], "batch_size": 2, **train},
        }
    )


def _seen_time_ids(model: LoadedModel, run: Any) -> list[tuple[int, ...]]:
    """Every time-ids row the UNet was called with while ``run()`` trained."""
    seen: list[tuple[int, ...]] = []
    unet = model.pipeline.unet

    def hook(module: Any, args: Any, kwargs: dict[str, Any]) -> None:
        added = kwargs.get("added_cond_kwargs") or {}
        seen.extend(tuple(int(v) for v in row) for row in added["time_ids"].tolist())

    handle = unet.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        run()
    finally:
        handle.remove()
    return seen


@pytest.fixture(scope="module")
def sdxl() -> LoadedModel:
    return load_pipeline(ModelConfig(pretrained="tiny://sdxl", device="cpu"))


@pytest.mark.slow
@pytest.mark.parametrize("flip", [0.0, 1.0])
def test_the_unet_sees_each_photos_size_and_crop(
    tmp_path: Path, sdxl: LoadedModel, flip: float
) -> None:
    subject = _prepared(tmp_path, [(310, 200), (180, 240)])
    pairs = list(zip(subject.train_paths, subject.train_captions, strict=True))
    by_source = {rec["source"]: rec for rec in subject.manifest["images"]}
    assert by_source["p0.png"]["upright_size"] == [310, 200]

    def run() -> None:
        cfg = _cfg(random_flip=flip)
        result = train_lora(
            cfg, sdxl, pairs, tmp_path / "run", progress=False, cache_root=tmp_path / "cache"
        )
        assert result.status == "completed"

    seen = _seen_time_ids(sdxl, run)
    # 310 x 200: resized 99 x 64, its centre crop starts at x 55 * 0.32 = 17.6 -> 18; the
    # mirror image of that crop starts at 99 - 18 - 64 = 17.
    # 180 x 240: resized 64 x 85, centre crop at y 30 * 64 / 180 = 10.7 -> 11 (mirrored: same).
    left = 17 if flip else 18
    assert set(seen) == {(200, 310, 0, left, RES, RES), (240, 180, 11, 0, RES, RES)}
    assert len(seen) == 4  # two steps of two photos


def test_mirrored_time_ids_follow_the_mirrored_crop(tmp_path: Path) -> None:
    """The objective pairs each mirrored latent with the mirrored crop's ids."""
    from types import SimpleNamespace

    from diffusers.configuration_utils import FrozenDict

    from harness.train.inputs import Shard, TrainInputs
    from harness.train.objective import DenoisingObjective

    lat = [(torch.full((4, 8, 8), float(i)), torch.zeros(4, 8, 8)) for i in range(2)]
    mirrored = [(torch.full((4, 8, 8), 10.0 + i), torch.zeros(4, 8, 8)) for i in range(2)]
    ids = [(200, 300, 0, 0, RES, RES), (240, 180, 11, 0, RES, RES)]
    flipped_ids = [(200, 300, 0, 32, RES, RES), (240, 180, 11, 0, RES, RES)]
    vae = SimpleNamespace(config=FrozenDict(scaling_factor=1.0, shift_factor=None))
    model = SimpleNamespace(device=torch.device("cpu"), pipeline=SimpleNamespace(vae=vae))
    for p in (0.0, 0.5, 1.0):
        data = TrainInputs(
            lat,
            ["a", "b"],
            [],
            "",
            None,
            flipped=mirrored,
            time_ids=ids,
            flipped_time_ids=flipped_ids,
        )
        obj = DenoisingObjective(
            _cfg(random_flip=p),
            model,  # type: ignore[arg-type]
            data,
            None,
            torch.Generator().manual_seed(0),
            Shard(batch_size=2),
            torch.autocast("cpu", enabled=False),  # type: ignore[arg-type]
        )
        for micro in range(6):
            batch = obj._batch(micro)
            for value, row in zip(
                batch.latents[:, 0, 0, 0].tolist(), batch.time_ids.tolist(), strict=True
            ):
                photo, is_mirror = int(value) % 10, value >= 10
                assert tuple(int(v) for v in row) == (flipped_ids if is_mirror else ids)[photo]


def test_class_images_get_the_target_size(tmp_path: Path) -> None:
    from types import SimpleNamespace

    from diffusers.configuration_utils import FrozenDict

    from harness.train.inputs import Shard, TrainInputs
    from harness.train.objective import DenoisingObjective

    lat = [(torch.zeros(4, 8, 8), torch.zeros(4, 8, 8))]
    vae = SimpleNamespace(config=FrozenDict(scaling_factor=1.0, shift_factor=None))
    model = SimpleNamespace(device=torch.device("cpu"), pipeline=SimpleNamespace(vae=vae))
    data = TrainInputs(
        lat,
        ["a"],
        lat,
        "a toy",
        None,
        time_ids=[(200, 300, 0, 16, RES, RES)],
        class_time_ids=(RES, RES, 0, 0, RES, RES),
    )
    obj = DenoisingObjective(
        _cfg(prior_preservation=True, batch_size=1),
        model,  # type: ignore[arg-type]
        data,
        None,
        torch.Generator().manual_seed(0),
        Shard(batch_size=1),
        torch.autocast("cpu", enabled=False),  # type: ignore[arg-type]
    )
    assert obj._batch(0).time_ids.tolist() == [
        [200, 300, 0, 16, RES, RES],
        [RES, RES, 0, 0, RES, RES],
    ]


def test_geometry_without_a_manifest_is_the_image_as_the_trainer_crops_it(tmp_path: Path) -> None:
    path = tmp_path / "loose.png"
    Image.new("RGB", (300, 200)).save(path)
    geom = photo_geometry(path)
    assert geom == PhotoGeometry((300, 200), (0, 0, 300, 200), (300, 200))
    assert time_ids(geom, RES) == (200, 300, 0, 16, RES, RES)
    square = tmp_path / "square.png"
    Image.new("RGB", (RES, RES)).save(square)
    assert time_ids(photo_geometry(square), RES) == (RES, RES, 0, 0, RES, RES)


def test_the_data_hash_changes_only_where_the_time_ids_matter(tmp_path: Path) -> None:
    path = tmp_path / "a.png"
    Image.new("RGB", (RES, RES)).save(path)
    pairs = [(path, "a photo of sks toy")]
    plain = data_hash(pairs, [])
    constant = [[(RES, RES, 0, 0, RES, RES)]]
    real = [[(200, 300, 0, 16, RES, RES)]]
    # SD 1.x, or SDXL on photos that were square at the resolution: the old hash, so old
    # checkpoints resume; SDXL on real geometry: another trajectory, another hash.
    assert data_hash(pairs, [], hashed_time_ids("sd15", RES, real)) == plain
    assert data_hash(pairs, [], hashed_time_ids("sdxl", RES, constant)) == plain
    assert data_hash(pairs, [], hashed_time_ids("sdxl", RES, real)) != plain
