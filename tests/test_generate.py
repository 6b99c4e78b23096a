"""Batched generation: determinism, batching independence, adapter swap and LoRA scales."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from harness.config import InferenceSetting
from harness.errors import HarnessError
from harness.generate import Speed, format_prompt, generate_images
from harness.models import WeightsFileError

FAST = InferenceSetting(guidance_scale=5.0, num_inference_steps=2, scheduler="ddim")


def random_lora(pipeline: Any, out_dir: Path, seed: int = 0, dora: bool = False) -> Path:
    """Save a UNet LoRA (a DoRA one with ``dora``) with non-zero random weights in diffusers'
    format."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    unet = copy.deepcopy(pipeline.unet)
    unet.add_adapter(
        LoraConfig(
            r=4,
            lora_alpha=4,
            target_modules=["to_q", "to_k", "to_v", "to_out.0"],
            use_dora=dora,
        )
    )
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in unet.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
    state = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    StableDiffusionPipeline.save_lora_weights(out_dir, unet_lora_layers=state)
    return out_dir


def pixels(out_dir: Path, record: Any) -> np.ndarray:
    return np.asarray(Image.open(out_dir / record.file))


def run(loaded: Any, out: Path, **kwargs: Any) -> list[Any]:
    defaults: dict[str, Any] = {
        "templates": ["a photo of {token} {class_name}", "a {token} {class_name} in the snow"],
        "token": "sks",
        "class_name": "toy",
        "seeds": [0, 1],
        "settings": [FAST],
        "out_dir": out,
        "progress": False,
    }
    defaults.update(kwargs)
    return generate_images(loaded, **defaults)


def test_manifest_and_files(tiny_sd15: Any, tmp_path: Path) -> None:
    records = run(tiny_sd15, tmp_path)
    assert len(records) == 4
    lines = [json.loads(x) for x in (tmp_path / "manifest.jsonl").read_text().splitlines()]
    assert [r["file"] for r in lines] == [r.file for r in records]
    first = lines[0]
    assert first["prompt"] == "a photo of sks toy"
    assert first["template"] == "a photo of {token} {class_name}"
    assert (first["seed"], first["guidance_scale"], first["num_inference_steps"]) == (0, 5.0, 2)
    assert first["setting_id"] == FAST.id and first["adapter"] is None
    assert Image.open(tmp_path / first["file"]).size == (64, 64)


def test_deterministic_and_independent_of_batching(tiny_sd15: Any, tmp_path: Path) -> None:
    one = run(tiny_sd15, tmp_path / "a", batch_size=1)
    four = run(tiny_sd15, tmp_path / "b", batch_size=4)
    again = run(tiny_sd15, tmp_path / "c", batch_size=4)
    for a, b, c in zip(one, four, again, strict=True):
        assert a.file == b.file == c.file
        assert np.array_equal(pixels(tmp_path / "b", b), pixels(tmp_path / "c", c))
        # Another batch size only changes float rounding (BLAS), never the noise: +-2 levels.
        diff = np.abs(pixels(tmp_path / "a", a).astype(int) - pixels(tmp_path / "b", b).astype(int))
        assert diff.max() <= 2
    # Different seeds really give different images.
    assert not np.array_equal(pixels(tmp_path / "a", one[0]), pixels(tmp_path / "a", one[1]))


def test_lora_scale_zero_equals_base_and_adapter_is_removed(tiny_sd15: Any, tmp_path: Path) -> None:
    lora = random_lora(tiny_sd15.pipeline, tmp_path / "lora")
    base = run(tiny_sd15, tmp_path / "base", seeds=[3])
    zero = InferenceSetting(
        guidance_scale=5.0, num_inference_steps=2, scheduler="ddim", lora_scale=0.0
    )
    scaled = run(tiny_sd15, tmp_path / "lora-out", seeds=[3], settings=[zero, FAST], adapter=lora)
    assert np.array_equal(
        pixels(tmp_path / "base", base[0]), pixels(tmp_path / "lora-out", scaled[0])
    )
    assert not np.array_equal(
        pixels(tmp_path / "base", base[0]), pixels(tmp_path / "lora-out", scaled[2])
    )
    assert not any("lora" in key for key in tiny_sd15.pipeline.unet.state_dict())
    again = run(tiny_sd15, tmp_path / "again", seeds=[3])
    assert np.array_equal(pixels(tmp_path / "base", base[0]), pixels(tmp_path / "again", again[0]))


