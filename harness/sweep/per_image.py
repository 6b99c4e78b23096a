"""Per-image and per-prompt scores on disk, beside the results tables.

The sweep (``<sweep.dir>``, rewritten with ``results.parquet``):

``per_image.parquet``
    one row per scored image of every evaluated point: ``point`` (the points-study trial
    number, as in ``results.parquet``), ``run_key``, ``checkpoint_step``, ``setting_id``,
    ``template``, ``prompt``, ``seed``, ``image`` (the path, relative to the project root),
    ``dino``, ``clip_i``, ``clip_t``, ``subject`` (the image's subject in a multi-subject
    sweep, ``data.subjects``; null otherwise).
``per_prompt.parquet``
    one row per prompt of every point: ``point``, ``run_key``, ``checkpoint_step``,
    ``setting_id``, ``prompt``, ``n_images``, ``dino``, ``clip_i``, ``clip_t``, ``div`` (the
    paper's DIV: mean pairwise LPIPS; null without ``metrics.lpips_weights``), ``div_dino``
    (1 - mean pairwise DINO similarity), ``subject`` (one row per prompt and subject in a
    multi-subject sweep). Rows kept before ``div`` was LPIPS (no ``div_dino`` key) are read
    with their DINO value as ``div_dino`` and a null ``div``.

The evaluate stage (``<evaluate.dir>/per_image.parquet``): the same columns plus ``baseline``;
the base model's rows have ``point`` -1 and null ``run_key`` / ``checkpoint_step``.

The rows come from the backend's records (:attr:`PointScores.per_image` and ``per_prompt``).
The sweep keeps each point's rows in a small JSON file of its own, keyed like the point
(``<sweep.dir>/scores/<study>/<run key>/step-<n>/<setting id>.json``, written when the point
is scored), so the tables are rebuilt from every worker's points and survive a resume, exactly
like ``results.parquet`` is rebuilt from the study.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from harness.sweep._files import replaced_together

if TYPE_CHECKING:
    from harness.sweep._base import PointScores, ScoredPoint

__all__ = [
    "BASELINE_POINT",
    "EVALUATE_IMAGE_SCHEMA",
    "IMAGE_SCHEMA",
    "PER_IMAGE",
    "PER_PROMPT",
    "PROMPT_SCHEMA",
    "PointRows",
    "arrow_table",
    "baseline_rows",
    "confirmed_image_rows",
    "image_rows",
    "is_baseline",
    "legacy_div",
    "point_rows_path",
    "write_point_rows",
    "write_score_tables",
    "write_table",
]

PER_IMAGE = "per_image.parquet"
PER_PROMPT = "per_prompt.parquet"
BASELINE_POINT = -1  # the ``point`` of the base model's rows in the evaluate stage's table

_IDENTITY = [
    ("point", pa.int64()),
    ("run_key", pa.string()),
    ("checkpoint_step", pa.int64()),
    ("setting_id", pa.string()),
]
IMAGE_SCHEMA = pa.schema(
    [
        *_IDENTITY,
        ("template", pa.string()),
        ("prompt", pa.string()),
        ("seed", pa.int64()),
        ("image", pa.string()),
        ("dino", pa.float64()),
        ("clip_i", pa.float64()),
        ("clip_t", pa.float64()),
        ("subject", pa.string()),
    ]
)
# ``baseline_setting``: the setting id of the base-model rows a row is compared with (a
# baseline row's own setting; a point's guidance, steps and scheduler at LoRA scales 1).
EVALUATE_IMAGE_SCHEMA = IMAGE_SCHEMA.append(pa.field("baseline", pa.bool_())).append(
    pa.field("baseline_setting", pa.string())
)
PROMPT_SCHEMA = pa.schema(
    [
        *_IDENTITY,
        ("prompt", pa.string()),
        ("n_images", pa.int64()),
        ("dino", pa.float64()),
        ("clip_i", pa.float64()),
        ("clip_t", pa.float64()),
        ("div", pa.float64()),
        ("div_dino", pa.float64()),
        ("subject", pa.string()),
    ]
)
_IMAGE_FIELDS = ("template", "prompt", "seed", "image", "dino", "clip_i", "clip_t", "subject")
_PROMPT_FIELDS = ("prompt", "n_images", "dino", "clip_i", "clip_t", "div", "div_dino", "subject")

PointRows = dict[str, list[dict[str, Any]]]  # {"images": [...], "prompts": [...]}


def image_rows(measured: PointScores, root: Path) -> list[dict[str, Any]]:
    """The per-image rows of a point (the table's image columns), image paths relative to
    ``root``."""
    from harness.sweep.recorder import relative

    return [
        {**{name: row.get(name) for name in _IMAGE_FIELDS}, "image": relative(row["image"], root)}
        for row in measured.per_image
    ]


def _prompt_rows(measured: PointScores) -> list[dict[str, Any]]:
    return [{name: row.get(name) for name in _PROMPT_FIELDS} for row in measured.per_prompt]


def point_rows_path(store: Path, run_key: str, step: int, setting_id: str) -> Path:
    """Where the rows of the point ``<run_key>/<step>/<setting_id>`` are kept."""
    return store / run_key / f"step-{int(step):06d}" / f"{setting_id}.json"


def write_point_rows(store: Path, point: ScoredPoint, root: Path) -> Path:
    """Keep a scored point's per-image and per-prompt rows (a retried run's re-evaluation of
    the same checkpoint replaces them, as it replaces the images)."""
    path = point_rows_path(store, point.run.key, point.checkpoint.step, point.measured.setting.id)
    rows: PointRows = {
        "images": image_rows(point.measured, root),
        "prompts": _prompt_rows(point.measured),
    }
    text = json.dumps(rows, sort_keys=True) + "\n"
    return _replace(path, lambda temporary: temporary.write_text(text, encoding="utf-8"))


def _replace(path: Path, write: Callable[[Path], object]) -> Path:
    """Write ``path`` through a temporary file of this process, then rename it: a reader
    (another worker rebuilding the tables) never sees half a file."""
    with replaced_together(path) as (temporary,):
        write(temporary)
    return path


def _read_point_rows(path: Path) -> PointRows:
    if not path.is_file():
        return {"images": [], "prompts": []}
    data = json.loads(path.read_text(encoding="utf-8"))
    prompts = [legacy_div(row) for row in data.get("prompts", [])]
    return {"images": list(data.get("images", [])), "prompts": prompts}


def legacy_div(values: Mapping[str, Any]) -> dict[str, Any]:
    """Scores (or a per-prompt row) as they are now: those kept before DIV was the paper's
    LPIPS one have a ``div`` (then 1 - mean DINO similarity) and no ``div_dino``; their
    ``div*`` keys become ``div_dino*`` (and ``div`` null), so the two never mix."""
    out = dict(values)
    if "div" not in out or "div_dino" in out:
        return out
    for suffix in ("", "_lo", "_hi"):
        if f"div{suffix}" in out:
            out[f"div_dino{suffix}"] = out.pop(f"div{suffix}")
    if "n_images" in out:  # a per-prompt row keeps its column
        out["div"] = None
    return out


def _clean(value: Any) -> Any:
    """NaN and missing values as ``None`` (pyarrow's null)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    try:
        return None if pd.isna(value) else value
    except (TypeError, ValueError):  # a list or another non-scalar
        return value


def arrow_table(rows: Iterable[Mapping[str, Any]], schema: pa.Schema) -> pa.Table:
    """``rows`` as an arrow table of exactly ``schema``'s columns and types (empty: the schema
    with no rows)."""
    names = schema.names
    columns: dict[str, list[Any]] = {name: [] for name in names}
    for row in rows:
        for name in names:
            columns[name].append(_clean(row.get(name)))
    return pa.table(columns, schema=schema)


def write_table(rows: Iterable[Mapping[str, Any]], schema: pa.Schema, path: Path) -> Path:
    """Write ``rows`` as parquet with ``schema`` (atomically: replaced, never half written)."""
    table = arrow_table(rows, schema)
    return _replace(path, lambda temporary: pq.write_table(table, temporary))


def write_score_tables(frame: pd.DataFrame, store: Path, out_dir: Path) -> tuple[Path, Path]:
    """``per_image.parquet`` and ``per_prompt.parquet`` in ``out_dir`` for every point of a
    results frame (:func:`harness.sweep.results.points_frame`), from the rows in ``store``."""
    images: list[dict[str, Any]] = []
    prompts: list[dict[str, Any]] = []
    identities = ("point", "run_key", "checkpoint_step", "setting_id")
    records = [] if frame.empty else frame[list(identities)].to_dict(orient="records")
    for identity in sorted(records, key=lambda r: int(r["point"])):
        rows = _read_point_rows(
            point_rows_path(
                store, identity["run_key"], identity["checkpoint_step"], identity["setting_id"]
            )
        )
        images += [{**identity, **row} for row in rows["images"]]
        prompts += [{**identity, **row} for row in rows["prompts"]]
    return (
        write_table(images, IMAGE_SCHEMA, out_dir / PER_IMAGE),
        write_table(prompts, PROMPT_SCHEMA, out_dir / PER_PROMPT),
    )


def is_baseline(per_image: pd.DataFrame) -> pd.Series:
    """Which rows of an evaluate-stage per-image table are the base model's."""
    flags = per_image["point"] == BASELINE_POINT
    if "baseline" in per_image:
        flags = flags | per_image["baseline"].fillna(False).astype(bool)
    return flags


def baseline_rows(per_image: pd.DataFrame, point: int) -> pd.DataFrame:
    """The base model's rows that ``point`` is compared with: those under its own guidance,
    steps and scheduler (``baseline_setting``), or every base row in a table from before
    there was one baseline per setting."""
    base = per_image[is_baseline(per_image)]
    if "baseline_setting" not in per_image.columns:
        return base
    mine = per_image[(per_image["point"] == point) & ~is_baseline(per_image)]
    wanted = mine["baseline_setting"].dropna()
    if wanted.empty or base["baseline_setting"].isna().all():
        return base
    return base[base["baseline_setting"] == wanted.iloc[0]]


def confirmed_image_rows(
    root: Path,
    measured: PointScores,
    row: Mapping[str, Any] | None = None,
    baseline_setting: str | None = None,
) -> list[dict[str, Any]]:
    """The evaluate stage's per-image rows of one confirmed point (``row``: its results row;
    ``baseline_setting``: the base-model setting it is compared with) or, without ``row``, of
    the base model (``point`` -1, no run key or checkpoint)."""
    identity: dict[str, Any] = {
        "point": BASELINE_POINT if row is None else int(row["point"]),
        "run_key": None if row is None else row["run_key"],
        "checkpoint_step": None if row is None else int(row["checkpoint_step"]),
        "setting_id": measured.setting.id,
        "baseline": row is None,
        "baseline_setting": measured.setting.id if row is None else baseline_setting,
    }
    return [{**identity, **image} for image in image_rows(measured, root)]
