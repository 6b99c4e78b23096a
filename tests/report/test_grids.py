"""The image grids (issue 12): each cell shows the image of the point at its labelled values,
checked from the manifest and pixel by pixel; a format the outputs cannot fill leaves no file.

The tables are synthetic (results.parquet, per_image.parquet, the evaluate stage's tables) with
small seeded images; the best point of every cell is known from the made-up scores.
"""

from __future__ import annotations

import itertools
import json
import zlib
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pandas as pd
import pytest
from PIL import Image, ImageChops

from harness.config import HarnessConfig, InferenceSetting, validate_config
from harness.report.grids import (
    DEFAULT_CELL,
    EMPTY,
    KINDS,
    GridFigure,
    cell_size,
    format_value,
    make_grids,
)
from harness.sweep.per_image import EVALUATE_IMAGE_SCHEMA, IMAGE_SCHEMA, write_table

PROMPTS = ("a photo of sks robot", "a sks robot in the snow")
SEEDS = (10, 11)
STEPS = (10, 20)


def make_cfg() -> HarnessConfig:
    return validate_config({"preset": "test", "tracking": {"mode": "off"}})


def _image(path: Path) -> str:
    """A small seeded image at ``path`` (pixels depend on the path); returns the path."""
    rng = np.random.default_rng(zlib.crc32(str(path).encode()))
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = rng.integers(0, 256, size=(5, 5, 3), dtype=np.uint8)
    Image.fromarray(pixels).resize((40, 40), Image.Resampling.NEAREST).save(path)
    return str(path)


def write_sweep(
    root: Path,
    runs: list[dict[str, Any]],
    grid: dict[str, list[Any]],
    quality: Any,
    per_image: bool = True,
) -> pd.DataFrame:
    """A sweep's results.parquet: every run x checkpoint x inference setting of ``grid``, with
    ``score.dino = quality(run, step, setting)``; four images per point (prompts x seeds) in
    per_image.parquet or, without it, in each point's images_dir/manifest.jsonl."""
    settings = [
        InferenceSetting(**{"num_inference_steps": 25, **dict(zip(grid, values, strict=True))})
        for values in itertools.product(*grid.values())
    ]
    rows, images = [], []
    for point, (r, step, setting) in enumerate(
        itertools.product(range(len(runs)), STEPS, settings)
    ):
        images_dir = f"runs/sweep/runs/s/run-{r}/eval/step-{step:06d}/images/{setting.id}"
        dino = quality(runs[r], step, setting)
        rows.append(
            {
                "point": point,
                "run_key": f"run-{r}",
                "checkpoint_step": step,
                **{f"train.{k}": v for k, v in runs[r].items()},
                **{f"eval.{k}": v for k, v in setting.dimensions().items()},
                "score.dino": dino,
                "score.clip_i": dino,
                "score.clip_t": 0.3,
                "pareto": False,
                "setting_id": setting.id,
                "scheduler": setting.scheduler,
                **({"eval.scheduler": setting.scheduler} if "scheduler" in grid else {}),
                "images_dir": images_dir,
            }
        )
        mine = _point_images(root, point, images_dir, per_image)
        images += mine
    frame = pd.DataFrame(rows)
    frame.to_parquet(root / "runs/sweep/results.parquet", index=False)
    if per_image:
        write_table(images, IMAGE_SCHEMA, root / "runs/sweep/per_image.parquet")
    return frame


def _point_images(root: Path, point: int, images_dir: str, table: bool) -> list[dict[str, Any]]:
    """Write a point's four images; their per-image rows, or (``table`` False) a manifest."""
    rows, lines = [], []
    for index, (prompt, seed) in enumerate(itertools.product(PROMPTS, SEEDS)):
        name = f"{index // 2:03d}-{seed}.png"
        _image(root / images_dir / name)
        rows.append(
            {"point": point, "prompt": prompt, "seed": seed, "image": f"{images_dir}/{name}"}
        )
        lines.append(json.dumps({"file": name, "prompt": prompt, "seed": seed}))
    if not table:
        (root / images_dir / "manifest.jsonl").write_text("\n".join(lines) + "\n")
    return rows


