"""Issue 16, training: the optimizer (AdamW, 8-bit AdamW, Prodigy), DoRA, the text encoder's
own LoRA alpha and an EMA of the adapter weights, each off by default."""

from __future__ import annotations

import logging
import sys
import types
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from harness.config import ConfigError, HarnessConfig, ModelConfig, validate_config
from harness.models import LoadedModel, load_pipeline
from harness.train import TrainingError, TrainResult, train_lora
from harness.train.attachment import Attachment
from harness.train.distributed import make_accelerator
from harness.train.kohya import kohya_module_name, kohya_state_dict
from harness.train.lora import _unet_to_diffusers, attached_lora, lora_configs
from harness.train.optim import check_optimizer
from harness.train.session import open_session
from harness.train.state import load_optimizer, save_optimizer
from tests.train.conftest import pinned_default_config


def raw_cfg(**train: Any) -> dict[str, Any]:
    return {
        "preset": "t",
        "model": {"pretrained": "tiny://sd15", "device": "cpu"},
        "data": {"class_name": "dog", "resolution": 64},
        "train": {"max_steps": 2, "checkpoint_steps": [], **train},
    }


def cfg_with(**train: Any) -> HarnessConfig:
    """A validated config (``ConfigError`` naming the key, as the CLI reports it)."""
    return validate_config(raw_cfg(**train))


def tiny() -> LoadedModel:
    return load_pipeline(ModelConfig(pretrained="tiny://sd15", device="cpu"))


@pytest.fixture(scope="module")
def sd15() -> LoadedModel:
    """This module's tiny pipeline to train on (the trainer leaves it unchanged)."""
    return tiny()


