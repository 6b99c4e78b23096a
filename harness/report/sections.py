"""The report's sections built from the results tables: leaderboard, Pareto front, steps,
importances, image grids and cost (the per-prompt ones are in :mod:`harness.report.prompts`).

Each function takes the config and the loaded :class:`~harness.report.data.ReportInputs` and
returns one :class:`~harness.report.model.Section`. Table values are the tables' own numbers;
the renderers round them (:func:`~harness.report.model.format_value`).
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from harness.config import HarnessConfig
from harness.report.data import ReportInputs, run_costs
from harness.report.figures import importance_png, label, pareto_png, steps_png
from harness.report.importance import importances
from harness.report.model import Figure, Section, Table, format_value, is_missing
from harness.sweep.plots import step_records
from harness.sweep.study import objective_names

__all__ = [
    "cost_section",
    "grids_section",
    "importance_section",
    "leaderboard_section",
    "pareto_section",
    "report_metrics",
    "steps_section",
]

ID_LABELS = {
    "selection_rank": "rank",
    "point": "point",
    "run_key": "run",
    "checkpoint_step": "step",
    "setting_id": "inference setting",
    "selected_by": "selected by",
}
SETTING_PREFIXES = ("train.", "eval.")


def report_metrics(cfg: HarnessConfig, table: pd.DataFrame, prefix: str = "confirm.") -> list[str]:
    """The metrics shown, those of ``table`` (``<prefix><m>`` columns): the subject metric, the
    other subject metric, the prompt metric, and the weighted score of a weighted sweep."""
    subject = cfg.sweep.subject_metric
    other = "clip_i" if subject == "dino" else "dino"
    names = [subject, other, cfg.sweep.prompt_metric, *(["weighted"] if cfg.sweep.weights else [])]
    return [m for m in names if f"{prefix}{m}" in table]


def _ids(table: pd.DataFrame, names: tuple[str, ...] = tuple(ID_LABELS)) -> list[str]:
    return [c for c in names if c in table]


def _varying(inputs: ReportInputs) -> list[str]:
    """The setting columns of the confirmed points that vary over the sweep (the searched and
    evaluated dimensions)."""
    sweep, table = inputs.sweep, inputs.evaluate
    out = []
    for column in table.columns:
        if not column.startswith(SETTING_PREFIXES):
            continue
        values = sweep[column] if column in sweep else table[column]
        if values.astype(str).nunique() > 1:
            out.append(column)
    return out


def _settings_tables(inputs: ReportInputs) -> list[Table]:
    """The confirmed points' varying settings (one row per point), and the fixed ones."""
    table, varying = inputs.evaluate, _varying(inputs)
    columns = [*_ids(table, ("point", "checkpoint_step", "setting_id")), *varying]
    shown = Table(
        table,
        columns,
        {**ID_LABELS},
        {c: "setting" for c in varying},
        key="point",
        caption="Settings of the confirmed points that vary over the sweep",
    )
    first = table.iloc[0]
    fixed = [c for c in table.columns if c.startswith(SETTING_PREFIXES) and c not in varying]
    rows = pd.DataFrame(
        {"setting": fixed, "value": [format_value(first[c], "setting") for c in fixed]}
    )
    caption = "Settings shared by every point"
    same = Table(rows, ["setting", "value"], key="setting", caption=caption, collapsed=True)
    return [shown, same]


def _references_table(cfg: HarnessConfig, inputs: ReportInputs, metrics: list[str]) -> Table | None:
    """The base model on the sweep's seeds (under ``eval``'s guidance, steps and scheduler) and
    on the fresh seeds (under each confirmed point's, the best point's first), and the
    real-photo ceiling."""
    from harness.sweep.confirm import base_setting

    refs = inputs.references
    fresh = refs.get("baselines") or {}
    best = refs.get("baseline_setting") or ""
    if not isinstance(fresh, dict) or not fresh:  # an evaluate output of before: one baseline
        fresh = {best: refs.get("baseline")}
    fresh = dict(sorted(fresh.items(), key=lambda item: item[0] != best))  # the best's first
    named = [
        (
            f"base model, sweep seeds, {base_setting(cfg.eval.setting).id}",
            inputs.sweep_metrics.get("baseline"),
        ),
        *(
            (f"base model, fresh seeds, {name}".rstrip(", "), scores)
            for name, scores in fresh.items()
        ),
        ("real photos (ceiling)", refs.get("real_ceiling")),
    ]
    rows = [{"reference": name, **scores} for name, scores in named if isinstance(scores, dict)]
    if not rows:
        return None
    frame = pd.DataFrame(rows)
    shown = ["reference", *[m for m in metrics if m in frame]]
    caption = "References: no adapter, and the real photos against each other"
    return Table(frame, shown, {m: label(m) for m in metrics}, key="reference", caption=caption)