def lr_te_quality(run: dict[str, Any], step: int, setting: InferenceSetting) -> float:
    """Higher lr and te lr are better; step 20, guidance 7.5 and full scales win every cell."""
    lr = {1e-4: 0.0, 2.5e-4: 0.1, 5e-4: 0.2}[run["learning_rate"]]
    te = {5e-5: 0.0, 1e-4: 0.05}[run["text_encoder_lr"]]
    inference = (
        0.03 * (setting.guidance_scale == 7.5)
        + 0.02 * setting.lora_scale
        + 0.01 * setting.text_encoder_lora_scale
    )
    return 0.4 + lr + te + 0.02 * (step == 20) + inference


LR_TE_RUNS = [
    {"learning_rate": lr, "text_encoder_lr": te, "rank": 4}
    for lr in (1e-4, 2.5e-4, 5e-4)
    for te in (5e-5, 1e-4)
]
LR_TE_GRID = {
    "guidance_scale": [3.0, 7.5, 10.0],
    "lora_scale": [0.5, 1.0],
    "text_encoder_lora_scale": [0.5, 1.0],
}


@pytest.fixture
def lr_te_sweep(tmp_path: Path) -> tuple[Path, pd.DataFrame]:
    (tmp_path / "runs/sweep").mkdir(parents=True)
    return tmp_path, write_sweep(tmp_path, LR_TE_RUNS, LR_TE_GRID, lr_te_quality)


def read_manifest(figure: GridFigure) -> dict[str, Any]:
    return dict(json.loads(figure.manifest.read_text()))


def assert_cells_show_their_images(root: Path, figure: GridFigure) -> dict[str, Any]:
    """Every cell's pixels are its image resized to the cell (or blank without one), the
    column headers are drawn above the cells; returns the manifest."""
    manifest = read_manifest(figure)
    assert figure.path.name == manifest["image"] == f"{figure.kind}.png"
    grid = Image.open(figure.path).convert("RGB")
    size = manifest["cell_size"]
    for cell in manifest["cells"]:
        box = tuple(cell["box"])
        assert (box[2] - box[0], box[3] - box[1]) == (size, size)
        tile = grid.crop(box)
        if cell["image"] is None:
            assert (np.asarray(tile) == EMPTY).all()
            continue
        with Image.open(root / cell["image"]) as source:
            expected = source.convert("RGB").resize((size, size), Image.Resampling.BICUBIC)
        assert ImageChops.difference(tile, expected).getbbox() is None, cell
        header = np.asarray(grid.crop((box[0], 0, box[2], box[1])).convert("L"))
        assert header.min() < 100, "no label drawn above the column"
    rows, cols = manifest["rows"], manifest["columns"]
    assert len(manifest["cells"]) == len(rows["values"]) * len(cols["values"])
    for cell in manifest["cells"]:
        assert cell["row_label"] == rows["labels"][cell["row"]]
        assert cell["row_value"] == rows["values"][cell["row"]]
        assert cell["col_label"] == cols["labels"][cell["col"]]
        assert cell["col_value"] == cols["values"][cell["col"]]
    return manifest


def _point(frame: pd.DataFrame, number: int) -> dict[str, Any]:
    return dict(frame.set_index("point").loc[number].to_dict())


def test_lr_grid_cells_are_the_best_point_of_their_learning_rates(
    lr_te_sweep: tuple[Path, pd.DataFrame],
) -> None:
    root, frame = lr_te_sweep
    figures = {g.kind: g for g in make_grids(make_cfg(), root, root / "reports/grids")}
    manifest = assert_cells_show_their_images(root, figures["lr_grid"])
    assert manifest["rows"]["labels"] == ["lr 1e-04", "lr 2.5e-04", "lr 5e-04"]
    assert manifest["rows"]["values"] == [1e-4, 2.5e-4, 5e-4]
    assert manifest["columns"]["labels"] == ["te lr 5e-05", "te lr 1e-04"]
    for cell in manifest["cells"]:
        point = _point(frame, cell["point"])
        assert point["train.learning_rate"] == cell["row_value"]
        assert point["train.text_encoder_lr"] == cell["col_value"]
        # The best checkpoint and inference setting of that pair of learning rates.
        assert point["checkpoint_step"] == 20 and point["eval.guidance_scale"] == 7.5
        assert point["eval.lora_scale"] == point["eval.text_encoder_lora_scale"] == 1.0
        assert (cell["prompt"], cell["seed"]) == (PROMPTS[0], SEEDS[0])  # one prompt and seed
        assert cell["image"] == f"{point['images_dir']}/000-{SEEDS[0]}.png"
    assert "prompt 'a photo of sks robot', seed 10" in figures["lr_grid"].title


