"""Per-image and per-prompt scores on disk (issue 12): ``runs/sweep/per_image.parquet``,
``per_prompt.parquet`` and ``runs/evaluate/per_image.parquet``, from the scorer's rows carried
through ``SettingScores`` and ``PointScores`` to the results sink."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from PIL import Image

from harness.config import HarnessConfig, InferenceSetting
from harness.errors import HarnessError
from harness.evaluate import evaluate_adapter, image_rows, make_scorer
from harness.generate import eval_seeds
from harness.sweep import RunEnd, RunSpec, SweepSink, run_sweep
from harness.sweep._base import PointScores
from harness.sweep.confirm import (
    base_setting,
    confirm_points,
    confirmation_config,
    read_sweep_results,
    selected_points,
    write_confirmation,
)
from harness.train import CheckpointInfo

from .fakes import OFFSETS, PROMPTS, TEMPLATES, FakeBackend
from .test_confirm import StubBackend, sweep_table
from .test_confirm import make_cfg as confirm_cfg
from .test_sweep_logic import make_cfg

IMAGE_COLUMNS = [
    "point",
    "run_key",
    "checkpoint_step",
    "setting_id",
    "template",
    "prompt",
    "seed",
    "image",
    "dino",
    "clip_i",
    "clip_t",
    "subject",  # null in a single-subject sweep
]
PROMPT_COLUMNS = [
    "point",
    "run_key",
    "checkpoint_step",
    "setting_id",
    "prompt",
    "n_images",
    "dino",
    "clip_i",
    "clip_t",
    "div",
    "div_dino",
    "subject",
]
INT_COLUMNS = ("point", "checkpoint_step", "seed")


def _schema(path: Path) -> dict[str, str]:
    return {f.name: str(f.type) for f in pq.read_schema(path)}


# --- the sweep, with the fake backend -------------------------------------------------------


def test_one_row_per_scored_image_of_every_point(tmp_path: Path) -> None:
    cfg = make_cfg(tmp_path, n_trials=2)
    summary = run_sweep(cfg, tmp_path, FakeBackend())
    results = pd.read_parquet(summary.results_parquet)
    per_image = pd.read_parquet(tmp_path / "runs/sweep/per_image.parquet")
    assert list(per_image.columns) == IMAGE_COLUMNS
    schema = _schema(tmp_path / "runs/sweep/per_image.parquet")
    assert {c: schema[c] for c in INT_COLUMNS} == dict.fromkeys(INT_COLUMNS, "int64")
    assert {schema[m] for m in ("dino", "clip_i", "clip_t")} == {"double"}
    assert len(per_image) == 4 * len(results) == 4 * 16
    # Each row's identity is its point's in results.parquet (the points-study trial number).
    ids = ["run_key", "checkpoint_step", "setting_id"]
    joined = per_image.merge(
        results[["point", *ids, "images_dir"]], on="point", suffixes=("", "_r")
    )
    assert len(joined) == len(per_image)
    for column in ids:
        assert (joined[column] == joined[f"{column}_r"]).all()
    # Image paths relative to the project root, inside the point's images folder.
    assert not joined["image"].str.startswith("/").any()
    assert (joined["image"].map(lambda p: str(Path(p).parent)) == joined["images_dir"]).all()
    assert set(per_image["prompt"]) == set(PROMPTS) and set(per_image["template"]) == set(TEMPLATES)
    assert set(per_image["seed"]) == {cfg.eval.seed, cfg.eval.seed + 1}
    # The values are the backend's: the per-image rows average to the point's score.
    means = per_image.groupby("point")[["dino", "clip_i", "clip_t"]].mean()
    indexed = results.set_index("point")
    for metric in ("dino", "clip_i", "clip_t"):
        assert (means[metric] - indexed.loc[means.index, f"score.{metric}"]).abs().max() < 1e-12
    first = per_image[per_image["point"] == results["point"].iloc[0]]
    offsets = first["dino"] - results["score.dino"].iloc[0]
    assert offsets.tolist() == pytest.approx(list(OFFSETS))


def test_one_row_per_prompt_of_every_point(tmp_path: Path) -> None:
    cfg = make_cfg(tmp_path, n_trials=1)
    summary = run_sweep(cfg, tmp_path, FakeBackend())
    results = pd.read_parquet(summary.results_parquet)
    per_prompt = pd.read_parquet(tmp_path / "runs/sweep/per_prompt.parquet")
    assert list(per_prompt.columns) == PROMPT_COLUMNS
    assert len(per_prompt) == 2 * len(results)
    assert (per_prompt["n_images"] == 2).all() and (per_prompt["div"] == 0.1).all()
    assert (per_prompt["div_dino"] == 0.2).all()
    per_image = pd.read_parquet(tmp_path / "runs/sweep/per_image.parquet")
    means = per_image.groupby(["point", "prompt"])["clip_t"].mean()
    indexed = per_prompt.set_index(["point", "prompt"])["clip_t"]
    assert (means - indexed.loc[means.index]).abs().max() < 1e-12


class _TableProbe(SweepSink):
    """Reads the per-image table when each run ends (after the results sink wrote it)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.rows_at_end: list[int] = []

    def run_finished(self, run: RunSpec, end: RunEnd) -> None:
        path = self.root / "runs/sweep/per_image.parquet"
        self.rows_at_end.append(len(pd.read_parquet(path)) if path.is_file() else -1)