def _leaderboard_table(cfg: HarnessConfig, table: pd.DataFrame) -> Table:
    metrics = report_metrics(cfg, table)
    kinds = ("score", "confirm", "shrinkage", "selection_bias")
    # An evaluate table from before the base model was scored on the sweep's seeds has no
    # selection_bias: shown without it.
    scores = [c for m in metrics for c in (f"{k}.{m}" for k in kinds) if c in table]
    labels = {**ID_LABELS}
    for m in metrics:
        labels.update(
            {
                f"score.{m}": f"{label(m)} sweep",
                f"confirm.{m}": f"{label(m)} confirmed",
                f"shrinkage.{m}": f"{label(m)} shrinkage",
                f"selection_bias.{m}": f"{label(m)} selection bias",
            }
        )
    caption = "Confirmed points, best first: sweep score, confirmation score (95% intervals)"
    return Table(table, [*_ids(table), *scores], labels, key="point", caption=caption)


def leaderboard_section(cfg: HarnessConfig, inputs: ReportInputs) -> Section:
    """The confirmed points with the sweep score, the confirmation score on fresh seeds (both
    with 95% intervals), the shrinkage, why each was selected and its settings."""
    table = inputs.evaluate
    seeds = inputs.references.get("seeds") or []
    fresh = f"seeds {seeds[0]}..{seeds[-1]}" if seeds else "fresh seeds"
    paragraphs = [
        f"{len(table)} points chosen from the sweep (`selected_by`: its Pareto front, or the best "
        f"weighted score) re-scored by the evaluate stage on {fresh}, which the sweep never "
        "used. `shrinkage` = sweep score - confirmed score. Part of it is not selection: "
        "other seeds (and held-out prompts) can be harder for every model. `selection bias` = "
        "shrinkage - the base model's own shrinkage (the base model, which nobody selected, "
        "scored on the sweep's prompts and seeds and on the confirmation's, under the point's "
        "guidance, steps and scheduler): how much selecting the best of many noisy points "
        "overstated it. Rank 1 is the sweep's best point (chosen on sweep scores).",
    ]
    base_drop = _base_shrinkage_sentence(table, report_metrics(cfg, table))
    if base_drop:
        paragraphs.append(base_drop)
    from harness.sweep.confirm import reproduction_warning

    # Warnings first: the base model's, then the best point's (a study that is not today's).
    checks = [inputs.references.get(k) for k in ("point_reproduction", "reproduction")]
    for check in checks:
        if isinstance(check, dict) and check.get("reproduced") is False:
            paragraphs.insert(0, reproduction_warning(check))
    tables = [_leaderboard_table(cfg, table), *_settings_tables(inputs)]
    references = _references_table(cfg, inputs, report_metrics(cfg, table))
    if references is not None:
        tables.append(references)
    return Section("leaderboard", "Leaderboard: the confirmed points", paragraphs, tables)


def _base_shrinkage_sentence(table: pd.DataFrame, metrics: list[str]) -> str:
    """The best point's base-model shrinkage per metric, in words ("" without the columns)."""
    if table.empty:
        return ""
    best = table.iloc[0]
    parts = [
        f"{label(m)} {format_value(best[f'shrinkage_base.{m}'], 'signed')}"
        for m in metrics
        if f"shrinkage_base.{m}" in table and pd.notna(best[f"shrinkage_base.{m}"])
    ]
    if not parts:
        return ""
    return (
        "The base model's own shrinkage under the best point's setting (sweep's seeds - "
        f"confirmation's): {', '.join(parts)}."
    )


