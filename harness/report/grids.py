"""The image grids researchers publish, from the sweep's and the evaluate stage's tables.

:func:`make_grids` writes, into ``out_dir``, one PNG and one JSON manifest per format that the
sweep has the values for (a format it cannot fill is skipped, and a stale file of it removed):

``lr_grid``
    learning rate (rows) x text-encoder learning rate (columns), or x the first other searched
    training parameter that varies when the text-encoder rate does not (dropout, rank, ...);
    each cell the best point (checkpoint and inference setting) of that pair of values.
``guidance_strip``
    one row over the guidance scales of the best run and checkpoint (its other inference
    settings fixed).
``scheduler_strip``
    one row over the inference schedulers of the best run and checkpoint, when
    ``sweep.inference.scheduler`` sweeps them (its other inference settings fixed).
``lora_scale_grid``
    LoRA scale of the UNet (rows) x of the text encoder (columns), best run and checkpoint.
``rank_grid``
    LoRA rank (rows) x prompts (columns), each row the best point of that rank.
``base_vs_lora``
    the base model (first row) versus the best confirmed point (second row) on the evaluate
    stage's fresh seeds, the same prompt and seed per column.

The parameter grids show one prompt and seed: the first image of the best point. "Best" is the
sweep's objective sum (:func:`harness.sweep.select.selection_scores`), ties to the lower point
number. Inputs: ``<sweep.dir>/results.parquet`` and ``per_image.parquet`` (or, from an older
sweep, each point's ``images_dir/manifest.jsonl``), ``<evaluate.dir>/per_image.parquet`` and
``results.parquet``. Cells are ``report.image_size`` pixels (default 128) and labelled with
their values; a cell without an image is light grey.

The manifest (``<kind>.json``) lists every cell: ``row``, ``col``, ``row_label``,
``row_value``, ``col_label``, ``col_value``, ``point``, ``image`` (relative to the project
root), ``prompt``, ``seed`` and ``box`` (``[left, top, right, bottom]`` in the PNG): each
image sits there resized to the cell (bicubic) and can be checked pixel by pixel.
"""

from __future__ import annotations

import functools
import json
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd
from PIL import Image, ImageDraw, ImageFont

from harness.config import INFERENCE_DIMENSIONS, SEARCHABLE_TRAIN_PARAMS
from harness.sweep.per_image import BASELINE_POINT, PER_IMAGE, baseline_rows
from harness.sweep.results import RESULTS_PARQUET, full_fidelity
from harness.sweep.select import selection_scores

if TYPE_CHECKING:
    from harness.config import HarnessConfig

__all__ = [
    "DEFAULT_CELL",
    "EMPTY",
    "KINDS",
    "RESAMPLE",
    "GridFigure",
    "cell_size",
    "format_value",
    "label",
    "make_grids",
]

logger = logging.getLogger(__name__)

KINDS = (
    "lr_grid",
    "guidance_strip",
    "scheduler_strip",
    "lora_scale_grid",
    "rank_grid",
    "base_vs_lora",
)
DEFAULT_CELL = 128
RESAMPLE = Image.Resampling.BICUBIC  # how a source image is fitted to its cell
MAX_AXIS = 16  # more distinct values than this: a continuous search, not a grid
MAX_COLUMNS = 8  # prompts (x seeds) shown in the rank and base-versus-LoRA grids
GAP, PAD = 2, 6
EMPTY = (225, 225, 225)  # a cell without an image
# The second axis of the learning-rate grid, in order of preference.
SECOND_PARAMS = ("text_encoder_lr", *(p for p in SEARCHABLE_TRAIN_PARAMS if p != "learning_rate"))
NAMES = {
    "learning_rate": "lr",
    "text_encoder_lr": "te lr",
    "prior_loss_weight": "prior weight",
    "train_text_encoder": "train te",
    "lr_scheduler": "lr schedule",
    "lr_warmup_steps": "warmup",
    "max_steps": "max steps",
    "guidance_scale": "guidance",
    "lora_scale": "unet scale",
    "text_encoder_lora_scale": "te scale",
    "num_inference_steps": "steps",
}
SCIENTIFIC = ("learning_rate", "text_encoder_lr")


