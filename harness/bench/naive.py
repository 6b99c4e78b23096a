"""The naive path: what researchers do today with diffusers' example scripts.

Training follows ``examples/dreambooth/train_dreambooth_lora.py`` at ``--train_batch_size`` =
``train.batch_size``: every step encodes its photos with the VAE and their captions with the
text encoder again (no latent or text-embedding cache),
and ``--checkpointing_steps`` saves the LoRA with ``save_lora_weights``. Evaluation is the
usual inference script: one freshly loaded pipeline, ``load_lora_weights`` per checkpoint, one
image per pipeline call for every inference setting, and every point scored from scratch (the
real photos embedded again each time).
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

from harness.bench.paths import BenchInputs, PathRun, peak_memory, sync_device

__all__ = ["naive_path"]


def naive_path(inputs: BenchInputs, load: Any, scorer: Any, work: Path, device: Any) -> PathRun:
    """Train, generate and score the points of ``inputs`` the naive way.

    ``load()`` returns a fresh base pipeline (called twice, outside the clock: once by the
    training script and once by the inference script, as two scripts would); ``scorer`` has
    its encoders loaded and no embedding cache.
    """
    shutil.rmtree(work, ignore_errors=True)
    train_pipe, infer_pipe = load(), load()
    with peak_memory(device) as peak:
        started = first = time.perf_counter()
        checkpoints = _train(inputs, train_pipe, work / "train", device)
        sync_device(device)
        train_s = time.perf_counter() - started
        started = time.perf_counter()
        points = _generate(inputs, infer_pipe, checkpoints, work / "images", device)
        sync_device(device)
        generate_s = time.perf_counter() - started
        started = time.perf_counter()
        scored = 0
        for images in points.values():  # ``scorer`` caches nothing: each point from scratch
            scorer.score(
                real=list(inputs.subject.reference),
                generated=images,
                prompts=[p for p in inputs.prompts for _ in inputs.seeds],
                token=inputs.subject.token,
                class_name=inputs.class_name,
            )
            scored += len(images)
        score_s = time.perf_counter() - started
        wall_s = time.perf_counter() - first  # as the harness path's: the whole pass
    return PathRun(
        points=len(points),
        train_s=train_s,
        train_steps=inputs.cfg.train.max_steps,
        generate_s=generate_s,
        images=scored,
        score_s=score_s,
        scored=scored,
        peak_bytes=peak[0],
        wall_s=wall_s,
    )


def _train(inputs: BenchInputs, pipe: Any, out_dir: Path, device: Any) -> list[Path]:
    """The example script's loop at ``--train_batch_size`` = ``train.batch_size`` (the same
    points as the harness's): AdamW, epsilon or v-prediction MSE, every photo VAE-encoded and
    every caption text-encoded at every step (no caches)."""
    import torch
    import torch.nn.functional as F
    from diffusers import DDPMScheduler, StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    from harness.train.lora import lora_configs

    cfg = inputs.cfg
    unet, vae, text_encoder = pipe.unet, pipe.vae, pipe.text_encoder
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    for module in (unet, vae, text_encoder):
        module.requires_grad_(False)
    # The harness's own LoRA settings (rank, alpha, dropout, targets): the same points.
    unet.add_adapter(lora_configs(cfg.train, "sd15")["unet"])
    params = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.train.learning_rate)
    generator = torch.Generator().manual_seed(cfg.seed)
    dtype = next(unet.parameters()).dtype
    saved = []
    unet.train()
    for step in range(1, cfg.train.max_steps + 1):
        pixels, ids = _example_batch(inputs, pipe.tokenizer, step)
        with torch.no_grad():
            latents = vae.encode(pixels.to(device, dtype)).latent_dist.sample()
            latents = latents * vae.config.scaling_factor
            states = text_encoder(ids.to(device))[0]
        noise = torch.randn(latents.shape, generator=generator).to(device, dtype)
        steps = noise_scheduler.config.num_train_timesteps
        t = torch.randint(0, steps, (len(latents),), generator=generator).to(device)
        noisy = noise_scheduler.add_noise(latents, noise, t)
        pred = unet(noisy, t, states).sample
        target = (
            noise_scheduler.get_velocity(latents, noise, t)
            if noise_scheduler.config.prediction_type == "v_prediction"
            else noise
        )
        loss = F.mse_loss(pred.float(), target.float())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step in cfg.train.checkpoint_steps:
            folder = out_dir / f"checkpoint-{step}"
            layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
            StableDiffusionPipeline.save_lora_weights(folder, unet_lora_layers=layers)
            saved.append(folder)
    return saved


def _example_batch(inputs: BenchInputs, tokenizer: Any, step: int) -> tuple[Any, Any]:
    """Step ``step``'s ``train.batch_size`` photos (cycling through the subject's, as an
    epoch-looping dataloader does) as pixels in [-1, 1], and their captions' token ids."""
    import numpy as np
    import torch
    from PIL import Image

    size = inputs.cfg.train.batch_size
    pairs = [inputs.pairs[((step - 1) * size + i) % len(inputs.pairs)] for i in range(size)]
    arrays = [
        np.asarray(Image.open(photo).convert("RGB"), dtype=np.float32) / 127.5 - 1.0
        for photo, _ in pairs
    ]
    pixels = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)
    ids = tokenizer(
        [caption for _, caption in pairs],
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids
    return pixels, ids


def _generate(
    inputs: BenchInputs, pipe: Any, checkpoints: list[Path], out_dir: Path, device: Any
) -> dict[tuple[str, str], list[Path]]:
    """One image per pipeline call, per checkpoint x setting x prompt x seed."""
    import torch

    from harness.generate import make_scheduler

    base = pipe.scheduler.config
    size = inputs.cfg.eval.resolution or inputs.cfg.data.resolution
    points: dict[tuple[str, str], list[Path]] = {}
    pipe.set_progress_bar_config(disable=True)
    for ckpt in checkpoints:
        pipe.load_lora_weights(ckpt, adapter_name="naive")
        for setting in inputs.settings:
            pipe.scheduler = make_scheduler(setting.scheduler, base)
            pipe.set_adapters(["naive"], adapter_weights=[setting.lora_scale])
            folder = out_dir / ckpt.name / setting.id
            folder.mkdir(parents=True, exist_ok=True)
            images = []
            for i, prompt in enumerate(inputs.prompts):
                for seed in inputs.seeds:
                    image = pipe(
                        prompt,
                        num_inference_steps=setting.num_inference_steps,
                        guidance_scale=setting.guidance_scale,
                        height=size,
                        width=size,
                        generator=torch.Generator(device="cpu").manual_seed(seed),
                    ).images[0]
                    path = folder / f"{i:03d}-{seed}.png"
                    image.save(path)
                    images.append(path)
            points[(ckpt.name, setting.id)] = images
        pipe.delete_adapters("naive")
    return points