@pytest.fixture
def photos(tmp_path: Path) -> list[tuple[Path, str]]:
    out = []
    for i in range(2):
        pixels = np.random.default_rng(i).integers(0, 255, (64, 64, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(tmp_path / f"p{i}.png")
        out.append((tmp_path / f"p{i}.png", "a photo of sks dog"))
    return out


def _train(cfg: HarnessConfig, model: LoadedModel, photos: Any, run: Path) -> TrainResult:
    result = train_lora(cfg, model, photos, run, progress=False, cache_root=run.parent / "cache")
    assert result.status == "completed", result.reason
    return result


def _raw(result: TrainResult, index: int = -1) -> dict[str, dict[str, torch.Tensor]]:
    """A checkpoint's raw (resumable) adapter tensors per component."""
    flat = load_file(str(result.checkpoints[index].path / "state" / "lora.safetensors"))
    out: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in flat.items():
        component, name = key.split("::", 1)
        out.setdefault(component, {})[name] = value
    return out


# --- text_encoder_alpha ---------------------------------------------------------------------


def test_text_encoder_alpha_sets_the_text_encoder_adapters_alpha() -> None:
    default = lora_configs(cfg_with(rank=4, alpha=8.0, train_text_encoder=True).train, "sdxl")
    assert default["unet"].lora_alpha == 8 and default["text_encoder"].lora_alpha == 8
    scaled = cfg_with(rank=4, alpha=8.0, text_encoder_rank=2, train_text_encoder=True).train
    assert lora_configs(scaled, "sd15")["text_encoder"].lora_alpha == 4  # alpha x 2/4, as before
    own = cfg_with(rank=4, alpha=8.0, text_encoder_alpha=1.5, train_text_encoder=True).train
    configs = lora_configs(own, "sdxl")
    assert configs["unet"].lora_alpha == 8
    assert configs["text_encoder"].lora_alpha == configs["text_encoder_2"].lora_alpha == 1.5
    with pytest.raises(ConfigError, match="text_encoder_alpha"):
        cfg_with(text_encoder_alpha=0)


def test_kohya_export_gives_text_encoder_modules_their_own_alpha() -> None:
    train = cfg_with(rank=4, alpha=8.0, text_encoder_alpha=2.0, train_text_encoder=True).train
    unet, te = "mid_block.attentions.0.proj_in", "text_model.encoder.layers.0.self_attn.q_proj"
    peft_state = {
        "unet": {
            f"{unet}.lora_A.weight": torch.ones(4, 8),
            f"{unet}.lora_B.weight": torch.ones(8, 4),
        },
        "text_encoder": {
            f"{te}.lora_A.weight": torch.ones(4, 8),
            f"{te}.lora_B.weight": torch.ones(8, 4),
        },
    }
    tensors = kohya_state_dict("sd15", peft_state, lora_configs(train, "sd15"))
    assert float(tensors[kohya_module_name("unet", unet, "sd15") + ".alpha"]) == 8.0
    assert float(tensors[kohya_module_name("text_encoder", te, "sd15") + ".alpha"]) == 2.0


# --- optimizer ------------------------------------------------------------------------------


def test_adamw8bit_on_a_cpu_fails_before_any_training_work(
    monkeypatch: pytest.MonkeyPatch, sd15: LoadedModel, photos: Any, tmp_path: Path
) -> None:
    fake = types.ModuleType("bitsandbytes")
    fake.optim = types.SimpleNamespace(AdamW8bit=torch.optim.AdamW)  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "bitsandbytes", fake)  # installed, but no CUDA here
    run = tmp_path / "run"
    with pytest.raises(TrainingError, match=r"train\.optimizer 'adamw8bit'.*CUDA.*'adamw'"):
        train_lora(cfg_with(optimizer="adamw8bit"), sd15, photos, run, progress=False)
    assert not run.exists()  # no result.json, caches or class images: nothing was started


def test_adamw8bit_without_bitsandbytes_says_to_install_the_cuda_extra(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # `import bitsandbytes` fails
    train = cfg_with(optimizer="adamw8bit").train
    with pytest.raises(TrainingError, match=r"train\.optimizer.*not installed.*'cuda' extra"):
        check_optimizer(train, torch.device("cuda"))
    check_optimizer(cfg_with().train, torch.device("cpu"))  # adamw needs nothing


def test_prodigy_is_the_optimizer_at_lr_one_and_warns_that_lrs_are_ignored(
    sd15: LoadedModel, caplog: pytest.LogCaptureFixture
) -> None:
    from prodigyopt import Prodigy

    cfg = cfg_with(optimizer="prodigy", learning_rate=3e-4, train_text_encoder=True)
    caplog.set_level(logging.WARNING, logger="harness.train.optim")
    with Attachment(sd15, cfg.train) as attachment:
        accelerator = make_accelerator(cfg.train, sd15.device)
        session = open_session(cfg, sd15, accelerator, attachment)
        optimizer = session.torch_optimizer
        assert isinstance(optimizer, Prodigy)
        assert [g["lr"] for g in optimizer.param_groups] == [1.0, 1.0]
        assert {g["name"] for g in optimizer.param_groups} == {"unet", "text_encoder"}
        group = optimizer.param_groups[0]
        assert group["safeguard_warmup"] and group["use_bias_correction"] and group["decouple"]
        assert group["weight_decay"] == cfg.train.adam_weight_decay
    warning = " ".join(r.getMessage() for r in caplog.records)
    assert "train.learning_rate=0.0003" in warning and "train.text_encoder_lr=5e-05" in warning


def test_prodigy_training_moves_the_weights_and_logs_its_step_size(
    sd15: LoadedModel, photos: Any, tmp_path: Path
) -> None:
    logged: list[dict[str, Any]] = []
    cfg = cfg_with(optimizer="prodigy", max_steps=3)
    result = train_lora(
        cfg,
        sd15,
        photos,
        tmp_path / "run",
        progress=False,
        cache_root=tmp_path / "cache",
        on_log=lambda record, step: logged.append(record),
    )
    assert result.status == "completed", result.reason
    unet = _raw(result)["unet"]
    assert any("lora_B" in k and v.abs().max() > 0 for k, v in unet.items())  # B starts at 0
    assert all(r["lr_unet"] == 1.0 and r["prodigy_d"] > 0 for r in logged)


def test_optimizer_state_with_nested_per_parameter_dicts_round_trips(tmp_path: Path) -> None:
    """bitsandbytes >= 0.45 nests its 8-bit states in a dict per parameter."""

    class Nested(torch.optim.SGD):
        def state_dict(self) -> dict[str, Any]:
            state = super().state_dict()
            for values in state["state"].values():
                values["quant"] = {"state1": torch.arange(4, dtype=torch.uint8), "bits": 8}
            return state

    param = torch.nn.Parameter(torch.ones(3))
    opt = Nested([param], lr=0.1, momentum=0.9)
    param.grad = torch.ones(3)
    opt.step()
    save_optimizer(opt, tmp_path)
    copy = torch.nn.Parameter(torch.ones(3))
    again = torch.optim.SGD([copy], lr=0.5, momentum=0.9)
    load_optimizer(again, tmp_path)
    quant = again.state[copy]["quant"]
    assert quant["bits"] == 8 and torch.equal(quant["state1"], torch.arange(4, dtype=torch.uint8))
    assert torch.equal(again.state[copy]["momentum_buffer"], opt.state[param]["momentum_buffer"])


# --- DoRA -----------------------------------------------------------------------------------


def test_dora_with_kohya_export_is_a_config_error_naming_both_keys() -> None:
    with pytest.raises(ConfigError, match=r"use_dora.*export_kohya"):
        cfg_with(use_dora=True, export_kohya=True)
    searched = {
        **raw_cfg(export_kohya=True),
        "sweep": {"space": {"use_dora": {"choices": [False, True]}}},
    }
    with pytest.raises(ConfigError, match=r"sweep\.space\.use_dora.*export_kohya"):
        validate_config(searched)
    configs = lora_configs(cfg_with(use_dora=True, train_text_encoder=True).train, "sd15")
    assert configs["unet"].use_dora and configs["text_encoder"].use_dora


def _unet_and_text_outputs(model: LoadedModel) -> tuple[torch.Tensor, torch.Tensor]:
    pipe = model.pipeline
    ids = pipe.tokenizer(
        ["a photo of sks dog"],
        padding="max_length",
        max_length=pipe.tokenizer.model_max_length,
        return_tensors="pt",
    ).input_ids
    gen = torch.Generator().manual_seed(0)
    latents = torch.randn(1, pipe.unet.config.in_channels, 8, 8, generator=gen)
    with torch.no_grad():
        text = pipe.text_encoder(ids)[0]
        noise = pipe.unet(latents, torch.tensor([500]), encoder_hidden_states=text).sample
    return noise, text


def test_dora_adapter_loads_into_diffusers_as_trained(
    sd15: LoadedModel, photos: Any, tmp_path: Path
) -> None:
    cfg = cfg_with(use_dora=True, train_text_encoder=True, learning_rate=5e-2, text_encoder_lr=5e-2)
    result = _train(cfg, sd15, photos, tmp_path / "run")
    raw = _raw(result)
    magnitudes = {
        c: [k for k in sd if k.endswith(".lora_magnitude_vector")] for c, sd in raw.items()
    }
    assert magnitudes["unet"] and magnitudes["text_encoder"]

    trained = tiny()  # the trained weights, through the trainer's own adapters
    base_noise, base_text = _unet_and_text_outputs(trained)
    with attached_lora(trained, cfg.train) as lora:
        lora.load_peft_state_dicts(raw)
        for module in lora.modules.values():
            module.eval()
        want_noise, want_text = _unet_and_text_outputs(trained)

    loaded = tiny()  # the file, through diffusers' loader
    loaded.pipeline.load_lora_weights(result.checkpoints[-1].path, adapter_name="dora")
    for component in ("unet", "text_encoder"):
        module = getattr(loaded.pipeline, component)
        assert module.peft_config["dora"].use_dora
        layers = {
            name: m for name, m in module.named_modules() if hasattr(m, "lora_magnitude_vector")
        }
        for key in magnitudes[component]:  # the trained magnitudes, not re-initialised ones
            layer = layers[key.removesuffix(".lora_magnitude_vector")]
            torch.testing.assert_close(
                layer.lora_magnitude_vector["dora"].weight, raw[component][key]
            )
    got_noise, got_text = _unet_and_text_outputs(loaded)
    torch.testing.assert_close(got_text, want_text, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got_noise, want_noise, rtol=1e-4, atol=1e-5)
    assert (want_noise - base_noise).abs().max() > 1e-4  # the adapter does something
    assert (want_text - base_text).abs().max() > 1e-4


# --- EMA ------------------------------------------------------------------------------------


def _adapter_file(result: TrainResult, index: int) -> dict[str, torch.Tensor]:
    return load_file(str(result.checkpoints[index].weights_path))


def test_ema_adapter_is_the_average_of_the_raw_weights(
    sd15: LoadedModel, photos: Any, tmp_path: Path
) -> None:
    decay = 0.5
    cfg = cfg_with(ema_decay=decay, checkpoint_steps=[1, 2], learning_rate=5e-2)
    result = _train(cfg, sd15, photos, tmp_path / "run")
    torch.manual_seed(cfg.train.seed)  # the trainer's adapters start from this RNG state
    with Attachment(sd15, cfg.train) as attachment:
        initial = {k: v.clone() for k, v in attachment.lora.peft_state_dicts()["unet"].items()}
    raw = [_raw(result, i)["unet"] for i in (0, 1)]
    average = initial
    for index, weights in enumerate(raw):
        average = {k: decay * average[k] + (1 - decay) * weights[k] for k in average}
        expected = {f"unet.{k}": v for k, v in _unet_to_diffusers(average).items()}
        written = _adapter_file(result, index)
        assert written.keys() == expected.keys()
        for key, value in expected.items():
            torch.testing.assert_close(written[key], value, rtol=1e-5, atol=1e-7)
        state = load_file(str(result.checkpoints[index].path / "state" / "ema.safetensors"))
        torch.testing.assert_close(
            state["unet::" + next(iter(average))], next(iter(average.values()))
        )
    # the published adapter is not the raw weights
    raw_file = {f"unet.{k}": v for k, v in _unet_to_diffusers(raw[1]).items()}
    assert any(not torch.allclose(raw_file[k], v) for k, v in _adapter_file(result, 1).items())


# --- the sweep ------------------------------------------------------------------------------


@pytest.mark.slow  # the sweep stack (optuna, pandas) and four fake runs
def test_the_new_options_are_searchable(tmp_path: Path) -> None:
    import pandas as pd

    from harness.sweep import run_sweep
    from tests.sweep.fakes import FakeBackend
    from tests.sweep.test_sweep_logic import make_cfg

    space = {
        "optimizer": {"choices": ["adamw", "prodigy"]},
        "ema_decay": {"choices": [None, 0.9]},
        "use_dora": True,
        "text_encoder_alpha": 2.0,
        "train_text_encoder": True,  # else text_encoder_alpha is never sampled
    }
    cfg = make_cfg(tmp_path, sampler="grid", n_trials=4, space=space)
    assert cfg.sweep.space["optimizer"].choices == ["adamw", "prodigy"]  # type: ignore[union-attr]
    backend = FakeBackend()
    summary = run_sweep(cfg, tmp_path, backend)
    assert summary.runs_completed == 4
    assert sorted((t["optimizer"], t["ema_decay"] or 0) for t in backend.trained) == [
        ("adamw", 0),
        ("adamw", 0.9),
        ("prodigy", 0),
        ("prodigy", 0.9),
    ]
    assert all(t["use_dora"] and t["text_encoder_alpha"] == 2.0 for t in backend.trained)
    frame = pd.read_parquet(summary.results_parquet)
    assert set(frame["train.optimizer"]) == {"adamw", "prodigy"}


def test_memory_and_file_format_settings_rename_no_study_run_or_checkpoint() -> None:
    """Gradient checkpointing and the kohya file change no trained weight: a worker on a smaller
    GPU that turns checkpointing on joins the study and resumes its runs' checkpoints."""
    from harness.sweep.runner import run_key
    from harness.sweep.study import study_id
    from harness.train.fingerprints import config_hash

    cfg = pinned_default_config()
    for change in ({"gradient_checkpointing": True}, {"export_kohya": True}):
        changed = cfg.model_copy(update={"train": cfg.train.model_copy(update=change)})
        assert (study_id(changed), run_key(changed), config_hash(changed)) == (
            study_id(cfg),
            run_key(cfg),
            config_hash(cfg),
        ), change


def test_a_machine_s_model_cache_folder_renames_no_study_run_or_checkpoint() -> None:
    """``model.cache_dir`` says where this machine keeps the hub's files, as ``model.device``
    says which card it uses: a worker on another node with its own cache folder joins the study
    and resumes the checkpoints of a run that died elsewhere (the checkpoint hash counted the
    folder, so such a retry trained from step 0)."""
    from harness.sweep.runner import run_key
    from harness.sweep.study import study_id
    from harness.train.fingerprints import config_hash

    cfg = pinned_default_config()
    node = cfg.model_copy(update={"model": cfg.model.model_copy(update={"cache_dir": "/scratch"})})
    assert (study_id(node), run_key(node), config_hash(node)) == (
        study_id(cfg),
        run_key(cfg),
        config_hash(cfg),
    )


def test_the_tiny_models_version_is_part_of_every_identity_from_the_next_one_on(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The tiny models' weights are made by code, not named by a revision: when their code
    changes (``TINY_VERSION``), a study, run or checkpoint of the old weights must not be
    resumed with the new ones. Version 3 is hashed as before (the pinned identities hold)."""
    from harness.config import schema as config  # identity_dump reads it there
    from harness.sweep.runner import run_key
    from harness.sweep.study import study_id
    from harness.train.fingerprints import config_hash

    cfg = pinned_default_config()  # checks the pins at today's version
    assert config.TINY_VERSION == 3
    before = (study_id(cfg), run_key(cfg), config_hash(cfg))
    monkeypatch.setattr(config, "TINY_VERSION", 4)
    after = (study_id(cfg), run_key(cfg), config_hash(cfg))
    assert all(old != new for old, new in zip(before, after, strict=True)), (before, after)
    real = cfg.model_copy(update={"model": cfg.model.model_copy(update={"pretrained": "a/b"})})
    now = (study_id(real), run_key(real), config_hash(real))
    monkeypatch.setattr(config, "TINY_VERSION", 3)
    assert (study_id(real), run_key(real), config_hash(real)) == now  # only tiny:// models


def test_the_new_keys_at_their_defaults_rename_no_study_run_or_checkpoint() -> None:
    from harness.sweep.runner import run_key
    from harness.train.fingerprints import config_hash

    cfg = pinned_default_config()
    for change in ({"optimizer": "prodigy"}, {"use_dora": True}, {"ema_decay": 0.99}):
        changed = cfg.model_copy(update={"train": cfg.train.model_copy(update=change)})
        assert config_hash(changed) != config_hash(cfg) and run_key(changed) != run_key(cfg)