def test_guidance_and_lora_scale_grids_of_the_best_run_and_checkpoint(
    lr_te_sweep: tuple[Path, pd.DataFrame],
) -> None:
    root, frame = lr_te_sweep
    figures = {g.kind: g for g in make_grids(make_cfg(), root, root / "out")}
    best_run = "run-5"  # lr 5e-4, te lr 1e-4
    strip = assert_cells_show_their_images(root, figures["guidance_strip"])
    assert strip["rows"]["labels"] == [f"run {best_run} step 20"]
    assert strip["columns"]["labels"] == ["guidance 3", "guidance 7.5", "guidance 10"]
    for cell in strip["cells"]:
        point = _point(frame, cell["point"])
        assert (point["run_key"], point["checkpoint_step"]) == (best_run, 20)
        assert point["eval.guidance_scale"] == cell["col_value"]
        assert point["eval.lora_scale"] == point["eval.text_encoder_lora_scale"] == 1.0
    scales = assert_cells_show_their_images(root, figures["lora_scale_grid"])
    assert scales["rows"]["labels"] == ["unet scale 0.5", "unet scale 1"]
    assert scales["columns"]["labels"] == ["te scale 0.5", "te scale 1"]
    for cell in scales["cells"]:
        point = _point(frame, cell["point"])
        assert (point["run_key"], point["checkpoint_step"]) == (best_run, 20)
        assert point["eval.guidance_scale"] == 7.5
        assert point["eval.lora_scale"] == cell["row_value"]
        assert point["eval.text_encoder_lora_scale"] == cell["col_value"]
    # Rank never varies and nothing was confirmed: those formats leave no file.
    assert list(figures) == ["lr_grid", "guidance_strip", "lora_scale_grid"]
    assert sorted(p.name for p in (root / "out").iterdir()) == sorted(
        f"{k}.{e}" for k in figures for e in ("png", "json")
    )
    assert all(g.path.parent == root / "out" for g in figures.values())


def lr_rank_quality(run: dict[str, Any], step: int, setting: InferenceSetting) -> float:
    return 0.4 + 0.1 * (run["learning_rate"] == 5e-4) + 0.01 * run["rank"] + 0.02 * (step == 20)


def test_lr_grid_by_rank_and_rank_grid_from_the_image_manifests(tmp_path: Path) -> None:
    """Text-encoder lr not searched: the lr grid's columns are the rank; images come from each
    point's images_dir manifest when there is no per_image.parquet (an older sweep)."""
    (tmp_path / "runs/sweep").mkdir(parents=True)
    runs = [
        {"learning_rate": lr, "text_encoder_lr": 5e-5, "rank": rank}
        for lr in (1e-4, 5e-4)
        for rank in (4, 8, 16)
    ]
    grid = {"guidance_scale": [7.5], "lora_scale": [1.0], "text_encoder_lora_scale": [1.0]}
    frame = write_sweep(tmp_path, runs, grid, lr_rank_quality, per_image=False)
    assert not (tmp_path / "runs/sweep/per_image.parquet").exists()
    figures = {g.kind: g for g in make_grids(make_cfg(), tmp_path, tmp_path / "grids")}
    assert list(figures) == ["lr_grid", "rank_grid"]  # one guidance, one scale: no strip
    lr = assert_cells_show_their_images(tmp_path, figures["lr_grid"])
    assert lr["columns"]["labels"] == ["rank 4", "rank 8", "rank 16"]
    for cell in lr["cells"]:
        point = _point(frame, cell["point"])
        assert (point["train.learning_rate"], point["train.rank"]) == (
            cell["row_value"],
            cell["col_value"],
        )
        assert point["checkpoint_step"] == 20
    ranks = assert_cells_show_their_images(tmp_path, figures["rank_grid"])
    assert ranks["rows"]["labels"] == ["rank 4", "rank 8", "rank 16"]
    assert ranks["columns"]["values"] == ranks["columns"]["labels"] == list(PROMPTS)
    for cell in ranks["cells"]:
        point = _point(frame, cell["point"])
        assert point["train.rank"] == cell["row_value"] and cell["prompt"] == cell["col_value"]
        assert point["train.learning_rate"] == 5e-4 and point["checkpoint_step"] == 20
        assert cell["seed"] == SEEDS[0]
    assert not (tmp_path / "grids/guidance_strip.png").exists()


