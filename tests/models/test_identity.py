"""Which weights a model reference stands for (harness.models.identity): a hub snapshot's
commit, a digest of local files that changes when the weights do."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from harness.config import ModelConfig
from harness.models.identity import (
    FULL_HASH_BYTES,
    file_digest,
    identity_change,
    model_identity,
)
from harness.models.tiny import tiny_pipeline_dir

from .single_file import save_sd15_single_file

COMMIT = "0123456789abcdef0123456789abcdef01234567"
NEWER = "fedcba9876543210fedcba9876543210fedcba98"


def _copy_tiny(tmp_path: Path) -> Path:
    folder = tmp_path / "sd15"
    shutil.copytree(tiny_pipeline_dir("sd15"), folder)
    return folder


def _retrain(weights: Path) -> None:
    """Every tensor moved a little, as further training moves them."""
    tensors = load_file(weights)
    save_file({k: v + 0.01 for k, v in tensors.items()}, weights)


def test_a_local_folder_is_identified_by_its_files(tmp_path: Path) -> None:
    folder = _copy_tiny(tmp_path)
    cfg = ModelConfig(pretrained=str(folder))
    first = model_identity(cfg)
    assert first["model"] == str(folder) and len(first["weights"]) == 64
    assert model_identity(cfg) == first
    # Another place, same files (another machine's path): the same weights.
    moved = tmp_path / "elsewhere"
    shutil.copytree(folder, moved)
    assert model_identity(ModelConfig(pretrained=str(moved)))["weights"] == first["weights"]
    (folder / ".cache").mkdir()  # huggingface_hub's download metadata: not the model
    (folder / ".cache" / "x.lock").write_text("1")
    assert model_identity(cfg) == first
    _retrain(folder / "unet" / "diffusion_pytorch_model.safetensors")
    retrained = model_identity(cfg)
    assert retrained["weights"] != first["weights"]
    assert identity_change(first, retrained) == (
        f"weights {retrained['weights'][:12]} (the study's: {first['weights'][:12]})"
    )
    # A scheduler's config is part of the model too: it changes every image.
    scheduler = folder / "scheduler" / "scheduler_config.json"
    config = json.loads(scheduler.read_text())
    scheduler.write_text(json.dumps({**config, "beta_end": 0.02}))
    assert model_identity(cfg)["weights"] != retrained["weights"]


def test_large_files_are_sampled_and_a_replaced_file_is_seen(tmp_path: Path) -> None:
    """Above FULL_HASH_BYTES a file is read in blocks spread over it: a file of other
    weights (every block differs) or another size is seen; reading stays a few megabytes."""
    path = tmp_path / "big.safetensors"
    generator = torch.Generator().manual_seed(0)
    n = FULL_HASH_BYTES // 4 * 3  # 12 MiB of float32
    save_file({"w": torch.randn(n, generator=generator)}, path)
    first = file_digest([path])
    assert file_digest([path]) == first
    save_file({"w": torch.randn(n, generator=generator)}, path)  # other weights, same shapes
    assert file_digest([path]) != first
    save_file({"w": torch.zeros(n + 1)}, path)
    assert file_digest([path]) != first


def test_a_single_file_and_its_config_folder_are_identified(tiny_sd15: Any, tmp_path: Path) -> None:
    path = save_sd15_single_file(tiny_sd15.pipeline, tmp_path / "model.safetensors")
    config = _copy_tiny(tmp_path)
    cfg = ModelConfig(pretrained=str(path), single_file_config=str(config))
    first = model_identity(cfg)
    assert set(first) == {"model", "weights", "config_weights"}
    assert first["weights"] == file_digest([path])
    (config / "scheduler" / "scheduler_config.json").write_text("{}")
    changed = model_identity(cfg)
    assert changed["weights"] == first["weights"]
    assert identity_change(first, changed) == (
        f"config_weights {changed['config_weights'][:12]} "
        f"(the study's: {first['config_weights'][:12]})"
    )


def test_a_tiny_model_is_identified_by_its_built_folder() -> None:
    identity = model_identity(ModelConfig(pretrained="tiny://sd15"))
    assert identity == {
        "model": "tiny://sd15",
        "weights": model_identity(ModelConfig(pretrained=str(tiny_pipeline_dir("sd15"))))[
            "weights"
        ],
    }
    assert model_identity(ModelConfig(pretrained="random://sd15")) == {"model": "random://sd15"}


def _hub_cache(cache: Path, repo: str, commit: str) -> None:
    """huggingface_hub's cache layout: refs/main names the snapshot a load uses."""
    folder = cache / f"models--{repo.replace('/', '--')}"
    (folder / "snapshots" / commit).mkdir(parents=True)
    (folder / "snapshots" / commit / "model_index.json").write_text("{}")
    (folder / "refs").mkdir(exist_ok=True)
    (folder / "refs" / "main").write_text(commit)


def test_a_hub_model_is_identified_by_the_commit_of_its_cached_snapshot(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cache = tmp_path / "hub"
    repo = "someone/some-model"
    cfg = ModelConfig(pretrained=repo, cache_dir=str(cache))
    assert model_identity(cfg) == {"model": repo, "commit": "unknown"}  # not downloaded
    _hub_cache(cache, repo, COMMIT)
    assert model_identity(cfg) == {"model": repo, "commit": COMMIT}
    # main moved on: a download of the new snapshot moves refs/main.
    _hub_cache(cache, repo, NEWER)
    moved = model_identity(cfg)
    assert moved == {"model": repo, "commit": NEWER}
    assert identity_change({"model": repo, "commit": COMMIT}, moved) == (
        f"commit {NEWER[:12]} (the study's: {COMMIT[:12]})"
    )
    # A revision that is a commit is its own identity, downloaded or not.
    pinned = cfg.model_copy(update={"revision": COMMIT})
    assert model_identity(pinned)["commit"] == COMMIT
    assert os.environ["HF_HUB_OFFLINE"] == "1"


def test_only_known_values_of_keys_both_sides_have_are_compared() -> None:
    study = {"model": "/a/model.safetensors", "weights": "a" * 64}
    assert identity_change(study, {**study, "model": "/b/model.safetensors"}) is None
    assert identity_change(study, {"model": "x", "commit": COMMIT}) is None
    assert identity_change({"model": "x", "commit": "unknown"}, {"commit": COMMIT}) is None
    assert (
        identity_change(study, {"weights": "b" * 64})
        == f"weights {'b' * 12} (the study's: {'a' * 12})"
    )
