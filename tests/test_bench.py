"""``harness bench``: both paths over the same points, interleaved repeats, median/min/max
figures and a machine-readable last line."""

from __future__ import annotations

import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from harness.bench.generation import VARIANTS
from harness.bench.paths import PathRun, adaptive_recall
from harness.bench.stats import Figure, interleaved

FIGURE = re.compile(
    r"^(?P<name>\S.*?, (?P<path>naive|harness exhaustive|harness))\s+(?P<median>\S+) (?P<unit>\S+)\s+"
    r"\(min (?P<min>\S+), max (?P<max>\S+), n=(?P<n>\d+)\)$"
)

GENERATION = re.compile(
    r"^(?P<name>generation, .+?)\s+(?P<median>\S+) images/s\s+\(min \S+, max \S+, n=1\)$"
)


def test_interleaved_warms_up_then_alternates_the_order() -> None:
    calls: list[str] = []
    runs = {name: (lambda name=name: calls.append(name) or len(calls)) for name in ("a", "b")}
    out = interleaved(runs, repeats=3)
    assert calls == ["a", "b", "a", "b", "b", "a", "a", "b"]  # warm-up, then A B, B A, A B
    assert out == {"a": [3, 6, 7], "b": [4, 5, 8]}  # the warm-up results are dropped
    with pytest.raises(ValueError):
        interleaved(runs, repeats=0)


def test_figure_is_the_median_with_min_and_max() -> None:
    figure = Figure("seconds per evaluated point, naive", "s", (3.0, 1.0, 10.0))
    assert figure.median == 3.0
    match = FIGURE.match(figure.line())
    assert match and (match["min"], match["max"], match["n"]) == ("1", "10", "3")


def _tiny_params() -> dict[str, object]:
    """The default preset at its smallest: 2 checkpoints x 2 settings, 2 prompts, 1 seed."""
    return {
        "preset": "tiny-cpu",
        "data": {"sample_images": 3},
        "train": {"max_steps": 2, "checkpoint_steps": [1, 2]},
        "eval": {
            "prompts": ["a photo of {token} {class_name}", "a {token} {class_name} on a table"],
            "images_per_prompt": 1,
            "batch_size": 2,
        },
        "sweep": {
            "inference": {
                "guidance_scale": [3.0, 7.5],
                "lora_scale": [1.0],
                "num_inference_steps": [1],
            }
        },
        "metrics": {"bootstrap_samples": 10},
    }


def test_the_exhaustive_summary_has_two_paths_and_the_ratio_last() -> None:
    """``summarize`` for a config with exhaustive evaluation (the default preset): the header,
    every figure of both paths, no adaptive lines, ``ratio=`` naive over harness."""
    from types import SimpleNamespace

    from harness.bench import summarize
    from harness.config import HarnessConfig, InferenceSetting

    cfg = HarnessConfig.model_validate(
        {"preset": "t", "train": {"max_steps": 2, "checkpoint_steps": [1, 2]}}
    )
    settings = (InferenceSetting(guidance_scale=3.0), InferenceSetting(guidance_scale=7.5))
    inputs = SimpleNamespace(cfg=cfg, settings=settings, prompts=("a", "b"), seeds=(0,))
    naive = [PathRun(4, 8.0, 2, 8.0, 8, 4.0, 8), PathRun(4, 10.0, 2, 8.0, 8, 6.0, 8)]
    mine = [PathRun(4, 2.0, 2, 4.0, 8, 2.0, 8), PathRun(4, 2.0, 2, 6.0, 8, 2.0, 8)]
    lines = summarize(inputs, {"naive": naive, "harness": mine}, "cpu (test)")  # type: ignore[arg-type]
    assert lines[0] == (
        "4 points per path (2 checkpoints x 2 inference settings), 2 prompts x 1 seeds each; "
        "harness evaluation exhaustive; 2 training steps; device cpu (test); median of 2 "
        "interleaved repeats after a warm-up"
    )
    names = [m["name"] for m in map(FIGURE.match, lines[1:-1]) if m]
    assert len(names) == len(lines) - 2 == 8
    assert names[:2] == [
        "seconds per evaluated point, naive",
        "seconds per evaluated point, harness",
    ]
    # naive per point: 5.0 and 6.0 s, median 5.5; harness 2.0 and 2.5 s, median 2.25.
    assert lines[-1] == f"ratio={5.5 / 2.25:.4f}"


