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

With adaptive evaluation configured (``sweep.evaluation: {rungs, keep_fraction}``) the harness
path evaluates adaptively and a third path, ``harness exhaustive``, evaluates every point at
the full protocol: the bench then also prints the recall of the exhaustive top-5 among the
adaptive top-5 full-fidelity points, the share of the images generated, and the ratio with
exhaustive evaluation. The ``tiny-adaptive`` preset is a grid where that comparison is
affordable on a CPU: ``harness -S preset=tiny-adaptive bench``.

``harness bench --agreement [--reference ddim:50]`` checks instead that the configured sampler
ranks the points as a many-step reference does (:mod:`harness.bench.agreement`);
``harness bench --generation`` measures fused LoRA, regional compilation and the
channels-last layout against the runtime-scaled LoRA (:mod:`harness.bench.generation`).
"""

from __future__ import annotations

import logging
import os
import platform
import statistics
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from harness.bench.paths import (
    BenchInputs,
    PathRun,
    adaptive_recall,
    bench_settings,
    fill_prompts,
    harness_path,
    is_cuda,
)
from harness.bench.stats import Figure, interleaved, logged_passes
from harness.config import AdaptiveEvaluation, HarnessConfig
from harness.errors import HarnessError

if TYPE_CHECKING:
    from harness.bench.flops import ModelFlops
    from harness.models import LoadedModel

__all__ = [
    "BenchInputs",
    "Figure",
    "PathRun",
    "link_dvc_cache",
    "main",
    "rooted_config",
    "run_agreement",
    "run_bench",
    "run_generation",
    "summarize",
]

EXHAUSTIVE = "harness exhaustive"
PATHS = ("naive", "harness", EXHAUSTIVE)
logger = logging.getLogger(__name__)
# A figure of one pass: its unit, and its value from the pass (None: the pass has none).
PassFigure = tuple[str, Callable[[PathRun], float | None]]


def rooted_config(cfg: HarnessConfig, root: Path) -> HarnessConfig:
    """``cfg`` with the project's inputs as absolute paths at ``root``: the model
    (:func:`harness.models.rooted_model`) and the subject's source folders (``data.raw_dir``,
    ``data.dreambench_dir``). The bench works in a temporary folder, where a relative input
    path would name nothing; its outputs (``data.prepared_dir``) stay relative, inside it."""
    from harness.data.files import resolve_path
    from harness.models import rooted_model

    data = {
        key: str(resolve_path(value, root))
        for key in ("raw_dir", "dreambench_dir")
        if (value := getattr(cfg.data, key))
    }
    return cfg.model_copy(
        update={"model": rooted_model(cfg.model, root), "data": cfg.data.model_copy(update=data)}
    )


def link_dvc_cache(root: Path, work: Path) -> None:
    """Link ``work/.dvc/cache`` to the project's DVC cache, if it has one: a subject's photos
    may be links into it (``dvc checkout`` with symlinks), which preparing accepts only inside
    the cache of the folder it prepares in."""
    cache = root / ".dvc" / "cache"
    if cache.is_dir() and not (work / ".dvc" / "cache").exists():
        (work / ".dvc").mkdir(parents=True, exist_ok=True)
        (work / ".dvc" / "cache").symlink_to(cache.resolve(), target_is_directory=True)


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


def _setup(cfg: HarnessConfig, work: Path) -> tuple[BenchInputs, LoadedModel, Any]:
    """The prepared inputs, the loaded pipeline and a scorer with its encoders loaded.

    Points ``HARNESS_CACHE_DIR`` and ``METRICS_CACHE_DIR`` of this process into ``work``.
    """
    from harness.evaluate import make_scorer
    from harness.models import load_pipeline

    os.environ["HARNESS_CACHE_DIR"] = str(work / "cache")
    os.environ["METRICS_CACHE_DIR"] = str(work / "metrics-cache")
    inputs = _inputs(cfg, work)
    loaded = load_pipeline(inputs.cfg.model)
    scorer = make_scorer(inputs.cfg, device=str(loaded.device))
    scorer.load_encoders()
    return inputs, loaded, scorer


def measure(
    cfg: HarnessConfig, work: Path, repeats: int = 3
) -> tuple[BenchInputs, dict[str, list[PathRun]], str, ModelFlops | None]:
    """Run both paths (warm-up, then ``repeats`` interleaved passes) inside ``work``.

    Returns the inputs, the passes of each path, the device's name and, on CUDA, the model's
    counted FLOPs.
    """
    from harness.bench.naive import naive_path
    from harness.models import load_pipeline
    from metrics import Scorer

    inputs, loaded, scorer = _setup(cfg, work)
    if loaded.family != "sd15":
        raise HarnessError(
            f"model.pretrained: {inputs.cfg.model.pretrained} is {loaded.family}; the benchmark's "
            "naive path is diffusers' SD 1.x example script (use an SD 1.x model)"
        )
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
    if inputs.cfg.sweep.evaluation != "exhaustive":
        # The exhaustive reference: its seconds, and the top points adaptive must find.
        paths[EXHAUSTIVE] = lambda: harness_path(
            inputs, loaded, scorer, work / "exhaustive", evaluation="exhaustive"
        )
    device, flops = _device_name(loaded.device), _model_flops(inputs, loaded)
    # Each pass logs its own figures: a run cut short by a time limit still says something.
    figures = pass_figures(inputs, device, flops)
    logged = {
        name: logged_passes(name, run, repeats, lambda r: pass_line(r, figures), logger)
        for name, run in paths.items()
    }
    return inputs, interleaved(logged, repeats), device, flops


def _model_flops(inputs: BenchInputs, loaded: LoadedModel) -> ModelFlops | None:
    """Counted model FLOPs for the MFU lines, on CUDA only (no peak to compare with on CPU)."""
    from harness.bench.flops import count_flops

    if not is_cuda(loaded.device):
        return None
    return count_flops(loaded.pipeline, inputs.cfg.eval.resolution or inputs.cfg.data.resolution)


def pass_line(run: PathRun, figures: dict[str, PassFigure]) -> str:
    """One pass's figures on one line: ``seconds per evaluated point 4.2 s; training steps/s
    10.8; ...``
    (a figure the pass has no value for, such as peak memory on a CPU, is left out)."""
    parts = []
    for title, (unit, value) in figures.items():
        number = value(run)
        if number is not None:  # the unit, unless the title says it ("training steps/s")
            parts.append(f"{title} {number:.4g}" + ("" if title.endswith(unit) else f" {unit}"))
    return "; ".join(parts)


def _device_name(device: Any) -> str:
    import torch

    if is_cuda(device):
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def summarize(
    inputs: BenchInputs,
    runs: dict[str, list[PathRun]],
    device: str,
    flops: ModelFlops | None = None,
) -> list[str]:
    """The report: a header, one line per figure and path (with ``flops``, the model FLOP
    utilisation of training and generation too), then ``ratio=<float>``."""
    first, paths = runs["harness"][0], [p for p in PATHS if p in runs]
    evaluation = inputs.cfg.sweep.evaluation
    mode = "exhaustive" if evaluation == "exhaustive" else f"adaptive {_describe(evaluation)}"
    header = (
        f"{first.points} points per path ({len(inputs.cfg.train.checkpoint_steps)} checkpoints x "
        f"{len(inputs.settings)} inference settings), {len(inputs.prompts)} prompts x "
        f"{len(inputs.seeds)} seeds each; harness evaluation {mode}; "
        f"{inputs.cfg.train.max_steps} training steps; device {device}; median of "
        f"{len(runs['harness'])} interleaved repeats after a warm-up"
    )
    from harness.bench.flops import peak_flops, unknown_peak

    lines = [header]
    for title, (unit, value) in pass_figures(inputs, device, flops).items():
        for path in paths:
            samples = tuple(v for v in map(value, runs[path]) if v is not None)
            if samples:
                lines.append(Figure(f"{title}, {path}", unit, samples).line())
    if flops is not None and peak_flops(device) is None:
        lines.append(unknown_peak(device))
    naive = statistics.median(r.per_point_s for r in runs["naive"])
    if EXHAUSTIVE in runs:
        lines += _adaptive_lines(runs, naive)
    mine = statistics.median(r.per_point_s for r in runs["harness"])
    lines.append(f"ratio={naive / mine:.4f}")
    return lines


def pass_figures(
    inputs: BenchInputs, device: str, flops: ModelFlops | None = None
) -> dict[str, PassFigure]:
    """Every figure of one pass, by title: its unit and its value (None where the pass has
    none: peak memory off CUDA). With ``flops`` and a card of known bf16 peak, the training
    and generation model FLOP utilisation too."""
    from harness.bench.flops import mfu, peak_flops

    figures: dict[str, PassFigure] = {
        "seconds per evaluated point": ("s", lambda r: r.per_point_s),
        "training steps/s": ("steps/s", lambda r: r.train_steps / r.train_s),
        "generation images/s": ("images/s", lambda r: r.images / r.generate_s),
        "scoring images/s": ("images/s", lambda r: r.scored / r.score_s),
        "peak CUDA memory": (
            "GiB",
            lambda r: None if r.peak_bytes is None else r.peak_bytes / 2**30,
        ),
    }
    peak = peak_flops(device)
    if flops is None or peak is None:
        return figures
    step = flops.train_step(inputs.cfg.train.batch_size)
    image = flops.mean_image(inputs.settings)
    figures["training MFU"] = ("%", lambda r: 100 * mfu(step * r.train_steps, r.train_s, peak))
    figures["generation MFU"] = ("%", lambda r: 100 * mfu(image * r.images, r.generate_s, peak))
    return figures


def _describe(evaluation: AdaptiveEvaluation) -> str:
    rungs = ", ".join(f"{r.prompts}x{r.images_per_prompt}" for r in evaluation.rungs)
    return f"(rungs {rungs}, keep_fraction {evaluation.keep_fraction:g})"


def _adaptive_lines(runs: dict[str, list[PathRun]], naive: float) -> list[str]:
    """Recall of the exhaustive top-5 and the images generated, from the last passes (every
    pass trains the same seeded run), and the exhaustive ratio."""
    exhaustive, adaptive = runs[EXHAUSTIVE][-1], runs["harness"][-1]
    recall, top = adaptive_recall(exhaustive, adaptive)
    share = adaptive.images / max(exhaustive.images, 1)
    full = statistics.median(r.per_point_s for r in runs[EXHAUSTIVE])
    return [
        f"adaptive evaluation: recall of the exhaustive top-{top} {recall:.2f}; "
        f"{adaptive.images} of {exhaustive.images} images generated ({share:.1%})",
        f"ratio with exhaustive evaluation={naive / full:.4f}",
    ]


def run_bench(cfg: HarnessConfig, work: Path, repeats: int = 3) -> list[str]:
    """Measure both paths on ``cfg`` inside ``work``; return the report lines."""
    return summarize(*measure(cfg, work, repeats))


def run_generation(cfg: HarnessConfig, work: Path, repeats: int = 3) -> list[str]:
    """``harness bench --generation``: runtime-scaled LoRA, fused LoRA, regional compile and
    channels-last on the same images (:mod:`harness.bench.generation`), each setting one full
    batch at least (:func:`full_batches`)."""
    from harness.bench.generation import generation_lines, measure_generation

    inputs, loaded, _ = _setup(cfg, work)
    inputs = full_batches(inputs)
    runs = measure_generation(inputs, loaded, work / "generation", repeats)
    flops = _model_flops(inputs, loaded)
    return generation_lines(inputs, runs, _device_name(loaded.device), flops)


def full_batches(inputs: BenchInputs) -> BenchInputs:
    """``inputs`` with enough seeds that every setting fills one ``eval.batch_size`` batch.

    Generation batches one setting's prompts x seeds; with fewer images than a batch the
    images/s (and MFU) would be those of a smaller batch than the one configured. The extra
    seeds continue ``eval.seed``'s sequence."""
    eval_cfg = inputs.cfg.eval
    wanted = -(-eval_cfg.batch_size // max(len(inputs.templates), 1))  # ceiling
    if len(inputs.seeds) >= wanted:
        return inputs
    return replace(inputs, seeds=tuple(eval_cfg.seed + i for i in range(wanted)))


def run_agreement(cfg: HarnessConfig, work: Path, reference: str = "ddim:50") -> list[str]:
    """``harness bench --agreement``: the config's samplers against ``reference``
    (``<scheduler>:<steps>``) on the same points (:mod:`harness.bench.agreement`)."""
    from harness.bench.agreement import agreement_lines, measure_agreement, parse_reference

    wanted = parse_reference(reference)  # before loading anything: a typo fails at once
    inputs, loaded, scorer = _setup(cfg, work)
    agreement = measure_agreement(inputs, loaded, scorer, work / "agreement", wanted)
    lines = agreement_lines(inputs.cfg, agreement)
    return [f"{lines[0]}; device {_device_name(loaded.device)}", *lines[1:]]


# ``harness``'s global options (its callback's): they go before the ``bench`` command, which
# refuses them ("No such option"). With a value: ``-p x``, ``-px``, ``--params=x``.
_GLOBAL_WITH_VALUE = ("-p", "--params", "-S", "--set")
_GLOBAL_FLAGS = ("-v", "--verbose")


def cli_args(argv: Sequence[str]) -> list[str]:
    """``python -m harness.bench`` arguments as ``harness`` arguments: the global options
    (``-p``/``--params``, ``-S``/``--set`` with their values, ``-v``/``--verbose``) before the
    ``bench`` command, in their order (a later ``-S`` wins), the rest (``--repeats N``) after
    it."""
    before: list[str] = []
    after: list[str] = []
    args = iter(argv)
    for arg in args:
        if arg in _GLOBAL_WITH_VALUE:
            before += [arg, next(args, "")]
        elif arg in _GLOBAL_FLAGS or _attached_global(arg):
            before.append(arg)
        else:
            after.append(arg)
    return [*before, "bench", *after]


def _attached_global(arg: str) -> bool:
    """A global option with its value in the same argument: ``--set=k=v``, ``-Sk=v``, ``-px``."""
    return any(
        arg.startswith(f"{name}=") if name.startswith("--") else len(arg) > 2 and arg[:2] == name
        for name in _GLOBAL_WITH_VALUE
    )


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m harness.bench [-p params.yaml] [--repeats N]``: the ``harness bench`` command
    (its logging, and bad input as one line instead of a traceback)."""
    import sys

    from harness.cli import app

    app(args=cli_args(sys.argv[1:] if argv is None else argv), prog_name="harness")