def test_rewritten_as_the_sweep_goes_and_kept_across_a_resume(tmp_path: Path) -> None:
    probe = _TableProbe(tmp_path)
    run_sweep(make_cfg(tmp_path, n_trials=2), tmp_path, FakeBackend(), sinks=[probe])
    per_run = 2 * 4 * 4  # checkpoints x settings x images
    assert probe.rows_at_end == [per_run, 2 * per_run]
    # A second call continues the study: the first call's rows stay, the new run's are added.
    summary = run_sweep(make_cfg(tmp_path, n_trials=3), tmp_path, FakeBackend(), sinks=[probe])
    per_image = pd.read_parquet(tmp_path / "runs/sweep/per_image.parquet")
    assert probe.rows_at_end[-1] == len(per_image) == 3 * per_run
    assert set(per_image["point"]) == set(pd.read_parquet(summary.results_parquet)["point"])
    assert per_image["point"].is_monotonic_increasing


def test_a_sweep_without_points_writes_empty_tables_with_their_columns(tmp_path: Path) -> None:
    cfg = make_cfg(
        tmp_path, sampler="grid", n_trials=1, space={"learning_rate": {"choices": [2e-4]}}
    )
    run_sweep(cfg, tmp_path, FakeBackend(fail_lr=2e-4))
    for name, columns in (("per_image", IMAGE_COLUMNS), ("per_prompt", PROMPT_COLUMNS)):
        path = tmp_path / f"runs/sweep/{name}.parquet"
        assert list(_schema(path)) == columns
        assert pd.read_parquet(path).empty


def test_the_tables_feed_the_image_grids(tmp_path: Path) -> None:
    """A grid sweep of learning rate x text-encoder lr and two guidance scales: the grids
    read per_image.parquet and show each point's own image."""
    from harness.report.grids import make_grids

    space = {
        "learning_rate": {"choices": [1e-4, 5e-4]},
        "text_encoder_lr": {"choices": [5e-5, 1e-4]},
        "train_text_encoder": {"choices": [True]},  # else text_encoder_lr is never sampled
    }
    cfg = make_cfg(tmp_path, sampler="grid", space=space, inference={"guidance_scale": [3.0, 7.5]})
    run_sweep(cfg, tmp_path, FakeBackend(write_images=True))
    figures = {g.kind: g for g in make_grids(cfg, tmp_path, tmp_path / "reports/grids")}
    assert list(figures) == ["lr_grid", "guidance_strip"]
    per_image = pd.read_parquet(tmp_path / "runs/sweep/per_image.parquet")
    results = pd.read_parquet(tmp_path / "runs/sweep/results.parquet").set_index("point")
    for figure in figures.values():
        manifest = json.loads(figure.manifest.read_text())
        grid = Image.open(figure.path).convert("RGB")
        for cell in manifest["cells"]:
            row = per_image[
                (per_image["point"] == cell["point"]) & (per_image["seed"] == cell["seed"])
            ]
            assert cell["image"] in set(row["image"]) and cell["prompt"] == PROMPTS[0]
            with Image.open(tmp_path / cell["image"]) as source:
                expected = source.convert("RGB").resize((128, 128), Image.Resampling.BICUBIC)
            assert np.array_equal(np.asarray(grid.crop(tuple(cell["box"]))), np.asarray(expected))
            point = results.loc[cell["point"]]
            if figure.kind == "lr_grid":
                assert point["train.learning_rate"] == cell["row_value"]
                assert point["train.text_encoder_lr"] == cell["col_value"]
            else:
                assert point["eval.guidance_scale"] == cell["col_value"]


# --- the evaluate stage, with a stub backend ------------------------------------------------