def test_each_pass_logs_its_figures_and_the_summary_has_mfu_on_a_known_card() -> None:
    """A pass's own line (what a run cut short by a time limit keeps), and the summary's MFU
    lines, from counted FLOPs and the card's bf16 peak: 2 steps of batch 1 at 1e12 FLOPs a
    forward in 2 s on an H100 (989e12 FLOP/s) is 2 * 2e12 / 2 / 989e12 = 0.202%."""
    from types import SimpleNamespace

    from harness.bench import pass_figures, pass_line, summarize
    from harness.bench.flops import ModelFlops
    from harness.config import HarnessConfig, InferenceSetting

    cfg = HarnessConfig.model_validate(
        {"preset": "t", "train": {"max_steps": 2, "checkpoint_steps": [1, 2], "batch_size": 1}}
    )
    settings = (InferenceSetting(guidance_scale=7.5, num_inference_steps=10),)
    inputs = SimpleNamespace(cfg=cfg, settings=settings, prompts=("a",), seeds=(0,))
    flops = ModelFlops(unet_forward=1e12, vae_decode=5e12)  # an image: 10 x 2 x 1e12 + 5e12
    card = "cuda (NVIDIA H100 80GB HBM3)"
    run = PathRun(2, 2.0, 2, 5.0, 4, 1.0, 4, peak_bytes=3 * 2**30)
    line = pass_line(run, pass_figures(inputs, card, flops))  # type: ignore[arg-type]
    assert line == (
        "seconds per evaluated point 4 s; training steps/s 1; generation images/s 0.8; "
        "scoring images/s 4; peak CUDA memory 3 GiB; training MFU 0.2022 %; "
        "generation MFU 2.022 %"
    )
    cpu_run = PathRun(2, 2.0, 2, 5.0, 4, 1.0, 4)
    assert pass_line(cpu_run, pass_figures(inputs, "cpu (test)")).endswith(  # type: ignore[arg-type]
        "scoring images/s 4"
    )
    lines = summarize(inputs, {"naive": [run], "harness": [run]}, card, flops)  # type: ignore[arg-type]
    names = [m["name"] for m in map(FIGURE.match, lines) if m]
    assert names[-4:] == [
        "training MFU, naive",
        "training MFU, harness",
        "generation MFU, naive",
        "generation MFU, harness",
    ]
    unknown = summarize(inputs, {"naive": [run], "harness": [run]}, "cuda (X1)", flops)  # type: ignore[arg-type]
    assert "model FLOP utilisation: the bf16 peak of cuda (X1) is not known" in unknown


def _in_process(tmp_path: Path, repo_root: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    """The tiny bench config, for an in-process run (the CLI path has its own test); the
    bench points the cache variables at its folder, which the test puts back afterwards."""
    from harness.config import load_config

    for name in ("HARNESS_CACHE_DIR", "METRICS_CACHE_DIR"):
        monkeypatch.setenv(name, os.environ.get(name, str(tmp_path / name)))
    shutil.copytree(repo_root / "experiments", tmp_path / "experiments")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(_tiny_params()))
    return load_config(tmp_path / "params.yaml")


