"""The sections built from per-image scores: the per-prompt breakdown and the paired
comparison of the top confirmed points.

Per-image scores come from ``<evaluate.dir>/per_image.parquet`` (the confirmed points on the
fresh seeds, and the base model as ``baseline`` rows with point -1) and, for the per-prompt
breakdown only, from ``<sweep.dir>/per_image.parquet`` when the evaluate one is missing.
Without either, the sections say so and show what the results tables have.
"""

from __future__ import annotations

import pandas as pd

from harness.config import HarnessConfig
from harness.report.data import ReportInputs
from harness.report.figures import heatmap_png, label
from harness.report.model import Figure, Section, Table, format_value
from harness.report.stats import paired_comparison
from harness.sweep.per_image import BASELINE_POINT, baseline_rows, is_baseline

__all__ = ["BASELINE_POINT", "paired_section", "per_prompt", "prompts_section"]


def _metrics(cfg: HarnessConfig, per_image: pd.DataFrame) -> list[str]:
    names = [cfg.sweep.subject_metric, "dino", cfg.sweep.prompt_metric]
    return [m for m in dict.fromkeys(names) if m in per_image]


def _means(per_image: pd.DataFrame, metrics: list[str]) -> pd.DataFrame:
    return per_image.groupby("prompt", sort=False)[metrics].mean()


def _flags(row: pd.Series, stats: pd.DataFrame, subject: str, prompt: str) -> str:
    """Why a prompt fails: its subject score is more than one standard deviation (over prompts)
    below the point's mean or no higher than the base model's; its prompt score more than one
    standard deviation below the mean."""
    out = []
    low_subject = row[subject] < stats.loc["mean", subject] - stats.loc["std", subject]
    if low_subject or row.get(f"diff.{subject}", 1.0) <= 0:
        out.append("subject")
    if row[prompt] < stats.loc["mean", prompt] - stats.loc["std", prompt]:
        out.append("prompt")
    return ", ".join(out)


def per_prompt(per_image: pd.DataFrame, point: int, subject: str, prompt: str) -> pd.DataFrame:
    """One row per prompt, worst subject score first: the point's mean ``<m>`` per prompt, the
    base model's ``base.<m>`` and ``diff.<m>`` (point - base) when it was scored, ``images``
    and ``fails`` (``subject``, ``prompt``: see :func:`_flags`)."""
    metrics = [subject, prompt]
    mine = per_image[(per_image["point"] == point) & ~is_baseline(per_image)]
    table = _means(mine, metrics)
    table["images"] = mine.groupby("prompt", sort=False).size()
    base = baseline_rows(per_image, point)
    if not base.empty:
        base_means = _means(base, metrics)
        for m in metrics:
            table[f"base.{m}"] = base_means[m]
            table[f"diff.{m}"] = table[m] - table[f"base.{m}"]
    stats = table[metrics].agg(["mean", "std"]).fillna(0.0)
    table["fails"] = [_flags(row, stats, subject, prompt) for _, row in table.iterrows()]
    return table.reset_index().sort_values(subject, kind="stable").reset_index(drop=True)


def _per_image_source(inputs: ReportInputs) -> tuple[pd.DataFrame | None, str]:
    if inputs.per_image_eval is not None and not inputs.per_image_eval.empty:
        return inputs.per_image_eval, "the evaluate stage's fresh seeds"
    if inputs.per_image_sweep is not None and not inputs.per_image_sweep.empty:
        return inputs.per_image_sweep, "the sweep's seeds (no evaluate per-image table)"
    return None, ""


def _heatmap(per_image: pd.DataFrame, points: list[int], metrics: list[str]) -> bytes:
    """Prompts x (confirmed points, base model) of every metric."""
    matrices = {}
    columns: dict[str, pd.Series] = {}
    for m in metrics:
        columns = {}
        for point in points:
            rows = per_image[(per_image["point"] == point) & ~is_baseline(per_image)]
            columns[f"point {point}"] = rows.groupby("prompt", sort=False)[m].mean()
        base = baseline_rows(per_image, points[0]) if points else pd.DataFrame()
        if not base.empty:  # the best point's: its guidance, steps and scheduler
            columns["base"] = base.groupby("prompt", sort=False)[m].mean()
        matrices[m] = pd.DataFrame(columns)
    return heatmap_png(matrices, list(columns))


def _fallback_prompts(cfg: HarnessConfig, inputs: ReportInputs, title: str) -> Section:
    table = inputs.evaluate
    metrics = [
        m for m in (cfg.sweep.subject_metric, cfg.sweep.prompt_metric) if f"confirm.{m}" in table
    ]
    columns = ["point", *[f"confirm.{m}" for m in metrics]]
    labels = {f"confirm.{m}": f"{label(m)} confirmed (all prompts)" for m in metrics}
    text = (
        f"Per-image scores are not recorded ({inputs.paths.get('per_image_eval')} and "
        f"{inputs.paths.get('per_image_sweep')} are absent), so there is no per-prompt "
        "breakdown: the results tables have only each point's mean over all prompts."
    )
    return Section("prompts", title, [text], [Table(table, columns, labels, key="point")])