@dataclass(frozen=True)
class GridFigure:
    """One written grid: its format, title, PNG and JSON manifest."""

    kind: str
    title: str
    path: Path
    manifest: Path


@dataclass(frozen=True)
class Axis:
    """The rows or columns of a grid: a name, the values and their labels."""

    name: str
    values: tuple[Any, ...]
    labels: tuple[str, ...]


@dataclass(frozen=True)
class Cell:
    """What one cell shows: a point's image of a prompt and seed (``image`` None: blank)."""

    point: int | None
    image: str | None
    prompt: str | None
    seed: int | None


@dataclass(frozen=True)
class GridSpec:
    """A grid to draw: rows x columns of cells, row-major."""

    kind: str
    title: str
    rows: Axis
    cols: Axis
    cells: tuple[Cell, ...]


@dataclass(frozen=True)
class Sources:
    """The tables the grids are drawn from (empty frames where an input is missing)."""

    root: Path
    points: pd.DataFrame  # results rows, best first, with ``_score``
    images: pd.DataFrame  # point, prompt, seed, image: the sweep's images in generation order
    confirmed: pd.DataFrame  # the evaluate stage's per-image rows
    confirmed_best: int | None  # the best confirmed point

    def cell(
        self, point: int | None, image: str | None, prompt: str | None, seed: int | None
    ) -> Cell:
        """A cell showing ``image`` (relative to the root); blank when that file is missing."""
        present = image is not None and (self.root / image).is_file()
        return Cell(point, image if present else None, prompt, seed)

    def image(self, point: int | None, prompt: str | None, seed: int | None) -> Cell:
        """The cell of ``point``'s sweep image of ``prompt`` and ``seed`` (blank: none)."""
        if point is None:
            return Cell(None, None, prompt, seed)
        return self.cell(point, self._index.get((point, prompt, seed)), prompt, seed)

    @functools.cached_property
    def _index(self) -> dict[tuple[int, str | None, int | None], str]:
        """``(point, prompt, seed) -> image`` of the sweep's images (the first of duplicates)."""
        index: dict[tuple[int, str | None, int | None], str] = {}
        for point, prompt, seed, image in self.images[
            ["point", "prompt", "seed", "image"]
        ].itertuples(index=False):
            index.setdefault((int(point), str(prompt), int(seed)), str(image))
        return index

    def first_image(self, point: int) -> tuple[str | None, int | None]:
        """(prompt, seed) of ``point``'s first image (generation order)."""
        mine = self.images[self.images["point"] == point]
        if mine.empty:
            return None, None
        return str(mine["prompt"].iloc[0]), int(mine["seed"].iloc[0])


def cell_size(cfg: HarnessConfig) -> int:
    """``report.image_size`` when the config has it, else :data:`DEFAULT_CELL`."""
    report = getattr(cfg, "report", None)
    size = getattr(report, "image_size", None)
    return int(size) if size else DEFAULT_CELL


def make_grids(cfg: HarnessConfig, root: Path, out_dir: Path) -> list[GridFigure]:
    """Write every grid the outputs can fill into ``out_dir`` (``<kind>.png`` and
    ``<kind>.json``); return them in :data:`KINDS` order. A skipped format leaves no file."""
    sources = load_sources(cfg, root)
    builders: dict[str, Callable[[Sources], GridSpec | None]] = {
        "lr_grid": lr_grid,
        "guidance_strip": guidance_strip,
        "scheduler_strip": scheduler_strip,
        "lora_scale_grid": lora_scale_grid,
        "rank_grid": rank_grid,
        "base_vs_lora": base_vs_lora,
    }
    size, written = cell_size(cfg), []
    for kind in KINDS:
        spec = builders[kind](sources)
        png, manifest = out_dir / f"{kind}.png", out_dir / f"{kind}.json"
        if spec is None or _filled(spec) < 2:
            png.unlink(missing_ok=True)
            manifest.unlink(missing_ok=True)
            logger.info("grid %s: skipped (the outputs do not have the values to fill it)", kind)
            continue
        write_grid(spec, root, size, png, manifest)
        written.append(GridFigure(kind, spec.title, png, manifest))
    return written


# --- inputs ---------------------------------------------------------------------------------


