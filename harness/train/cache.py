"""Caches that let repeated trials skip the VAE, the frozen text encoders and class sampling.

Layout under the cache root (``HARNESS_CACHE_DIR`` or ``~/.cache/harness``)::

    train/latents/<key>.safetensors   {"mean", "std"}: the VAE posterior of one image
    train/text/<key>.safetensors      {"prompt_embeds"[, "pooled"]}: frozen encoder outputs
    class-images/<key>/00000.png ...  + meta.json (written last; the folder is renamed in)

Every key is a SHA-256 over the model identity (reference, revision, variant, and for local
weights their size and mtime), the component dtype, and the image bytes + resolution or the
prompt. Only safetensors, PNG and JSON are written; nothing is pickled.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from harness.config import HarnessConfig, ModelConfig, class_image_seeds
from harness.models import LoadedModel
from harness.models.tiny import TINY_VERSION, default_cache_root
from harness.train.tensorfiles import (
    atomic_write_json,
    atomic_write_tensors,
    content_hash,
    file_sha256,
    read_tensors,
)

__all__ = [
    "CacheStats",
    "PromptEmbedding",
    "cached_latents",
    "cached_prompt_embeddings",
    "encode_prompts",
    "ensure_class_images",
    "load_image_tensor",
    "model_identity",
]

logger = logging.getLogger(__name__)

CACHE_VERSION = 1


@dataclass
class CacheStats:
    """Hits and misses of one cache lookup."""

    hits: int = 0
    misses: int = 0


@dataclass(frozen=True)
class PromptEmbedding:
    """Text conditioning of one prompt: token embeddings and, for SDXL, the pooled embedding."""

    prompt_embeds: torch.Tensor  # (seq, dim)
    pooled: torch.Tensor | None  # (dim,) for SDXL


def model_identity(model_cfg: ModelConfig, model: LoadedModel) -> dict[str, Any]:
    """What identifies the base weights in cache keys (never the device)."""
    ident: dict[str, Any] = {
        "ref": f"{model.ref.kind}:{model.ref.value}",
        "revision": model_cfg.revision,
        "variant": model_cfg.variant,
        "family": model.family,
    }
    if model.ref.kind == "tiny":
        ident["tiny_version"] = TINY_VERSION
    elif model.ref.kind in ("local_dir", "single_file"):
        root = Path(model.ref.value)
        files = sorted(root.rglob("*.safetensors")) if root.is_dir() else [root]
        ident["files"] = [
            (
                str(f.relative_to(root)) if root.is_dir() else f.name,
                f.stat().st_size,
                f.stat().st_mtime_ns,
            )
            for f in files
        ]
    return ident


def load_image_tensor(path: Path, resolution: int, flip: bool = False) -> torch.Tensor:
    """An RGB image as a (3, H, W) tensor in [-1, 1]; resized (centre crop) when not square at
    ``resolution`` (prepared data already is); mirrored left-right with ``flip``."""
    with Image.open(path) as img:
        rgb = img.convert("RGB")
    if flip:
        rgb = rgb.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    if rgb.size != (resolution, resolution):
        side = min(rgb.size)
        left, top = (rgb.width - side) // 2, (rgb.height - side) // 2
        rgb = rgb.crop((left, top, left + side, top + side)).resize(
            (resolution, resolution), Image.Resampling.LANCZOS
        )
    data = torch.frombuffer(bytearray(rgb.tobytes()), dtype=torch.uint8)
    data = data.view(resolution, resolution, 3).permute(2, 0, 1).float()
    return data / 127.5 - 1.0


def _entry(cache_root: Path, kind: str, key: str) -> Path:
    return cache_root / "train" / kind / key[:2] / f"{key}.safetensors"


@torch.no_grad()
def cached_latents(
    model: LoadedModel,
    model_cfg: ModelConfig,
    images: Sequence[Path],
    resolution: int,
    cache_root: Path | None = None,
    stats: CacheStats | None = None,
    flip: bool = False,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The VAE posterior (mean, std), on CPU in float32, of each image (``flip``: of its
    mirror image, ``train.random_flip``); encodes only misses."""
    root = cache_root or default_cache_root()
    vae = model.pipeline.vae
    ident = model_identity(model_cfg, model)
    out: list[tuple[torch.Tensor, torch.Tensor] | None] = []
    missing: list[tuple[int, Path, Path]] = []
    for i, path in enumerate(images):
        key = content_hash(
            {
                "v": CACHE_VERSION,
                "what": "vae-latent",
                "model": ident,
                "dtype": str(vae.dtype),
                "resolution": resolution,
                "image_sha256": file_sha256(Path(path)),
                **({"flip": True} if flip else {}),  # unflipped keys are what they were
            }
        )
        entry = _entry(root, "latents", key)
        found = read_tensors(entry)
        if found is not None and {"mean", "std"} <= found.keys():
            out.append((found["mean"], found["std"]))
        else:
            out.append(None)
            missing.append((i, Path(path), entry))
    if stats is not None:
        stats.hits += len(images) - len(missing)
        stats.misses += len(missing)
    upcast = vae.dtype == torch.float16 and bool(vae.config.get("force_upcast", False))
    dtype = torch.float32 if upcast else vae.dtype
    for start in range(0, len(missing), 8):
        chunk = missing[start : start + 8]
        pixels = torch.stack([load_image_tensor(p, resolution, flip) for _, p, _ in chunk])
        if upcast:
            vae.to(torch.float32)
        try:
            dist = vae.encode(pixels.to(model.device, dtype)).latent_dist
        finally:
            if upcast:
                vae.to(torch.float16)
        for j, (i, _, entry) in enumerate(chunk):
            mean, std = dist.mean[j].float().cpu(), dist.std[j].float().cpu()
            atomic_write_tensors(entry, {"mean": mean, "std": std}, {"format": "pt"})
            out[i] = (mean, std)
    return [o for o in out if o is not None]