def write_confirmation(
    root: Path,
    best: int,
    other: int,
    seeds: tuple[int, ...],
    subjects: tuple[str, ...] = (),
) -> None:
    """The evaluate stage's tables: two confirmed points (``best`` first) and the baseline;
    with ``subjects``, each subject's images of its own prompts (``<subject> <prompt>``)."""
    rows = []
    for point in (best, other, -1):
        folder = "runs/evaluate/baseline" if point == -1 else f"runs/evaluate/point-{point:05d}"
        for subject in subjects or (None,):
            prompts = [f"{subject} {p}" if subject else p for p in PROMPTS]
            where = f"{folder}/{subject}" if subject else folder
            rows += _confirmed_rows(root, point, where, prompts, seeds, subject)
    write_table(rows, EVALUATE_IMAGE_SCHEMA, root / "runs/evaluate/per_image.parquet")
    table = pd.DataFrame({"point": [other, best], "selection_rank": [2, 1]})
    table.to_parquet(root / "runs/evaluate/results.parquet", index=False)


def _confirmed_rows(
    root: Path,
    point: int,
    folder: str,
    prompts: list[str],
    seeds: tuple[int, ...],
    subject: str | None,
    setting: str = "g7.5",
) -> list[dict[str, Any]]:
    rows = []
    for index, (prompt, seed) in enumerate(itertools.product(prompts, seeds)):
        image = f"{folder}/images/{setting}/{index // len(seeds):03d}-{seed}.png"
        _image(root / image)
        rows.append(
            {
                "point": point,
                "run_key": None if point == -1 else "run-1",
                "checkpoint_step": None if point == -1 else 20,
                "setting_id": setting,
                "prompt": prompt,
                "seed": seed,
                "image": image,
                "dino": 0.5,
                "baseline": point == -1,
                **({"subject": subject} if subject else {}),
            }
        )
    return rows


def test_base_vs_lora_of_a_multi_subject_sweep_shows_every_subject(tmp_path: Path) -> None:
    """Four subjects, two prompts x two seeds each: two columns per subject (its prompts at
    the first seed), each the same subject, prompt and seed for base and LoRA."""
    subjects = ("backpack", "cat2", "dog", "teapot")
    write_confirmation(tmp_path, best=7, other=3, seeds=(20, 21), subjects=subjects)
    (figure,) = make_grids(make_cfg(), tmp_path, tmp_path / "grids")
    manifest = assert_cells_show_their_images(tmp_path, figure)
    keys = [tuple(v) for v in manifest["columns"]["values"]]
    assert keys == [(s, f"{s} {prompt}", 20) for s in subjects for prompt in PROMPTS]
    assert manifest["columns"]["labels"][0] == f"backpack: backpack {PROMPTS[0]} (seed 20)"
    for cell in manifest["cells"]:
        subject, prompt, seed = cell["col_value"]
        assert (cell["prompt"], cell["seed"]) == (prompt, seed)
        folder = "baseline" if cell["row"] == 0 else "point-00007"
        assert cell["image"].startswith(f"runs/evaluate/{folder}/{subject}/")


