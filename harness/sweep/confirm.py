"""The ``evaluate`` stage's core: the sweep's chosen points and the base model, re-scored on
fresh seeds.

The best of many noisy points overstates its own score: the sweep picked it *because* its
images happened to score well (selection bias). Re-scoring the same adapter under the same
inference setting on seeds the sweep never used (:func:`harness.config.seed_spans`; optionally
on held-out prompts, ``evaluate.prompts``) gives a score that was not selected on. Both are
recorded side by side, with the difference::

    shrinkage.<metric> = score.<metric> (sweep) - confirm.<metric> (fresh seeds)

Part of a shrinkage is not selection: fresh seeds (and held-out prompts) can be harder for
every model. The base model, which nobody selected, is scored on both image sets under each
point's guidance, steps and scheduler; its own drop is subtracted (a difference of
differences, as the points and the base model share prompts and seeds on each side)::

    shrinkage_base.<metric> = baseline_sweep.<metric> - baseline.<metric>
    selection_bias.<metric> = shrinkage.<metric> - shrinkage_base.<metric>

A study keeps its points' scores across code changes (so that it resumes), so a sweep's scores
can come from other models or code than today's (an upgrade of the harness or diffusers, a hub
revision that moved, other hardware). The base model on the sweep's seeds under ``eval``'s
setting is what the study stored as its baseline: it is generated again and compared
(:func:`reproduction`); a difference above :data:`REPRODUCTION_TOLERANCE` is a warning and
``sweep_reproduced: false`` in ``reports/metrics.json``.

Which points: :func:`harness.sweep.select.select_points`. How they are scored: the sweep's own
protocol (:meth:`harness.sweep.backend.HarnessBackend.evaluate` and ``references``) under a
config whose ``eval`` section has the confirmation seeds and prompts
(:func:`confirmation_config`), so the numbers are comparable with the sweep's.

Outputs: ``<evaluate.dir>/results.{csv,parquet}`` (one row per selected point),
``<evaluate.dir>/per_image.parquet`` (one row per image of every point and of the base model
on the fresh seeds), ``<evaluate.dir>/references.json`` (baselines, real ceiling, seeds),
images under ``<evaluate.dir>/point-<n>/``, ``baseline/`` (fresh seeds) and
``baseline-sweep/`` (the sweep's seeds), and the git-tracked ``reports/metrics.json``
that ``dvc metrics show`` and ``dvc exp show`` read.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import pandas as pd
from tqdm.auto import tqdm

from harness.config import INFERENCE_DIMENSIONS, HarnessConfig, InferenceSetting, seed_spans
from harness.errors import HarnessError
from harness.outputs import read_json_object, read_table
from harness.sweep._base import PointScores
from harness.sweep._files import replaced_together
from harness.sweep.per_image import (
    EVALUATE_IMAGE_SCHEMA,
    PER_IMAGE,
    confirmed_image_rows,
    write_table,
)
from harness.sweep.recorder import relative
from harness.sweep.results import results_paths
from harness.sweep.runner import scalarize
from harness.sweep.select import SELECTED_BY, select_points
from harness.sweep.space import NO_TEXT_ENCODER_SCALE, TEXT_ENCODER_SCALE
from harness.sweep.study import study_id
from harness.sweep.summary import METRICS_FILE as SWEEP_METRICS_FILE
from harness.sweep.summary import results_study
from harness.train import CheckpointInfo

__all__ = [
    "METRICS_FILE",
    "REPRODUCTION_TOLERANCE",
    "Confirmation",
    "EvaluateError",
    "ScoringBackend",
    "confirm_points",
    "confirmation_config",
    "confirmation_seeds",
    "metrics_summary",
    "optional_number",
    "point_setting",
    "read_sweep_results",
    "reproduction",
    "selected_points",
    "selection_bias",
    "write_confirmation",
]

# Git-tracked (not under the ignored runs/): `dvc exp show` / `dvc metrics diff` read it per commit.
METRICS_FILE = "reports/metrics.json"
RESULTS_CSV = "results.csv"
RESULTS_PARQUET = "results.parquet"
REFERENCES_JSON = "references.json"
METRICS = ("dino", "clip_i", "clip_t")
EXTRA_METRICS = ("div", "div_dino", "pres")
ID_COLUMNS = ("point", "run_key", "checkpoint_step", "setting_id", "scheduler", "adapter")
# Largest |difference| of a mean score (DINO, CLIP-I, CLIP-T) between the base model's images
# now and the study's, same seeds and setting, still taken as the same models and code. On one
# machine they are equal; bf16 kernels on another GPU move a mean of 20 images by about 1e-3.
REPRODUCTION_TOLERANCE = 0.01
REQUIRED_COLUMNS = (
    *ID_COLUMNS,
    *(f"eval.{name}" for name in INFERENCE_DIMENSIONS),
    *(f"score.{m}" for m in METRICS),
)


class EvaluateError(HarnessError):
    """The evaluate stage cannot run: no sweep results, no points, a needed adapter is gone."""


class ScoringBackend(Protocol):
    """What the confirmation needs of a backend (:class:`harness.sweep.backend.HarnessBackend`;
    tests use stubs): the sweep's evaluation of a checkpoint, and its reference scores."""

    def evaluate(
        self,
        cfg: HarnessConfig,
        checkpoint: CheckpointInfo,
        settings: Sequence[InferenceSetting],
        out_dir: Path,
    ) -> list[PointScores]:
        """Score ``checkpoint`` under every setting with ``cfg.eval``'s prompts and seeds."""
        ...

    def references(self, cfg: HarnessConfig, out_dir: Path) -> dict[str, dict[str, float]]:
        """``baseline`` (the base model, ``eval`` setting) and ``real_ceiling`` scores."""
        ...


