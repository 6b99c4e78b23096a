"""Batched, deterministic generation: prompts x seeds x inference settings, for one adapter.

The base pipeline is loaded once; LoRA adapters are loaded under a name, scaled per component
(UNet and text encoders separately) and deleted again, so a sweep evaluates many checkpoints and
scales without reloading the model. Every image has its own seeded generator, so an image depends
only on (adapter, prompt, seed, setting) — never on the batch it was generated in, up to float
rounding in batched kernels (a pixel level or two) — and the same seed gives paired images
across settings.

Output layout (``out_dir``)::

    images/<setting-id>/<prompt-index>-<seed>.png
    manifest.jsonl      one line per image: file, prompt, template, seed, setting, adapter

``manifest.jsonl`` is what ``python -m metrics score --prompts`` reads.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from collections import deque
from collections.abc import Collection, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from harness.config import HarnessConfig, InferenceSetting
from harness.errors import HarnessError
from harness.models import PICKLE_SUFFIXES, LoadedModel, check_weights_file
from harness.outputs import temporary_beside

__all__ = [
    "ADAPTER_NAME",
    "SCHEDULER_CLASSES",
    "SCHEDULER_OPTIONS",
    "GeneratedImage",
    "ImageWriter",
    "Speed",
    "WriteTimes",
    "adapter_loaded",
    "channels_last",
    "compiled_blocks",
    "format_prompt",
    "generate_images",
    "lora_fused",
    "make_scheduler",
    "resolve_adapter",
    "to_uint8",
]

logger = logging.getLogger(__name__)
ADAPTER_NAME = "subject"
LORA_WEIGHTS = "pytorch_lora_weights.safetensors"


@dataclass(frozen=True)
class GeneratedImage:
    """One generated image and everything needed to reproduce and score it."""

    file: str  # relative to the output folder
    prompt: str
    template: str
    prompt_index: int
    seed: int
    setting: InferenceSetting
    adapter: str | None

    def to_json(self) -> dict[str, Any]:
        """Flat JSON record for ``manifest.jsonl``."""
        record = asdict(self)
        record.update(self.setting.model_dump(mode="json"))
        del record["setting"]
        record["setting_id"] = self.setting.id
        return record


def format_prompt(template: str, token: str, class_name: str) -> str:
    """Fill ``{token}``/``{class_name}`` (or DreamBench's ``{0}``/``{1}``) into a template."""
    try:
        return template.format(token, class_name, token=token, class_name=class_name)
    except (IndexError, KeyError) as exc:
        raise HarnessError(
            f"eval.prompts: template {template!r} has an unknown placeholder {exc}; "
            "use {token} and {class_name}"
        ) from None


# Each eval.scheduler by its diffusers class, and the options it is built with from the model's
# own scheduler config (harness.export writes the same into a model card's snippet).
SCHEDULER_CLASSES = {
    "dpmsolver++": "DPMSolverMultistepScheduler",
    "ddim": "DDIMScheduler",
    "ddpm": "DDPMScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler_a": "EulerAncestralDiscreteScheduler",
    "pndm": "PNDMScheduler",
    "unipc": "UniPCMultistepScheduler",
}
SCHEDULER_OPTIONS: dict[str, dict[str, Any]] = {"dpmsolver++": {"algorithm_type": "dpmsolver++"}}


def make_scheduler(name: str, base_config: Any) -> Any:
    """A diffusers scheduler of kind ``name`` built from the model's own scheduler config."""
    import diffusers

    if name not in SCHEDULER_CLASSES:
        raise HarnessError(f"eval.scheduler: unknown scheduler {name!r}")
    scheduler_class = getattr(diffusers, SCHEDULER_CLASSES[name])
    return scheduler_class.from_config(base_config, **SCHEDULER_OPTIONS.get(name, {}))


def _adapter_components(pipeline: Any, name: str) -> list[str]:
    """Components of the pipeline that actually hold adapter ``name``."""
    return [comp for comp, names in pipeline.get_list_adapters().items() if name in names]


def set_lora_scales(pipeline: Any, name: str, unet: float, text_encoder: float) -> None:
    """Scale adapter ``name`` separately in the UNet and the text encoder(s)."""
    weights = {
        comp: (unet if comp in ("unet", "transformer") else text_encoder)
        for comp in _adapter_components(pipeline, name)
    }
    pipeline.set_adapters([name], adapter_weights=[weights])


@contextmanager
def eval_mode(pipeline: Any) -> Iterator[None]:
    """Put the pipeline's networks in eval mode (LoRA dropout off) and restore their modes."""
    modules = [
        m
        for name in ("unet", "text_encoder", "text_encoder_2", "vae")
        if (m := getattr(pipeline, name, None)) is not None
    ]
    modes = [m.training for m in modules]
    for module in modules:
        module.eval()
    try:
        yield
    finally:
        for module, mode in zip(modules, modes, strict=True):
            module.train(mode)


def resolve_adapter(adapter: Path) -> tuple[Path, str]:
    """(folder, weight file name) of a LoRA checkpoint folder or ``.safetensors`` file.

    The file passes :func:`harness.models.check_weights_file` first, so a pickle-based file
    (``.bin``, ``.ckpt``, ``.pt``, ``.pth``), a renamed pickle or a truncated file is refused
    with one line and never reaches ``torch.load``.

    Raises:
        HarnessError: the weights are missing or unsafe (:class:`WeightsFileError`).
    """
    adapter = Path(adapter)
    weights = adapter / LORA_WEIGHTS if adapter.is_dir() else adapter
    if not weights.is_file() and weights.suffix.lower() not in PICKLE_SUFFIXES:
        raise HarnessError(f"adapter: {weights}: LoRA weights not found")
    checked = check_weights_file(weights, "adapter")
    return checked.parent, checked.name


# What torch's load_state_dict says about a state dict of the wrong model (peft loads a LoRA
# through it); every other RuntimeError is the machine's, not the file's.
_FILE_FAULT = re.compile(
    r"size mismatch|Error\(s\) in loading state_dict|Missing key|Unexpected key"
)


def _load_lora(pipeline: Any, folder: Path, weight_name: str, name: str) -> None:
    """``pipeline.load_lora_weights``, a file this model cannot take (another model's LoRA:
    peft's size mismatch; no LoRA keys: diffusers' "Invalid LoRA checkpoint") one error
    naming it."""
    import torch

    try:
        pipeline.load_lora_weights(str(folder), weight_name=weight_name, adapter_name=name)
    except torch.OutOfMemoryError:
        raise
    except (ValueError, KeyError, RuntimeError) as exc:
        if type(exc) is RuntimeError and not _FILE_FAULT.search(str(exc)):
            raise  # a device or driver error (CUDA, NCCL) is not the file's fault
        lines = str(exc).strip().splitlines()
        detail = "; ".join(line.strip() for line in lines[:2]) or type(exc).__name__
        raise HarnessError(
            f"adapter: {folder / weight_name}: not a LoRA this model can load (a LoRA of "
            f"another base model or family?): {detail}"
        ) from None


@contextmanager
def adapter_loaded(pipeline: Any, adapter: Path | None, name: str = ADAPTER_NAME) -> Iterator[bool]:
    """Load a LoRA checkpoint folder (or file) for the duration of the block, then delete it.

    Yields whether an adapter is active. The base weights are untouched afterwards, so the next
    checkpoint can be swapped in without reloading the pipeline.
    """
    if adapter is None:
        yield False
        return
    held = {comp: names for comp, names in pipeline.get_list_adapters().items() if names}
    if held:
        # Loading and unloading around live adapters (e.g. one being trained) would corrupt them.
        raise HarnessError(
            f"adapter: pipeline already holds LoRA adapters {held}; evaluate those in place "
            "(adapter=None) or unload them first"
        )
    folder, weight_name = resolve_adapter(adapter)
    try:
        # Inside the try: an interrupt in the middle of the load must not leave half-injected
        # LoRA layers behind.
        _load_lora(pipeline, folder, weight_name, name)
        yield True
    finally:
        # unload (not delete_adapters): it also removes peft's wrapper modules, so the base
        # pipeline is exactly as it was, state-dict keys included.
        pipeline.unload_lora_weights()


@dataclass(frozen=True)
class Speed:
    """How generation runs, never what it produces: ``eval.fuse_lora``, ``eval.compile`` and
    ``eval.channels_last``."""

    fuse_lora: bool = False
    compile: bool = False
    channels_last: bool = False

    @classmethod
    def of(cls, cfg: HarnessConfig) -> Speed:
        """The ``eval`` section's choices."""
        return cls(
            fuse_lora=cfg.eval.fuse_lora,
            compile=cfg.eval.compile,
            channels_last=cfg.eval.channels_last,
        )


@contextmanager
def lora_fused(pipeline: Any, enabled: bool, name: str = ADAPTER_NAME) -> Iterator[None]:
    """Fuse adapter ``name``, at the scales :func:`set_lora_scales` set, into the base weights
    for the block, then unfuse it and put the base weights back bit for bit.

    Unfusing subtracts the delta again, which in bf16 or fp16 leaves rounding error in the base
    weights; over a sweep's many fuse/unfuse cycles on one pipeline that error would build up,
    so the touched weights are copied before and restored after.
    """
    if not enabled:
        yield
        return
    components = _adapter_components(pipeline, name)
    # Outside inference mode, even inside a caller's: DoRA's fuse and unfuse give the base
    # weights new tensors, which inference mode would make inference tensors, and training
    # on this pipeline afterwards (a sweep evaluates checkpoints mid-run) could not use them.
    with torch.inference_mode(False), torch.no_grad():
        saved = _base_weights(pipeline, components)
        pipeline.fuse_lora(components=components, lora_scale=1.0, adapter_names=[name])
    try:
        yield
    finally:
        with torch.inference_mode(False), torch.no_grad():
            pipeline.unfuse_lora(components=components)
            for param, original in saved:
                param.copy_(original)


def _base_weights(pipeline: Any, components: Sequence[str]) -> list[tuple[Any, Any]]:
    """``(parameter, copy)`` of every base weight and bias under a LoRA layer of ``components``."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    saved = []
    for component in components:
        for module in getattr(pipeline, component).modules():
            if isinstance(module, BaseTunerLayer):
                base = module.get_base_layer()
                saved += [(p, p.detach().clone()) for p in base.parameters(recurse=False)]
    return saved


@contextmanager
def compiled_blocks(pipeline: Any, enabled: bool) -> Iterator[None]:
    """Regional ``torch.compile`` of the denoiser's repeated blocks (diffusers'
    ``_repeated_blocks``, e.g. ``BasicTransformerBlock``) for the block; eager again after it,
    so training on the same pipeline is never compiled."""
    denoiser = getattr(pipeline, "unet", None) or getattr(pipeline, "transformer", None)
    names = set(getattr(denoiser, "_repeated_blocks", None) or ())
    if not enabled or denoiser is None or not names:
        if enabled:
            logger.warning("eval.compile: %s has no repeated blocks to compile", type(denoiser))
        yield
        return
    blocks = [m for m in denoiser.modules() if type(m).__name__ in names]
    for block in blocks:
        block.compile()
    try:
        yield
    finally:
        for block in blocks:
            # What nn.Module.compile() sets; None is the module's eager forward again.
            block._compiled_call_impl = None


@contextmanager
def channels_last(pipeline: Any, enabled: bool) -> Iterator[None]:
    """The UNet and the VAE (a loaded adapter's convolutions included) in the channels-last
    memory layout for the block, the default layout after it.

    Convolutions on tensor cores run in NHWC; with NCHW weights every convolution pays for
    layout transposes. The outputs of a convolution with NHWC weights are NHWC, so the latents
    need no conversion. Only the layout changes, never a value; converting back matters:
    safetensors refuses to save non-contiguous tensors, and training follows on the same
    pipeline. Parameters keep their identity (``Module.to`` sets ``.data``).
    """
    if not enabled:
        yield
        return
    found = (getattr(pipeline, name, None) for name in ("unet", "transformer", "vae"))
    parts: list[Any] = [part for part in found if part is not None]
    for part in parts:
        part.to(memory_format=torch.channels_last)
    try:
        yield
    finally:
        for part in parts:
            part.to(memory_format=torch.contiguous_format)


def _batches(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def generate_images(
    loaded: LoadedModel,
    *,
    templates: Sequence[str],
    token: str,
    class_name: str,
    seeds: Sequence[int],
    settings: Sequence[InferenceSetting],
    out_dir: Path,
    adapter: Path | None = None,
    resolution: int | None = None,
    batch_size: int = 4,
    progress: bool = True,
    skip: Collection[tuple[str, int, int]] = (),
    speed: Speed | None = None,
    writes: WriteTimes | None = None,
) -> list[GeneratedImage]:
    """Generate ``len(templates) x len(seeds)`` images for every setting and write a manifest.

    Args:
        loaded: the base pipeline (loaded once, reused).
        templates: prompt templates with ``{token}``/``{class_name}``.
        seeds: one image per seed and prompt; the same seeds across settings give paired images.
        settings: inference settings to sweep on the same loaded pipeline and adapter.
        out_dir: output folder (images and ``manifest.jsonl``, appended to when it exists).
        adapter: LoRA checkpoint folder or ``.safetensors`` file; ``None`` is the base model.
        resolution: image side in pixels (default: the model's native size).
        batch_size: images per forward pass.
        skip: ``(setting id, prompt index, seed)`` of images that exist already (an earlier,
            smaller evaluation of the same adapter): not generated, not in the result.
        speed: ``eval.fuse_lora``, ``eval.compile`` and ``eval.channels_last`` (default: none).
        writes: filled in with where PNG writing time went (``harness bench --generation``).

    Returns:
        The images' records, in generation order; every image is on disk by then.
    """
    todo = _jobs(templates, seeds, settings, skip)
    out_dir.mkdir(parents=True, exist_ok=True)
    total = sum(len(mine) for mine in todo.values())
    speed = speed or Speed()
    with (
        tqdm(total=total, desc="generate", unit="img", disable=not progress, leave=False) as bar,
        compiled_blocks(loaded.pipeline, speed.compile),
        ImageWriter(out_dir, times=writes) as writer,
    ):
        records = _generate_settings(
            loaded,
            todo,
            token,
            class_name,
            settings,
            writer,
            adapter,
            resolution,
            batch_size,
            bar,
            speed,
        )
    _append_manifest(out_dir, records)
    return records


def _jobs(
    templates: Sequence[str],
    seeds: Sequence[int],
    settings: Sequence[InferenceSetting],
    skip: Collection[tuple[str, int, int]],
) -> dict[str, list[tuple[int, str, int]]]:
    """Per setting id, its ``(prompt index, template, seed)`` jobs that ``skip`` lacks."""
    jobs = [(i, t, s) for i, t in enumerate(templates) for s in seeds]
    return {
        setting.id: [job for job in jobs if (setting.id, job[0], job[2]) not in skip]
        for setting in settings
    }


def _generate_settings(
    loaded: LoadedModel,
    jobs: Mapping[str, Sequence[tuple[int, str, int]]],
    token: str,
    class_name: str,
    settings: Sequence[InferenceSetting],
    writer: ImageWriter,
    adapter: Path | None,
    resolution: int | None,
    batch_size: int,
    bar: tqdm[Any],
    speed: Speed,
) -> list[GeneratedImage]:
    """Each setting's (prompt index, template, seed) jobs (``jobs[setting.id]``), with
    ``adapter`` loaded once.

    Each setting gets its LoRA scales and scheduler; the pipeline's own scheduler is put back.
    """
    pipeline = loaded.pipeline
    base_scheduler = pipeline.scheduler
    records: list[GeneratedImage] = []
    try:
        with (
            adapter_loaded(pipeline, adapter) as active,
            channels_last(pipeline, speed.channels_last),  # after loading: the adapter too
            eval_mode(pipeline),
        ):
            for setting in settings:
                if not jobs[setting.id]:
                    continue
                if active:
                    set_lora_scales(
                        pipeline, ADAPTER_NAME, setting.lora_scale, setting.text_encoder_lora_scale
                    )
                pipeline.scheduler = make_scheduler(setting.scheduler, base_scheduler.config)
                # Fusing outside inference mode (lora_fused); generating inside it.
                with lora_fused(pipeline, active and speed.fuse_lora), torch.inference_mode():
                    for batch in _batches(jobs[setting.id], batch_size):
                        records += _generate_batch(
                            loaded, batch, token, class_name, setting, writer, adapter, resolution
                        )
                        bar.update(len(batch))
    finally:
        pipeline.scheduler = base_scheduler
    return records


def _append_manifest(out_dir: Path, records: Sequence[GeneratedImage]) -> None:
    """Append one JSON line per image to ``out_dir/manifest.jsonl``."""
    with (out_dir / "manifest.jsonl").open("a", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record.to_json(), sort_keys=True) + "\n")


def _generate_batch(
    loaded: LoadedModel,
    batch: Sequence[tuple[int, str, int]],
    token: str,
    class_name: str,
    setting: InferenceSetting,
    writer: ImageWriter,
    adapter: Path | None,
    resolution: int | None,
) -> list[GeneratedImage]:
    prompts = [format_prompt(t, token, class_name) for _, t, _ in batch]
    # One generator per image: its noise does not depend on its neighbours in the batch.
    generators = [torch.Generator("cpu").manual_seed(seed) for _, _, seed in batch]
    kwargs: dict[str, Any] = {}
    if resolution:
        kwargs.update(height=resolution, width=resolution)
    images = loaded.pipeline(
        prompt=prompts,
        generator=generators,
        guidance_scale=setting.guidance_scale,
        num_inference_steps=setting.num_inference_steps,
        output_type="pt",  # bytes, not PIL images, cross to the host: see to_uint8
        **kwargs,
    ).images
    out = []
    for (index, template, seed), prompt, pixels in zip(
        batch, prompts, to_uint8(images), strict=True
    ):
        relative = f"images/{setting.id}/{index:03d}-{seed}.png"
        writer.submit(pixels, relative)
        out.append(
            GeneratedImage(
                file=relative,
                prompt=prompt,
                template=template,
                prompt_index=index,
                seed=seed,
                setting=setting,
                adapter=str(adapter) if adapter else None,
            )
        )
    return out


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """``(B, 3, H, W)`` floats in [0, 1] (a pipeline's ``output_type="pt"``) as ``(B, H, W, 3)``
    uint8 pixels, rounded exactly as diffusers' ``numpy_to_pil`` rounds them (float32 times
    255, round half to even), on the images' device: a quarter of the bytes cross to the
    host, and no float image is converted in Python between GPU batches."""
    pixels = (images.float() * 255).round().to(torch.uint8)
    return pixels.permute(0, 2, 3, 1).cpu().numpy()


@dataclass
class WriteTimes:
    """Where PNG writing time went (seconds, summed): ``encode_s`` on the writer threads,
    overlapped with generation; ``wait_s`` that generation stood waiting for them."""

    images: int = 0
    encode_s: float = 0.0
    wait_s: float = 0.0


class ImageWriter:
    """Encodes and writes PNGs on background threads while the next batch generates.

    zlib at PNG's default level takes ~60 ms per 512 px image on one core (a quarter of an
    image's generation time on an H100), and it releases the GIL, so threads overlap it with
    the accelerator's work. At most ``max_pending`` images wait in memory; ``submit`` blocks
    beyond that. Leaving the block waits for every write and raises the first failure.
    """

    def __init__(
        self,
        out_dir: Path,
        threads: int = 2,
        max_pending: int = 32,
        times: WriteTimes | None = None,
    ) -> None:
        self.out_dir = out_dir
        self.times = times if times is not None else WriteTimes()
        self._max_pending = max_pending
        self._pending: deque[Future[None]] = deque()
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="png-writer")
        self._lock = threading.Lock()

    def __enter__(self) -> ImageWriter:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        try:
            if exc_type is None:
                while self._pending:
                    self._wait_oldest()
        finally:
            # On an error, queued writes are dropped (the manifest is not written either);
            # writes under way finish, so no temporary file is left behind.
            self._pool.shutdown(wait=True, cancel_futures=True)

    def submit(self, pixels: np.ndarray, relative: str) -> None:
        """Write ``(H, W, 3)`` uint8 ``pixels`` to ``out_dir/relative`` (a PNG) in the background."""
        while len(self._pending) >= self._max_pending:
            self._wait_oldest()
        self._pending.append(self._pool.submit(self._write, pixels, self.out_dir / relative))

    def _wait_oldest(self) -> None:
        started = time.perf_counter()
        try:
            self._pending.popleft().result()
        finally:
            self.times.wait_s += time.perf_counter() - started

    def _write(self, pixels: np.ndarray, path: Path) -> None:
        from PIL import Image

        started = time.perf_counter()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            _save_png_atomically(Image.fromarray(pixels), path)
        except OSError as exc:
            raise HarnessError(f"{path}: could not write the image: {exc}") from exc
        with self._lock:
            self.times.images += 1
            self.times.encode_s += time.perf_counter() - started


def eval_seeds(cfg: HarnessConfig) -> list[int]:
    """The evaluation seeds: ``images_per_prompt`` consecutive seeds from ``eval.seed``."""
    return [cfg.eval.seed + i for i in range(cfg.eval.images_per_prompt)]


def _save_png_atomically(image: Any, path: Path) -> None:
    """Write to a unique temporary file, then rename: workers that write the same image (the
    base model's references at the end of every worker's sweep) never let a reader see half
    a file."""
    tmp = temporary_beside(path)
    image.save(tmp, format="PNG")
    tmp.replace(path)