class _ImagesStub(StubBackend):
    """The confirm tests' stub, with per-image rows and the base model's record."""

    def evaluate(
        self,
        cfg: HarnessConfig,
        checkpoint: CheckpointInfo,
        settings: Sequence[InferenceSetting],
        out_dir: Path,
    ) -> list[PointScores]:
        (point,) = super().evaluate(cfg, checkpoint, settings, out_dir)
        point.per_image = _stub_images(cfg, point, offset=0.0)
        return [point]

    def references_with_baseline(
        self, cfg: HarnessConfig, out_dir: Path
    ) -> tuple[dict[str, dict[str, float]], PointScores]:
        base = PointScores(cfg.eval.setting, {}, out_dir / "images" / cfg.eval.setting.id, 2)
        base.per_image = _stub_images(cfg, base, offset=-0.5)
        return self.references(cfg, out_dir), base


def _stub_images(cfg: HarnessConfig, point: PointScores, offset: float) -> list[dict[str, Any]]:
    return [
        {
            "template": "a {token} {class_name}",
            "prompt": "a sks dog",
            "seed": seed,
            "image": str(point.images_dir / f"000-{seed}.png"),
            "dino": 0.5 + offset,
            "clip_i": 0.6 + offset,
            "clip_t": None,  # a scorer without prompts gives no CLIP-T: null, not NaN strings
        }
        for seed in eval_seeds(cfg)
    ]


def test_evaluate_writes_confirmed_and_baseline_images(tmp_path: Path) -> None:
    cfg = confirm_cfg()
    backend = _ImagesStub(sweep_table(tmp_path, cfg), tmp_path)
    selected = selected_points(cfg, tmp_path, read_sweep_results(cfg, tmp_path))
    result = write_confirmation(
        cfg, tmp_path, confirm_points(cfg, tmp_path, selected, backend, False)
    )
    assert result.per_image_parquet == tmp_path / "runs/evaluate/per_image.parquet"
    table = pd.read_parquet(result.per_image_parquet)
    assert list(table.columns) == [*IMAGE_COLUMNS, "baseline", "baseline_setting"]
    schema = _schema(result.per_image_parquet)
    assert schema["baseline"] == "bool" and schema["checkpoint_step"] == "int64"
    seeds = eval_seeds(confirmation_config(cfg))
    points = table[~table["baseline"]]
    assert points["point"].tolist() == [p for p in (0, 1, 2) for _ in seeds]
    assert set(points["seed"]) == set(seeds) == {13, 14, 15}
    confirmed = result.table.set_index("point")
    for column in ("run_key", "checkpoint_step", "setting_id"):
        assert (
            points[column].to_numpy() == confirmed.loc[points["point"], column].to_numpy()
        ).all()
    assert points["image"].str.startswith("runs/evaluate/point-").all()
    base = table[table["baseline"]]
    # The base model under each point's guidance and steps (points 0 and 2 share one).
    wanted = [confirmed.loc[p, "baseline_setting"] for p in (0, 1)]
    assert len(set(wanted)) == 2 and base["setting_id"].tolist() == [
        w for w in wanted for _ in seeds
    ]
    assert (base["baseline_setting"] == base["setting_id"]).all()
    assert points["baseline_setting"].tolist() == [
        confirmed.loc[p, "baseline_setting"] for p in points["point"]
    ]
    assert (base["point"] == -1).all()
    assert base["run_key"].isna().all() and base["checkpoint_step"].isna().all()
    assert base["image"].str.startswith("runs/evaluate/baseline/images/").all()
    assert (base["dino"] == 0.0).all() and table["clip_t"].isna().all()


def test_a_backend_without_image_rows_gives_an_empty_table(tmp_path: Path) -> None:
    cfg = confirm_cfg()
    backend = StubBackend(sweep_table(tmp_path, cfg), tmp_path)
    selected = selected_points(cfg, tmp_path, read_sweep_results(cfg, tmp_path))
    result = write_confirmation(
        cfg, tmp_path, confirm_points(cfg, tmp_path, selected, backend, False)
    )
    assert result.per_image_parquet is not None
    assert list(_schema(result.per_image_parquet)) == [
        *IMAGE_COLUMNS,
        "baseline",
        "baseline_setting",
    ]
    assert pd.read_parquet(result.per_image_parquet).empty
    assert len(result.table) == 3  # everything else as before


# --- the real scorer and backend on tiny models ---------------------------------------------