def test_schedulers_switch_and_restore(tiny_sd15: Any, tmp_path: Path) -> None:
    before = type(tiny_sd15.pipeline.scheduler)
    settings = [
        InferenceSetting(num_inference_steps=2, scheduler=s) for s in ("dpmsolver++", "euler")
    ]
    records = run(
        tiny_sd15, tmp_path, templates=["a {token} {class_name}"], seeds=[0], settings=settings
    )
    assert {r.setting.scheduler for r in records} == {"dpmsolver++", "euler"}
    assert type(tiny_sd15.pipeline.scheduler) is before


def test_missing_adapter_is_a_clear_error(tiny_sd15: Any, tmp_path: Path) -> None:
    with pytest.raises(HarnessError, match="LoRA weights not found"):
        run(tiny_sd15, tmp_path, adapter=tmp_path / "nope")


@pytest.mark.parametrize("name", ["a.bin", "a.ckpt", "a.pt", "a.pth", "a.safetensors", "dir"])
def test_pickle_adapter_refused_without_unpickling(
    tiny_sd15: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    weights = tmp_path / name
    if name == "dir":  # a checkpoint folder whose weights are a renamed pickle
        weights.mkdir()
        weights = weights / "pytorch_lora_weights.safetensors"
    torch.save({"unet.x.lora.down.weight": torch.zeros(2, 2)}, weights)

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("torch.load reached")

    monkeypatch.setattr(torch, "load", refuse)
    with pytest.raises(WeightsFileError, match=rf"^adapter: {re.escape(str(weights))}: "):
        run(tiny_sd15, tmp_path / "out", adapter=tmp_path / name)
    assert not any(tiny_sd15.pipeline.get_list_adapters().values())
    assert not (tmp_path / "out" / "manifest.jsonl").exists()


@pytest.mark.parametrize("kind", ["another model's LoRA", "not a LoRA"])
def test_an_adapter_this_model_cannot_load_is_one_error_naming_it(
    tiny_sd15: Any, tmp_path: Path, kind: str
) -> None:
    """A valid safetensors file that is an SDXL LoRA on SD 1.5 (every shape off) or a base
    checkpoint: one error naming the file, the pipeline left without adapters (it was
    peft's size-mismatch or diffusers' "Invalid LoRA checkpoint" traceback)."""
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "adapter"
    folder.mkdir()
    weights = folder / "pytorch_lora_weights.safetensors"
    if kind == "not a LoRA":
        save_file({"conv_in.weight": torch.zeros(4, 4)}, str(weights))
    else:
        good = load_file(str(random_lora(tiny_sd15.pipeline, tmp_path / "good") / weights.name))
        wider = {
            k: torch.zeros(v.shape[0], v.shape[1] + 3) if ".down." in k else v
            for k, v in good.items()
        }
        save_file(wider, str(weights))
    with pytest.raises(HarnessError, match=rf"^adapter: {re.escape(str(weights))}: not a LoRA "):
        run(tiny_sd15, tmp_path / "out", adapter=folder)
    assert not any(tiny_sd15.pipeline.get_list_adapters().values())
    assert not (tmp_path / "out" / "manifest.jsonl").exists()


def test_a_device_error_while_loading_an_adapter_is_not_blamed_on_the_file(
    tiny_sd15: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Only the file's own faults become "not a LoRA this model can load": a CUDA error raised
    while copying weights to the GPU propagates as it is."""
    lora = random_lora(tiny_sd15.pipeline, tmp_path / "lora")

    def device_fault(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(tiny_sd15.pipeline, "load_lora_weights", device_fault)
    with pytest.raises(RuntimeError, match=r"^CUDA error: an illegal memory access"):
        run(tiny_sd15, tmp_path / "out", adapter=lora)


def test_a_fused_dora_adapter_leaves_the_base_weights_trainable(
    tiny_sd15: Any, tmp_path: Path
) -> None:
    """DoRA's fuse and unfuse replace the base weights' tensors; done under inference mode they
    became inference tensors, and training on the same pipeline after a sweep's checkpoint
    evaluation failed ("Inference tensors cannot be saved for backward"), on that worker's
    every later run too."""
    dora = random_lora(tiny_sd15.pipeline, tmp_path / "dora", dora=True)
    fused = run(tiny_sd15, tmp_path / "fused", adapter=dora, speed=Speed(fuse_lora=True))
    plain = run(tiny_sd15, tmp_path / "plain", adapter=dora)
    for a, b in zip(fused, plain, strict=True):
        gap = np.abs(pixels(tmp_path / "fused", a).astype(int) - pixels(tmp_path / "plain", b))
        assert gap.max() <= 2, "the fused DoRA adapter generates what the runtime one does"
    unet = tiny_sd15.pipeline.unet
    assert [n for n, p in unet.named_parameters() if p.is_inference()] == []
    sample = torch.randn(1, unet.config.in_channels, 8, 8, requires_grad=True)
    context = torch.randn(1, 77, unet.config.cross_attention_dim)
    unet(sample, 1, encoder_hidden_states=context).sample.mean().backward()
    assert sample.grad is not None


def test_format_prompt_both_placeholder_styles() -> None:
    assert format_prompt("a {token} {class_name}", "sks", "dog") == "a sks dog"
    assert format_prompt("a {0} {1} on the beach", "sks", "dog") == "a sks dog on the beach"
    with pytest.raises(HarnessError, match="unknown placeholder"):
        format_prompt("a {subject}", "sks", "dog")


def test_every_configurable_scheduler_builds_from_the_models_config(tiny_sd15: Any) -> None:
    """Each ``eval.scheduler`` value gives its diffusers class, built from the model's own
    scheduler config (UniPC and DPM-Solver++ are the fast evaluation samplers)."""
    from typing import get_args

    from harness.config import Scheduler
    from harness.generate import make_scheduler

    base = tiny_sd15.pipeline.scheduler.config
    built = {name: make_scheduler(name, base) for name in get_args(Scheduler)}
    expected = {
        "ddim": "DDIMScheduler",
        "dpmsolver++": "DPMSolverMultistepScheduler",
        "unipc": "UniPCMultistepScheduler",
        "euler": "EulerDiscreteScheduler",
        "euler_a": "EulerAncestralDiscreteScheduler",
        "pndm": "PNDMScheduler",
        "ddpm": "DDPMScheduler",
    }
    assert {name: type(s).__name__ for name, s in built.items()} == expected
    assert built["dpmsolver++"].config.algorithm_type == "dpmsolver++"
    assert all(s.config.num_train_timesteps == base.num_train_timesteps for s in built.values())


def test_fused_lora_gives_the_unfused_images_and_restores_the_base_exactly(
    tiny_sd15: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``eval.fuse_lora``: each setting's adapter, at its own scale, fused into the weights
    gives the images of the runtime-scaled adapter; the base weights are bit-identical after."""
    from harness.generate import Speed

    lora = random_lora(tiny_sd15.pipeline, tmp_path / "lora")
    settings = [
        InferenceSetting(guidance_scale=5.0, num_inference_steps=2, scheduler="ddim", lora_scale=s)
        for s in (0.4, 1.0)
    ]
    before = {k: v.clone() for k, v in tiny_sd15.pipeline.unet.state_dict().items()}
    plain = run(tiny_sd15, tmp_path / "plain", seeds=[3], settings=settings, adapter=lora)
    merged: list[bool] = []  # per pipeline call: were the UNet's LoRA layers merged?
    pipeline_type = type(tiny_sd15.pipeline)
    original = pipeline_type.__call__

    def spying(self: Any, *args: Any, **kwargs: Any) -> Any:
        from peft.tuners.tuners_utils import BaseTunerLayer

        layers = [m for m in self.unet.modules() if isinstance(m, BaseTunerLayer)]
        merged.append(bool(layers) and all(m.merged for m in layers))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(pipeline_type, "__call__", spying)
    fused = run(
        tiny_sd15,
        tmp_path / "fused",
        seeds=[3],
        settings=settings,
        adapter=lora,
        speed=Speed(fuse_lora=True),
    )
    monkeypatch.undo()
    assert merged == [True, True]  # one batch per setting, each with the adapter fused
    for a, b in zip(plain, fused, strict=True):
        diff = np.abs(pixels(tmp_path / "plain", a).astype(int) - pixels(tmp_path / "fused", b))
        assert diff.max() <= 2, (a.setting.id, diff.max())  # the same maths, other rounding
    # The two scales still differ: each setting fused its own scale, not the first one's.
    assert not np.array_equal(
        pixels(tmp_path / "fused", fused[0]), pixels(tmp_path / "fused", fused[2])
    )
    after = tiny_sd15.pipeline.unet.state_dict()
    assert set(after) == set(before)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_compiled_blocks_are_compiled_only_while_generating(tiny_sd15: Any) -> None:
    """``eval.compile``: the denoiser's repeated transformer blocks are compiled inside the
    block and eager again after it (training on the same pipeline never runs compiled)."""
    from harness.generate import compiled_blocks

    unet = tiny_sd15.pipeline.unet
    blocks = [m for m in unet.modules() if type(m).__name__ == "BasicTransformerBlock"]
    assert blocks
    with compiled_blocks(tiny_sd15.pipeline, True):
        assert all(b._compiled_call_impl is not None for b in blocks)
        others = [m for m in unet.modules() if m not in blocks]
        assert all(getattr(m, "_compiled_call_impl", None) is None for m in others)
    assert all(b._compiled_call_impl is None for b in blocks)
    with compiled_blocks(tiny_sd15.pipeline, False):
        assert all(b._compiled_call_impl is None for b in blocks)


def test_written_images_are_the_pipelines_own_pil_images(tiny_sd15: Any, tmp_path: Path) -> None:
    """The PNGs (uint8 on the device, encoded on writer threads) hold exactly the pixels of
    diffusers' own ``output_type="pil"`` images for the same prompts and seeds."""
    records = run(tiny_sd15, tmp_path, seeds=[3], resolution=64)
    prompts = [r.prompt for r in records]
    with torch.inference_mode():
        own = tiny_sd15.pipeline(
            prompt=prompts,
            generator=[torch.Generator("cpu").manual_seed(3) for _ in prompts],
            guidance_scale=FAST.guidance_scale,
            num_inference_steps=FAST.num_inference_steps,
            height=64,
            width=64,
        ).images
    for record, image in zip(records, own, strict=True):
        assert np.array_equal(pixels(tmp_path, record), np.asarray(image)), record.file


def test_to_uint8_rounds_as_diffusers_numpy_to_pil() -> None:
    """Every level boundary (k + 0.5) / 255 and its float neighbours, in float32 and bf16."""
    from diffusers.image_processor import VaeImageProcessor

    from harness.generate import to_uint8

    edges = (torch.arange(256, dtype=torch.float64) + 0.5) / 255
    values = torch.cat([edges, torch.nextafter(edges, edges + 1), torch.rand(4000).double()])
    values = values.float().clamp(0, 1)
    for dtype in (torch.float32, torch.bfloat16):
        images = values[: 3 * 4 * 4 * 25].reshape(25, 3, 4, 4).to(dtype)
        theirs = VaeImageProcessor.numpy_to_pil(VaeImageProcessor.pt_to_numpy(images))
        ours = to_uint8(images)
        assert ours.shape == (25, 4, 4, 3) and ours.dtype == np.uint8
        assert np.array_equal(ours, np.stack([np.asarray(i) for i in theirs])), dtype


def test_image_writer_bounds_what_waits_and_names_a_failed_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """submit blocks once max_pending images wait (memory stays bounded when encoding is
    slower than generation); a write that fails is raised on leaving the block, naming the file."""
    import threading
    import time

    from harness import generate
    from harness.generate import ImageWriter, WriteTimes

    release = threading.Event()
    real_save = generate._save_png_atomically

    def slow_save(image: Any, path: Path) -> None:
        release.wait(10)
        real_save(image, path)

    monkeypatch.setattr(generate, "_save_png_atomically", slow_save)
    pixels_ = np.zeros((8, 8, 3), np.uint8)
    times = WriteTimes()
    with ImageWriter(tmp_path, threads=1, max_pending=2, times=times) as writer:
        writer.submit(pixels_, "a/0.png")
        writer.submit(pixels_, "a/1.png")
        third = threading.Thread(target=writer.submit, args=(pixels_, "a/2.png"))
        third.start()
        third.join(0.5)
        assert third.is_alive()  # blocked: two images wait already
        release.set()
        third.join(10)
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["0.png", "1.png", "2.png"]
    assert times.images == 3 and times.wait_s > 0.3 and times.encode_s > 0.3

    (tmp_path / "blocked").write_text("a file where the setting's folder goes")
    start = time.perf_counter()
    with pytest.raises(HarnessError, match=r"blocked/0\.png"), ImageWriter(tmp_path) as writer:
        writer.submit(pixels_, "blocked/0.png")
    assert time.perf_counter() - start < 10


def _conv_weights(pipeline: Any) -> list[torch.Tensor]:
    """Every 4-D weight of the UNet and the VAE (the tensors a memory format applies to)."""
    return [p for part in (pipeline.unet, pipeline.vae) for p in part.parameters() if p.dim() == 4]


def test_channels_last_gives_the_same_images_and_restores_the_layout(
    tiny_sd15: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``eval.channels_last``: the UNet and the VAE (the adapter's convolutions included) run in
    NHWC while generating and give the NCHW images; after it every weight is contiguous again
    (safetensors refuses other strides, and training follows on the same pipeline) with the
    same values."""
    from harness.generate import Speed

    lora = random_lora(tiny_sd15.pipeline, tmp_path / "lora")
    pipeline = tiny_sd15.pipeline
    before = {k: v.clone() for k, v in pipeline.unet.state_dict().items()}
    plain = run(tiny_sd15, tmp_path / "plain", seeds=[3], adapter=lora)
    layouts: list[bool] = []  # per pipeline call: were all 4-D weights NHWC?

    def spying(self: Any, *args: Any, **kwargs: Any) -> Any:
        weights = _conv_weights(self)
        layouts.append(
            bool(weights)
            and all(w.is_contiguous(memory_format=torch.channels_last) for w in weights)
        )
        return original(self, *args, **kwargs)

    original = type(pipeline).__call__
    monkeypatch.setattr(type(pipeline), "__call__", spying)
    nhwc = run(
        tiny_sd15, tmp_path / "nhwc", seeds=[3], adapter=lora, speed=Speed(channels_last=True)
    )
    monkeypatch.undo()
    assert layouts == [True]
    for a, b in zip(plain, nhwc, strict=True):
        diff = np.abs(pixels(tmp_path / "plain", a).astype(int) - pixels(tmp_path / "nhwc", b))
        assert diff.max() <= 2, (a.file, diff.max())  # the same maths, other rounding
    assert all(w.is_contiguous() for w in _conv_weights(pipeline))
    after = pipeline.unet.state_dict()
    assert set(after) == set(before)
    assert all(torch.equal(before[k], after[k]) for k in before)