def _sweep_references(inputs: ReportInputs) -> dict[str, dict[str, float]]:
    """Baseline and ceiling on the sweep's seeds when the sweep recorded them."""
    out = {}
    for name in ("baseline", "real_ceiling"):
        scores = inputs.sweep_metrics.get(name) or inputs.references.get(name)
        if isinstance(scores, dict):
            out[name] = scores
    return out


def _sweep_baseline_setting(cfg: HarnessConfig, inputs: ReportInputs) -> str:
    """The setting of the baseline :func:`_sweep_references` gives: ``eval``'s on the sweep's
    seeds, else the evaluate stage's (the best point's)."""
    from harness.sweep.confirm import base_setting

    if isinstance(inputs.sweep_metrics.get("baseline"), dict):
        return base_setting(cfg.eval.setting).id
    return str(inputs.references.get("baseline_setting") or "")


def _reference_sentence(
    refs: Mapping[str, Mapping[str, float]], subject: str, prompt: str, setting: str = ""
) -> str:
    base, ceiling = refs.get("baseline") or {}, refs.get("real_ceiling") or {}
    parts = []
    under = f"; {setting}" if setting else ""  # its scores move with guidance and steps
    if subject in base and prompt in base:
        parts.append(
            f"the base model (star{under}) scores {label(subject)} "
            f"{format_value(base[subject], 'score')} "
            f"and {label(prompt)} {format_value(base[prompt], 'score')}"
        )
    if subject in ceiling:
        parts.append(
            f"the real photos against each other (dashed line, the ceiling) "
            f"{label(subject)} {format_value(ceiling[subject], 'score')}"
        )
    return ("On the sweep's seeds " + "; ".join(parts) + ".") if parts else ""


def pareto_section(cfg: HarnessConfig, inputs: ReportInputs) -> Section:
    """Subject versus prompt fidelity over every sweep point, the front, base model, ceiling."""
    from harness.sweep.plots import pareto_records

    subject, prompt = cfg.sweep.subject_metric, cfg.sweep.prompt_metric
    title = f"Pareto front: {label(subject)} versus {label(prompt)}"
    sweep = inputs.sweep
    points = pd.DataFrame(pareto_records(sweep, subject, prompt))
    if points.empty:
        return Section("pareto", title, ["The sweep has no evaluated point."])
    refs = _sweep_references(inputs)
    front = sweep[sweep["pareto"].astype(bool)].sort_values(f"score.{subject}", ascending=False)
    front = front.assign(confirmed=front["point"].isin(inputs.evaluate["point"]))
    columns = [*_ids(front, ("point", "run_key", "checkpoint_step", "setting_id"))]
    columns += [f"score.{subject}", f"score.{prompt}", "confirmed"]
    labels = {**ID_LABELS, f"score.{subject}": label(subject), f"score.{prompt}": label(prompt)}
    paragraphs = [
        f"{len(points)} sweep points (every training configuration x checkpoint step x "
        f"inference setting, on the sweep's seeds); {int(front.shape[0])} on the Pareto front "
        f"of {label(subject)} (subject fidelity) and {label(prompt)} (prompt fidelity), both "
        "maximised: no other point is at least as good on both and better on one.",
        _reference_sentence(refs, subject, prompt, _sweep_baseline_setting(cfg, inputs)),
    ]
    figure = Figure("Pareto front", png=pareto_png(points, subject, prompt, refs))
    table = Table(
        front, columns, labels, key="point", caption="The Pareto front, best subject first"
    )
    return Section("pareto", title, [p for p in paragraphs if p], [table], [figure])


def _score_label(cfg: HarnessConfig) -> str:
    names = objective_names(cfg)
    if names == ["weighted"]:
        return "weighted score"
    return "score (mean of " + " and ".join(label(n) for n in names) + ")"


