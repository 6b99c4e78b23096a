"""Which sweep points the ``evaluate`` stage re-scores (and ``sweep.keep_adapters`` keeps).

The rule, one function for both (:func:`select_points`):

1. the **Pareto front** of every point on (``sweep.subject_metric``, ``sweep.prompt_metric``),
   both maximised: no other point is at least as good on both and better on one;
2. with ``sweep.weights`` (a weighted sweep has one objective), also the **best point by the
   weighted score**, whether or not it is on that front;
3. ranked by the sweep's objective sum (:func:`harness.sweep.runner.scalarize`: the weighted
   score, or the equal-weight sum of the two objectives, the rule that also picks a run's
   representative point), highest first, ties by point number; at most ``evaluate.top_k``.

The first selected point is *the* best point of the sweep (``reports/metrics.json``). It is
chosen on the sweep's scores only: choosing it on the confirmation scores would bring the
selection bias back.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from harness.config import HarnessConfig

__all__ = ["SELECTED_BY", "pareto_mask", "select_points", "selection_scores"]

SELECTED_BY = "selected_by"  # "pareto", "weighted" or "pareto+weighted"
RANK = "selection_rank"  # 1 = the best point
SCORE = "selection_score"  # the sweep score the ranking uses


def pareto_mask(values: np.ndarray) -> np.ndarray:
    """Non-dominated rows of ``values`` (n points x m objectives, all maximised).

    Equal points are all kept (neither dominates the other), as in Optuna's ``best_trials``.
    """
    keep = np.ones(len(values), dtype=bool)
    for i, row in enumerate(values):
        at_least = (values >= row).all(axis=1)
        better = (values > row).any(axis=1)
        keep[i] = not (at_least & better).any()
    return keep


def selection_scores(cfg: HarnessConfig, frame: pd.DataFrame) -> pd.Series:
    """The sweep score each point is ranked by (``scalarize`` on its ``score.*`` columns)."""
    weights = cfg.sweep.weights or {cfg.sweep.subject_metric: 0.5, cfg.sweep.prompt_metric: 0.5}
    total = pd.Series(0.0, index=frame.index)
    for metric, weight in weights.items():
        total = total + weight * frame[f"score.{metric}"].astype(float)
    return total


def select_points(cfg: HarnessConfig, frame: pd.DataFrame) -> pd.DataFrame:
    """The points to re-score, best first: a copy of their rows of a results frame with
    ``selected_by``, ``selection_rank`` (1 = best) and ``selection_score`` added.

    ``frame`` needs ``point`` and the ``score.<metric>`` columns of both objectives (and of
    every weighted metric); points with a missing score, or scored below the full protocol
    (``fidelity`` < 1: adaptive evaluation stopped them at a rung), are never selected. Empty
    in, empty out.
    """
    from harness.sweep.results import full_fidelity

    objectives = [f"score.{cfg.sweep.subject_metric}", f"score.{cfg.sweep.prompt_metric}"]
    weighted = list(cfg.sweep.weights or {})
    needed = [*objectives, *(f"score.{m}" for m in weighted)]
    scored = full_fidelity(frame).dropna(subset=needed).copy()
    if scored.empty:
        return scored.assign(**{SELECTED_BY: [], RANK: [], SCORE: []})
    scored[SCORE] = selection_scores(cfg, scored)
    front = pareto_mask(scored[objectives].to_numpy(dtype=float))
    labels = pd.Series(np.where(front, "pareto", ""), index=scored.index, dtype=object)
    if weighted:
        best = scored.sort_values([SCORE, "point"], ascending=[False, True]).index[0]
        labels[best] = "pareto+weighted" if front[scored.index.get_loc(best)] else "weighted"
    chosen = scored[labels != ""].assign(**{SELECTED_BY: labels[labels != ""]})
    chosen = chosen.sort_values([SCORE, "point"], ascending=[False, True]).head(cfg.evaluate.top_k)
    chosen[RANK] = range(1, len(chosen) + 1)
    return chosen.reset_index(drop=True)
