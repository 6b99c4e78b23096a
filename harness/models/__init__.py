"""Model loading: the only place that calls ``from_pretrained`` / ``from_single_file``.

A model reference (``model.pretrained``) is one of

* ``tiny://sd15`` or ``tiny://sdxl``: tiny seeded random pipelines, cached on disk as diffusers
  folders (see :mod:`harness.models.tiny`);
* ``random://sd15``: the full-size SD 1.5 architecture with random weights, built in memory on
  its device (for ``harness bench`` on a GPU: speed does not depend on the weights);
* a local diffusers folder (holds ``model_index.json``), with ``model.variant``;
* a single-file ``.safetensors`` checkpoint in the original (LDM) layout;
* a Hugging Face hub id (``owner/name``), with ``model.revision`` and ``model.variant``.

A relative path (``model.pretrained``, ``model.single_file_config``) starts at the project root
when the caller passes it (``root``), as every other config path does.

SD 1.x versus SDXL is decided from the loaded components (a second text encoder and a UNet with
``text_time`` additional embeddings mean SDXL), never from the name. Only safetensors weights are
accepted and ``trust_remote_code`` is never used. A hub id that is not in the local cache while
offline fails at once with instructions, instead of a long retry loop.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlparse

import torch

from harness.config import ModelConfig
from harness.errors import HarnessError
from harness.models.tiny import TINY_KINDS, build_random_sd15, tiny_pipeline_dir

__all__ = [
    "PICKLE_SUFFIXES",
    "Family",
    "LoadedModel",
    "ModelLoadError",
    "ModelRef",
    "WeightsFileError",
    "check_weights_file",
    "detect_family",
    "load_pipeline",
    "load_tokenizer",
    "parse_model_ref",
    "resolve_device",
    "resolve_dtype",
    "rooted_model",
]

logger = logging.getLogger(__name__)

Family = Literal["sd15", "sdxl"]
RefKind = Literal["tiny", "random", "local_dir", "single_file", "hub"]

_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
PICKLE_SUFFIXES = frozenset({".ckpt", ".bin", ".pt", ".pth", ".pkl"})


class ModelLoadError(HarnessError, RuntimeError):
    """A model could not be loaded; the message says what to do about it."""


class WeightsFileError(ModelLoadError):
    """A weights file is pickle-based (refused), missing, or not a readable safetensors file."""


def check_weights_file(path: str | Path, what: str) -> Path:
    """The one gate for every weights file the harness loads: base model, LoRA, training state.

    Only ``.safetensors`` files are accepted (anything else may be unpickled by torch, which can
    run arbitrary code), and the file's header must parse, which catches a truncated file and
    a pickle renamed to ``.safetensors`` without reading the tensors.

    Args:
        path: the file.
        what: where it came from (``model.pretrained``, ``adapter``...), for the message.

    Raises:
        WeightsFileError: one line naming ``what`` and the file.
    """
    path = Path(path).expanduser()
    suffix = path.suffix.lower()
    if suffix in PICKLE_SUFFIXES:
        raise WeightsFileError(
            f"{what}: {path}: pickle-based checkpoints ({suffix}) can run arbitrary code when "
            "loaded and are refused; use a .safetensors file"
        )
    if suffix != ".safetensors":
        raise WeightsFileError(f"{what}: {path}: only .safetensors weight files are accepted")
    if not path.is_file():
        raise WeightsFileError(f"{what}: {path}: file not found")
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            handle.keys()
    except Exception as exc:  # SafetensorError (no public class), OSError
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise WeightsFileError(
            f"{what}: {path}: not a valid safetensors file ({reason}); it may be truncated "
            "or a pickle checkpoint renamed to .safetensors"
        ) from None
    return path


@dataclass(frozen=True)
class ModelRef:
    """A parsed ``model.pretrained`` value."""

    kind: RefKind
    value: str


@dataclass
class LoadedModel:
    """A loaded pipeline with what the rest of the harness needs to know about it."""

    pipeline: Any
    family: Family
    ref: ModelRef
    device: torch.device
    dtype: torch.dtype


def _rooted(path_text: str, root: Path | None) -> Path:
    """A config path as the harness reads it: a relative one starts at the project ``root``
    (the params file's folder, where every other config path starts), not at the working
    directory; without a root (a caller that has none) the working directory it is."""
    path = Path(path_text).expanduser()
    return root / path if root is not None and not path.is_absolute() else path


def rooted_model(cfg: ModelConfig, root: Path) -> ModelConfig:
    """``cfg`` with a relative local ``model.pretrained`` / ``model.single_file_config`` and a
    relative ``model.cache_dir`` made absolute at ``root``: for code that runs in another
    folder (``harness bench`` works in a temporary one). Not for a sweep's config, whose model
    reference is part of the study's identity, the same in every copy of the project."""
    update = {}
    for key in ("pretrained", "single_file_config"):  # a hub id stays one
        value = getattr(cfg, key)
        if value and "://" not in value and _rooted(value, root).exists():
            update[key] = str(_rooted(value, root).resolve())
    if cfg.cache_dir:  # a folder to create, if need be: never a hub id
        update["cache_dir"] = str(_rooted(cfg.cache_dir, root).resolve())
    return cfg.model_copy(update=update)


def parse_model_ref(pretrained: str, root: Path | None = None) -> ModelRef:
    """Classify a model reference without loading anything (a single file's header is read).

    Args:
        pretrained: the ``model.pretrained`` value.
        root: the project root a relative path starts at (default: the working directory).

    Raises:
        ModelLoadError: for unknown tiny models, or strings that are neither an existing path
            nor a hub id; :class:`WeightsFileError` for pickle-based files and ``.safetensors``
            files that are missing, truncated or not safetensors at all.
    """
    if pretrained.startswith("tiny://"):
        name = pretrained.removeprefix("tiny://")
        if name not in TINY_KINDS:
            raise ModelLoadError(
                f"model.pretrained: unknown tiny model {pretrained!r}; use "
                + " or ".join(f"tiny://{k}" for k in TINY_KINDS)
            )
        return ModelRef("tiny", name)
    if pretrained.startswith("random://"):
        if pretrained != "random://sd15":
            raise ModelLoadError(
                f"model.pretrained: unknown random model {pretrained!r}; use random://sd15"
            )
        return ModelRef("random", "sd15")
    path = _rooted(pretrained, root)
    if path.suffix.lower() in PICKLE_SUFFIXES:
        check_weights_file(path, "model.pretrained")  # raises: pickle-based
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise ModelLoadError(
                f"model.pretrained: {pretrained}: folder has no model_index.json "
                "(expected a diffusers pipeline folder)"
            )
        return ModelRef("local_dir", str(path))
    if path.suffix.lower() == ".safetensors":
        return ModelRef("single_file", str(check_weights_file(path, "model.pretrained")))
    if _HUB_ID.match(pretrained) and not path.exists():
        return ModelRef("hub", pretrained)
    raise ModelLoadError(
        f"model.pretrained: {pretrained!r} is neither an existing diffusers folder, a "
        ".safetensors file, a hub id (owner/name) nor tiny://sd15|tiny://sdxl"
    )


def resolve_device(device: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; ``cuda`` without a GPU is an error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError("model.device: 'cuda' requested but no CUDA device is available")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """The weights' dtype; half precision on CPU falls back to float32 (with a warning)."""
    wanted = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    if device.type == "cpu" and wanted != torch.float32:
        logger.warning("model.dtype %s on CPU is slow or unsupported; using float32", dtype)
        return torch.float32
    return wanted


def detect_family(pipeline: Any) -> Family:
    """SD 1.x-family or SDXL, from the components' configs (never from a name)."""
    unet = getattr(pipeline, "unet", None)
    if unet is None:
        raise ModelLoadError("pipeline has no UNet; only UNet-based Stable Diffusion is supported")
    addition = unet.config.get("addition_embed_type")
    if getattr(pipeline, "text_encoder_2", None) is not None and addition == "text_time":
        return "sdxl"
    if getattr(pipeline, "text_encoder", None) is not None and addition is None:
        return "sd15"
    raise ModelLoadError(
        f"unsupported architecture: UNet addition_embed_type={addition!r} with "
        f"text encoders {[n for n in ('text_encoder', 'text_encoder_2') if getattr(pipeline, n, None) is not None]}"
    )


def _hf_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in {"1", "true", "yes", "on"}


def _behind_proxy(scheme: str, host: str) -> bool:
    """Do the environment's proxy variables (``HTTPS_PROXY``, ``ALL_PROXY``..., either case)
    send requests for ``host`` through a proxy (``NO_PROXY`` honoured)?"""
    proxies = urllib.request.getproxies_environment()
    if not (proxies.get(scheme) or proxies.get("all")):
        return False
    return not urllib.request.proxy_bypass(host)


def _hub_reachable(timeout_s: float = 3.0) -> bool:
    """Can we open a TCP connection to the hub endpoint within ``timeout_s``?

    Behind an HTTP(S) proxy a direct connection is often blocked while huggingface_hub, which
    honours the proxy variables, downloads fine: then the hub counts as reachable and
    huggingface_hub itself decides (a wrong proxy fails there, with its own message).
    """
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    parsed = urlparse(endpoint)
    if _behind_proxy(parsed.scheme or "https", parsed.hostname or ""):
        return True
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        with socket.create_connection((parsed.hostname or "", port), timeout=timeout_s):
            return True
    except OSError:
        return False


def _hub_snapshot(repo_id: str, revision: str | None, cache_dir: str | None) -> Path | None:
    """The local cache's snapshot folder of ``repo_id`` at ``revision``, named by its commit
    (None: not downloaded); what a load from the cache uses."""
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(
        repo_id, "model_index.json", cache_dir=cache_dir, revision=revision
    )
    # <cache>/models--owner--name/snapshots/<commit>/model_index.json
    return Path(found).parent if isinstance(found, str) else None


def _hub_cached(repo_id: str, revision: str | None, cache_dir: str | None) -> bool:
    return _hub_snapshot(repo_id, revision, cache_dir) is not None


def _offline_help(repo_id: str) -> str:
    offline = _hf_offline()
    why = "HF_HUB_OFFLINE is set" if offline else "the hub cannot be reached (offline)"
    return (
        f"model.pretrained: hub model {repo_id!r} is not in the local Hugging Face cache and "
        f"{why}. Supply the weights one of these ways: download them on a connected machine "
        f"(`huggingface-cli download {repo_id}`) and copy the cache (HF_HOME or "
        "model.cache_dir); or point model.pretrained at a local diffusers folder or a "
        ".safetensors single-file checkpoint."
        + ("" if offline else " Set HF_HUB_OFFLINE=1 to use only the cache.")
    )


def _hub_local_only(repo_id: str, revision: str | None, cache_dir: str | None) -> bool:
    """Decide quickly whether to load from cache only; raise when that cannot work."""
    cached = _hub_cached(repo_id, revision, cache_dir)
    if _hf_offline():
        if not cached:
            raise ModelLoadError(_offline_help(repo_id))
        return True
    if _hub_reachable():
        return False
    if not cached:
        raise ModelLoadError(_offline_help(repo_id))
    logger.warning("hub unreachable; loading %s from the local cache only", repo_id)
    return True


def _pipeline_class_for_checkpoint(path: str) -> Any:
    """Choose the pipeline class from the checkpoint's tensor names (its content)."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    from safetensors import safe_open

    with safe_open(path, framework="pt") as handle:
        keys = list(handle.keys())
    if any(k.startswith("conditioner.embedders.1.") for k in keys):
        return StableDiffusionXLPipeline
    if any(k.startswith("model.diffusion_model.") for k in keys):
        return StableDiffusionPipeline
    raise ModelLoadError(
        f"model.pretrained: {path}: not a Stable Diffusion single-file checkpoint "
        "(no model.diffusion_model.* tensors)"
    )


def _config_source(cfg: ModelConfig, root: Path | None) -> str | None:
    """``model.single_file_config`` as diffusers takes it: a local folder (a relative one
    starts at the project root) or else a hub id."""
    value = cfg.single_file_config
    if not value:  # unset (an empty string too: it would name the root folder itself)
        return None
    folder = _rooted(value, root)
    return str(folder) if folder.is_dir() else value


def _load_single_file(
    ref: ModelRef, cfg: ModelConfig, dtype: torch.dtype, root: Path | None
) -> Any:
    """A single-file checkpoint, its component configs inferred or from ``single_file_config``."""
    cls = _pipeline_class_for_checkpoint(ref.value)
    kwargs: dict[str, Any] = {"torch_dtype": dtype}  # from_single_file still spells it so
    local_only = _hf_offline()
    config = _config_source(cfg, root)
    if config is not None:
        kwargs["config"] = config
        local_only = Path(config).is_dir() or _hub_local_only(config, None, cfg.cache_dir)
    if cls.__name__ == "StableDiffusionPipeline":
        kwargs.update(safety_checker=None, requires_safety_checker=False)
    return cls.from_single_file(
        ref.value, local_files_only=local_only, cache_dir=cfg.cache_dir, **kwargs
    )


def _load(
    ref: ModelRef,
    cfg: ModelConfig,
    dtype: torch.dtype,
    cache_root: Path | None,
    root: Path | None = None,
) -> Any:
    from diffusers import DiffusionPipeline

    common: dict[str, Any] = {"dtype": dtype, "use_safetensors": True}
    if ref.kind == "tiny":
        folder = tiny_pipeline_dir(ref.value, cache_root)  # type: ignore[arg-type]
        return DiffusionPipeline.from_pretrained(folder, local_files_only=True, **common)
    if ref.kind == "random":
        # Built where it runs (a GPU initialises a billion weights in a blink), never saved.
        return build_random_sd15(device=resolve_device(cfg.device)).to(dtype=dtype)
    if ref.kind == "local_dir":
        # A folder saved with save_pretrained(variant="fp16") holds only *.fp16.safetensors.
        return DiffusionPipeline.from_pretrained(
            ref.value, local_files_only=True, safety_checker=None, variant=cfg.variant, **common
        )
    if ref.kind == "single_file":
        return _load_single_file(ref, cfg, dtype, root)
    local_only = _hub_local_only(ref.value, cfg.revision, cfg.cache_dir)
    return DiffusionPipeline.from_pretrained(
        ref.value,
        revision=cfg.revision,
        variant=cfg.variant,
        cache_dir=cfg.cache_dir,
        local_files_only=local_only,
        safety_checker=None,  # it blacks out images and would distort the metrics
        **common,
    )


@contextmanager
def _no_loading_bars() -> Iterator[None]:
    """diffusers' and transformers' per-component loading bars, off while a pipeline loads:
    a sweep loads and swaps often, and one log line with the load time says what they say."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    was = (
        diffusers_logging.is_progress_bar_enabled(),
        transformers_logging.is_progress_bar_enabled(),
    )
    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was[0]:
            diffusers_logging.enable_progress_bar()
        if was[1]:
            transformers_logging.enable_progress_bar()


_VARIANT_FILE = re.compile(r"\.([A-Za-z0-9_]+)(?:-\d+-of-\d+)?\.safetensors$")


def _local_dir_hint(folder: Path, variant: str | None) -> str:
    """What a failed load of a local diffusers folder most likely means, from its files."""
    files = [p for p in folder.rglob("*") if p.is_file()]
    if any(p.suffix.lower() in PICKLE_SUFFIXES for p in files):
        return " (only safetensors weights are accepted)"
    found = sorted({m.group(1) for p in files if (m := _VARIANT_FILE.search(p.name))})
    if found and variant not in found:
        # save_pretrained(variant=...) writes only <name>.<variant>.safetensors files.
        names = " / ".join(map(repr, found))
        return f" (the folder holds {names} variant weights: set model.variant)"
    return ""


def _load_failure(exc: Exception, ref: ModelRef, cfg: ModelConfig) -> ModelLoadError:
    """The user error for a library's failure to load ``ref``: one line naming the key."""
    from diffusers.loaders.single_file_utils import SingleFileComponentError

    where = f"model.pretrained: {cfg.pretrained}"
    if isinstance(exc, SingleFileComponentError):
        # diffusers' first line names the component; the rest is multi-line code advice.
        first = (str(exc).strip().splitlines() or ["a component's weights are missing"])[0]
        return ModelLoadError(
            f"{where}: {first.rstrip('.')}; use a single-file checkpoint that holds every "
            "component (UNet, VAE, text encoders), a diffusers folder or a hub id "
            "(model.single_file_config supplies the components' configs, not their weights)"
        )
    if ref.kind == "local_dir":
        hint = _local_dir_hint(Path(ref.value), cfg.variant)
    elif "safetensors" in str(exc).lower() or ".bin" in str(exc):
        hint = " (only safetensors weights are accepted)"
    else:
        hint = ""
    text = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
    text = text or type(exc).__name__
    return ModelLoadError(f"{where}: {text}{hint}")


def load_pipeline(
    cfg: ModelConfig, cache_root: Path | None = None, root: Path | None = None
) -> LoadedModel:
    """Load the base pipeline named by ``cfg`` onto its device, in eval mode.

    Args:
        cfg: the ``model`` section of the config.
        cache_root: where tiny models are cached (default ``HARNESS_CACHE_DIR`` or
            ``~/.cache/harness``).
        root: the project root (the params file's folder) that relative ``model.pretrained``
            and ``model.single_file_config`` paths start at; default: the working directory.

    Raises:
        ModelLoadError: with a message that says how to fix the reference or supply weights.
    """
    ref = parse_model_ref(cfg.pretrained, root)
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    # Imported after the checks above: a bad reference fails before diffusers loads.
    from diffusers.loaders.single_file_utils import SingleFileComponentError

    started = time.perf_counter()
    try:
        with _no_loading_bars():
            pipeline = _load(ref, cfg, dtype, cache_root, root)
    except ModelLoadError:
        raise
    except (OSError, ValueError, SingleFileComponentError) as exc:
        raise _load_failure(exc, ref, cfg) from exc
    family = detect_family(pipeline)
    pipeline.to(device)
    pipeline.set_progress_bar_config(disable=True)
    logger.info(
        "loaded %s (%s, %s) on %s in %.1fs",
        cfg.pretrained,
        family,
        dtype,
        device,
        time.perf_counter() - started,
    )
    return LoadedModel(pipeline=pipeline, family=family, ref=ref, device=device, dtype=dtype)


def _tokenizer_source(
    cfg: ModelConfig, ref: ModelRef, root: Path | None
) -> tuple[str, dict[str, Any]] | None:
    """Where the model's first tokenizer lies on disk: (diffusers folder or hub id, options)."""
    if ref.kind == "local_dir":
        return ref.value, {}
    hub = ref.value if ref.kind == "hub" else _config_source(cfg, root)
    if hub is None:
        return None
    if Path(hub).is_dir():
        return hub, {}
    revision = cfg.revision if ref.kind == "hub" else None
    if not _hub_cached(hub, revision, cfg.cache_dir):
        return None
    return hub, {"revision": revision, "cache_dir": cfg.cache_dir}


def load_tokenizer(cfg: ModelConfig, root: Path | None = None) -> tuple[Any, str] | None:
    """The model's own (first) tokenizer from local files, with where it came from, or None
    when only a download could supply it or the model has none on disk: ``tiny://`` and
    ``random://`` models use the offline CLIP BPE, whose ids are SD's (the caller falls back
    to it). Never downloads and never loads weights. Relative paths start at ``root`` (the
    project root; default: the working directory), as in :func:`load_pipeline`."""
    from transformers import CLIPTokenizer

    ref = parse_model_ref(cfg.pretrained, root)
    if ref.kind in ("tiny", "random"):
        return None
    source = _tokenizer_source(cfg, ref, root)
    if source is None:
        return None
    where, options = source
    try:
        tokenizer = CLIPTokenizer.from_pretrained(
            where, subfolder="tokenizer", local_files_only=True, **options
        )
    except (OSError, ValueError) as exc:
        logger.info("no local tokenizer for %s (%s)", cfg.pretrained, exc)
        return None
    return tokenizer, f"{cfg.pretrained} (tokenizer)"