@dataclass
class Confirmation:
    """What the evaluate stage produced: the table, the references and where they are."""

    table: pd.DataFrame = field(repr=False)
    references: dict[str, dict[str, float]]
    seeds: list[int]
    results_csv: Path | None = None
    results_parquet: Path | None = None
    metrics_path: Path | None = None
    # One row per confirmation image of every point and of the base model (per_image.parquet).
    per_image: list[dict[str, Any]] = field(default_factory=list, repr=False)
    per_image_parquet: Path | None = None
    # The setting of ``references["baseline"]`` (the best point's guidance, steps, scheduler),
    # and the base model's scores under every confirmed point's such setting, by setting id.
    baseline_setting: str | None = None
    baselines: dict[str, dict[str, float]] = field(default_factory=dict)
    # The base model on the sweep's own prompts and seeds, by the same setting ids: what the
    # seeds alone change (``shrinkage_base``), which selection has no part in.
    baselines_sweep: dict[str, dict[str, float]] = field(default_factory=dict)
    # The base model now against the study's stored baseline (:func:`reproduction`); None
    # when the sweep stored none. And the best point now against its own sweep scores, same
    # seeds and prompts: what the base model cannot show (the adapter, its loading, PEFT).
    reproduction: dict[str, Any] | None = None
    point_reproduction: dict[str, Any] | None = None

    @property
    def reproduced(self) -> bool | None:
        """Whether today's code and models give the study's scores (None: nothing checked)."""
        checks = [c for c in (self.reproduction, self.point_reproduction) if c is not None]
        return all(c["reproduced"] for c in checks) if checks else None

    def describe(self) -> list[str]:
        """One line per confirmed point (sweep vs confirmation scores) and one for the base."""
        lines = [
            f"sweep score -> confirmation on fresh seeds {self.seeds[0]}..{self.seeds[-1]} "
            "(shrinkage = sweep - confirmation; selection = shrinkage - the base model's own: "
            "what selection overstated)"
        ]
        for row in self.table.to_dict(orient="records"):
            scores = ", ".join(
                f"{m} {row[f'score.{m}']:.3f} -> {row[f'confirm.{m}']:.3f} "
                f"(shrinkage {row[f'shrinkage.{m}']:+.3f}{_selection_part(row, m)})"
                for m in METRICS
            )
            lines.append(
                f"point {row['point']} (run {row['run_key']} step {row['checkpoint_step']} "
                f"{row['setting_id']}, {row[SELECTED_BY]}): {scores}"
            )
        base = self.references.get("baseline", {})
        shown = ", ".join(f"{m} {base[m]:.3f}" for m in METRICS if m in base)
        under = f", {self.baseline_setting}" if self.baseline_setting else ""
        swept = self.baselines_sweep.get(self.baseline_setting or "", {})
        if swept:
            shown += "; on the sweep's seeds " + ", ".join(
                f"{m} {swept[m]:.3f}" for m in METRICS if m in swept
            )
        lines.append(f"baseline (no adapter, fresh seeds{under}): {shown}")
        for check in (self.reproduction, self.point_reproduction):
            if check is not None and not check["reproduced"]:
                lines.append(reproduction_warning(check))
        return lines


