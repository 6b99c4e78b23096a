"""Adaptive evaluation: successive halving over one training run's points.

A run has ``len(checkpoints) x len(settings)`` points (96 for the ``sd15-lora`` preset), and
generating the full protocol for each costs far more than training. With
``sweep.evaluation: {rungs, keep_fraction}`` every point first gets the cheapest rung (its
first prompts and seeds), the best ``keep_fraction`` of them the next rung, and the last rung's
survivors the full protocol. A rung's images are the full protocol's own (same prompts,
seeds and files), so promotion only generates the images a point lacks.

Promotion ranks a run's points against each other, not against other runs': the outcome then
depends only on the run itself, never on which workers finished first, and each run keeps at
least ``min_keep`` full-fidelity points, so ``S.runs`` is told full-fidelity values only.

Points that stop at a rung are recorded with their scores and ``fidelity`` (the share of the
full protocol's images behind them) as PRUNED trials of the points study; the promoted ones
are its COMPLETE trials, so Optuna's Pareto front, the report and the evaluate stage see
full-fidelity points alone.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import numpy as np

from harness.config import AdaptiveEvaluation, HarnessConfig, InferenceSetting, Rung
from harness.sweep._base import PointScores
from harness.train import CheckpointInfo

if TYPE_CHECKING:
    from collections.abc import Mapping

__all__ = ["evaluate_adaptively", "evaluate_points", "kept", "promotion_order"]

logger = logging.getLogger(__name__)

# (checkpoint, settings, rung or None for the full protocol, earlier rungs' points) -> points
EvaluateFn = Callable[
    [CheckpointInfo, Sequence[InferenceSetting], Rung | None, Sequence[PointScores]],
    list[PointScores],
]
RecordFn = Callable[[CheckpointInfo, PointScores], None]


def promotion_order(cfg: HarnessConfig, scores: Sequence[Mapping[str, float]]) -> list[int]:
    """Indices of ``scores`` best first, by ``sweep.evaluation.rank_by``.

    ``pareto``: non-dominated sorting on the study's objectives (first front first), ties
    within a front by the weighted objective; ``weighted``: the weighted objective alone
    (``sweep.weights``, or the two objectives' mean); ``auto``: weighted when the sweep has
    ``sweep.weights``, else pareto.
    """
    from harness.sweep.runner import objective_values, scalarize
    from harness.sweep.select import pareto_mask

    evaluation = cfg.sweep.evaluation
    rank_by = evaluation.rank_by if isinstance(evaluation, AdaptiveEvaluation) else "auto"
    if rank_by == "auto":
        rank_by = "weighted" if cfg.sweep.weights else "pareto"
    weighted = [scalarize(cfg, s) for s in scores]
    front = np.zeros(len(scores), dtype=int)
    if rank_by == "pareto":
        values = np.array([objective_values(cfg, s) for s in scores], dtype=float)
        left, level = np.arange(len(scores)), 0
        while left.size:
            on_front = pareto_mask(values[left])
            front[left[on_front]] = level
            left, level = left[~on_front], level + 1
    return sorted(range(len(scores)), key=lambda i: (front[i], -weighted[i], i))


def kept(evaluation: AdaptiveEvaluation, n: int) -> int:
    """How many of a rung's ``n`` points go on: ``ceil(keep_fraction * n)``, at least
    ``min_keep``, at most ``n``."""
    return min(n, max(evaluation.min_keep, math.ceil(evaluation.keep_fraction * n - 1e-9)))


def evaluate_points(
    cfg: HarnessConfig,
    checkpoints: Sequence[CheckpointInfo],
    settings: Sequence[InferenceSetting],
    evaluate: EvaluateFn,
    record: RecordFn,
) -> None:
    """Every point of ``checkpoints x settings`` as ``sweep.evaluation`` says: each at the full
    protocol (one ``evaluate`` call per checkpoint), or :func:`evaluate_adaptively`."""
    if cfg.sweep.evaluation != "exhaustive":
        evaluate_adaptively(cfg, checkpoints, settings, evaluate, record)
        return
    for ckpt in checkpoints:
        for point in evaluate(ckpt, settings, None, ()):
            record(ckpt, point)


def evaluate_adaptively(
    cfg: HarnessConfig,
    checkpoints: Sequence[CheckpointInfo],
    settings: Sequence[InferenceSetting],
    evaluate: EvaluateFn,
    record: RecordFn,
) -> None:
    """Successive halving over ``checkpoints x settings``; every point is recorded once, at
    the fidelity it stopped at (the full protocol for the last rung's survivors).

    A promoted point's seconds add up over its rungs and its ``history`` keeps each earlier
    rung's scores (how well the cheap rung predicted the full score can be read off later).
    """
    evaluation = cfg.sweep.evaluation
    assert isinstance(evaluation, AdaptiveEvaluation)
    alive = [(ckpt, setting) for ckpt in checkpoints for setting in settings]
    latest: dict[tuple[int, str], PointScores] = {}
    for index, rung in enumerate(evaluation.rungs):
        measured = _measure(checkpoints, alive, latest, evaluate, rung)
        if all(point.fidelity >= 1.0 - 1e-9 for _, point in measured):
            logger.info(
                "sweep.evaluation: rung %d (%d prompts x %d images) is the whole evaluation "
                "protocol here; its points are full-fidelity points",
                index,
                rung.prompts,
                rung.images_per_prompt,
            )
            for ckpt, point in measured:
                record(ckpt, point)
            return
        for _, point in measured:
            point.rung = index
        order = promotion_order(cfg, [point.scores for _, point in measured])
        promoted = set(order[: kept(evaluation, len(measured))])
        for i, (ckpt, point) in enumerate(measured):
            if i in promoted:
                latest[(ckpt.step, point.setting.id)] = point
            else:
                record(ckpt, point)
        alive = [(ckpt, point.setting) for i, (ckpt, point) in enumerate(measured) if i in promoted]
    for ckpt, point in _measure(checkpoints, alive, latest, evaluate, None):
        record(ckpt, point)


def _measure(
    checkpoints: Sequence[CheckpointInfo],
    alive: Sequence[tuple[CheckpointInfo, InferenceSetting]],
    latest: Mapping[tuple[int, str], PointScores],
    evaluate: EvaluateFn,
    rung: Rung | None,
) -> list[tuple[CheckpointInfo, PointScores]]:
    """Evaluate the ``alive`` points at ``rung``, one backend call per checkpoint (its adapter
    loaded once), reusing each point's previous rung."""
    out = []
    for ckpt in checkpoints:
        mine = [setting for c, setting in alive if c.step == ckpt.step]
        if not mine:
            continue
        before = {s.id: latest[(ckpt.step, s.id)] for s in mine if (ckpt.step, s.id) in latest}
        for point in evaluate(ckpt, mine, rung, list(before.values())):
            earlier = before.get(point.setting.id)
            if earlier is not None:
                _carry_over(earlier, point)
            out.append((ckpt, point))
    return out


def _carry_over(earlier: PointScores, point: PointScores) -> None:
    """The point's earlier rung into its history, and that rung's seconds into its own."""
    point.history = [
        *earlier.history,
        {
            "rung": earlier.rung,
            "fidelity": earlier.fidelity,
            "n_images": earlier.n_images,
            "scores": dict(earlier.scores),
        },
    ]
    for phase, seconds in earlier.seconds.items():
        point.seconds[phase] = point.seconds.get(phase, 0.0) + seconds
