"""Image/text encoders for the scores: DINO ViT-S/16 (timm) and CLIP (open_clip).

Model references:

* DINO (:func:`load_dino`)
    - ``"timm/vit_small_patch16_224.dino"`` (default): the Hugging Face hub repo; only its
      ``model.safetensors`` is used, from the local hub cache or downloaded once.
    - ``"/path/model.safetensors"``: a local file holding a timm ViT state dict
      (architecture ``arch``, default ``vit_small_patch16_224``).
    - ``"tiny://dino"``: a tiny random ViT (patch 16, 224 input, depth 2, width 32), seeded.
* CLIP (:func:`load_clip`)
    - ``("ViT-B-32", "openai")`` (default): an open_clip architecture and pretrained tag; the
      tag's ``open_clip_model.safetensors`` is fetched from the hub, and QuickGELU plus the
      preprocessing the tag was trained with are applied (open_clip 3.x would otherwise build
      ``ViT-B-32`` with plain GELU for the OpenAI weights and only warn).
    - ``(arch, "/path/weights.safetensors")``: a local file (use ``ViT-B-32-quickgelu`` for
      OpenAI weights).
    - ``"tiny://clip"``: a tiny random CLIP (224 input, 2+2 layers) that still uses the real
      49,408-token CLIP BPE tokenizer and open_clip's real preprocessing.

Weights are only ever read with safetensors: pickled checkpoints (``.pt``, ``.pth``, ``.bin``)
are refused, and nothing runs remote code. With ``HF_HUB_OFFLINE=1`` and nothing cached, the
loaders fail at once with a message on how to supply the weights.

Encoders return float32 CPU tensors of L2-normalised rows. Inference runs in ``eval()`` under
``torch.inference_mode`` in batches; fp32 is the default (deterministic on CPU); bf16 autocast
is available on CUDA only and is part of the encoder id (so cached embeddings never mix).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from metrics.errors import MetricsInputError, WeightsUnavailableError
from metrics.images import ImageInput, load_image
from metrics.preprocess import ImageTransform, dino_transform

__all__ = [
    "DEFAULT_CLIP_MODEL",
    "DEFAULT_CLIP_PRETRAINED",
    "DEFAULT_DINO_MODEL",
    "TINY_CLIP",
    "TINY_DINO",
    "ClipEncoder",
    "DinoEncoder",
    "ImageEncoder",
    "load_clip",
    "load_dino",
    "resolve_device",
]

DEFAULT_DINO_MODEL = "timm/vit_small_patch16_224.dino"
DEFAULT_DINO_ARCH = "vit_small_patch16_224"
DEFAULT_CLIP_MODEL = "ViT-B-32"
DEFAULT_CLIP_PRETRAINED = "openai"
TINY_DINO = "tiny://dino"
TINY_CLIP = "tiny://clip"

_PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".pkl", ".pickle")
_TINY_CLIP_NAME = "metrics-tiny-clip"
_TINY_CLIP_CONFIG: dict[str, Any] = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 224, "layers": 2, "width": 32, "head_width": 16, "patch_size": 32},
    # vocab_size and context_length of the real CLIP: the real BPE tokenizer feeds it.
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}
_TINY_DINO_KWARGS: dict[str, Any] = {"img_size": 224, "depth": 2, "embed_dim": 32, "num_heads": 2}
_WEIGHTS_HINT = (
    "run once with network access (HF_HUB_OFFLINE unset) to fill the Hugging Face cache, "
    "or pass a local .safetensors file"
)


def resolve_device(device: str | torch.device) -> torch.device:
    """``"auto"`` -> CUDA when available, else CPU; anything else is passed to ``torch.device``."""
    if isinstance(device, str) and device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as exc:
        raise MetricsInputError(f"invalid device {device!r}: {exc}") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise MetricsInputError(f"device {device!r} requested but CUDA is not available")
    return resolved


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


def _safetensors_file(path_like: str, what: str) -> Path:
    """A local weights file that exists and is safetensors (pickles are refused unread)."""
    path = Path(path_like).expanduser()
    if path.suffix.lower() in _PICKLE_SUFFIXES:
        raise WeightsUnavailableError(
            f"refusing to load pickled {what} weights {path}: convert them to .safetensors"
        )
    if path.suffix.lower() != ".safetensors":
        raise WeightsUnavailableError(f"{what} weights must be a .safetensors file, got {path}")
    if not path.is_file():
        raise WeightsUnavailableError(f"{what} weights file not found: {path}")
    return path


def _hub_file(repo_id: str, filename: str, what: str, cache_dir: str | None) -> Path:
    """Fetch one file from the Hugging Face hub (or its local cache); fail with a hint."""
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(repo_id=repo_id, filename=filename, cache_dir=cache_dir))
    except Exception as exc:  # offline, not cached, no such repo/file, network errors
        raise WeightsUnavailableError(
            f"{what} weights {repo_id}/{filename} are unavailable ({_first_line(exc)}); "
            + _WEIGHTS_HINT
        ) from None


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Seed the CPU RNG for a model's random init without disturbing the caller's RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


@contextlib.contextmanager
def _quiet_logging() -> Iterator[None]:
    # open_clip warns on the root logger that a random model has no pretrained weights:
    # expected for tiny test models, noise on the CLI.
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(previous)


class ImageEncoder:
    """Batched, L2-normalised image embeddings from a vision model.

    Attributes:
        id: identifies weights, preprocessing and precision (the embedding-cache key).
        device: where the model runs.
        batch_size: images per forward pass.
    """

    def __init__(
        self,
        model: nn.Module,
        transform: ImageTransform,
        *,
        encoder_id: str,
        device: torch.device,
        batch_size: int = 16,
        bf16_autocast: bool = False,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        # Any: open_clip's encode_image/encode_text are not visible on nn.Module's type.
        self.model: Any = model.to(device).eval()
        self.transform = transform
        self.device = device
        self.batch_size = batch_size
        # bf16 only where it helps and is supported; CPU stays fp32 and deterministic.
        self.bf16_autocast = bf16_autocast and device.type == "cuda"
        self.id = encoder_id + (":bf16" if self.bf16_autocast else ":fp32")

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.bf16_autocast:
            return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _forward_images(self, pixels: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _run(
        self, batches: Iterator[torch.Tensor], forward: Callable[[torch.Tensor], torch.Tensor]
    ) -> torch.Tensor:
        outputs: list[torch.Tensor] = []
        with torch.inference_mode(), self._autocast():
            for batch in batches:
                features = forward(batch.to(self.device)).float()
                outputs.append(F.normalize(features, dim=-1).cpu())
        return torch.cat(outputs)

    def encode_images(self, images: Sequence[ImageInput]) -> torch.Tensor:
        """Embeddings ``[N, D]`` (float32, CPU, unit rows) of paths or PIL images, in order."""
        if not images:
            raise ValueError("encode_images needs at least one image")

        def batches() -> Iterator[torch.Tensor]:
            for start in range(0, len(images), self.batch_size):
                chunk = images[start : start + self.batch_size]
                yield torch.stack([self.transform(load_image(image)) for image in chunk])

        return self._run(batches(), self._forward_images)


class DinoEncoder(ImageEncoder):
    """DINO ViT: the [CLS] token after the final norm (timm ``num_classes=0`` output)."""

    def _forward_images(self, pixels: torch.Tensor) -> torch.Tensor:
        output: torch.Tensor = self.model(pixels)
        return output


class ClipEncoder(ImageEncoder):
    """CLIP: projected image and text embeddings (``encode_image`` / ``encode_text``)."""

    def __init__(
        self,
        model: nn.Module,
        transform: ImageTransform,
        tokenizer: Callable[[list[str]], torch.Tensor],
        *,
        encoder_id: str,
        device: torch.device,
        batch_size: int = 16,
        bf16_autocast: bool = False,
    ) -> None:
        super().__init__(
            model,
            transform,
            encoder_id=encoder_id,
            device=device,
            batch_size=batch_size,
            bf16_autocast=bf16_autocast,
        )
        self.tokenizer = tokenizer

    def _forward_images(self, pixels: torch.Tensor) -> torch.Tensor:
        output: torch.Tensor = self.model.encode_image(pixels)
        return output

    def _forward_texts(self, tokens: torch.Tensor) -> torch.Tensor:
        output: torch.Tensor = self.model.encode_text(tokens)
        return output

    def encode_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """Embeddings ``[N, D]`` (float32, CPU, unit rows) of ``texts``, in order."""
        if not texts:
            raise ValueError("encode_texts needs at least one text")
        texts = list(texts)

        def batches() -> Iterator[torch.Tensor]:
            for start in range(0, len(texts), self.batch_size):
                yield self.tokenizer(texts[start : start + self.batch_size])

        return self._run(batches(), self._forward_texts)


def load_dino(
    ref: str = DEFAULT_DINO_MODEL,
    device: str | torch.device = "cpu",
    *,
    batch_size: int = 16,
    bf16_autocast: bool = False,
    seed: int = 0,
    arch: str = DEFAULT_DINO_ARCH,
    timm_kwargs: Mapping[str, Any] | None = None,
    hub_cache_dir: str | None = None,
) -> DinoEncoder:
    """Load the DINO encoder from a hub id, a local ``.safetensors`` file or ``tiny://dino``.

    Args:
        ref: ``"timm/<model>.<tag>"``, a ``.safetensors`` path, or ``"tiny://dino"``.
        device: ``"cpu"``, ``"cuda"``, ``"cuda:1"`` or ``"auto"``.
        batch_size: images per forward pass.
        bf16_autocast: bf16 autocast (CUDA only; ignored on CPU).
        seed: init seed of the tiny model.
        arch: timm architecture of a local file.
        timm_kwargs: extra ``timm.create_model`` arguments for a local file (e.g. ``depth``).
        hub_cache_dir: Hugging Face cache folder (default: the hub's own).

    Raises:
        WeightsUnavailableError: weights missing (offline, not cached), unsafe or mismatched.
    """
    torch_device = resolve_device(device)
    source = _dino_source(ref, seed, arch, timm_kwargs, hub_cache_dir)
    return DinoEncoder(
        _create_dino(source, seed),
        dino_transform(),
        encoder_id=source.encoder_id,
        device=torch_device,
        batch_size=batch_size,
        bf16_autocast=bf16_autocast,
    )


@dataclass(frozen=True)
class _DinoSource:
    """What :func:`load_dino` builds: a timm model name and its arguments, the weights file
    (``None``: the seeded random tiny model) and the encoder id."""

    model_name: str
    create_kwargs: dict[str, Any]
    weights: Path | None
    encoder_id: str


def _dino_source(
    ref: str,
    seed: int,
    arch: str,
    timm_kwargs: Mapping[str, Any] | None,
    hub_cache_dir: str | None,
) -> _DinoSource:
    """Resolve a DINO reference (``tiny://dino``, a local file or a hub id) to its weights."""
    kwargs: dict[str, Any] = {"num_classes": 0}
    if ref == TINY_DINO:
        return _DinoSource(
            DEFAULT_DINO_ARCH,
            {**kwargs, **_TINY_DINO_KWARGS},
            None,
            f"dino:{TINY_DINO}:seed={seed}",
        )
    if ref.startswith("tiny://"):
        raise WeightsUnavailableError(f"unknown tiny DINO model {ref!r}; use {TINY_DINO!r}")
    if ref.lower().endswith((".safetensors", *_PICKLE_SUFFIXES)) or Path(ref).is_file():
        weights = _safetensors_file(ref, "DINO")
        kwargs.update(timm_kwargs or {})
        encoder_id = f"dino:{arch}:file-sha256={_file_sha256(weights)}"
        if timm_kwargs:
            # The same weights file under other model arguments (e.g. global_pool="avg")
            # gives other embeddings: they are part of the cache key.
            encoder_id += ":timm=" + json.dumps(dict(timm_kwargs), sort_keys=True, default=repr)
        return _DinoSource(arch, kwargs, weights, encoder_id)
    repo_id = ref if ref.startswith("timm/") else f"timm/{ref}"
    weights = _hub_file(repo_id, "model.safetensors", "DINO", hub_cache_dir)
    # The hub cache keeps files under snapshots/<commit>/: new weights, new cache key.
    encoder_id = f"dino:{repo_id}@{weights.parent.name}"
    return _DinoSource(repo_id.removeprefix("timm/"), kwargs, weights, encoder_id)


def _create_dino(source: _DinoSource, seed: int) -> nn.Module:
    """The timm ViT of ``source``: seeded random weights, or its weights file loaded strictly."""
    import timm
    from safetensors.torch import load_file
    from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn

    if source.weights is None:
        with _seeded(seed):
            tiny: nn.Module = timm.create_model(
                source.model_name, pretrained=False, **source.create_kwargs
            )
        return tiny
    try:
        model = timm.create_model(source.model_name, pretrained=False, **source.create_kwargs)
        if not isinstance(model, VisionTransformer):
            raise ValueError(f"{source.model_name} is not a timm VisionTransformer")
        state_dict = checkpoint_filter_fn(load_file(str(source.weights)), model)
        state_dict = {k: v for k, v in state_dict.items() if not k.startswith("head.")}
        model.load_state_dict(state_dict, strict=True)
    except (RuntimeError, ValueError, KeyError) as exc:
        raise WeightsUnavailableError(
            f"DINO weights {source.weights} do not fit {source.model_name} ({_first_line(exc)})"
        ) from None
    return model


def _register_tiny_clip() -> None:
    import open_clip

    if _TINY_CLIP_NAME in open_clip.list_models():
        return
    # open_clip only registers configs from files; the registry keeps them in memory.
    with tempfile.TemporaryDirectory() as tmp:
        config_path = Path(tmp) / f"{_TINY_CLIP_NAME}.json"
        config_path.write_text(json.dumps(_TINY_CLIP_CONFIG))
        open_clip.add_model_config(config_path)


def load_clip(
    ref: str = DEFAULT_CLIP_MODEL,
    pretrained: str | None = DEFAULT_CLIP_PRETRAINED,
    device: str | torch.device = "cpu",
    *,
    batch_size: int = 16,
    bf16_autocast: bool = False,
    seed: int = 0,
    hub_cache_dir: str | None = None,
) -> ClipEncoder:
    """Load a CLIP encoder: an open_clip architecture with a pretrained tag or local file.

    Args:
        ref: open_clip architecture (``"ViT-B-32"``) or ``"tiny://clip"``.
        pretrained: a pretrained tag (``"openai"``), a ``.safetensors`` path, or ``None``
            (random weights: only meaningful for ``tiny://clip``, where it is ignored).
        device: ``"cpu"``, ``"cuda"``, ``"cuda:1"`` or ``"auto"``.
        batch_size: images or texts per forward pass.
        bf16_autocast: bf16 autocast (CUDA only; ignored on CPU).
        seed: init seed of random models.
        hub_cache_dir: Hugging Face cache folder (default: the hub's own).

    Raises:
        WeightsUnavailableError: unknown tag, weights missing (offline), or a pickle file.
    """
    import open_clip

    torch_device = resolve_device(device)
    with _open_clip_info_muted():
        source = _clip_source(ref, pretrained, seed, hub_cache_dir)
        model, preprocess = _create_clip(source, seed)
        tokenizer = open_clip.get_tokenizer(source.model_name)
    return ClipEncoder(
        model,
        preprocess,
        tokenizer,
        encoder_id=source.encoder_id,
        device=torch_device,
        batch_size=batch_size,
        bf16_autocast=bf16_autocast,
    )


@contextlib.contextmanager
def _open_clip_info_muted() -> Iterator[None]:
    """Drop open_clip's INFO lines ("Parsing tokenizer identifier", "Using default
    SimpleTokenizer", ...): it logs them on the root logger, so every worker's log and every
    CLI run showed them as ``INFO root:``. Its warnings still pass."""

    def keep(record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or "open_clip" not in record.pathname

    root = logging.getLogger()
    root.addFilter(keep)
    try:
        yield
    finally:
        root.removeFilter(keep)


@dataclass(frozen=True)
class _ClipSource:
    """What :func:`load_clip` builds: an open_clip model name, its checkpoint (``None``: random
    weights), the encoder id and extra ``create_model_and_transforms`` arguments."""

    model_name: str
    checkpoint: Path | None
    encoder_id: str
    create_kwargs: dict[str, Any] = field(default_factory=dict)


def _clip_source(
    ref: str, pretrained: str | None, seed: int, hub_cache_dir: str | None
) -> _ClipSource:
    """Resolve a CLIP architecture and pretrained tag or file to its weights."""
    import open_clip

    if ref == TINY_CLIP:
        _register_tiny_clip()
        return _ClipSource(_TINY_CLIP_NAME, None, f"clip:{TINY_CLIP}:seed={seed}")
    if ref.startswith("tiny://"):
        raise WeightsUnavailableError(f"unknown tiny CLIP model {ref!r}; use {TINY_CLIP!r}")
    if ref not in open_clip.list_models():
        raise WeightsUnavailableError(
            f"unknown open_clip architecture {ref!r} (see open_clip.list_models())"
        )
    if pretrained is None:
        logging.getLogger(__name__).warning("CLIP %s has random weights (pretrained=None)", ref)
        return _ClipSource(ref, None, f"clip:{ref}:random:seed={seed}")
    if (
        pretrained.lower().endswith((".safetensors", *_PICKLE_SUFFIXES))
        or Path(pretrained).is_file()
    ):
        checkpoint = _safetensors_file(pretrained, "CLIP")
        return _ClipSource(ref, checkpoint, f"clip:{ref}:file-sha256={_file_sha256(checkpoint)}")
    return _clip_tag_source(ref, pretrained, hub_cache_dir)


def _clip_tag_source(ref: str, pretrained: str, hub_cache_dir: str | None) -> _ClipSource:
    """An open_clip pretrained tag: its safetensors file from the hub, plus the activation and
    preprocessing the tag was trained with."""
    import open_clip

    tag_cfg = open_clip.get_pretrained_cfg(ref, pretrained)
    if not tag_cfg:
        tags = open_clip.list_pretrained_tags_by_model(ref)
        raise WeightsUnavailableError(
            f"unknown pretrained tag {pretrained!r} for {ref}; known tags: {tags}"
        )
    hub = str(tag_cfg.get("hf_hub") or "")
    if not hub:
        raise WeightsUnavailableError(
            f"CLIP {ref}/{pretrained} has no safetensors source on the hub; convert its "
            "checkpoint to .safetensors and pass the file as the pretrained weights"
        )
    repo_id, filename = _hub_safetensors_name(hub)
    checkpoint = _hub_file(repo_id, filename, "CLIP", hub_cache_dir)
    create_kwargs = {
        "force_quick_gelu": bool(tag_cfg.get("quick_gelu", False)),
        "image_mean": tag_cfg.get("mean"),
        "image_std": tag_cfg.get("std"),
        "image_interpolation": tag_cfg.get("interpolation"),
        "image_resize_mode": tag_cfg.get("resize_mode"),
    }
    encoder_id = f"clip:{ref}:{pretrained}@{checkpoint.parent.name}"
    return _ClipSource(ref, checkpoint, encoder_id, create_kwargs)


def _hub_safetensors_name(hub: str) -> tuple[str, str]:
    """``(repo id, file name)`` of the safetensors weights behind an open_clip ``hf_hub`` entry.

    open_clip's convention: ``"org/repo/"`` means the repo's default weights file,
    ``"org/repo/file.bin"`` a named one; either way only the safetensors sibling is used.
    """
    if hub.endswith("/"):
        return hub.rstrip("/"), "open_clip_model.safetensors"
    repo_id, filename = os.path.split(hub)
    # open_clip's default pickle name has a differently named safetensors sibling.
    if filename == "open_clip_pytorch_model.bin":
        filename = "open_clip_model.safetensors"
    return repo_id, Path(filename).with_suffix(".safetensors").name


def _create_clip(source: _ClipSource, seed: int) -> tuple[nn.Module, ImageTransform]:
    """The open_clip model (seeded init, then ``source``'s checkpoint) and its preprocessing."""
    import open_clip

    checkpoint = source.checkpoint
    try:
        with _seeded(seed), _quiet_logging():
            model, _, preprocess = open_clip.create_model_and_transforms(
                source.model_name,
                pretrained=str(checkpoint) if checkpoint is not None else None,
                device="cpu",
                **source.create_kwargs,
            )
    except (RuntimeError, ValueError, KeyError) as exc:
        raise WeightsUnavailableError(
            f"CLIP weights {checkpoint} do not fit {source.model_name} ({_first_line(exc)})"
        ) from None
    return model, preprocess