def _selection_part(row: dict[str, Any], metric: str) -> str:
    """``", selection +0.012"`` when the row has its selection bias, else nothing."""
    value = optional_number(row.get(f"selection_bias.{metric}"))
    return "" if value is None else f", selection {value:+.3f}"


def confirmation_seeds(cfg: HarnessConfig) -> list[int]:
    """The seeds of the confirmation images (one image per seed and prompt).

    Raises:
        EvaluateError: naming ``evaluate.seed`` when they overlap the sweep's seeds (the config
            refuses that already; this is the same check where the seeds are used).
    """
    swept, fresh = seed_spans(cfg)
    shared = sorted(set(swept) & set(fresh))
    if shared:
        raise EvaluateError(
            f"evaluate.seed: confirmation seeds {fresh.start}..{fresh.stop - 1} overlap the "
            f"sweep's seeds {swept.start}..{swept.stop - 1} (shared: {shared}); leave "
            f"evaluate.seed unset or use >= {swept.stop}"
        )
    count = cfg.evaluate.images_per_prompt_for(cfg.eval.images_per_prompt)
    return list(fresh)[:count]


def confirmation_config(cfg: HarnessConfig) -> HarnessConfig:
    """``cfg`` whose ``eval`` section has the confirmation seeds (and held-out prompts, or
    with ``evaluate.protocol: dreambench`` each subject's DreamBench prompts).

    Everything else of the evaluation protocol (settings, resolution, PRES, metrics) stays the
    sweep's, so its scores compare with the sweep's.
    """
    seeds = confirmation_seeds(cfg)
    update: dict[str, Any] = {"seed": seeds[0], "images_per_prompt": len(seeds)}
    if cfg.evaluate.prompts is not None:
        update.update(prompts=list(cfg.evaluate.prompts), prompt_source="config")
    if cfg.evaluate.protocol == "dreambench":  # each subject's own DreamBench prompt list
        update["prompt_source"] = "dataset"
    return cfg.model_copy(update={"eval": cfg.eval.model_copy(update=update)})


def read_sweep_results(cfg: HarnessConfig, root: Path) -> pd.DataFrame:
    """The sweep's results table (``<sweep.dir>/results.parquet``).

    Raises:
        EvaluateError: it is missing, has no points, or lacks the columns the stage needs.
    """
    _, parquet = results_paths(root / cfg.sweep.dir)
    if not parquet.is_file():
        raise EvaluateError(
            f"{parquet}: no sweep results table; run `harness sweep` (the sweep stage) first"
        )
    frame = read_table(parquet, "harness sweep", EvaluateError)
    if frame.empty:
        raise EvaluateError(
            f"{parquet}: the sweep has no evaluated points yet (every run pruned or failed?); "
            "run `harness sweep` until it has some"
        )
    missing = [c for c in REQUIRED_COLUMNS if c not in frame.columns]
    if missing:
        raise EvaluateError(
            f"{parquet}: lacks columns {missing} (written by an older harness?); rerun "
            "`harness sweep` to rewrite it"
        )
    _check_same_study(cfg, root, parquet)
    return frame


