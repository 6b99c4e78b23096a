"""The sections of a sweep across subjects (``data.subjects``) and of the DreamBench protocol:
the per-subject breakdown of the confirmed points, and the DreamBooth paper's table.

Per-subject scores come from ``<evaluate.dir>/per_image.parquet`` (its ``subject`` column):
each confirmed point's and the base model's images on each subject, on the fresh seeds. The
paper's table comes from the evaluate stage's results and ``references.json``, whose scores
are already the mean over subjects (:mod:`harness.sweep.subjects`).
"""

from __future__ import annotations

import pandas as pd

from harness.config import HarnessConfig
from harness.data.subjects import is_multi_subject
from harness.report.data import ReportInputs
from harness.report.figures import label
from harness.report.model import Section, Table, format_value
from harness.sweep.per_image import baseline_rows, is_baseline

__all__ = [
    "base_columns",
    "dreambench_section",
    "per_subject",
    "subjects_section",
    "weak_subjects",
]

PAPER_METRICS = ("dino", "clip_i", "clip_t", "div", "pres")


def base_columns(per_image: pd.DataFrame, points: list[int]) -> dict[int, str]:
    """Each point's base-model column: ``base`` for the first (best) point's guidance, steps
    and scheduler, ``base at <setting>`` for any other; points that share a setting share it."""
    return {point: name for point, (name, _) in _bases(per_image, points).items()}


def _bases(per_image: pd.DataFrame, points: list[int]) -> dict[int, tuple[str, pd.DataFrame]]:
    """Each point's base-model column name (:func:`base_columns`) and base-model rows."""
    names: dict[str | None, str] = {}
    out = {}
    for point in points:
        base = baseline_rows(per_image, point)
        settings = base["setting_id"].dropna().unique() if "setting_id" in base else []
        setting = str(settings[0]) if len(settings) == 1 else None
        if setting not in names:
            names[setting] = "base" if not names else f"base at {setting}"
        out[point] = (names[setting], base)
    return out


def per_subject(per_image: pd.DataFrame, metric: str, points: list[int]) -> pd.DataFrame:
    """One row per subject: each confirmed point's mean ``metric`` (``point <n>``), each after
    the base model's under the point's own setting (:func:`base_columns`), from the evaluate
    stage's per-image rows."""
    rows = per_image.dropna(subset=["subject"])
    table = pd.DataFrame(index=pd.Index(sorted(rows["subject"].unique()), name="subject"))
    for point, (column, base) in _bases(rows, points).items():
        if column not in table and not base.empty:
            table[column] = base.groupby("subject")[metric].mean()
        mine = rows[(rows["point"] == point) & ~is_baseline(rows)]
        if not mine.empty:
            table[f"point {point}"] = mine.groupby("subject")[metric].mean()
    return table.reset_index()


def weak_subjects(table: pd.DataFrame, points: list[int], bases: dict[int, str]) -> list[str]:
    """One sentence per point with a score: its weakest subject, and the subjects on which it
    is no better than the base model under its own setting (``bases``: :func:`base_columns`)."""
    out = []
    by_subject = table.set_index("subject")
    for point in points:
        column = f"point {point}"
        if column not in by_subject:
            continue
        # A subject the point has no score for (every image's metric NaN) is left out; a
        # point with none at all gets no sentence (pandas 3's idxmin raises on all-NaN).
        scores = by_subject[column].dropna()
        if scores.empty:
            continue
        weakest = str(scores.idxmin())
        text = f"point {point}: weakest on `{weakest}` ({format_value(scores[weakest], 'score')})"
        if bases.get(point) in by_subject:
            base = by_subject[bases[point]]
            failed = [s for s in scores.index if scores[s] <= base[s]]
            text += (
                "; no better than the base model on " + ", ".join(f"`{s}`" for s in failed)
                if failed
                else "; better than the base model on every subject"
            )
        out.append(text + ".")
    return out