def _text_modules(model: LoadedModel) -> list[tuple[Any, Any]]:
    pipe = model.pipeline
    pairs = [(pipe.tokenizer, pipe.text_encoder)]
    if model.family == "sdxl":
        pairs.append((pipe.tokenizer_2, pipe.text_encoder_2))
    return pairs


def encode_prompts(
    model: LoadedModel, prompts: Sequence[str]
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Text conditioning for ``prompts`` as the UNet expects it (gradients flow when enabled).

    SD 1.x: the last hidden state of the text encoder. SDXL: both encoders' penultimate hidden
    states concatenated, and the second encoder's pooled projection (as in diffusers' examples).
    """
    embeds: list[torch.Tensor] = []
    pooled: torch.Tensor | None = None
    for tokenizer, encoder in _text_modules(model):
        ids = tokenizer(
            list(prompts),
            padding="max_length",
            max_length=tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids.to(model.device)
        if model.family == "sd15":
            embeds.append(encoder(ids)[0])
        else:
            output = encoder(ids, output_hidden_states=True)
            pooled = output[0]
            embeds.append(output.hidden_states[-2])
    return torch.cat(embeds, dim=-1), pooled


@torch.no_grad()
def cached_prompt_embeddings(
    model: LoadedModel,
    model_cfg: ModelConfig,
    prompts: Sequence[str],
    cache_root: Path | None = None,
    stats: CacheStats | None = None,
) -> dict[str, PromptEmbedding]:
    """Frozen text-encoder outputs per unique prompt (CPU tensors); encodes only misses."""
    root = cache_root or default_cache_root()
    ident = model_identity(model_cfg, model)
    dtypes = [str(enc.dtype) for _, enc in _text_modules(model)]
    out: dict[str, PromptEmbedding] = {}
    for prompt in dict.fromkeys(prompts):
        key = content_hash(
            {"v": CACHE_VERSION, "what": "text", "model": ident, "dtype": dtypes, "prompt": prompt}
        )
        entry = _entry(root, "text", key)
        found = read_tensors(entry)
        if found is not None and "prompt_embeds" in found:
            if stats is not None:
                stats.hits += 1
        else:
            if stats is not None:
                stats.misses += 1
            embeds, pooled = encode_prompts(model, [prompt])
            found = {"prompt_embeds": embeds[0].float().cpu()}
            if pooled is not None:
                found["pooled"] = pooled[0].float().cpu()
            atomic_write_tensors(entry, found, {"format": "pt", "prompt": prompt[:200]})
        out[prompt] = PromptEmbedding(found["prompt_embeds"], found.get("pooled"))
    return out


def _sample(model: LoadedModel, spec: dict[str, Any], indices: range) -> list[Any]:
    """Class images ``indices`` of ``spec`` (image ``i`` seeded with ``spec["seed"] + i``,
    where ``spec["seed"]`` is the start of :func:`harness.config.class_image_seeds`)."""
    generators = [torch.Generator("cpu").manual_seed(spec["seed"] + i) for i in indices]
    res = spec["resolution"]
    images: list[Any] = model.pipeline(
        prompt=[spec["prompt"]] * len(indices),
        height=res,
        width=res,
        num_inference_steps=spec["steps"],
        guidance_scale=spec["guidance"],
        generator=generators,
    ).images
    return images


def ensure_class_images(
    cfg: HarnessConfig,
    model: LoadedModel,
    class_prompt: str,
    n: int,
    cache_root: Path | None = None,
    *,
    num_inference_steps: int = 25,
    guidance_scale: float = 7.5,
    batch_size: int = 4,
) -> list[Path]:
    """``n`` class images of the base model for ``class_prompt``, generated once and cached.

    Keyed by (model identity, prompt, resolution, count, seed, sampler settings): every trial of
    a sweep reuses them. Call before any adapter is attached (they must come from the base
    model). Image ``i`` uses seed ``class_image_seeds(cfg)[i]``: a stream of its own, so no
    evaluation image (PRES generates the class prompt too) starts from a class image's noise.
    """
    root = (cache_root or default_cache_root()) / "class-images"
    res = cfg.data.resolution
    spec = {
        "v": CACHE_VERSION,
        "model": model_identity(cfg.model, model),
        "dtype": str(model.dtype),
        "prompt": class_prompt,
        "resolution": res,
        "count": n,
        "seed": class_image_seeds(cfg).start,
        "steps": num_inference_steps,
        "guidance": guidance_scale,
    }
    target = root / content_hash(spec)[:32]
    names = [f"{i:05d}.png" for i in range(n)]
    if (target / "meta.json").is_file() and all((target / f).is_file() for f in names):
        return [target / f for f in names]
    logger.info("generating %d class images for %r", n, class_prompt)
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".class-", dir=root))
    try:
        for start in range(0, n, batch_size):
            count = min(batch_size, n - start)
            images = _sample(model, spec, range(start, start + count))
            for i, image in enumerate(images):
                image.save(staging / names[start + i])
        atomic_write_json(staging / "meta.json", spec)
        if target.exists():  # an incomplete earlier attempt
            shutil.rmtree(target, ignore_errors=True)
        try:
            staging.rename(target)
        except OSError:  # another worker won the race with an identical set
            if not (target / "meta.json").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return [target / f for f in names]