def _photos(folder: Path) -> list[Path]:
    """Three seeded block images standing in for real photos."""
    folder.mkdir(parents=True)
    paths = []
    for seed in range(3):
        pixels = np.random.default_rng(seed).integers(0, 256, size=(4, 4, 3), dtype=np.uint8)
        paths.append(folder / f"photo-{seed}.png")
        Image.fromarray(pixels).resize((64, 64), Image.Resampling.NEAREST).save(paths[-1])
    return paths


@pytest.fixture(scope="module")
def tiny_cfg() -> HarnessConfig:
    return HarnessConfig.model_validate(
        {
            "preset": "test",
            "data": {"sample_images": 5, "class_name": "toy"},
            "train": {"max_steps": 2, "checkpoint_steps": [2], "learning_rate": 5e-2, "rank": 4},
            "eval": {
                "prompts": [
                    "a photo of {token} {class_name}",
                    "a {token} {class_name} in the snow",
                ],
                "images_per_prompt": 1,
                "num_inference_steps": 2,
                "scheduler": "ddim",
            },
            "metrics": {
                "dino_model": "tiny://dino",
                "clip_model": "tiny://clip",
                "clip_pretrained": None,
                "bootstrap_samples": 10,
            },
            "sweep": {
                "study_name": "per-image",
                "n_trials": 1,
                "sampler": "random",
                "pruner": "none",
                "proxy": {"prompts": 1, "images_per_prompt": 1},
                "inference": {"num_inference_steps": [2]},  # the default is 25 steps
            },
            "evaluate": {"top_k": 1},
            "tracking": {"mode": "off"},
        }
    )


def test_evaluate_adapter_matches_each_image_with_its_scores(
    tiny_cfg: HarnessConfig, tiny_sd15: Any, tmp_path: Path
) -> None:
    real = _photos(tmp_path / "real")
    scorer = make_scorer(tiny_cfg)
    (result,) = evaluate_adapter(
        tiny_cfg,
        tiny_sd15,
        scorer,
        reference=real,
        token="sks",
        class_name="toy",
        adapter=None,
        settings=[tiny_cfg.eval.setting],
        templates=tiny_cfg.eval.prompts,
        seeds=[3, 4],
        out_dir=tmp_path / "out",
    )
    assert len(result.per_image) == len(result.images) == 4
    for row, record in zip(result.per_image, result.images, strict=True):
        assert row["image"] == str(tmp_path / "out" / record.file)
        assert (row["prompt"], row["template"], row["seed"]) == (
            record.prompt,
            record.template,
            record.seed,
        )
        assert -1.0 <= row["dino"] <= 1.0 and row["clip_t"] is not None
    # DINO / CLIP-I are means over all pairs, CLIP-T over images: the rows average to them.
    for metric in ("dino", "clip_i", "clip_t"):
        mean = sum(row[metric] for row in result.per_image) / 4
        assert mean == pytest.approx(result.scores[metric], abs=1e-6)
    # Rows that do not line up with the records are an error, never silently mismatched.
    swapped = scorer.score(real, [tmp_path / "out" / r.file for r in result.images[::-1]])
    with pytest.raises(HarnessError, match="do not match"):
        image_rows(tmp_path / "out", result.images, swapped)
    empty = dataclasses.replace(swapped, images=())
    assert image_rows(tmp_path / "out", result.images, empty) == []