def load_sources(cfg: HarnessConfig, root: Path) -> Sources:
    """Read the sweep's and the evaluate stage's tables (missing ones as empty frames)."""
    sweep_dir, evaluate_dir = root / cfg.sweep.dir, root / cfg.evaluate.dir
    points = _ranked_points(cfg, full_fidelity(_read(sweep_dir / RESULTS_PARQUET)))
    images = _sweep_images(root, sweep_dir, points)
    confirmed = _read(evaluate_dir / PER_IMAGE)
    return Sources(root, points, images, confirmed, _confirmed_best(evaluate_dir, confirmed))


def _read(path: Path) -> pd.DataFrame:
    return pd.read_parquet(path) if path.is_file() else pd.DataFrame()


def _ranked_points(cfg: HarnessConfig, frame: pd.DataFrame) -> pd.DataFrame:
    """The scored points, best first by the sweep's objective sum (``_score``)."""
    if frame.empty or "point" not in frame.columns:
        return pd.DataFrame()
    weights = cfg.sweep.weights or {cfg.sweep.subject_metric: 0.5, cfg.sweep.prompt_metric: 0.5}
    needed = [f"score.{m}" for m in weights]
    if any(c not in frame.columns for c in needed):
        return pd.DataFrame()
    frame = frame.dropna(subset=needed).copy()
    frame["_score"] = selection_scores(cfg, frame)
    frame = frame.sort_values(["_score", "point"], ascending=[False, True])
    return frame.reset_index(drop=True)


def _sweep_images(root: Path, sweep_dir: Path, points: pd.DataFrame) -> pd.DataFrame:
    """The sweep's images per point: ``per_image.parquet``, and for the points it lacks (an
    older sweep wrote none) each point's ``images_dir/manifest.jsonl``."""
    columns = ["point", "prompt", "seed", "image"]
    table = sweep_dir / PER_IMAGE
    images = pd.read_parquet(table, columns=columns) if table.is_file() else pd.DataFrame()
    listed = set(images["point"]) if not images.empty else set()
    rows: list[dict[str, Any]] = []
    if "images_dir" in points.columns:
        for point, folder in zip(points["point"], points["images_dir"], strict=True):
            if int(point) not in listed and isinstance(folder, str):
                rows += _manifest_rows(root, int(point), folder)
    extra = pd.DataFrame(rows, columns=columns)
    return extra if images.empty else pd.concat([images, extra], ignore_index=True)


def _manifest_rows(root: Path, point: int, folder: str) -> list[dict[str, Any]]:
    """A point's images from the per-setting manifest of
    :func:`harness.evaluate.evaluate_adapter` (``file`` relative to the folder, prompt, seed)."""
    manifest = root / folder / "manifest.jsonl"
    if not manifest.is_file():
        return []
    rows = []
    for line in manifest.read_text(encoding="utf-8").splitlines():
        if line.strip():
            record = json.loads(line)
            image = (Path(folder) / Path(record["file"]).name).as_posix()
            rows.append(
                {
                    "point": point,
                    "prompt": record["prompt"],
                    "seed": int(record["seed"]),
                    "image": image,
                }
            )
    return rows


def _confirmed_best(evaluate_dir: Path, confirmed: pd.DataFrame) -> int | None:
    """The evaluate stage's best point: its results' first row (selection rank 1)."""
    table = _read(evaluate_dir / RESULTS_PARQUET)
    if not table.empty and "point" in table.columns:
        if "selection_rank" in table.columns:
            table = table.sort_values("selection_rank")
        return int(table["point"].iloc[0])
    if not confirmed.empty:
        lora = confirmed[confirmed["point"] != BASELINE_POINT]
        return int(lora["point"].iloc[0]) if len(lora) else None
    return None


# --- labels ---------------------------------------------------------------------------------


def _plain(value: Any) -> Any:
    """A JSON-safe Python value (numpy scalars unwrapped)."""
    return value.item() if hasattr(value, "item") else value


def format_value(name: str, value: Any) -> str:
    """``value`` as a label shows it: learning rates in short scientific notation
    (``1e-04``, ``2.5e-04``), other numbers in their shortest form (``7.5``, ``8``)."""
    value = _plain(value)
    if isinstance(value, bool) or not isinstance(value, int | float):
        return str(value)
    if name in SCIENTIFIC:
        for digits in range(6):
            text = f"{value:.{digits}e}"
            if math.isclose(float(text), value, rel_tol=1e-9):
                return text
    return f"{value:g}"