def _bench(
    tmp_path: Path, repo_root: Path, params: dict[str, object], *args: str
) -> tuple[list[str], str]:
    """``harness -p params.yaml bench --repeats 1 ARGS`` in a tmp project; its stdout lines
    and its log (stderr)."""
    shutil.copytree(repo_root / "experiments", tmp_path / "experiments")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HOME": str(tmp_path / "home")}
    proc = subprocess.run(
        [sys.executable, "-m", "harness", "-p", "params.yaml", "bench", "--repeats", "1", *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout.strip().splitlines(), proc.stderr


@pytest.mark.slow
def test_harness_bench_with_adaptive_evaluation(repo_root: Path, tmp_path: Path) -> None:
    """Through the CLI, as a user runs it. With ``sweep.evaluation`` adaptive, a third path
    evaluates exhaustively: every figure for the three paths, positive and finite, then the
    recall of the exhaustive top-5, the images generated against the exhaustive count, both
    ratios, ``ratio=`` last."""
    params = _tiny_params()
    params["eval"] = {**params["eval"], "images_per_prompt": 2}  # type: ignore[dict-item]
    params["sweep"] = {
        "inference": {
            "guidance_scale": [3.0, 7.5],
            "lora_scale": [1.0],
            "num_inference_steps": [1],
        },
        "evaluation": {"rungs": [{"prompts": 1}], "keep_fraction": 0.25},
    }
    lines, log = _bench(tmp_path, repo_root, params)
    passes = re.findall(
        r"harness\.bench: (.+?) (warm-up|pass 1/1): seconds per evaluated point (\S+) s; ", log
    )
    assert sorted((p, label) for p, label, _ in passes) == sorted(
        (p, label)
        for p in ("naive", "harness", "harness exhaustive")
        for label in ("warm-up", "pass 1/1")
    ), log[-3000:]
    assert "harness evaluation adaptive (rungs 1x1, keep_fraction 0.25)" in lines[0], lines[0]
    assert lines[0].startswith("4 points per path (2 checkpoints x 2 inference settings)"), lines
    assert "2 prompts x 2 seeds" in lines[0] and "device cpu" in lines[0]
    figures = [FIGURE.match(line) for line in lines[1:-3]]
    assert all(figures), lines
    names = [m["name"] for m in figures if m]
    for title in (
        "seconds per evaluated point",
        "training steps/s",
        "generation images/s",
        "scoring images/s",
    ):
        for path in ("naive", "harness", "harness exhaustive"):
            assert f"{title}, {path}" in names, names
    for m in figures:
        assert m is not None and m["n"] == "1"  # one timed pass (the minimum), for speed
        low, median, high = float(m["min"]), float(m["median"]), float(m["max"])
        assert math.isfinite(median) and 0 < low <= median <= high, m.string
    # 4 points of 4 images: 1 image each at the rung, then 3 more for the one promoted; the
    # top holds the 4 points, 1 of them full-fidelity: recall 1/4 at most.
    adaptive = re.fullmatch(
        r"adaptive evaluation: recall of the exhaustive top-4 (0\.00|0\.25); "
        r"7 of 16 images generated \(43\.8%\)",
        lines[-3],
    )
    assert adaptive, lines[-3]
    assert re.fullmatch(r"ratio with exhaustive evaluation=\d+\.\d+", lines[-2]), lines[-2]
    assert re.fullmatch(r"ratio=\d+\.\d+", lines[-1]), lines[-1]


def test_harness_bench_agreement_of_the_sampler_with_a_reference(
    repo_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``harness bench --agreement``: the same 4 points evaluated with the config's sampler
    (DPM-Solver++, 1 step) and with DDIM at 3 steps; rank agreement, top overlap, differences,
    speed, and ``agreement=`` last."""
    from harness.bench import run_agreement

    lines = run_agreement(_in_process(tmp_path, repo_root, monkeypatch), tmp_path / "w", "ddim:3")
    assert lines[0].startswith("4 points, dpmsolver++ 1 steps against ddim 3 steps"), lines
    assert "device cpu" in lines[0]
    assert re.fullmatch(
        r"rank agreement of the weighted score: spearman -?\d\.\d{3}; top-4 overlap 1\.00",
        lines[1],
    ), lines[1]
    diffs = re.fullmatch(r"mean \|difference\|: dino (\S+), clip_i (\S+), clip_t (\S+)", lines[2])
    assert diffs and all(float(d) > 0 for d in diffs.groups()), lines[2]  # other images
    assert re.fullmatch(r"generation seconds per image: \S+ against \S+ \(x\S+ faster\)", lines[3])
    last = re.fullmatch(r"agreement=(-?\d\.\d{4})", lines[-1])
    assert last and -1.0 <= float(last[1]) <= 1.0, lines[-1]


@pytest.mark.slow
def test_harness_bench_generation_measures_every_speed_option(
    repo_root: Path, tmp_path: Path
) -> None:
    """``harness bench --generation`` through the CLI: images/s of the runtime-scaled LoRA, the
    fused LoRA, regional compilation, channels-last and all three together on the same images,
    each setting at least one full batch, and each option's ratio over the default
    (``compile_ratio=`` last)."""
    from harness.bench.generation import RATIOS

    params = _tiny_params()
    # A batch of 3 with 2 prompts and 1 seed: 2 seeds make each setting's batch full.
    params["eval"] = {**params["eval"], "batch_size": 3}  # type: ignore[dict-item]
    lines, log = _bench(tmp_path, repo_root, params, "--generation")
    assert lines[0].startswith("8 images per pass (2 prompts x 2 seeds x 2 inference settings")
    figures = {m["name"]: float(m["median"]) for m in map(GENERATION.match, lines) if m}
    assert set(figures) == {f"generation, {v}" for v in VARIANTS}, lines
    # Every pass on the log as it ends (what a run stopped by a time limit keeps).
    logged = re.findall(
        r"harness\.bench\.generation: generation, (.+) (warm-up|pass 1/1): (\S+) images/s; ",
        log,
    )
    assert sorted((n, label) for n, label, _ in logged) == sorted(
        (v, label) for v in VARIANTS for label in ("warm-up", "pass 1/1")
    ), log[-3000:]
    assert {n: float(x) for n, label, x in logged if label != "warm-up"} == pytest.approx(
        {v[len("generation, ") :]: x for v, x in figures.items()}, rel=1e-3
    )
    assert all(math.isfinite(v) and v > 0 for v in figures.values())
    assert not any("MFU" in line for line in lines)  # no bf16 peak to compare with on a CPU
    base = figures["generation, runtime LoRA"]
    ratios = [re.fullmatch(r"(\w+)=(\d+\.\d{4})", line) for line in lines[-len(RATIOS) :]]
    assert [m[1] for m in ratios if m] == list(RATIOS), lines
    assert lines[-1].startswith("compile_ratio=")
    for match in ratios:
        assert match and float(match[2]) == pytest.approx(
            figures[f"generation, {RATIOS[match[1]]}"] / base, 1e-3
        )
    # PNG writing (default variant): encoded on the writer threads, some of it waited for.
    writing = {
        m[1]: float(m[2])
        for m in (re.match(r"(PNG \S+), .+?\s+(\S+) ms/image", line) for line in lines)
        if m
    }
    assert set(writing) == {"PNG encoding", "PNG writing"}, lines
    assert writing["PNG encoding"] > 0 and writing["PNG writing"] >= 0


def test_generation_lines_give_each_options_mfu_on_a_known_card() -> None:
    """On a card of known bf16 peak, ``bench --generation`` prints each option's generation
    MFU: 2 images/s of 10 steps with guidance at 1e12 FLOPs a UNet forward and 5e12 a decode
    is 2 * 25e12 FLOP/s, 5.056% of an H100's 989e12."""
    from types import SimpleNamespace

    from harness.bench.flops import ModelFlops
    from harness.bench.generation import GenerationPass, generation_lines
    from harness.config import InferenceSetting

    settings = (InferenceSetting(guidance_scale=7.5, num_inference_steps=10),)
    inputs = SimpleNamespace(templates=("a", "b"), seeds=(0,), settings=settings)
    runs = {name: [GenerationPass(2.0 * (i + 1), 1.0, 0.0)] for i, name in enumerate(VARIANTS)}
    flops = ModelFlops(unet_forward=1e12, vae_decode=5e12)
    card = "cuda (NVIDIA H100 80GB HBM3)"
    lines = generation_lines(inputs, runs, card, flops)  # type: ignore[arg-type]
    mfu = {
        m[1]: float(m[2])
        for m in (re.match(r"generation MFU, (.+?)\s+(\S+) %", line) for line in lines)
        if m
    }
    assert list(mfu) == list(VARIANTS)
    assert mfu["runtime LoRA"] == pytest.approx(100 * 2 * 25e12 / 989e12, 1e-3)
    assert mfu["fused LoRA"] == pytest.approx(2 * mfu["runtime LoRA"], 1e-3)
    unknown = generation_lines(inputs, runs, "cuda (X1)", flops)  # type: ignore[arg-type]
    assert not any("MFU" in line for line in unknown)
    assert any("bf16 peak of cuda (X1) is not known" in line for line in unknown)


def test_a_bad_reference_is_refused_naming_the_expected_form() -> None:
    from harness.bench.agreement import parse_reference
    from harness.errors import HarnessError

    assert parse_reference("unipc:20") == ("unipc", 20)
    for bad in ("ddim", "ddim:0", "heun:20", "ddim:x"):
        with pytest.raises(HarnessError, match="--reference: expected <scheduler>:<steps>"):
            parse_reference(bad)


def test_agreement_lines_rank_identical_and_reversed_points() -> None:
    from harness.bench.agreement import Agreement, agreement_lines
    from harness.config import HarnessConfig

    cfg = HarnessConfig(preset="test")
    keys = [(10, f"s{i}") for i in range(6)]
    scores = {k: {"dino": 0.1 * i, "clip_i": 0.1 * i, "clip_t": 0.2} for i, k in enumerate(keys)}
    same = Agreement(scores, scores, 0.5, 2.0, "dpmsolver++ 20 steps", "ddim 50 steps")
    lines = agreement_lines(cfg, same)
    assert lines[1] == "rank agreement of the weighted score: spearman 1.000; top-5 overlap 1.00"
    assert lines[2] == "mean |difference|: dino 0.0000, clip_i 0.0000, clip_t 0.0000"
    assert lines[3].endswith("(x4.00 faster)") and lines[-1] == "agreement=1.0000"
    flipped = {k: {**v, "dino": -v["dino"]} for k, v in scores.items()}
    reversed_ = agreement_lines(cfg, Agreement(flipped, scores, 1.0, 1.0, "a", "b"))
    assert reversed_[-1] == "agreement=-1.0000"
    assert "top-5 overlap 0.80" in reversed_[1]  # 6 points: the two top-5s share four


def _run(scores: dict[tuple[int, str], tuple[float, float]]) -> PathRun:
    return PathRun(1, 1.0, 1, 1.0, 1, 1.0, 1, scores=scores)


def test_adaptive_recall_counts_the_exhaustive_top_among_the_full_fidelity_top() -> None:
    exhaustive = _run({(1, str(i)): (float(i), 1.0) for i in range(10)})  # top-5: 5..9
    adaptive = _run(
        {
            **{(1, str(i)): (float(i), 1.0) for i in (9, 8, 7, 2, 1, 0)},
            # a cheap point that scored high does not count, whatever its score
            (1, "6"): (100.0, 0.25),
        }
    )
    # The adaptive top-5 full-fidelity points are 9, 8, 7, 2, 1: three of the exhaustive five.
    assert adaptive_recall(exhaustive, adaptive) == (0.6, 5)
    assert adaptive_recall(_run({(1, "a"): (1.0, 1.0)}), _run({(1, "a"): (1.0, 1.0)})) == (1.0, 1)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_bench_on_cuda_names_the_card_and_reports_peak_memory(
    repo_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The CUDA path: synchronised timings, the card's name and each path's peak memory."""
    from harness.bench import run_bench
    from harness.config import load_config

    for name in ("HARNESS_CACHE_DIR", "METRICS_CACHE_DIR"):  # the bench points them at its folder
        monkeypatch.setenv(name, os.environ.get(name, str(tmp_path / name)))
    shutil.copytree(repo_root / "experiments", tmp_path / "experiments")
    params = {**_tiny_params(), "model": {"device": "cuda"}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    lines = run_bench(load_config(tmp_path / "params.yaml"), tmp_path / "work", repeats=1)
    assert f"device cuda ({torch.cuda.get_device_name(0)})" in lines[0]
    peaks = [FIGURE.match(line) for line in lines if line.startswith("peak CUDA memory")]
    assert [m["path"] for m in peaks if m] == ["naive", "harness"]
    assert all(m and float(m["median"]) > 0 for m in peaks)
    from harness.bench.flops import peak_flops

    if peak_flops(torch.cuda.get_device_name(0)) is None:
        assert any("bf16 peak of" in line and "not known" in line for line in lines), lines
    else:
        mfu = [m for m in map(FIGURE.match, lines) if m and "MFU" in m["name"]]
        assert [m["name"] for m in mfu] == [
            f"{kind} MFU, {path}"
            for kind in ("training", "generation")
            for path in ("naive", "harness")
        ]
        assert all(0 < float(m["median"]) < 100 for m in mfu)


def test_module_entry_point_fails_in_one_line_on_a_missing_params_file(tmp_path: Path) -> None:
    """``python -m harness.bench`` is the ``harness bench`` command: a bad params file is one
    line naming it, not a traceback."""
    proc = subprocess.run(
        [sys.executable, "-m", "harness.bench", "-p", str(tmp_path / "nope.yaml")],
        cwd=tmp_path,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr, proc.stderr
    assert "nope.yaml" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_the_naive_path_trains_the_same_points_at_the_configured_batch_size(
    repo_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The example script run as a researcher runs it for the same points: with
    ``--train_batch_size`` = ``train.batch_size`` (3 here), so each of its steps denoises 3
    photos (cycling through the subject's), as the harness's steps do. At batch 1 it did a
    third of the harness's training work and its steps/s and MFU were not comparable."""
    from harness.bench import _inputs
    from harness.bench.naive import _train
    from harness.models import load_pipeline

    cfg = _in_process(tmp_path, repo_root, monkeypatch)
    cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"batch_size": 3})})
    inputs = _inputs(cfg, tmp_path / "w")
    pipe = load_pipeline(inputs.cfg.model).pipeline
    batches: list[int] = []
    pipe.unet.register_forward_hook(lambda _m, args, _out: batches.append(args[0].shape[0]))
    checkpoints = _train(inputs, pipe, tmp_path / "train", "cpu")
    assert batches == [3, 3]  # 2 steps of 3 photos
    assert [c.name for c in checkpoints] == ["checkpoint-1", "checkpoint-2"]
    assert all((c / "pytorch_lora_weights.safetensors").is_file() for c in checkpoints)
