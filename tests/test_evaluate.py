"""Evaluation: generate per setting, score with the metrics package, reproducible from files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from harness.config import HarnessConfig, InferenceSetting
from harness.evaluate import SettingScores, evaluate_adapter, image_grid, make_scorer, score_dict
from metrics import ScoreResult
from metrics.cli import main as metrics_main

TEMPLATES = ["a photo of {token} {class_name}", "a {token} {class_name} in the snow"]
SEEDS = [0, 1]
SETTINGS = [
    InferenceSetting(guidance_scale=5.0, num_inference_steps=2, scheduler="ddim"),
    InferenceSetting(guidance_scale=1.0, num_inference_steps=2, scheduler="euler"),
]


def blocks(seed: int, size: tuple[int, int] = (64, 64)) -> Image.Image:
    """A seeded image of coloured blocks (a stand-in for a real photo)."""
    rng = np.random.default_rng(seed)
    small = Image.fromarray(rng.integers(0, 256, size=(4, 4, 3), dtype=np.uint8))
    return small.resize(size, Image.Resampling.NEAREST)


@pytest.fixture(scope="module")
def cfg() -> HarnessConfig:
    return HarnessConfig.model_validate(
        {
            "preset": "test",
            "data": {"resolution": 64},
            "eval": {"batch_size": 3},
            "metrics": {
                "dino_model": "tiny://dino",
                "clip_model": "tiny://clip",
                "clip_pretrained": None,
                "bootstrap_samples": 50,
                "batch_size": 3,
                "lpips_weights": "tiny",
            },
        }
    )


@pytest.fixture(scope="module")
def evaluated(
    cfg: HarnessConfig, tiny_sd15: Any, tmp_path_factory: pytest.TempPathFactory
) -> tuple[list[SettingScores], Path, Path]:
    """Both settings evaluated once on the base model: (results, output folder, real folder)."""
    real = tmp_path_factory.mktemp("real")
    for seed in range(3):
        blocks(seed).save(real / f"photo-{seed}.png")
    out = tmp_path_factory.mktemp("eval")
    results = evaluate_adapter(
        cfg,
        tiny_sd15,
        make_scorer(cfg),
        reference=sorted(real.iterdir()),
        token="sks",
        class_name="toy",
        adapter=None,
        settings=SETTINGS,
        templates=TEMPLATES,
        seeds=SEEDS,
        out_dir=out,
    )
    return results, out, real


def test_make_scorer_follows_the_metrics_section(cfg: HarnessConfig) -> None:
    scorer = make_scorer(cfg, device="cpu")
    m = cfg.metrics
    assert (scorer.config.dino_model, scorer.config.clip_model) == (m.dino_model, m.clip_model)
    assert scorer.config.clip_pretrained is None
    assert scorer.config.identifier_policy == m.identifier_policy
    assert scorer.config.bootstrap_samples == m.bootstrap_samples == 50
    assert (scorer.config.batch_size, scorer.config.seed) == (3, cfg.seed)
    assert scorer.config.lpips_weights == m.lpips_weights == "tiny"


def test_score_dict_flattens_means_and_intervals() -> None:
    result = ScoreResult(
        dino=0.5,
        clip_i=0.25,
        clip_t=0.125,
        div=None,  # no prompt with two images: no DIV, no DIV interval
        div_dino=None,
        ci={
            "dino": (0.4, 0.6),
            "clip_i": None,
            "clip_t": (0.1, 0.15),
            "div": None,
            "div_dino": None,
        },
        images=(),
        prompts=(),
    )
    flat = score_dict(result)
    assert flat == {
        "dino": 0.5,
        "dino_lo": 0.4,
        "dino_hi": 0.6,
        "clip_i": 0.25,
        "clip_t": 0.125,
        "clip_t_lo": 0.1,
        "clip_t_hi": 0.15,
    }
    assert all(type(v) is float for v in flat.values())


def test_image_grid_is_row_major_in_cells(tmp_path: Path) -> None:
    images = [
        Image.new("RGB", (40, 30), (255, 0, 0)),
        Image.new("RGB", (50, 50), (0, 255, 0)),
        Image.new("L", (20, 60), 128),  # grey-scale: converted to RGB
    ]
    paths = []
    for i, image in enumerate(images):
        image.save(tmp_path / f"{i}.png")
        paths.append(tmp_path / f"{i}.png")
    grid = image_grid(paths, columns=2, cell=16)
    assert grid.mode == "RGB" and grid.size == (32, 32)  # 3 images in 2 columns: 2 rows
    assert grid.getpixel((8, 8)) == (255, 0, 0)
    assert grid.getpixel((24, 8)) == (0, 255, 0)
    assert grid.getpixel((8, 24)) == (128, 128, 128)
    assert grid.getpixel((24, 24)) == (255, 255, 255)  # empty cell: white background
    assert image_grid(paths[:1], columns=4, cell=8).size == (32, 8)


def test_evaluate_adapter_scores_every_setting(
    evaluated: tuple[list[SettingScores], Path, Path],
) -> None:
    results, out, real = evaluated
    assert [r.setting for r in results] == SETTINGS
    n_images = len(TEMPLATES) * len(SEEDS)
    for result in results:
        assert len(result.images) == n_images
        assert {image.setting for image in result.images} == {result.setting}
        assert result.images_dir == out / "images" / result.setting.id
        assert all((out / image.file).parent == result.images_dir for image in result.images)
        assert {"dino", "dino_lo", "dino_hi", "clip_i", "clip_t", "div", "div_dino"} <= set(
            result.scores
        )
        assert result.scores["div"] > 0 and result.metadata["lpips_weights"] == "tiny:seed=0"
        assert {"div", "div_dino"} <= set(result.per_prompt[0])
        assert result.scores["dino_lo"] <= result.scores["dino"] <= result.scores["dino_hi"]
        assert [row["prompt"] for row in result.per_prompt] == sorted(
            {image.prompt for image in result.images}
        )
        assert all(row["n_images"] == len(SEEDS) for row in result.per_prompt)
        assert result.metadata["n_real"] == len(list(real.iterdir()))
        assert result.metadata["n_generated"] == n_images
        assert result.metadata["token"] == "sks" and result.metadata["class_name"] == "toy"
    # Different guidance and scheduler, same seeds: different images, different scores.
    assert results[0].scores["dino"] != results[1].scores["dino"]


def test_setting_manifest_reproduces_the_scores_with_the_metrics_cli(
    cfg: HarnessConfig,
    evaluated: tuple[list[SettingScores], Path, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    results, _, real = evaluated
    m = cfg.metrics
    for result in results:
        manifest = result.images_dir / "manifest.jsonl"
        entries = [json.loads(line) for line in manifest.read_text().splitlines()]
        # Paths relative to the setting's own folder, and only that setting's images.
        assert sorted(e["file"] for e in entries) == sorted(
            Path(image.file).name for image in result.images
        )
        assert {(e["prompt"], e["seed"]) for e in entries} == {
            (image.prompt, image.seed) for image in result.images
        }
        out = tmp_path / f"{result.setting.id}.json"
        status = metrics_main(
            [
                "score", "--real", str(real), "--generated", str(result.images_dir),
                "--prompts", str(manifest), "--json", str(out),
                "--dino-model", m.dino_model, "--clip-model", m.clip_model,
                "--clip-pretrained", "none", "--token", "sks", "--class-name", "toy",
                "--identifier-policy", m.identifier_policy,
                "--bootstrap-samples", str(m.bootstrap_samples), "--seed", str(cfg.seed),
                "--lpips-weights", str(m.lpips_weights),
            ]
        )  # fmt: skip
        assert status == 0, capsys.readouterr().err
        scores = json.loads(out.read_text())
        for name in ("dino", "clip_i", "clip_t", "div", "div_dino"):
            assert scores["means"][name] == pytest.approx(result.scores[name], abs=1e-6)
            lo, hi = scores["ci95"][name]
            assert (lo, hi) == pytest.approx(
                (result.scores[f"{name}_lo"], result.scores[f"{name}_hi"]), abs=1e-6
            )


def test_a_rungs_images_are_reused_and_the_scores_equal_a_fresh_evaluation(
    cfg: HarnessConfig,
    evaluated: tuple[list[SettingScores], Path, Path],
    tiny_sd15: Any,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Adaptive evaluation's promotion: a 1 prompt x 1 seed rung, then the full protocol on top
    of it, generates only the missing images and scores exactly like evaluating afresh."""
    fresh, fresh_dir, real = evaluated
    common: dict[str, Any] = dict(
        reference=sorted(real.iterdir()), token="sks", class_name="toy", adapter=None
    )
    scorer = make_scorer(cfg)
    rung = evaluate_adapter(
        cfg,
        tiny_sd15,
        scorer,
        **common,
        settings=SETTINGS,
        templates=TEMPLATES[:1],
        seeds=SEEDS[:1],
        out_dir=tmp_path,
    )
    assert [len(r.images) for r in rung] == [1, 1]
    first = {r.setting.id: (tmp_path / r.images[0].file).read_bytes() for r in rung}

    calls: list[int] = []
    pipeline = tiny_sd15.pipeline
    original = type(pipeline).__call__

    def counting(self: Any, *args: Any, **kwargs: Any) -> Any:
        calls.append(len(kwargs["prompt"]))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(type(pipeline), "__call__", counting)
    full = evaluate_adapter(
        cfg,
        tiny_sd15,
        scorer,
        **common,
        settings=SETTINGS,
        templates=TEMPLATES,
        seeds=SEEDS,
        out_dir=tmp_path,
        reuse=[image for r in rung for image in r.images],
    )
    n_images = len(TEMPLATES) * len(SEEDS)
    assert sum(calls) == len(SETTINGS) * (n_images - 1)  # the rung's image is not redone
    for again, before in zip(full, fresh, strict=True):
        assert [(i.prompt_index, i.seed) for i in again.images] == [
            (i.prompt_index, i.seed) for i in before.images
        ]
        # The same noise per image; other batch neighbours move a pixel by a level at most
        # (float rounding in batched kernels), so the scores agree to rounding.
        for a, b in zip(again.images, before.images, strict=True):
            pixels = [
                np.asarray(Image.open(d / i.file), dtype=int)
                for d, i in ((tmp_path, a), (fresh_dir, b))
            ]
            assert np.abs(pixels[0] - pixels[1]).max() <= 2
        # abs too: the diversities of near-identical images are ~1e-3, where a pixel level
        # moves the last digits by more than 1e-3 of the value.
        assert again.scores == pytest.approx(before.scores, rel=1e-3, abs=1e-5)
        assert [row["dino"] for row in again.per_image] == pytest.approx(
            [row["dino"] for row in before.per_image], rel=1e-3
        )
        assert (tmp_path / again.images[0].file).read_bytes() == first[again.setting.id]
