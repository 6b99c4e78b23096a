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
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from harness.config import HarnessConfig, load_config


def _timed(fn: Callable[[], Any], repeat: int = 1) -> float:
    """Best wall time of ``repeat`` calls (seconds)."""
    best = float("inf")
    for _ in range(repeat):
        started = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - started)
    return best


def _line(name: str, reference: float, measured: float, what: str) -> str:
    return f"{name:<34} {reference:8.3f}s -> {measured:8.3f}s   x{reference / measured:6.2f} {what}"


def run_benchmarks(cfg: HarnessConfig, work: Path) -> list[str]:
    """Run every benchmark on ``cfg`` inside ``work``; return the report lines."""
    import os

    from harness.data import load_prepared, prepare_subject
    from harness.evaluate import make_scorer
    from harness.generate import InferenceSetting, generate_images
    from harness.models import load_pipeline
    from harness.train import train_lora

    os.environ["HARNESS_CACHE_DIR"] = str(work / "cache")
    os.environ["METRICS_CACHE_DIR"] = str(work / "metrics-cache")
    prepare_subject(cfg.data, work, progress=False)
    subject = load_prepared(work / cfg.data.prepared_dir / cfg.data.subject)
    loaded = load_pipeline(cfg.model)
    lines = []

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
    many = _timed(
        lambda: generate_images(
            loaded, out_dir=work / "gb", batch_size=cfg.eval.batch_size, **common
        )
    )
    lines.append(_line(f"generate batch {cfg.eval.batch_size} vs 1", one, many, "speed-up"))

    pairs = list(zip(subject.train_paths, subject.train_captions, strict=True))
    cold = _timed(lambda: train_lora(cfg, loaded, pairs, work / "t1", resume=False, progress=False))
    warm = _timed(lambda: train_lora(cfg, loaded, pairs, work / "t2", resume=False, progress=False))
    lines.append(_line("train warm vs cold caches", cold, warm, "speed-up"))

    generated = sorted((work / "gb").rglob("*.png"))
    scorer = make_scorer(cfg, device=str(loaded.device))
    scorer.real_ceiling(list(subject.reference))  # load the encoders outside the timing
    shutil.rmtree(work / "metrics-cache", ignore_errors=True)
    score = lambda: scorer.score(real=list(subject.reference), generated=generated)  # noqa: E731
    cold_score = _timed(score)
    warm_score = _timed(score, repeat=3)
    lines.append(_line("score warm vs cold real cache", cold_score, warm_score, "speed-up"))

    per_point = many + warm_score  # one point: every prompt x seed generated, then scored
    lines.append(
        _line("training run vs evaluated point", warm, per_point, "points per training run")
    )
    return lines


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
