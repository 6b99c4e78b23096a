"""Benchmarks that print ratios against a reference run in the same process.

    python -m harness.bench                 # tiny models on CPU (the default preset)
    python -m harness.bench -p params.yaml  # whatever params.yaml configures (e.g. a GPU preset)

Each line compares a configuration with its reference measured just before in the same process,
so the ratio means something on any machine; absolute seconds are printed for context only.

* generation: batched (``eval.batch_size``) versus one image per forward pass;
* training: a run with warm latent / text-embedding caches versus the same run with cold caches;
* metrics: scoring with the real-photo embedding cache warm versus cold;
* sweep economics: seconds per evaluated point versus seconds per training run.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from harness.config import HarnessConfig, InferenceSetting, load_config

if TYPE_CHECKING:
    from harness.data import PreparedSubject
    from harness.models import LoadedModel

__all__ = ["Comparison", "main", "measure", "run_benchmarks"]


@dataclass(frozen=True)
class Comparison:
    """One benchmark: ``measured_s`` against ``reference_s``, both timed in this process.

    ``name`` says what is compared with what (``"generate batch 4 vs 1"``); ``what`` says what
    the ratio ``reference_s / measured_s`` counts (``"speed-up"``).
    """

    name: str
    reference_s: float
    measured_s: float
    what: str

    @property
    def ratio(self) -> float:
        """``reference_s / measured_s``."""
        return self.reference_s / self.measured_s

    def line(self) -> str:
        """The report line: both times, then the ratio."""
        return (
            f"{self.name:<34} {self.reference_s:8.3f}s -> {self.measured_s:8.3f}s   "
            f"x{self.ratio:6.2f} {self.what}"
        )


def _timed(fn: Callable[[], Any], repeat: int = 1) -> float:
    """Best wall time of ``repeat`` calls (seconds)."""
    best = float("inf")
    for _ in range(repeat):
        started = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - started)
    return best


def measure(cfg: HarnessConfig, work: Path) -> list[Comparison]:
    """Run every benchmark on ``cfg`` inside ``work`` (caches included); return the comparisons.

    Points ``HARNESS_CACHE_DIR`` and ``METRICS_CACHE_DIR`` of this process into ``work``.
    """
    from harness.data import load_prepared, prepare_subject
    from harness.models import load_pipeline

    os.environ["HARNESS_CACHE_DIR"] = str(work / "cache")
    os.environ["METRICS_CACHE_DIR"] = str(work / "metrics-cache")
    prepare_subject(cfg.data, work, progress=False)
    subject = load_prepared(work / cfg.data.prepared_dir / cfg.data.subject)
    loaded = load_pipeline(cfg.model)
    generation, generated = _bench_generation(cfg, loaded, subject, work)
    training = _bench_training(cfg, loaded, subject, work)
    scoring = _bench_scoring(cfg, loaded, subject, generated, work)
    # One evaluated point: every prompt x seed generated in batches, then scored (warm cache).
    per_point = generation.measured_s + scoring.measured_s
    economics = Comparison(
        "training run vs evaluated point", training.measured_s, per_point, "points per training run"
    )
    return [generation, training, scoring, economics]


def run_benchmarks(cfg: HarnessConfig, work: Path) -> list[str]:
    """Run every benchmark on ``cfg`` inside ``work``; return the report lines."""
    return [comparison.line() for comparison in measure(cfg, work)]


def _bench_generation(
    cfg: HarnessConfig, loaded: LoadedModel, subject: PreparedSubject, work: Path
) -> tuple[Comparison, list[Path]]:
    """Batched generation (``eval.batch_size``) against one image per forward pass; also
    returns the batched run's images (scored next)."""
    from harness.generate import generate_images

    setting = InferenceSetting(num_inference_steps=cfg.eval.num_inference_steps, scheduler="ddim")
    common: dict[str, Any] = {
        "templates": list(cfg.eval.prompts),
        "token": cfg.data.token,
        "class_name": subject.class_name or "object",
        "seeds": list(range(cfg.eval.images_per_prompt)),
        "settings": [setting],
        "resolution": cfg.data.resolution,
        "progress": False,
    }
    one = _timed(lambda: generate_images(loaded, out_dir=work / "g1", batch_size=1, **common))
    batch = cfg.eval.batch_size
    many = _timed(lambda: generate_images(loaded, out_dir=work / "gb", batch_size=batch, **common))
    generated = sorted((work / "gb").rglob("*.png"))
    return Comparison(f"generate batch {batch} vs 1", one, many, "speed-up"), generated


def _bench_training(
    cfg: HarnessConfig, loaded: LoadedModel, subject: PreparedSubject, work: Path
) -> Comparison:
    """The same training run twice: the second finds the latent / text-embedding caches warm."""
    from harness.train import train_lora

    pairs = list(zip(subject.train_paths, subject.train_captions, strict=True))
    cold = _timed(lambda: train_lora(cfg, loaded, pairs, work / "t1", resume=False, progress=False))
    warm = _timed(lambda: train_lora(cfg, loaded, pairs, work / "t2", resume=False, progress=False))
    return Comparison("train warm vs cold caches", cold, warm, "speed-up")


def _bench_scoring(
    cfg: HarnessConfig,
    loaded: LoadedModel,
    subject: PreparedSubject,
    generated: list[Path],
    work: Path,
) -> Comparison:
    """Scoring with the real-photo embedding cache cold, then warm (best of three)."""
    from harness.evaluate import make_scorer

    scorer = make_scorer(cfg, device=str(loaded.device))
    scorer.real_ceiling(list(subject.reference))  # load the encoders outside the timing
    shutil.rmtree(work / "metrics-cache", ignore_errors=True)
    score = lambda: scorer.score(real=list(subject.reference), generated=generated)  # noqa: E731
    cold = _timed(score)
    warm = _timed(score, repeat=3)
    return Comparison("score warm vs cold real cache", cold, warm, "speed-up")


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-p", "--params", default="params.yaml", type=Path)
    args = parser.parse_args(argv)
    cfg = load_config(args.params)
    with tempfile.TemporaryDirectory(prefix="harness-bench-") as tmp:
        for line in run_benchmarks(cfg, Path(tmp)):
            print(line)


if __name__ == "__main__":
    main()