def label(column: str, value: Any) -> str:
    """The label of a parameter value, e.g. ``lr 1e-04``, ``te lr 5e-05``, ``guidance 7.5``."""
    name = column.split(".", 1)[-1]
    return f"{NAMES.get(name, name)} {format_value(name, value)}"


def _axis(column: str, values: Sequence[Any]) -> Axis:
    ordered = tuple(sorted({_plain(v) for v in values if not pd.isna(v)}))
    return Axis(column, ordered, tuple(label(column, v) for v in ordered))


def _describe(prompt: str | None, seed: int | None) -> str:
    return f"prompt '{prompt}', seed {seed}" if prompt is not None else "no image"


# --- the formats ----------------------------------------------------------------------------


def _varying(points: pd.DataFrame, column: str) -> bool:
    return column in points.columns and points[column].dropna().nunique() >= 2


def _grid_by(
    kind: str,
    title: str,
    sources: Sources,
    candidates: pd.DataFrame,
    axes: tuple[Axis, Axis],
    image: tuple[str | None, int | None],
) -> GridSpec | None:
    """Rows x columns of the candidates' values, each cell the best candidate with that pair
    of values (``candidates`` are best first), showing its image of one prompt and seed."""
    rows, cols = axes
    if not rows.values or not cols.values or max(len(rows.values), len(cols.values)) > MAX_AXIS:
        return None
    cells = []
    for row_value in rows.values:
        for col_value in cols.values:
            match = candidates[
                (candidates[rows.name] == row_value) & (candidates[cols.name] == col_value)
            ]
            point = int(match["point"].iloc[0]) if len(match) else None
            cells.append(sources.image(point, *image))
    return GridSpec(kind, title, rows, cols, tuple(cells))


def lr_grid(sources: Sources) -> GridSpec | None:
    """Learning rate x text-encoder learning rate (or the first other varying training
    parameter), the best checkpoint and inference setting per cell."""
    points, lr = sources.points, "train.learning_rate"
    if points.empty or lr not in points.columns:
        return None
    second = next((f"train.{p}" for p in SECOND_PARAMS if _varying(points, f"train.{p}")), None)
    if second is None and "train.text_encoder_lr" in points.columns:
        second = "train.text_encoder_lr"  # fixed: one column, labelled with its value
    if second is None:
        return None
    image = sources.first_image(int(points["point"].iloc[0]))
    name = NAMES.get(second.removeprefix("train."), second.removeprefix("train."))
    title = (
        f"Learning rate x {name}: best checkpoint and inference setting per cell, "
        f"{_describe(*image)}"
    )
    axes = (_axis(lr, points[lr]), _axis(second, points[second]))
    return _grid_by("lr_grid", title, sources, points, axes, image)


def _family(points: pd.DataFrame, best: pd.Series, free: Sequence[str]) -> pd.DataFrame:
    """The best point's run and checkpoint under the settings that differ from its own only in
    the ``free`` inference dimensions, with a ``run`` column naming the run and step."""
    mask = (points["run_key"] == best["run_key"]) & (
        points["checkpoint_step"] == best["checkpoint_step"]
    )
    fixed = [f"eval.{n}" for n in (*INFERENCE_DIMENSIONS, "scheduler") if n not in free]
    fixed += [] if "scheduler" in free else ["scheduler"]  # the setting's own, swept or not
    for column in (c for c in fixed if c in points.columns):
        # NaN is a value here: a run without a text-encoder adapter has no text-encoder scale.
        same = points[column] == best[column]
        mask &= (same | points[column].isna()) if pd.isna(best[column]) else same
    return points[mask].assign(run=_run_value(best))


def _run_value(best: pd.Series) -> str:
    return f"{best['run_key']}/{int(best['checkpoint_step'])}"


def _run_axis(best: pd.Series) -> Axis:
    text = f"run {best['run_key']} step {int(best['checkpoint_step'])}"
    return Axis("run", (_run_value(best),), (text,))