def _check_same_study(cfg: HarnessConfig, root: Path, parquet: Path) -> None:
    """The table must be this configuration's study: confirming another configuration's
    points would report them under these params."""
    study = results_study(root / cfg.sweep.dir, EvaluateError)
    expected = study_id(cfg, root)
    if study is not None and study != expected:
        raise EvaluateError(
            f"{parquet}: holds study {study!r}, but this configuration's study is "
            f"{expected!r}; run `harness sweep` first (dvc repro does)"
        )


def selected_points(cfg: HarnessConfig, root: Path, frame: pd.DataFrame) -> pd.DataFrame:
    """:func:`~harness.sweep.select.select_points` of the results, each with its adapter.

    Raises:
        EvaluateError: no point has scores, or a selected point's adapter was deleted.
    """
    selected = select_points(cfg, frame)
    if selected.empty:
        raise EvaluateError("the sweep results have no point with scores to re-score")
    gone = [
        f"point {row['point']} ({row['adapter'] if isinstance(row['adapter'], str) else 'removed'})"
        for row in selected.to_dict(orient="records")
        if not isinstance(row["adapter"], str) or not (root / row["adapter"]).is_dir()
    ]
    if gone:
        raise EvaluateError(
            f"the adapters of {len(gone)} selected point(s) were deleted: {', '.join(gone)}; "
            "sweep.keep_adapters keeps those of the points evaluate re-scores, so evaluate.top_k "
            "was probably raised after the sweep: lower it, or sweep with keep_adapters: all"
        )
    return selected


def point_setting(cfg: HarnessConfig, row: pd.Series | dict[str, Any]) -> InferenceSetting:
    """The inference setting of a results row (its ``eval.*`` columns and scheduler)."""
    values: dict[str, Any] = {}
    for name in INFERENCE_DIMENSIONS:
        value = row.get(f"eval.{name}")
        if value is None or pd.isna(value):
            # Only a run without a text-encoder adapter lacks one (its text-encoder scale):
            # nothing to scale; the sweep generated it at NO_TEXT_ENCODER_SCALE.
            continue
        values[name] = int(value) if name == "num_inference_steps" else float(value)
    values.setdefault(TEXT_ENCODER_SCALE, NO_TEXT_ENCODER_SCALE)
    setting = InferenceSetting(**values, scheduler=row["scheduler"] or cfg.eval.scheduler)
    if setting.id != row["setting_id"]:
        raise EvaluateError(
            f"point {row['point']}: its eval.* columns give setting {setting.id}, "
            f"but its setting_id is {row['setting_id']}"
        )
    return setting


def _fresh_dir(path: Path) -> Path:
    """``path``, emptied: generation appends to manifests, so a rerun starts clean."""
    shutil.rmtree(path, ignore_errors=True)
    return path


