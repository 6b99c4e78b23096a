"""Issue 16, training: min-SNR-gamma weighting, offset noise and random horizontal flips, each
off by default, each changing exactly what it should."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler
from diffusers.configuration_utils import FrozenDict
from PIL import Image

from harness.config import HarnessConfig, ModelConfig
from harness.models import load_pipeline
from harness.sweep.runner import run_key
from harness.sweep.study import study_id
from harness.train import train_lora
from harness.train.cache import cached_latents
from harness.train.fingerprints import config_hash
from harness.train.inputs import Shard, TrainInputs
from harness.train.objective import DenoisingObjective, _weighted_mse
from tests.train.conftest import pinned_default_config


def cfg_with(**train: Any) -> HarnessConfig:
    return HarnessConfig.model_validate(
        {
            "preset": "t",
            "model": {"pretrained": "tiny://sd15", "device": "cpu"},
            "data": {"resolution": 64},
            "train": {"max_steps": 1, "checkpoint_steps": [], **train},
        }
    )


def objective(cfg: HarnessConfig, prediction: str = "epsilon", **inputs: Any) -> DenoisingObjective:
    """The loss on stub inputs: two photos whose posteriors have no spread (std 0), so a drawn
    latent is the posterior's mean itself."""
    mean = [torch.full((4, 8, 8), float(i)) for i in range(2)]
    posteriors = [(m, torch.zeros_like(m)) for m in mean]
    data = TrainInputs(posteriors, ["a", "b"], [], "", None, **inputs)
    vae = SimpleNamespace(config=FrozenDict(scaling_factor=1.0, shift_factor=None))
    model = SimpleNamespace(device=torch.device("cpu"), pipeline=SimpleNamespace(vae=vae))
    scheduler = DDPMScheduler(num_train_timesteps=1000, prediction_type=prediction)
    return DenoisingObjective(
        cfg,
        model,  # type: ignore[arg-type]
        data,
        scheduler,
        torch.Generator().manual_seed(0),
        Shard(batch_size=2),
        torch.autocast("cpu", enabled=False),  # type: ignore[arg-type]
    )


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_min_snr_weights_are_min_snr_gamma_over_snr(prediction: str) -> None:
    obj = objective(cfg_with(snr_gamma=5.0), prediction)
    steps = torch.tensor([0, 10, 500, 999])
    alphas = obj.noise_scheduler.alphas_cumprod[steps]
    snr = alphas / (1 - alphas)
    expected = torch.clamp(snr, max=5.0) / (snr + 1 if prediction == "v_prediction" else snr)
    weights = obj._snr_weights(steps)
    assert weights is not None
    torch.testing.assert_close(weights, expected.float())
    # Low-noise steps (high SNR) are weighted down, noisy ones keep their weight (epsilon).
    assert weights[0] < 0.01 and (prediction != "epsilon" or weights[-1] == 1.0)
    assert objective(cfg_with())._snr_weights(steps) is None


def test_weighted_mse_is_the_weighted_mean_of_per_sample_errors() -> None:
    pred, target = (
        torch.zeros(2, 1, 2, 2),
        torch.stack([torch.ones(1, 2, 2), 3 * torch.ones(1, 2, 2)]),
    )
    assert _weighted_mse(pred, target, None).item() == pytest.approx((1 + 9) / 2)
    weights = torch.tensor([1.0, 0.5])
    assert _weighted_mse(pred, target, weights).item() == pytest.approx((1 * 1 + 9 * 0.5) / 2)


def _photo(path: Path, seed: int = 0) -> Path:
    pixels = np.random.default_rng(seed).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def test_snr_gamma_changes_the_training_loss(tmp_path: Path) -> None:
    model = load_pipeline(ModelConfig(pretrained="tiny://sd15", device="cpu"))
    pair = [(_photo(tmp_path / "photo.png"), "a photo of sks dog")]
    losses = {}
    for name, gamma in (("plain", None), ("huge", 1e12), ("tiny", 0.05)):
        logged: list[float] = []
        train_lora(
            cfg_with(snr_gamma=gamma),
            model,
            pair,
            tmp_path / name,
            on_log=lambda record, step, logged=logged: logged.append(record["loss"]),
            progress=False,
            cache_root=tmp_path / "cache",
        )
        losses[name] = logged[0]
    # gamma above every SNR weighs every sample 1: the plain MSE; a gamma below the drawn
    # step's SNR weighs it down.
    assert losses["huge"] == pytest.approx(losses["plain"], rel=1e-5)
    assert losses["tiny"] < 0.9 * losses["plain"]


