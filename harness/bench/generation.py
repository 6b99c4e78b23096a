"""``harness bench --generation``: the generation options against each other, measured.

One run is trained with the config's steps; its last checkpoint generates the evaluation
prompts x seeds under every ``sweep.inference`` setting, five ways, interleaved after a
warm-up (which also pays for compilation):

- ``runtime LoRA``: peft scales the adapter at run time (the default);
- ``fused LoRA``: ``eval.fuse_lora``, the scaled adapter fused into the weights per setting;
- ``regional compile``: ``eval.compile``, the denoiser's repeated blocks under torch.compile;
- ``channels last``: ``eval.channels_last``, the UNet and the VAE in the NHWC layout;
- ``all three``: the three options together (whether their gains add up).

Printed: images/s of each (median, min, max); on a CUDA card of known bf16 peak each one's
generation MFU (:mod:`harness.bench.flops`); the time PNG encoding takes on the writer threads
and the time generation stood waiting for them (what overlapping them saves, and whether they
keep up); then each option's speed-up over the default, one ``<name>_ratio=<float>`` line each,
``compile_ratio=`` last. The same images come out of all of them (to rounding), so the faster
option can be switched on without changing any score.
"""

from __future__ import annotations

import logging
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from harness.bench.paths import BenchInputs, sync_device
from harness.bench.stats import Figure, interleaved, logged_passes

if TYPE_CHECKING:
    from harness.bench.flops import ModelFlops
    from harness.models import LoadedModel

__all__ = ["RATIOS", "VARIANTS", "GenerationPass", "generation_lines", "measure_generation"]

logger = logging.getLogger(__name__)

VARIANTS = {
    "runtime LoRA": {},
    "fused LoRA": {"fuse_lora": True},
    "regional compile": {"compile": True},
    "channels last": {"channels_last": True},
    "all three": {"fuse_lora": True, "compile": True, "channels_last": True},
}
# The ratio lines, in print order, and the variant each one divides by the default's images/s;
# ``compile_ratio`` stays last, where it has always been.
RATIOS = {
    "fused_ratio": "fused LoRA",
    "channels_last_ratio": "channels last",
    "all_ratio": "all three",
    "compile_ratio": "regional compile",
}


@dataclass(frozen=True)
class GenerationPass:
    """One timed pass: images/s, and PNG writing's milliseconds per image."""

    images_per_s: float
    encode_ms: float  # on the writer threads, overlapped with generation
    wait_ms: float  # generation waiting for the writers


def measure_generation(
    inputs: BenchInputs, loaded: LoadedModel, work: Path, repeats: int
) -> dict[str, list[GenerationPass]]:
    """Each variant's passes: ``repeats`` interleaved ones (after a warm-up)."""
    from harness.generate import Speed, WriteTimes, generate_images
    from harness.train import train_lora

    cfg = inputs.cfg
    trained = train_lora(cfg, loaded, inputs.pairs, work / "run", resume=False, progress=False)
    adapter = trained.checkpoints[-1].path
    passes = [0]

    def variant(name: str, options: dict[str, Any]) -> Any:
        def run() -> GenerationPass:
            passes[0] += 1
            writes = WriteTimes()
            sync_device(loaded.device)
            started = time.perf_counter()
            records = generate_images(
                loaded,
                templates=inputs.templates,
                token=inputs.subject.token,
                class_name=inputs.class_name,
                seeds=inputs.seeds,
                settings=inputs.settings,
                out_dir=work / "images" / f"{passes[0]:03d}",
                adapter=adapter,
                resolution=cfg.eval.resolution or cfg.data.resolution,
                batch_size=cfg.eval.batch_size,
                progress=False,
                speed=Speed(**options),
                writes=writes,
            )
            sync_device(loaded.device)
            n = max(len(records), 1)
            return GenerationPass(
                images_per_s=len(records) / (time.perf_counter() - started),
                encode_ms=1000 * writes.encode_s / n,
                wait_ms=1000 * writes.wait_s / n,
            )

        return run

    runs = {
        name: logged_passes(f"generation, {name}", variant(name, o), repeats, _described, logger)
        for name, o in VARIANTS.items()
    }
    return interleaved(runs, repeats)


def _described(result: GenerationPass) -> str:
    return (
        f"{result.images_per_s:.4g} images/s; PNG encoding {result.encode_ms:.3g} ms/image, "
        f"waited {result.wait_ms:.3g} ms/image"
    )


def generation_lines(
    inputs: BenchInputs,
    runs: dict[str, list[GenerationPass]],
    device: str,
    flops: ModelFlops | None = None,
) -> list[str]:
    """The report: a header, images/s per variant, with ``flops`` on a card of known bf16 peak
    each variant's generation MFU, PNG writing, the speed-ups, ``compile_ratio=`` last."""
    images = len(inputs.templates) * len(inputs.seeds) * len(inputs.settings)
    lines = [
        f"{images} images per pass ({len(inputs.templates)} prompts x {len(inputs.seeds)} seeds "
        f"x {len(inputs.settings)} inference settings, one checkpoint); device {device}; "
        f"median of {len(runs['runtime LoRA'])} interleaved repeats after a warm-up"
    ]
    lines += [
        Figure(f"generation, {name}", "images/s", tuple(p.images_per_s for p in r)).line()
        for name, r in runs.items()
    ]
    lines += _mfu_lines(inputs, runs, device, flops)
    default = runs["runtime LoRA"]
    lines += [
        Figure(
            "PNG encoding, on writer threads", "ms/image", tuple(p.encode_ms for p in default)
        ).line(),
        Figure(
            "PNG writing, generation waited", "ms/image", tuple(p.wait_ms for p in default)
        ).line(),
    ]
    base = statistics.median(p.images_per_s for p in default)
    return lines + [
        f"{key}={statistics.median(p.images_per_s for p in runs[name]) / base:.4f}"
        for key, name in RATIOS.items()
    ]


def _mfu_lines(
    inputs: BenchInputs,
    runs: dict[str, list[GenerationPass]],
    device: str,
    flops: ModelFlops | None,
) -> list[str]:
    """Each variant's generation MFU (none without counted FLOPs; a line saying why for a
    card whose bf16 peak is not known)."""
    from harness.bench.flops import mfu, peak_flops, unknown_peak

    if flops is None:
        return []
    peak = peak_flops(device)
    if peak is None:
        return [unknown_peak(device)]
    image = flops.mean_image(inputs.settings)
    return [
        Figure(
            f"generation MFU, {name}",
            "%",
            tuple(100 * mfu(image * p.images_per_s, 1.0, peak) for p in r),
        ).line()
        for name, r in runs.items()
    ]