def confirm_points(
    cfg: HarnessConfig,
    root: Path,
    selected: pd.DataFrame,
    backend: ScoringBackend,
    progress: bool = True,
) -> Confirmation:
    """Re-score every selected point, then the base model, on the confirmation seeds; and the
    base model on the sweep's seeds (its own shrinkage; the study's baseline reproduced), and
    the best point there too (its sweep scores reproduced).

    ``backend`` must have been made for :func:`confirmation_config` (its prompts); the table
    has one row per selected point, in selection order (best first).
    """
    fresh, out = confirmation_config(cfg), root / cfg.evaluate.dir
    records = selected.to_dict(orient="records")
    settings = [point_setting(cfg, row) for row in records]
    base_of = [base_setting(s) for s in settings]  # each point's, in selection order
    bases = list({base.id: base for base in base_of}.values())
    # The study's own baseline (eval's setting, the sweep's seeds) is generated again too.
    stored, checked = _stored_sweep_baseline(cfg, root), base_setting(cfg.eval.setting)
    on_sweep = [*bases, *([checked] if stored and checked.id not in {b.id for b in bases} else [])]
    rows, images = [], []
    total = len(records) + len(bases) + len(on_sweep) + 1
    with tqdm(total=total, desc="evaluate", unit="point", disable=not progress) as bar:
        for row, setting, base in zip(records, settings, base_of, strict=True):
            checkpoint = CheckpointInfo(int(row["checkpoint_step"]), root / row["adapter"])
            point_dir = _fresh_dir(out / f"point-{int(row['point']):05d}")
            (measured,) = backend.evaluate(fresh, checkpoint, [setting], point_dir)
            rows.append(confirmation_row(cfg, root, row, measured))
            images += confirmed_image_rows(root, measured, row, base.id)
            bar.update()
        # The base model at each point's guidance, steps and scheduler (its scores move with
        # them, CLIP-T above all): on the fresh seeds here, below on the sweep's (what seeds do).
        found: dict[str, dict[str, dict[str, float]]] = {}
        baseline_dir = _fresh_dir(out / "baseline")
        for base in bases:
            found[base.id], baseline = _references(backend, with_setting(fresh, base), baseline_dir)
            images += confirmed_image_rows(root, baseline) if baseline is not None else []
            bar.update()
        swept = _base_on_sweep_seeds(cfg, backend, on_sweep, out, bar)
        best_now = _best_on_sweep_seeds(cfg, root, backend, records[0], settings[0], out, bar)
        checks = _reproductions(cfg, root, stored, swept, records[0], best_now)
    for row, base in zip(rows, base_of, strict=True):
        row["baseline_setting"] = base.id
        scores = found[base.id].get("baseline", {})
        row.update({f"baseline.{m}": scores.get(m) for m in METRICS})
        row.update(selection_bias(cfg, row, scores, swept[base.id]))
    best = bases[0].id  # the sweep's best point's: what reports/metrics.json compares
    return Confirmation(
        pd.DataFrame(rows),
        found[best],
        confirmation_seeds(cfg),
        per_image=images,
        baseline_setting=best,
        baselines={k: v["baseline"] for k, v in found.items() if "baseline" in v},
        baselines_sweep={k: v for k, v in swept.items() if v},
        reproduction=checks[0],
        point_reproduction=checks[1],
    )


def _reproductions(
    cfg: HarnessConfig,
    root: Path,
    stored: dict[str, float],
    swept: dict[str, dict[str, float]],
    best: dict[str, Any],
    best_now: PointScores,
) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """:func:`reproduction` of the study's stored baseline (``eval``'s setting), and of the
    best point against the scores the sweep recorded for it; both name the changes since the
    study began (looked up once)."""
    checked = base_setting(cfg.eval.setting).id
    packages, model = _changes_since_study(cfg, root)
    recorded = {k.removeprefix("score."): v for k, v in best.items() if k.startswith("score.")}
    point = reproduction(best_now.setting.id, recorded, best_now.scores, packages, model)
    if point is not None:
        point["what"] = (
            f"the sweep's best point (point {best['point']}, run {best['run_key']} step "
            f"{best['checkpoint_step']})"
        )
    return reproduction(checked, stored, swept.get(checked, {}), packages, model), point


def _best_on_sweep_seeds(
    cfg: HarnessConfig,
    root: Path,
    backend: ScoringBackend,
    row: dict[str, Any],
    setting: InferenceSetting,
    out: Path,
    bar: Any,
) -> PointScores:
    """The sweep's best point generated again on the sweep's own prompts and seeds."""
    checkpoint = CheckpointInfo(int(row["checkpoint_step"]), root / row["adapter"])
    (now,) = backend.evaluate(cfg, checkpoint, [setting], _fresh_dir(out / "best-sweep"))
    bar.update()
    return now


def _changes_since_study(cfg: HarnessConfig, root: Path) -> tuple[list[str], str | None]:
    """The packages whose versions here differ from those the study was started with, and
    how the model's weights differ from its (``<sweep.dir>/summary.json``'s ``environment``
    and ``model``; not recorded: no change)."""
    from harness.models.identity import identity_change, model_identity
    from harness.sweep.environment import differences, software_versions
    from harness.sweep.results import SUMMARY_JSON

    path = root / cfg.sweep.dir / SUMMARY_JSON
    summary = read_json_object(path, "harness sweep", EvaluateError)
    stored, model = summary.get("environment"), summary.get("model")
    packages = differences(stored, software_versions()) if isinstance(stored, dict) else []
    weights = None
    if isinstance(model, dict):
        weights = identity_change(model, model_identity(cfg.model, root))
    return packages, weights