def _failing_sentence(table: pd.DataFrame, subject: str, prompt: str) -> str:
    """``Failing prompts: 1 of 4: 'a red sks dog' (subject: DINO 0.512, CLIP-T 0.301).``"""
    failing = table[table["fails"] != ""].to_dict(orient="records")
    named = [
        f"'{r['prompt']}' ({r['fails']}: {label(subject)} {format_value(r[subject], 'score')}, "
        f"{label(prompt)} {format_value(r[prompt], 'score')})"
        for r in failing
    ]
    return f"Failing prompts: {len(failing)} of {len(table)}" + (
        ": " + "; ".join(named) + "." if named else "."
    )


def prompts_section(cfg: HarnessConfig, inputs: ReportInputs) -> Section:
    """Which prompts the subject fails on: per-prompt subject and prompt scores of the best
    confirmed point against the base model, and a heat map over the confirmed points."""
    title = "Per prompt: where the subject fails"
    per_image, source = _per_image_source(inputs)
    if per_image is None:
        return _fallback_prompts(cfg, inputs, title)
    subject, prompt = cfg.sweep.subject_metric, cfg.sweep.prompt_metric
    best = int(inputs.evaluate.iloc[0]["point"])
    table = per_prompt(per_image, best, subject, prompt)
    paragraphs = [
        f"Mean scores per prompt of the best confirmed point ({best}) on {source}, worst "
        f"{label(subject)} first, with the base model on the same prompts and seeds where it "
        f"was scored. `fails`: subject when its {label(subject)} is more than one standard "
        "deviation (over prompts) below its mean, or no higher than the base model's; prompt "
        f"when its {label(prompt)} is more than one standard deviation below its mean.",
        _failing_sentence(table, subject, prompt),
    ]
    columns = ["prompt", "images", subject, prompt]
    columns += [c for m in (subject, prompt) for c in (f"base.{m}", f"diff.{m}") if c in table]
    columns.append("fails")
    labels: dict[str, str] = {subject: label(subject), prompt: label(prompt)}
    for m in (subject, prompt):
        labels.update({f"base.{m}": f"base {label(m)}", f"diff.{m}": f"{label(m)} - base"})
    shown = Table(table, columns, labels, {"images": "int"}, key="prompt")
    points = [int(p) for p in inputs.evaluate["point"]]
    figure = Figure("Per-prompt scores", png=_heatmap(per_image, points, [subject, prompt]))
    return Section("prompts", title, paragraphs, [shown], [figure])


def _paired_table(
    cfg: HarnessConfig, inputs: ReportInputs, found: pd.DataFrame, metrics: list[str]
) -> Table:
    ids = [c for c in ("point", "run_key", "checkpoint_step", "setting_id") if c in inputs.evaluate]
    frame = found.merge(inputs.evaluate[ids], on="point", how="left")
    columns = [*ids, "n_pairs"]
    labels = {"run_key": "run", "checkpoint_step": "step", "setting_id": "inference setting"}
    for m in metrics:
        columns += [f"diff.{m}", f"verdict.{m}"]
        labels.update({f"diff.{m}": f"{label(m)} best - this", f"verdict.{m}": label(m)})
    labels["n_pairs"] = "image pairs"
    caption = "Best confirmed point minus each other top point (95% paired-bootstrap intervals)"
    return Table(frame, columns, labels, {"n_pairs": "int"}, key="point", caption=caption)


def paired_section(cfg: HarnessConfig, inputs: ReportInputs) -> Section:
    """The best confirmed point against each other top point (up to ``report.top_k`` points):
    differences over the same prompts and seeds with paired-bootstrap 95% intervals and a
    real / noise verdict."""
    title = "Paired comparison of the top points"
    per_image = inputs.per_image_eval
    ranked = [int(p) for p in inputs.evaluate["point"]][: cfg.report.top_k]
    if per_image is None or per_image.empty:
        why = f"it needs per-image scores ({inputs.paths.get('per_image_eval')} is absent)"
        return Section("paired", title, [f"Not available: {why}."])
    if len(ranked) < 2:
        return Section("paired", title, ["Only one point was confirmed: nothing to compare."])
    metrics = _metrics(cfg, per_image)
    found = paired_comparison(
        per_image,
        ranked[0],
        ranked[1:],
        metrics,
        n_resamples=cfg.report.bootstrap_samples,
        seed=cfg.report.seed,
    )
    real = [
        f"point {r['point']} ({label(m)})"
        for r in found.to_dict(orient="records")
        for m in metrics
        if r.get(f"verdict.{m}") == "real"
    ]
    paragraphs = [
        f"Point {ranked[0]} (rank 1) minus each of the next {len(ranked) - 1} confirmed points, "
        "image by image on the same prompt and seed: a positive difference means rank 1 scores "
        "higher. 95% intervals from a paired bootstrap over prompts and, within each prompt, "
        f"seeds ({cfg.report.bootstrap_samples} resamples, seed {cfg.report.seed}). Verdict: "
        "real when the interval excludes 0, noise when it does not.",
        "Real differences: "
        + (", ".join(real) if real else "none; every difference is noise")
        + ".",
    ]
    table = _paired_table(cfg, inputs, found, metrics)
    return Section("paired", title, paragraphs, [table])