def steps_section(cfg: HarnessConfig, inputs: ReportInputs) -> Section:
    """Score versus training steps, one line per training configuration (``run_key``)."""
    subject, prompt = cfg.sweep.subject_metric, cfg.sweep.prompt_metric
    records = pd.DataFrame(step_records(inputs.sweep, objective_names(cfg), subject, prompt))
    title = "Score versus training steps"
    if records.empty:
        return Section("steps", title, ["The sweep has no scored checkpoint."])
    score = _score_label(cfg)
    best = records.loc[records.groupby("run_key")["score"].idxmax()]
    summary = ", ".join(
        f"{r['run_key']} at step {r['checkpoint_step']} ({format_value(r['score'], 'score')})"
        for r in best.sort_values("score", ascending=False).to_dict(orient="records")
    )
    paragraphs = [
        f"Per training configuration (`run_key`) and checkpoint step, the {score} of its best "
        f"inference setting. Best step per configuration: {summary}.",
    ]
    columns = ["run_key", "checkpoint_step", "setting_id", "score", "subject_score", "prompt_score"]
    labels = {
        **ID_LABELS,
        "score": score,
        "subject_score": label(subject),
        "prompt_score": label(prompt),
    }
    records["row"] = records["run_key"].astype(str) + "/" + records["checkpoint_step"].astype(str)
    caption = "Best inference setting per run and step"
    table = Table(records, columns, labels, key="row", caption=caption)
    figure = Figure("Score versus checkpoint step", png=steps_png(records, score))
    return Section("steps", title, paragraphs, [table], [figure])


def importance_section(cfg: HarnessConfig, root: Path, inputs: ReportInputs) -> Section:
    """PED-ANOVA importances of the parameters for a high value of each objective."""
    objectives = objective_names(cfg)
    found = importances(cfg, root, inputs.study, inputs.sweep, objectives)
    title = "Parameter importance"
    direction = "; ".join(f"importance for a high {label(o)}" for o in objectives)
    paragraphs = [
        f"Which settings matter ({direction}: every objective is maximised, so PED-ANOVA ranks "
        f"the parameters for reaching high values), computed on {found.source}.",
    ]
    if found.constant:
        paragraphs.append(
            "Left out, since they never vary over the points: "
            + ", ".join(f"`{p}`" for p in found.constant)
            + "."
        )
    if not found.values or not any(found.values.values()):
        paragraphs.append(f"No importance: {found.problem or 'no parameter varies'}.")
        return Section("importance", title, paragraphs)
    first = objectives[0]
    params = sorted(found.values[first], key=lambda p: -found.values[first][p])
    frame = pd.DataFrame(
        {"parameter": params}
        | {f"importance.{o}": [found.values[o].get(p) for p in params] for o in objectives}
    )
    labels = {f"importance.{o}": f"importance for a high {label(o)}" for o in objectives}
    table = Table(frame, list(frame.columns), labels, key="parameter")
    figure = Figure("Parameter importance", png=importance_png(found.values))
    return Section("importance", title, paragraphs, [table], [figure])


def grids_section(cfg: HarnessConfig, root: Path, out_dir: Path) -> Section:
    """The image grids of :func:`harness.report.grids.make_grids`, when that module exists."""
    title = "Image grids"
    try:
        grids_module: Any = importlib.import_module("harness.report.grids")
    except ImportError as exc:
        return Section("grids", title, [f"Image grids are not available ({exc})."])
    grids = grids_module.make_grids(cfg, root, out_dir)
    figures = [
        Figure(str(g.title), path=Path(g.path), manifest=Path(g.manifest), kind=str(g.kind))
        for g in grids
    ]
    paragraphs = [
        "Generated images side by side, one grid per compared setting (the base model "
        "against the LoRA on the same prompts and seeds among them); each grid's manifest says "
        "which image is which point, prompt and seed."
        if figures
        else "No image grid was made."
    ]
    return Section("grids", title, paragraphs, figures=figures)


QUALITY = {
    "pres": "PRES (prior preservation: DINO of class-prompt images against the subject, lower "
    "is better)",
    "div": "DIV (diversity, as in the DreamBooth paper: mean LPIPS distance among images of one "
    "prompt, higher is more varied)",
    "div_dino": "DIV-DINO (diversity: 1 - mean DINO similarity among images of one prompt, "
    "higher is more varied; not the paper's DIV)",
}


def _unmeasured(cfg: HarnessConfig, metric: str) -> str:
    """One line: ``metric`` was not measured, and why when the configuration says."""
    name = label(metric)
    if metric == "div" and cfg.metrics.lpips_weights is None:
        return (
            f"{name}: not measured (no LPIPS weights: set metrics.lpips_weights to a file from "
            "`python -m metrics lpips-convert`)."
        )
    return f"{name}: not measured."