def _base_on_sweep_seeds(
    cfg: HarnessConfig,
    backend: ScoringBackend,
    settings: Sequence[InferenceSetting],
    out: Path,
    bar: Any,
) -> dict[str, dict[str, float]]:
    """The base model's scores on the sweep's own prompts and seeds under each setting, by
    setting id (``{}`` where the backend gives no baseline); images in ``out/baseline-sweep``."""
    swept: dict[str, dict[str, float]] = {}
    out_dir = _fresh_dir(out / "baseline-sweep")
    for base in settings:
        swept[base.id] = _references(backend, with_setting(cfg, base), out_dir)[0].get(
            "baseline", {}
        )
        bar.update()
    return swept


def _stored_sweep_baseline(cfg: HarnessConfig, root: Path) -> dict[str, float]:
    """The base model's scores the study stored (``<sweep.dir>/metrics.json``'s ``baseline``:
    ``eval``'s setting, the sweep's seeds), or ``{}``."""
    path = root / cfg.sweep.dir / SWEEP_METRICS_FILE
    stored = read_json_object(path, "harness sweep", EvaluateError).get("baseline")
    return dict(stored) if isinstance(stored, dict) else {}


def reproduction(
    setting: str,
    stored: dict[str, float],
    now: dict[str, float],
    packages: Sequence[str] = (),
    model: str | None = None,
) -> dict[str, Any] | None:
    """The base model's scores now against the study's, same seeds and ``setting``:
    ``{"setting", "sweep", "now", "difference", "reproduced", "packages", "model"}``, or None
    when either side has none of the metrics. ``reproduced``: every |difference| <=
    REPRODUCTION_TOLERANCE; ``packages``: those whose versions changed since the study began
    (:func:`harness.sweep.environment.differences`), ``model``: how the weights changed
    (:func:`harness.models.identity.identity_change`), the likely causes when it is not."""
    metrics = [m for m in METRICS if m in stored and m in now]
    if not metrics:
        return None
    difference = {m: float(now[m]) - float(stored[m]) for m in metrics}
    return {
        "setting": setting,
        "sweep": {m: float(stored[m]) for m in metrics},
        "now": {m: float(now[m]) for m in metrics},
        "difference": difference,
        "reproduced": all(abs(d) <= REPRODUCTION_TOLERANCE for d in difference.values()),
        "packages": list(packages),
        "model": model,
    }


def reproduction_warning(check: dict[str, Any]) -> str:
    """One line: the base model (or ``check["what"]``) no longer gives the study's scores,
    the likely causes, and what to do."""
    scores = ", ".join(
        f"{m} {check['sweep'][m]:.3f} in the study, {check['now'][m]:.3f} now" for m in check["now"]
    )
    changed = check.get("packages") or []
    causes = []  # none recorded (an older references.json): the usual suspects
    if check.get("model"):
        causes.append(f"the model's weights changed since the study began: {check['model']}")
    if changed:
        causes.append(f"packages changed since the study began: {', '.join(changed)}")
    cause = (
        "; ".join(causes) or "an upgrade of the harness, a hub revision that moved, other hardware"
    )
    return (
        f"WARNING: {check.get('what', 'the base model')} on the sweep's seeds "
        f"({check['setting']}) no longer gives the "
        f"study's scores ({scores}): the study's points were made by other models, code or "
        f"hardware ({cause}), so their sweep scores, shrinkage and selection bias do not "
        "compare with today's confirmation. Sweep again in a new study "
        "(-S sweep.study_name=<new name>)"
    )