def _strip(sources: Sources, kind: str, dimension: str, what: str) -> GridSpec | None:
    """One row over inference ``dimension``'s values for the best run and checkpoint, its
    other inference settings fixed."""
    points, column = sources.points, f"eval.{dimension}"
    best = points.iloc[0]
    family = _family(points, best, [dimension])
    image = sources.first_image(int(best["point"]))
    title = f"{what}, best run and checkpoint: {_describe(*image)}"
    axes = (_run_axis(best), _axis(column, family[column]))
    return _grid_by(kind, title, sources, family, axes, image)


def guidance_strip(sources: Sources) -> GridSpec | None:
    """One row over the guidance scales of the best run and checkpoint."""
    points = sources.points
    if points.empty or "eval.guidance_scale" not in points.columns:
        return None
    return _strip(sources, "guidance_strip", "guidance_scale", "Guidance scale")


def scheduler_strip(sources: Sources) -> GridSpec | None:
    """One row over the inference schedulers of the best run and checkpoint (only when the
    sweep evaluates several: ``eval.scheduler`` varies)."""
    points = sources.points
    if points.empty or not _varying(points, "eval.scheduler"):
        return None
    return _strip(sources, "scheduler_strip", "scheduler", "Inference scheduler")


def lora_scale_grid(sources: Sources) -> GridSpec | None:
    """LoRA scale of the UNet (rows) x of the text encoder (columns), best run and checkpoint."""
    points = sources.points
    unet, text = "eval.lora_scale", "eval.text_encoder_lora_scale"
    if points.empty or unet not in points.columns or text not in points.columns:
        return None
    best = points.iloc[0]
    if pd.isna(best[text]):  # a run without a text-encoder adapter: its UNet scale alone
        return _strip(
            sources, "lora_scale_grid", "lora_scale", "UNet LoRA scale (no text-encoder LoRA)"
        )
    family = _family(points, best, ["lora_scale", "text_encoder_lora_scale"])
    image = sources.first_image(int(best["point"]))
    title = f"LoRA scale UNet x text encoder, best run and checkpoint: {_describe(*image)}"
    axes = (_axis(unet, family[unet]), _axis(text, family[text]))
    return _grid_by("lora_scale_grid", title, sources, family, axes, image)


def rank_grid(sources: Sources) -> GridSpec | None:
    """LoRA rank (rows) x the best point's prompts (columns, its first seed), each row the
    best point of that rank."""
    points, column = sources.points, "train.rank"
    if points.empty or not _varying(points, column):
        return None
    ranks = _axis(column, points[column])
    mine = sources.images[sources.images["point"] == int(points["point"].iloc[0])]
    prompts = tuple(dict.fromkeys(str(p) for p in mine["prompt"]))[:MAX_COLUMNS]
    if not prompts or len(ranks.values) > MAX_AXIS:
        return None
    seed = int(mine["seed"].iloc[0])
    cells = []
    for rank in ranks.values:
        point = int(points.loc[points[column] == rank, "point"].iloc[0])
        cells += [sources.image(point, prompt, seed) for prompt in prompts]
    title = f"LoRA rank: the best point of each rank, seed {seed}"
    return GridSpec("rank_grid", title, ranks, Axis("prompt", prompts, prompts), tuple(cells))


def _keys(table: pd.DataFrame, by_subject: bool) -> list[tuple[Any, ...]]:
    """Each image's ``(prompt, seed)``, or ``(subject, prompt, seed)``, in table order."""
    seeds = [int(s) for s in table["seed"]]
    if by_subject:
        subjects = table["subject"].astype(str)
        return list(zip(subjects, table["prompt"].astype(str), seeds, strict=True))
    return list(zip(table["prompt"].astype(str), seeds, strict=True))