def test_base_vs_lora_pairs_the_same_prompts_and_seeds(tmp_path: Path) -> None:
    write_confirmation(tmp_path, best=7, other=3, seeds=(20, 21, 22))
    (figure,) = make_grids(make_cfg(), tmp_path, tmp_path / "grids")  # no sweep table: only this
    assert figure.kind == "base_vs_lora"
    manifest = assert_cells_show_their_images(tmp_path, figure)
    assert manifest["rows"]["labels"] == ["base model", "LoRA point 7"]
    assert manifest["rows"]["values"] == ["base", 7]
    pairs = [[p, s] for p in PROMPTS for s in (20, 21, 22)]
    assert manifest["columns"]["values"] == pairs
    assert manifest["columns"]["labels"] == [f"{p} (seed {s})" for p, s in pairs]
    for cell in manifest["cells"]:
        assert cell["point"] == (-1 if cell["row"] == 0 else 7)
        assert [cell["prompt"], cell["seed"]] == cell["col_value"]
        folder = "baseline" if cell["row"] == 0 else "point-00007"
        assert cell["image"].startswith(f"runs/evaluate/{folder}/")
        assert cell["image"].endswith(f"-{cell['seed']}.png")


def test_skipped_formats_leave_no_file_and_remove_stale_ones(tmp_path: Path) -> None:
    out = tmp_path / "grids"
    assert make_grids(make_cfg(), tmp_path, out) == []  # no outputs at all
    assert not out.exists() or not any(out.iterdir())
    out.mkdir()
    for kind in KINDS:
        (out / f"{kind}.png").write_bytes(b"old")
        (out / f"{kind}.json").write_text("{}")
    (tmp_path / "runs/sweep").mkdir(parents=True)
    one = {"guidance_scale": [7.5], "lora_scale": [1.0], "text_encoder_lora_scale": [1.0]}
    write_sweep(tmp_path, [LR_TE_RUNS[0]], one, lr_te_quality)  # one run: nothing to compare
    assert make_grids(make_cfg(), tmp_path, out) == []
    assert list(out.iterdir()) == []


def test_cells_without_an_image_are_blank(lr_te_sweep: tuple[Path, pd.DataFrame]) -> None:
    root, frame = lr_te_sweep
    gone = frame[(frame["run_key"] == "run-0") & (frame["checkpoint_step"] == 20)]
    for folder in gone["images_dir"]:
        for image in (root / folder).iterdir():
            image.unlink()
    figures = {g.kind: g for g in make_grids(make_cfg(), root, root / "grids")}
    manifest = assert_cells_show_their_images(root, figures["lr_grid"])
    blank = [c for c in manifest["cells"] if c["image"] is None]
    assert [(c["row"], c["col"]) for c in blank] == [(0, 0)]  # lr 1e-4, te lr 5e-5
    assert blank[0]["point"] is not None


def test_cell_size_follows_report_image_size(lr_te_sweep: tuple[Path, pd.DataFrame]) -> None:
    assert cell_size(SimpleNamespace()) == DEFAULT_CELL == 128  # type: ignore[arg-type]
    assert cell_size(SimpleNamespace(report=SimpleNamespace(image_size=48))) == 48  # type: ignore[arg-type]
    cfg = make_cfg()
    if not hasattr(cfg, "report"):
        pytest.skip("this config has no report section")
    small = cfg.model_copy(update={"report": cfg.report.model_copy(update={"image_size": 48})})
    root, _ = lr_te_sweep
    figures = make_grids(small, root, root / "small")
    for figure in figures:
        assert assert_cells_show_their_images(root, figure)["cell_size"] == 48


@pytest.mark.parametrize(
    ("name", "value", "text"),
    [
        ("learning_rate", 1e-4, "1e-04"),
        ("learning_rate", 2.5e-4, "2.5e-04"),
        ("text_encoder_lr", 5e-5, "5e-05"),
        ("guidance_scale", 7.5, "7.5"),
        ("guidance_scale", 14.0, "14"),
        ("rank", 8, "8"),
        ("dropout", 0.1, "0.1"),
        ("train_text_encoder", True, "True"),
        ("lr_scheduler", "cosine", "cosine"),
    ],
)
def test_values_are_labelled_as_published(name: str, value: Any, text: str) -> None:
    assert format_value(name, value) == text