def selection_bias(
    cfg: HarnessConfig,
    row: dict[str, Any],
    fresh_base: dict[str, float],
    sweep_base: dict[str, float],
) -> dict[str, float | None]:
    """A confirmed row's ``baseline_sweep.<m>`` (the base model on the sweep's prompts and
    seeds), ``shrinkage_base.<m>`` (its own sweep - confirmation difference: the seeds' and
    prompts' part, as nobody selected the base model) and ``selection_bias.<m>`` (the row's
    shrinkage less that part). None where the base model lacks the metric on either side."""
    out: dict[str, float | None] = {}
    for m in _metrics(cfg):
        before, after = _base_score(cfg, sweep_base, m), _base_score(cfg, fresh_base, m)
        base_drop = None if before is None or after is None else before - after
        out[f"baseline_sweep.{m}"] = before
        out[f"shrinkage_base.{m}"] = base_drop
        out[f"selection_bias.{m}"] = (
            None if base_drop is None else row[f"shrinkage.{m}"] - base_drop
        )
    return out


def _base_score(cfg: HarnessConfig, scores: dict[str, float], metric: str) -> float | None:
    """The base model's ``metric`` (``weighted``: by ``sweep.weights``), or None."""
    if metric == "weighted":
        weights = cfg.sweep.weights or {}
        return scalarize(cfg, scores) if all(m in scores for m in weights) else None
    return optional_number(scores.get(metric))


def base_setting(setting: InferenceSetting) -> InferenceSetting:
    """What of ``setting`` applies to the base model: guidance, steps and scheduler (its LoRA
    scales at 1, as there is no adapter to scale)."""
    return setting.model_copy(update={"lora_scale": 1.0, TEXT_ENCODER_SCALE: 1.0})


def with_setting(cfg: HarnessConfig, setting: InferenceSetting) -> HarnessConfig:
    """``cfg`` whose ``eval`` setting (what the baseline is generated under) is ``setting``."""
    return cfg.model_copy(update={"eval": cfg.eval.model_copy(update=dict(setting))})


def _references(
    backend: ScoringBackend, cfg: HarnessConfig, out_dir: Path
) -> tuple[dict[str, dict[str, float]], PointScores | None]:
    """The backend's reference scores, and the base model's :class:`PointScores` (its
    per-image rows) when the backend gives it (``references_with_baseline``, as
    :class:`~harness.sweep.backend.HarnessBackend` does)."""
    with_baseline = getattr(backend, "references_with_baseline", None)
    if with_baseline is None:
        return backend.references(cfg, out_dir), None
    return with_baseline(cfg, out_dir)


def _metrics(cfg: HarnessConfig) -> list[str]:
    return [*METRICS, *(["weighted"] if cfg.sweep.weights else [])]


def confirmation_row(
    cfg: HarnessConfig, root: Path, row: dict[str, Any], measured: PointScores
) -> dict[str, Any]:
    """One table row: the point's identity, sweep and confirmation scores, shrinkage."""
    out: dict[str, Any] = {c: row[c] for c in ID_COLUMNS}
    out.update({SELECTED_BY: row[SELECTED_BY], "selection_rank": row["selection_rank"]})
    sweep = {k.removeprefix("score."): v for k, v in row.items() if k.startswith("score.")}
    confirm = dict(measured.scores)
    if cfg.sweep.weights:
        sweep["weighted"], confirm["weighted"] = row["selection_score"], scalarize(cfg, confirm)
    for m in _metrics(cfg):
        for suffix in ("", "_lo", "_hi"):
            out[f"score.{m}{suffix}"] = sweep.get(m + suffix)
        for suffix in ("", "_lo", "_hi"):
            out[f"confirm.{m}{suffix}"] = confirm.get(m + suffix)
        out[f"shrinkage.{m}"] = float(sweep[m]) - float(confirm[m])
    for m in EXTRA_METRICS:  # the paper's DIV and PRES (and DIV-DINO), when measured
        if m in confirm:
            out.update({f"confirm.{m}{s}": confirm.get(m + s) for s in ("", "_lo", "_hi")})
    out["confirm.n_images"] = measured.n_images
    out["confirm.images_dir"] = relative(measured.images_dir, root)
    out.update({k: v for k, v in row.items() if k.startswith(("train.", "eval."))})
    return out


