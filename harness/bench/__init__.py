"""``harness bench``: seconds per evaluated point, the harness against the naive path.

    harness bench                   # the default preset: tiny models on CPU
    harness bench -p params.yaml    # whatever params.yaml configures (e.g. a GPU preset)
    python -m harness.bench         # the same

Both paths (:mod:`harness.bench.paths`, :mod:`harness.bench.naive`) train one run with the
config's checkpoint steps and evaluate the same points (checkpoint x ``sweep.inference``
setting) on the same prompts and seeds. Each path runs once to warm up, then ``--repeats``
times, interleaved (A B, B A, ...); every figure is the median of the repeats, with min and
max. Absolute figures depend on the machine (the header says which); the ratio on the last
line, ``ratio=<float>`` (naive seconds per point / harness seconds per point), is the result.
"""

from __future__ import annotations

import logging
import os
import platform
import statistics
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from harness.bench.paths import (
    BenchInputs,
    PathRun,
    bench_settings,
    fill_prompts,
    harness_path,
    is_cuda,
)
from harness.bench.stats import Figure, interleaved
from harness.config import HarnessConfig
from harness.errors import HarnessError

__all__ = ["BenchInputs", "Figure", "PathRun", "main", "run_bench", "summarize"]

PATHS = ("naive", "harness")
logger = logging.getLogger(__name__)


def _inputs(cfg: HarnessConfig, work: Path) -> BenchInputs:
    """Prepare the configured subject inside ``work``; the points, prompts and seeds."""
    from harness.data import load_prepared, prepare_subject, with_subject
    from harness.generate import eval_seeds
    from harness.sweep.backend import evaluation_templates

    prepare_subject(cfg.data, work, progress=False)
    subject = load_prepared(work / cfg.data.prepared_dir / cfg.data.subject)
    cfg = with_subject(cfg, subject)
    templates = evaluation_templates(cfg, subject)
    class_name = subject.class_name or cfg.data.class_name or "object"
    return BenchInputs(
        cfg=cfg,
        subject=subject,
        prompts=fill_prompts(templates, subject.token, class_name),
        templates=tuple(templates),
        seeds=tuple(eval_seeds(cfg)),
        settings=bench_settings(cfg),
    )


def measure(
    cfg: HarnessConfig, work: Path, repeats: int = 3
) -> tuple[BenchInputs, dict[str, list[PathRun]], str]:
    """Run both paths (warm-up, then ``repeats`` interleaved passes) inside ``work``.

    Points ``HARNESS_CACHE_DIR`` and ``METRICS_CACHE_DIR`` of this process into ``work``.
    Returns the inputs, the passes of each path and the device's name.
    """
    from harness.bench.naive import naive_path
    from harness.evaluate import make_scorer
    from harness.models import load_pipeline
    from metrics import Scorer

    os.environ["HARNESS_CACHE_DIR"] = str(work / "cache")
    os.environ["METRICS_CACHE_DIR"] = str(work / "metrics-cache")
    inputs = _inputs(cfg, work)
    loaded = load_pipeline(inputs.cfg.model)
    if loaded.family != "sd15":
        raise HarnessError(
            f"model.pretrained: {inputs.cfg.model.pretrained} is {loaded.family}; the benchmark's "
            "naive path is diffusers' SD 1.x example script (use an SD 1.x model)"
        )
    scorer = make_scorer(inputs.cfg, device=str(loaded.device))
    scorer.load_encoders()
    uncached = Scorer(replace(scorer.config, use_cache=False))
    uncached.load_encoders()
    paths = {
        "naive": lambda: naive_path(
            inputs,
            lambda: load_pipeline(inputs.cfg.model).pipeline,
            uncached,
            work / "naive",
            loaded.device,
        ),
        "harness": lambda: harness_path(inputs, loaded, scorer, work / "harness"),
    }
    runs = interleaved({name: _logged(name, run, repeats) for name, run in paths.items()}, repeats)
    return inputs, runs, _device_name(loaded.device)


def _logged(name: str, run: Callable[[], PathRun], repeats: int) -> Callable[[], PathRun]:
    """``run``, with one progress line per pass on the log (a pass can take minutes)."""
    done = [0]

    def logged() -> PathRun:
        result = run()
        label = "warm-up" if done[0] == 0 else f"pass {done[0]}/{repeats}"
        done[0] += 1
        logger.info("bench: %s %s: %.2f s per point", name, label, result.per_point_s)
        return result

    return logged


def _device_name(device: Any) -> str:
    import torch

    if is_cuda(device):
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def summarize(inputs: BenchInputs, runs: dict[str, list[PathRun]], device: str) -> list[str]:
    """The report: a header, one line per figure and path, then ``ratio=<float>``."""
    first = runs["harness"][0]
    header = (
        f"{first.points} points per path ({len(inputs.cfg.train.checkpoint_steps)} checkpoints x "
        f"{len(inputs.settings)} inference settings), {len(inputs.prompts)} prompts x "
        f"{len(inputs.seeds)} seeds each; {inputs.cfg.train.max_steps} training steps; "
        f"device {device}; median of {len(runs['harness'])} interleaved repeats after a warm-up"
    )
    lines = [header]
    figures = {
        "seconds per evaluated point": ("s", lambda r: r.per_point_s),
        "training steps/s": ("steps/s", lambda r: r.train_steps / r.train_s),
        "generation images/s": ("images/s", lambda r: r.images / r.generate_s),
        "scoring images/s": ("images/s", lambda r: r.scored / r.score_s),
    }
    for title, (unit, value) in figures.items():
        for path in PATHS:
            samples = tuple(value(r) for r in runs[path])
            lines.append(Figure(f"{title}, {path}", unit, samples).line())
    for path in PATHS:
        peaks = [r.peak_bytes for r in runs[path] if r.peak_bytes is not None]
        if peaks:
            gib = tuple(p / 2**30 for p in peaks)
            lines.append(Figure(f"peak CUDA memory, {path}", "GiB", gib).line())
    naive = statistics.median(r.per_point_s for r in runs["naive"])
    mine = statistics.median(r.per_point_s for r in runs["harness"])
    lines.append(f"ratio={naive / mine:.4f}")
    return lines


def run_bench(cfg: HarnessConfig, work: Path, repeats: int = 3) -> list[str]:
    """Measure both paths on ``cfg`` inside ``work``; return the report lines."""
    return summarize(*measure(cfg, work, repeats))


def cli_args(argv: Sequence[str]) -> list[str]:
    """``python -m harness.bench`` arguments as ``harness`` arguments: ``-p``/``--params``
    before the ``bench`` command, the rest (``--repeats N``) after it."""
    before: list[str] = []
    after: list[str] = []
    args = iter(argv)
    for arg in args:
        if arg in ("-p", "--params"):
            before += [arg, next(args, "")]
        elif arg.startswith("--params="):
            before.append(arg)
        else:
            after.append(arg)
    return [*before, "bench", *after]


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m harness.bench [-p params.yaml] [--repeats N]``: the ``harness bench`` command
    (its logging, and bad input as one line instead of a traceback)."""
    import sys

    from harness.cli import app

    app(args=cli_args(sys.argv[1:] if argv is None else argv), prog_name="harness")