def _quality(inputs: ReportInputs) -> tuple[pd.DataFrame, list[str], list[str]]:
    """The confirmed points with their sweep ``score.pres``/``score.div`` (and intervals);
    the measured and the unmeasured metric names."""
    sweep, points = inputs.sweep, inputs.evaluate[_ids(inputs.evaluate, ("point", "run_key"))]
    measured = [m for m in QUALITY if f"score.{m}" in sweep and sweep[f"score.{m}"].notna().any()]
    columns = [
        f"score.{m}{s}" for m in measured for s in ("", "_lo", "_hi") if f"score.{m}{s}" in sweep
    ]
    merged = points.merge(sweep[["point", *columns]], on="point", how="left")
    return merged, measured, [m for m in QUALITY if m not in measured]


def _cost_sentences(costs: pd.DataFrame, points: int) -> list[str]:
    recorded = costs.dropna(subset=["device_s"]) if "device_s" in costs else costs.iloc[0:0]
    if recorded.empty:
        return ["Cost: not recorded (no run folder has a `result.json` with its wall time)."]
    devices = sorted({str(d) for d in recorded["device"] if not is_missing(d)}) or ["device"]
    total = float(recorded["device_s"].sum())
    peak = recorded["peak_mib"].max() if "peak_mib" in recorded else None
    memory = (
        f"peak memory {format_value(peak, 'mib')} MiB"
        if not is_missing(peak)
        else "peak memory not recorded"
    )
    return [
        f"Cost: {len(recorded)} of {len(costs)} training runs record their time: "
        f"{format_value(total, 'seconds')} {'/'.join(devices)}-seconds of training in all "
        f"(wall time x processes), {format_value(total / max(points, 1), 'seconds')} per "
        f"evaluated point over {points} points; {memory}. Generation and scoring time is not "
        "recorded.",
    ]


def _adaptive_sentences(metrics: dict[str, Any]) -> list[str]:
    """What adaptive evaluation saved (from the sweep's metrics.json), when it ran."""
    points, full = metrics.get("points"), metrics.get("points_full")
    images, exhaustive = metrics.get("images"), metrics.get("images_exhaustive")
    if not (points and full is not None and images and exhaustive) or full >= points:
        return []
    return [
        f"Adaptive evaluation (sweep.evaluation): {full} of {points} points were promoted to "
        f"the full protocol, the others scored at a cheap rung only; {images} images were "
        f"generated instead of {exhaustive} ({images / exhaustive:.0%}). Only full-protocol "
        "points are ranked in this report."
    ]


def cost_section(cfg: HarnessConfig, root: Path, inputs: ReportInputs) -> Section:
    """PRES and DIV where measured, and the training cost of each confirmed point's run."""
    merged, measured, missing = _quality(inputs)
    costs = run_costs(cfg, root, inputs.study, inputs.sweep)
    table = merged.merge(costs, on="run_key", how="left") if "run_key" in merged else merged
    paragraphs = [f"{QUALITY[m]}: sweep score of each confirmed point." for m in measured]
    paragraphs += [_unmeasured(cfg, m) for m in missing]
    baseline = inputs.references.get("baseline") or {}
    for m in ("div", "div_dino"):
        if m in measured and baseline.get(m) is not None:
            paragraphs.append(
                f"The base model's {label(m)} on the fresh seeds: "
                f"{format_value(baseline[m], 'score')}."
            )
    paragraphs += _cost_sentences(costs, len(inputs.sweep))
    paragraphs += _adaptive_sentences(inputs.sweep_metrics)
    cost_columns = ["train_s", "processes", "device_s", "points_of_run", "device_s_per_point"]
    columns = [*_ids(table, ("point", "run_key")), *[f"score.{m}" for m in measured]]
    columns += [c for c in [*cost_columns, "device", "peak_mib"] if c in table]
    labels = {
        **ID_LABELS,
        **{f"score.{m}": label(m) for m in measured},
        "train_s": "training s",
        "processes": "processes",
        "device_s": "device-s",
        "points_of_run": "points of run",
        "device_s_per_point": "device-s per point",
        "peak_mib": "peak MiB",
    }
    caption = "Per confirmed point: quality of the prior and diversity, its run's training cost"
    shown = Table(
        table, columns, labels, {"processes": "int", "points_of_run": "int"}, "point", caption
    )
    return Section("cost", "Prior preservation, diversity and cost", paragraphs, [shown])