def test_noise_offset_shifts_each_sample_and_channel_by_a_constant() -> None:
    latents = torch.zeros(2, 4, 8, 8)
    _, _, plain = objective(cfg_with())._noised(latents)
    _, _, offset = objective(cfg_with(noise_offset=0.1))._noised(latents)
    shift = offset - plain  # the same first draw; then one value per sample and channel
    torch.testing.assert_close(shift, shift[..., :1, :1].expand_as(shift), atol=1e-6, rtol=0)
    assert 0 < shift.abs().max() < 1.0 and shift[..., 0, 0].std() > 0


def test_random_flip_puts_the_mirrored_photo_in_the_batch() -> None:
    flipped = [(torch.full((4, 8, 8), 10.0 + i), torch.zeros(4, 8, 8)) for i in range(2)]
    never = objective(cfg_with(random_flip=0.0, batch_size=2), flipped=flipped)._batch(0).latents
    always = objective(cfg_with(random_flip=1.0, batch_size=2), flipped=flipped)._batch(0).latents
    assert set(never.unique().tolist()) == {0.0, 1.0}  # the photos as they are
    assert set(always.unique().tolist()) == {10.0, 11.0}  # their mirror images
    half = objective(cfg_with(random_flip=0.5, batch_size=2), flipped=flipped)
    seen = {tuple(sorted(half._batch(m).latents.unique().tolist())) for m in range(20)}
    assert len(seen) > 1  # some batches mirrored, some not


def test_flipped_latents_are_the_mirror_images_encoding(tmp_path: Path) -> None:
    model_cfg = ModelConfig(pretrained="tiny://sd15", device="cpu")
    model = load_pipeline(model_cfg)
    photo, mirror = _photo(tmp_path / "photo.png"), tmp_path / "mirror.png"
    Image.open(photo).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(mirror)
    cache = tmp_path / "cache"
    (flipped,) = cached_latents(model, model_cfg, [photo], 64, cache, flip=True)
    (direct,) = cached_latents(model, model_cfg, [mirror], 64, cache)
    (plain,) = cached_latents(model, model_cfg, [photo], 64, cache)
    torch.testing.assert_close(flipped[0], direct[0])
    assert not torch.allclose(flipped[0], plain[0])  # a separate cache entry


def test_the_new_keys_at_their_defaults_rename_no_study_run_or_checkpoint() -> None:
    cfg = pinned_default_config()
    changed = cfg.model_copy(update={"train": cfg.train.model_copy(update={"snr_gamma": 5.0})})
    assert study_id(changed) != study_id(cfg)
    assert run_key(changed) != run_key(cfg) and config_hash(changed) != config_hash(cfg)


def test_the_trainer_encodes_the_mirrored_photos_only_when_flipping(tmp_path: Path) -> None:
    from harness.train.inputs import prepare_inputs

    model = load_pipeline(ModelConfig(pretrained="tiny://sd15", device="cpu"))
    pairs = [(_photo(tmp_path / f"p{i}.png", i), "a photo of sks dog") for i in range(2)]
    off = prepare_inputs(cfg_with(), model, pairs, [], tmp_path / "cache")
    on = prepare_inputs(cfg_with(random_flip=0.5), model, pairs, [], tmp_path / "cache")
    assert off.flipped is None and on.flipped is not None and len(on.flipped) == 2
    assert on.stats["latents"].misses == 2  # the photos were cached already, their mirrors not
    mirrored = cached_latents(
        model, model_cfg_of(), [p for p, _ in pairs], 64, tmp_path / "cache", flip=True
    )
    torch.testing.assert_close(on.flipped[1][0], mirrored[1][0])


def model_cfg_of() -> ModelConfig:
    return ModelConfig(pretrained="tiny://sd15", device="cpu")


def test_a_sweep_searches_the_loss_options(tmp_path: Path) -> None:
    import pandas as pd

    from harness.sweep import run_sweep
    from tests.sweep.fakes import FakeBackend
    from tests.sweep.test_sweep_logic import make_cfg

    space = {"snr_gamma": {"choices": [None, 5.0]}, "random_flip": {"choices": [0.0, 0.5]}}
    cfg = make_cfg(tmp_path, sampler="grid", n_trials=4, space=space)
    backend = FakeBackend()
    summary = run_sweep(cfg, tmp_path, backend)
    assert summary.runs_completed == 4
    assert sorted((t["snr_gamma"] or 0, t["random_flip"]) for t in backend.trained) == [
        (0, 0.0),
        (0, 0.5),
        (5.0, 0.0),
        (5.0, 0.5),
    ]
    frame = pd.read_parquet(summary.results_parquet)
    assert set(frame["train.snr_gamma"].fillna(0)) == {0, 5.0}