@pytest.mark.slow
def test_real_tiny_sweep_and_evaluate_write_per_image_tables(
    tiny_cfg: HarnessConfig, tiny_sd15: Any, tmp_path: Path
) -> None:
    from harness.data import load_prepared, prepare_subject
    from harness.sweep.backend import HarnessBackend

    prepare_subject(tiny_cfg.data, tmp_path, progress=False)
    subject = load_prepared(tmp_path / "data/prepared/sample")
    backend = HarnessBackend(tiny_cfg, tiny_sd15, subject, make_scorer(tiny_cfg), progress=False)
    summary = run_sweep(tiny_cfg, tmp_path, backend)
    results = pd.read_parquet(summary.results_parquet)
    per_image = pd.read_parquet(tmp_path / "runs/sweep/per_image.parquet")
    assert len(results) == 1 and len(per_image) == 2  # one point, two prompts x one seed
    assert list(per_image.columns) == IMAGE_COLUMNS
    assert all((tmp_path / p).is_file() for p in per_image["image"])
    means = per_image.groupby("point")["dino"].mean()
    assert means.to_numpy() == pytest.approx(
        results.set_index("point").loc[means.index, "score.dino"].to_numpy(), abs=1e-6
    )
    assert len(pd.read_parquet(tmp_path / "runs/sweep/per_prompt.parquet")) == 2

    held_out = ["a {token} {class_name} on the moon", "a {token} {class_name} in a bucket"]
    cfg = tiny_cfg.model_copy(
        update={"evaluate": tiny_cfg.evaluate.model_copy(update={"prompts": held_out})}
    )
    fresh = confirmation_config(cfg)
    confirming = HarnessBackend(fresh, tiny_sd15, subject, backend.scorer, progress=False)
    selected = selected_points(cfg, tmp_path, read_sweep_results(cfg, tmp_path))
    confirmation = write_confirmation(
        cfg, tmp_path, confirm_points(cfg, tmp_path, selected, confirming, False)
    )
    assert confirmation.per_image_parquet is not None
    table = pd.read_parquet(confirmation.per_image_parquet)
    assert table["baseline"].tolist() == [False, False, True, True]
    assert table["point"].tolist() == [int(results["point"].iloc[0])] * 2 + [-1, -1]
    assert set(table["seed"]) == set(eval_seeds(fresh))
    assert set(table["template"]) == set(held_out)
    assert all((tmp_path / p).is_file() for p in table["image"])
    base = table[table["baseline"]]
    baseline_dino = confirmation.references["baseline"]["dino"]
    assert base["dino"].mean() == pytest.approx(baseline_dino, abs=1e-6)
    # The base model again on the sweep's prompts and seeds (the confirming backend was made for
    # the fresh ones): the sweep's own baseline, image for image, at the same setting.
    (row,) = confirmation.table.to_dict(orient="records")
    assert row["baseline_setting"] == base_setting(tiny_cfg.eval.setting).id
    swept = json.loads((tmp_path / "runs/sweep/metrics.json").read_text())["baseline"]
    for metric in ("dino", "clip_i", "clip_t"):
        assert row[f"baseline_sweep.{metric}"] == pytest.approx(swept[metric], abs=1e-6)
        assert row[f"selection_bias.{metric}"] == pytest.approx(
            row[f"shrinkage.{metric}"] - (swept[metric] - row[f"baseline.{metric}"]), abs=1e-6
        )
    assert len(table) == 4  # the sweep-seed baseline's images are not confirmation rows
    assert len(list((tmp_path / "runs/evaluate/baseline-sweep").rglob("*.png"))) == 2
    # The best point again on the sweep's prompts and seeds: its sweep scores, to rounding.
    check = confirmation.point_reproduction
    assert check is not None and check["reproduced"] is True
    for metric in ("dino", "clip_i", "clip_t"):
        assert check["now"][metric] == pytest.approx(row[f"score.{metric}"], abs=1e-6)
    again = sorted((tmp_path / "runs/evaluate/best-sweep").rglob("images/*/*.png"))
    assert [p.name for p in again] == sorted(Path(p).name for p in per_image["image"])


def test_rows_and_scores_kept_before_div_was_lpips_read_as_div_dino(tmp_path: Path) -> None:
    from harness.sweep.per_image import legacy_div, point_rows_path, write_score_tables

    # Before DIV was the paper's LPIPS one, `div` held 1 - mean DINO similarity and there was
    # no `div_dino`: such values must land in div_dino, never in the LPIPS column.
    old_scores = {"dino": 0.5, "div": 0.3, "div_lo": 0.2, "div_hi": 0.4}
    assert legacy_div(old_scores) == {
        "dino": 0.5,
        "div_dino": 0.3,
        "div_dino_lo": 0.2,
        "div_dino_hi": 0.4,
    }
    new_scores = {"dino": 0.5, "div": 0.25, "div_dino": 0.3}
    assert legacy_div(new_scores) == new_scores and legacy_div({"dino": 1.0}) == {"dino": 1.0}

    store = tmp_path / "scores"
    old_row = {"prompt": "a sks toy", "n_images": 2, "dino": 0.5, "clip_i": 0.6, "clip_t": 0.2}
    path = point_rows_path(store, "run-a", 10, "s0")
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"images": [], "prompts": [{**old_row, "div": 0.3}]}))
    frame = pd.DataFrame(
        [{"point": 0, "run_key": "run-a", "checkpoint_step": 10, "setting_id": "s0"}]
    )
    _, prompt_path = write_score_tables(frame, store, tmp_path)
    table = pd.read_parquet(prompt_path)
    assert list(table.columns) == PROMPT_COLUMNS
    assert table["div_dino"].tolist() == [0.3] and table["div"].isna().all()