def metrics_summary(
    cfg: HarnessConfig, confirmation: Confirmation, root: Path | None = None
) -> dict[str, Any]:
    """``reports/metrics.json``: the best point's sweep and confirmation scores, shrinkage (its
    own and the mean over every confirmed point), baseline and real ceiling."""
    table = confirmation.table
    best = table.iloc[0]  # selection order: the sweep's best point first
    metrics = _metrics(cfg)
    confirm_keys = [f"{m}{s}" for m in metrics for s in ("", "_lo", "_hi")]
    data: dict[str, Any] = {
        "study": study_id(cfg, root),
        "points_confirmed": len(table),
        "best_point": int(best["point"]),
        "best_checkpoint_step": int(best["checkpoint_step"]),
        "sweep": {m: float(best[f"score.{m}"]) for m in metrics},
        "confirm": {k: optional_number(best[f"confirm.{k}"]) for k in confirm_keys},
        "shrinkage": {m: float(best[f"shrinkage.{m}"]) for m in metrics},
        "shrinkage_mean": {m: float(table[f"shrinkage.{m}"].mean()) for m in metrics},
    }
    if all(f"selection_bias.{m}" in table for m in metrics):
        data["selection_bias"] = {m: optional_number(best[f"selection_bias.{m}"]) for m in metrics}
        data["selection_bias_mean"] = {
            m: optional_number(table[f"selection_bias.{m}"].mean()) for m in metrics
        }
    data.update({k: dict(v) for k, v in confirmation.references.items()})
    swept = confirmation.baselines_sweep.get(confirmation.baseline_setting or "")
    if swept:
        data["baseline_sweep"] = dict(swept)
    if confirmation.reproduced is not None:
        data["sweep_reproduced"] = confirmation.reproduced
    if confirmation.reproduction is not None:
        data["sweep_baseline_difference"] = dict(confirmation.reproduction["difference"])
    if confirmation.point_reproduction is not None:
        data["sweep_point_difference"] = dict(confirmation.point_reproduction["difference"])
    if confirmation.baseline_setting is not None:
        data["baseline_setting"] = confirmation.baseline_setting
    return data


def optional_number(value: Any) -> float | None:
    """A results-table cell as a JSON number: None for a missing value or NaN."""
    return None if value is None or pd.isna(value) else float(value)


def write_confirmation(cfg: HarnessConfig, root: Path, confirmation: Confirmation) -> Confirmation:
    """Write the table (CSV, parquet), the per-image scores (``per_image.parquet``:
    :mod:`harness.sweep.per_image`), ``references.json`` and ``reports/metrics.json``; return
    ``confirmation`` with the paths set."""
    out = root / cfg.evaluate.dir
    out.mkdir(parents=True, exist_ok=True)
    csv_path, parquet_path = out / RESULTS_CSV, out / RESULTS_PARQUET
    metrics_path = root / METRICS_FILE
    references = {
        **confirmation.references,
        "baseline_setting": confirmation.baseline_setting,
        "baselines": confirmation.baselines,
        "baselines_sweep": confirmation.baselines_sweep,
        "reproduction": confirmation.reproduction,
        "point_reproduction": confirmation.point_reproduction,
        "seeds": confirmation.seeds,
        "held_out_prompts": cfg.evaluate.prompts,
    }
    # Replaced together: a failed write (a full disk) leaves the previous confirmation whole,
    # never a new table beside old references for the report to mix.
    paths = (csv_path, parquet_path, out / REFERENCES_JSON, metrics_path)
    with replaced_together(*paths) as (csv, parquet, refs, metrics):
        confirmation.table.to_csv(csv, index=False)
        confirmation.table.to_parquet(parquet, index=False)
        _write_json(refs, references)
        _write_json(metrics, metrics_summary(cfg, confirmation, root))
        confirmation.per_image_parquet = write_table(
            confirmation.per_image, EVALUATE_IMAGE_SCHEMA, out / PER_IMAGE
        )
    confirmation.results_csv, confirmation.results_parquet = csv_path, parquet_path
    confirmation.metrics_path = metrics_path
    return confirmation


def _write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