def subjects_section(cfg: HarnessConfig, inputs: ReportInputs) -> Section | None:
    """Per subject, the base model's and every confirmed point's subject and prompt scores on
    the fresh seeds, and which subjects each point fails on (None: a one-subject sweep)."""
    if not is_multi_subject(cfg.data):
        return None
    per_image = inputs.per_image_eval
    section = Section("subjects", "Subjects")
    if per_image is None or "subject" not in per_image or per_image["subject"].isna().all():
        section.paragraphs.append(
            "No per-subject scores: the evaluate stage's per_image.parquet is missing."
        )
        return section
    names = sorted(per_image["subject"].dropna().unique())
    points = [int(p) for p in inputs.evaluate["point"]]
    section.paragraphs.append(
        f"Each score of the sweep and of the confirmation is the mean over {len(names)} subjects "
        f"({', '.join(names)}), its interval a 95% t-interval across subjects. Below, each "
        "subject on its own (fresh seeds): a configuration that wins on average can still fail "
        "on one subject."
    )
    metrics = [m for m in dict.fromkeys([cfg.sweep.subject_metric, cfg.sweep.prompt_metric])]
    for metric in metrics:
        table = per_subject(per_image, metric, points)
        columns = list(table.columns)
        caption = (
            f"{label(metric)} per subject: each confirmed point after the base model under its "
            "guidance, steps and scheduler"
        )
        section.tables.append(
            Table(table, columns, {c: c for c in columns}, key="subject", caption=caption)
        )
        if metric == cfg.sweep.subject_metric:
            section.paragraphs += weak_subjects(table, points, base_columns(per_image, points))
    return section


def dreambench_section(cfg: HarnessConfig, inputs: ReportInputs) -> Section | None:
    """The DreamBooth paper's table (Ruiz et al. 2023, Table 1): rows real images (the
    ceiling), the base model and each confirmed point; columns DINO, CLIP-I, CLIP-T (DIV, the
    paper's LPIPS one, and PRES when measured), each the mean over subjects. DIV-DINO is not a
    column: the paper has no such score. None unless the sweep spans subjects
    or ``evaluate.protocol`` is ``dreambench``."""
    if not is_multi_subject(cfg.data) and cfg.evaluate.protocol != "dreambench":
        return None
    refs, table = inputs.references, inputs.evaluate
    rows = [
        {"method": "Real images", **(refs.get("real_ceiling") or {})},
        {"method": "Base model (no adapter)", **(refs.get("baseline") or {})},
    ]
    for record in table.to_dict(orient="records"):
        scores = {
            m + s: record.get(f"confirm.{m}{s}") for m in PAPER_METRICS for s in ("", "_lo", "_hi")
        }
        name = f"point {record['point']} (step {record['checkpoint_step']}, {record['setting_id']})"
        rows.append({"method": name, **scores})
    frame = pd.DataFrame(rows)
    shown = [m for m in PAPER_METRICS if m in frame and frame[m].notna().any()]
    subjects = inputs.sweep.get("subjects")
    count = int(subjects.max()) if subjects is not None and subjects.notna().any() else 1
    protocol = "DreamBench" if cfg.evaluate.protocol == "dreambench" else "the sweep's"
    seeds = refs.get("seeds") or []
    caption = (
        f"In the layout of the DreamBooth paper's Table 1: each score the mean over {count} "
        f"subject(s), {protocol} prompts, {len(seeds)} image(s) per prompt on fresh seeds"
    )
    return Section(
        "dreambench",
        "DreamBench table",
        [
            "Real images: the subject's photos against each other (the ceiling of DINO and "
            "CLIP-I; CLIP-T needs a generated image). Base model: no adapter, same prompts."
        ],
        [
            Table(
                frame,
                ["method", *shown],
                {m: label(m) for m in shown},
                key="method",
                caption=caption,
            )
        ],
    )