def _paired_columns(
    lora: pd.DataFrame, base: pd.DataFrame, by_subject: bool = False
) -> list[tuple[Any, ...]]:
    """Image keys both have: up to :data:`MAX_COLUMNS`, as many prompts as fit; with
    ``by_subject``, the same number from every subject (the first prompts of each)."""
    shared = set(_keys(base, by_subject))
    pairs = [key for key in _keys(lora, by_subject) if key in shared]
    groups = list(dict.fromkeys(k[:-1] for k in pairs))  # (subject,) prompt
    if by_subject:
        subjects = list(dict.fromkeys(g[0] for g in groups))
        share = max(1, MAX_COLUMNS // len(subjects)) if subjects else 0
        groups = [g for subj in subjects for g in [h for h in groups if h[0] == subj][:share]]
    groups = groups[:MAX_COLUMNS]
    per_group = max(1, MAX_COLUMNS // max(1, len(groups)))
    return [key for group in groups for key in [k for k in pairs if k[:-1] == group][:per_group]]


def _key_label(key: tuple[Any, ...]) -> str:
    *group, seed = key
    return f"{': '.join(group)} (seed {seed})"


def base_vs_lora(sources: Sources) -> GridSpec | None:
    """The base model versus the best confirmed point on the same prompts and fresh seeds
    (of every subject, a few prompts each, in a multi-subject sweep)."""
    confirmed, best = sources.confirmed, sources.confirmed_best
    if confirmed.empty or best is None or "baseline" not in confirmed.columns:
        return None
    is_base = confirmed["baseline"].astype(bool)
    tables = {
        BASELINE_POINT: baseline_rows(confirmed, best),  # under the best point's guidance
        best: confirmed[~is_base & (confirmed["point"] == best)],
    }
    by_subject = "subject" in confirmed.columns and confirmed["subject"].nunique() > 1
    pairs = _paired_columns(tables[best], tables[BASELINE_POINT], by_subject)
    if not pairs:
        return None
    cells = []
    for point in (BASELINE_POINT, best):
        index: dict[tuple[Any, ...], Any] = {}
        for key, image in zip(
            _keys(tables[point], by_subject), tables[point]["image"], strict=True
        ):
            index.setdefault(key, image)  # the first of duplicates
        for key in pairs:
            cells.append(sources.cell(point, str(index[key]), key[-2], key[-1]))
    rows = Axis("model", ("base", best), ("base model", f"LoRA point {best}"))
    cols = Axis("image", tuple(pairs), tuple(_key_label(k) for k in pairs))
    title = f"Base model versus the best LoRA (point {best}) on the evaluate stage's fresh seeds"
    return GridSpec("base_vs_lora", title, rows, cols, tuple(cells))


def _filled(spec: GridSpec) -> int:
    """Cells that show an image: a grid needs two to compare anything."""
    return sum(cell.image is not None for cell in spec.cells)


# --- drawing --------------------------------------------------------------------------------


def _font(size: int) -> Any:
    """Pillow's default font, scaled to the cell (its bitmap font without FreeType)."""
    try:
        return ImageFont.load_default(size=max(10, size // 10))
    except (TypeError, OSError):  # pragma: no cover - an old Pillow or no FreeType
        return ImageFont.load_default()


def _text_width(draw: ImageDraw.ImageDraw, text: str, font: Any) -> int:
    left, _, right, _ = draw.textbbox((0, 0), text, font=font)
    return math.ceil(right - left)


def _clip(draw: ImageDraw.ImageDraw, text: str, font: Any, width: int) -> str:
    while len(text) > 1 and _text_width(draw, text, font) > width:
        text = text[:-1]
    return text


def wrap(draw: ImageDraw.ImageDraw, text: str, font: Any, width: int, lines: int = 3) -> list[str]:
    """``text`` in at most ``lines`` lines of at most ``width`` pixels (the last one cut)."""
    out: list[str] = []
    for word in text.split():
        joined = f"{out[-1]} {word}" if out else word
        if out and _text_width(draw, joined, font) <= width:
            out[-1] = joined
        else:
            out.append(word)
    if len(out) > lines:
        out = [*out[: lines - 1], " ".join(out[lines - 1 :]) + "..."]
    return [_clip(draw, line, font, width) for line in out] or [""]


@dataclass(frozen=True)
class _Layout:
    """Where everything goes: text lines and the cells' top-left corner."""

    width: int
    height: int
    line: int
    title: list[str]
    col_lines: list[list[str]]
    row_lines: list[list[str]]
    left: int  # x of the first column
    header: int  # y of the column labels
    top: int  # y of the first row


def _layout(spec: GridSpec, size: int, font: Any) -> _Layout:
    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    line = int(draw.textbbox((0, 0), "Ag", font=font)[3]) + 2
    col_lines = [wrap(draw, text, font, size) for text in spec.cols.labels]
    row_lines = [wrap(draw, text, font, 2 * size) for text in spec.rows.labels]
    label_width = max(_text_width(draw, t, font) for lines in row_lines for t in lines)
    left = 2 * PAD + label_width
    n_cols, n_rows = len(spec.cols.values), len(spec.rows.values)
    width = left + n_cols * size + (n_cols - 1) * GAP + PAD
    title = wrap(draw, spec.title, font, width - 2 * PAD)
    header = PAD + len(title) * line + PAD
    top = header + max(len(lines) for lines in col_lines) * line + PAD
    height = top + n_rows * size + (n_rows - 1) * GAP + PAD
    return _Layout(width, height, line, title, col_lines, row_lines, left, header, top)


def cell_box(layout: _Layout, row: int, col: int, size: int) -> tuple[int, int, int, int]:
    """``(left, top, right, bottom)`` of a cell in the PNG."""
    x, y = layout.left + col * (size + GAP), layout.top + row * (size + GAP)
    return x, y, x + size, y + size


def _draw_labels(draw: ImageDraw.ImageDraw, layout: _Layout, size: int, font: Any) -> None:
    for k, text in enumerate(layout.title):
        draw.text((PAD, PAD + k * layout.line), text, fill="black", font=font)
    for j, lines in enumerate(layout.col_lines):
        x = cell_box(layout, 0, j, size)[0]
        for k, text in enumerate(lines):
            offset = (size - _text_width(draw, text, font)) // 2
            draw.text((x + offset, layout.header + k * layout.line), text, fill="black", font=font)
    for i, lines in enumerate(layout.row_lines):
        y = cell_box(layout, i, 0, size)[1] + (size - len(lines) * layout.line) // 2
        for k, text in enumerate(lines):
            draw.text((PAD, y + k * layout.line), text, fill="black", font=font)


def render(spec: GridSpec, root: Path, size: int) -> tuple[Image.Image, list[dict[str, Any]]]:
    """The grid as an image, and its manifest's cells (with their boxes)."""
    font = _font(size)
    layout = _layout(spec, size, font)
    canvas = Image.new("RGB", (layout.width, layout.height), "white")
    draw = ImageDraw.Draw(canvas)
    _draw_labels(draw, layout, size, font)
    n_cols, cells = len(spec.cols.values), []
    for index, cell in enumerate(spec.cells):
        row, col = divmod(index, n_cols)
        box = cell_box(layout, row, col, size)
        if cell.image is None:
            draw.rectangle((box[0], box[1], box[2] - 1, box[3] - 1), fill=EMPTY)
        else:
            with Image.open(root / cell.image) as source:
                canvas.paste(source.convert("RGB").resize((size, size), RESAMPLE), box[:2])
        cells.append(_manifest_cell(spec, row, col, cell, box))
    return canvas, cells


def _manifest_cell(
    spec: GridSpec, row: int, col: int, cell: Cell, box: tuple[int, int, int, int]
) -> dict[str, Any]:
    return {
        "row": row,
        "col": col,
        "row_label": spec.rows.labels[row],
        "row_value": spec.rows.values[row],
        "col_label": spec.cols.labels[col],
        "col_value": spec.cols.values[col],
        "point": cell.point,
        "image": cell.image,
        "prompt": cell.prompt,
        "seed": cell.seed,
        "box": list(box),
    }


def write_grid(spec: GridSpec, root: Path, size: int, png: Path, manifest: Path) -> None:
    """Draw ``spec`` into ``png`` and list its cells in ``manifest``."""
    image, cells = render(spec, root, size)
    png.parent.mkdir(parents=True, exist_ok=True)
    image.save(png, format="PNG")
    data = {
        "kind": spec.kind,
        "title": spec.title,
        "cell_size": size,
        "resample": "bicubic",
        "image": png.name,
        "rows": _axis_json(spec.rows),
        "columns": _axis_json(spec.cols),
        "cells": cells,
    }
    manifest.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def _axis_json(axis: Axis) -> dict[str, Any]:
    return {"name": axis.name, "values": list(axis.values), "labels": list(axis.labels)}