def scheduler_quality(run: dict[str, Any], step: int, setting: InferenceSetting) -> float:
    """euler beats ddim at guidance 7.5 only; guidance 7.5 wins overall."""
    bonus = 0.05 * (setting.guidance_scale == 7.5) * (setting.scheduler == "euler")
    return 0.4 + 0.1 * run["learning_rate"] * 1e3 + 0.02 * (step == 20) + bonus


def test_scheduler_strip_of_the_best_run_and_checkpoint_when_schedulers_are_swept(
    tmp_path: Path,
) -> None:
    """sweep.inference.scheduler: one row over the schedulers at the best point's guidance;
    the guidance strip stays at the best point's scheduler."""
    (tmp_path / "runs/sweep").mkdir(parents=True)
    runs = [{"learning_rate": lr, "rank": 4} for lr in (1e-4, 5e-4)]
    grid = {"guidance_scale": [3.0, 7.5], "scheduler": ["ddim", "euler"]}
    frame = write_sweep(tmp_path, runs, grid, scheduler_quality)
    figures = {g.kind: g for g in make_grids(make_cfg(), tmp_path, tmp_path / "grids")}
    assert "scheduler_strip" in figures and KINDS.index("scheduler_strip") == 2
    strip = assert_cells_show_their_images(tmp_path, figures["scheduler_strip"])
    assert strip["rows"]["labels"] == ["run run-1 step 20"]
    assert strip["columns"]["labels"] == ["scheduler ddim", "scheduler euler"]
    for cell in strip["cells"]:
        point = _point(frame, cell["point"])
        assert (point["run_key"], point["checkpoint_step"]) == ("run-1", 20)
        assert point["eval.guidance_scale"] == 7.5 and point["scheduler"] == cell["col_value"]
    guidance = assert_cells_show_their_images(tmp_path, figures["guidance_strip"])
    assert {_point(frame, c["point"])["scheduler"] for c in guidance["cells"]} == {"euler"}
    plain = tmp_path / "plain"
    (plain / "runs/sweep").mkdir(parents=True)
    write_sweep(plain, runs, {"guidance_scale": [3.0, 7.5]}, scheduler_quality)
    kinds = [g.kind for g in make_grids(make_cfg(), plain, plain / "grids")]
    assert "scheduler_strip" not in kinds and "guidance_strip" in kinds


def test_strips_of_a_best_run_without_text_encoder_lora(tmp_path: Path) -> None:
    """A UNet-only run's points have no eval.text_encoder_lora_scale (NaN): its guidance strip
    still holds every guidance value, and there is no text-encoder scale grid to draw."""
    (tmp_path / "runs/sweep").mkdir(parents=True)
    runs = [{"learning_rate": 1e-4, "rank": 4}, {"learning_rate": 5e-4, "rank": 4}]
    grid = {"guidance_scale": [3.0, 7.5], "lora_scale": [0.5, 1.0]}
    frame = write_sweep(
        tmp_path, runs, grid, lambda r, step, s: r["learning_rate"] + step + s.lora_scale
    )
    frame["eval.text_encoder_lora_scale"] = np.nan
    frame.to_parquet(tmp_path / "runs/sweep/results.parquet", index=False)
    figures = {g.kind: g for g in make_grids(make_cfg(), tmp_path, tmp_path / "out")}
    strip = assert_cells_show_their_images(tmp_path, figures["guidance_strip"])
    assert strip["columns"]["labels"] == ["guidance 3", "guidance 7.5"]
    assert all(cell["image"] is not None for cell in strip["cells"])
    scales = assert_cells_show_their_images(tmp_path, figures["lora_scale_grid"])
    assert scales["rows"]["labels"] == ["run run-1 step 20"]
    assert scales["columns"]["labels"] == ["unet scale 0.5", "unet scale 1"]
    assert "no text-encoder LoRA" in figures["lora_scale_grid"].title
