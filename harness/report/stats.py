"""Paired comparisons of confirmed points on the same prompts and seeds.

Two points of the evaluate stage were scored on the same prompts with the same fresh seeds, so
their images pair up by ``(prompt, seed)``: the difference of a metric between two points is a
mean of per-pair differences, and its 95% interval comes from a **two-stage paired bootstrap**
(:func:`paired_bootstrap`): resample the prompts with replacement, then within every drawn
prompt its seeds with replacement, and take percentiles of the resampled mean difference. It
covers both sources of noise (which prompts, which seeds); with one pair per prompt it is the
plain bootstrap. An interval that excludes 0 is a *real* difference, one that does not is
*noise* (:attr:`Interval.verdict`). The resampling is seeded: the same inputs give the same
interval.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

__all__ = ["PAIR_KEYS", "Interval", "paired_bootstrap", "paired_comparison", "paired_differences"]

PAIR_KEYS = ("prompt", "seed")


@dataclass(frozen=True)
class Interval:
    """A mean difference with its bootstrap interval."""

    mean: float
    lo: float
    hi: float
    n: int  # pairs

    @property
    def excludes_zero(self) -> bool:
        """Whether the interval lies wholly above or below 0."""
        return self.lo > 0 or self.hi < 0

    @property
    def verdict(self) -> str:
        """``"real"`` when the interval excludes 0, else ``"noise"``."""
        return "real" if self.excludes_zero else "noise"


def _cluster_matrix(values: np.ndarray, clusters: Sequence[Hashable] | None) -> np.ndarray:
    """Clusters x members, NaN-padded (one member per cluster without ``clusters``)."""
    if clusters is None:
        return values[:, None]
    codes, _ = pd.factorize(pd.Series(list(clusters)), sort=False)
    sizes = np.bincount(codes)
    matrix = np.full((len(sizes), int(sizes.max())), np.nan)
    slot = np.zeros(len(sizes), dtype=int)
    for code, value in zip(codes, values, strict=True):
        matrix[code, slot[code]] = value
        slot[code] += 1
    return matrix


def paired_bootstrap(
    differences: Sequence[float] | np.ndarray,
    clusters: Sequence[Hashable] | None = None,
    *,
    n_resamples: int = 2000,
    seed: int = 0,
    confidence: float = 0.95,
) -> Interval:
    """The mean of ``differences`` with a two-stage percentile bootstrap interval.

    ``clusters`` (one label per difference, e.g. its prompt) are resampled with replacement,
    then the members of every drawn cluster (its seeds). Every pair weighs the same.

    Raises:
        ValueError: no differences, or ``clusters`` of another length.
    """
    values = np.asarray(differences, dtype=float)
    if values.size == 0:
        raise ValueError("no paired differences")
    if clusters is not None and len(clusters) != values.size:
        raise ValueError(f"{len(clusters)} cluster labels for {values.size} differences")
    matrix = _cluster_matrix(values, clusters)
    sizes = (~np.isnan(matrix)).sum(axis=1)
    rng = np.random.default_rng(seed)
    n_clusters, width = matrix.shape
    picked = rng.integers(0, n_clusters, size=(n_resamples, n_clusters))
    members = (rng.random((n_resamples, n_clusters, width)) * sizes[picked][..., None]).astype(int)
    drawn = matrix[picked[..., None], members]
    used = np.arange(width)[None, None, :] < sizes[picked][..., None]
    means = np.where(used, drawn, 0.0).sum(axis=(1, 2)) / used.sum(axis=(1, 2))
    alpha = (1.0 - confidence) / 2.0
    lo, hi = np.quantile(means, [alpha, 1.0 - alpha])
    return Interval(float(values.mean()), float(lo), float(hi), int(values.size))


def paired_differences(per_image: pd.DataFrame, best: int, other: int, metric: str) -> pd.DataFrame:
    """``prompt``, ``seed`` and ``diff`` (best - other) of ``metric`` for every image pair the
    two points share (same prompt and seed); pairs with a missing score are dropped."""
    columns = [*PAIR_KEYS, metric]

    def images(point: int) -> pd.DataFrame:
        rows = per_image.loc[per_image["point"] == point, columns]
        return rows.groupby(list(PAIR_KEYS), as_index=False)[metric].mean()

    pairs = images(best).merge(images(other), on=list(PAIR_KEYS), suffixes=("_a", "_b"))
    pairs["diff"] = pairs[f"{metric}_a"] - pairs[f"{metric}_b"]
    return pairs.dropna(subset=["diff"])[[*PAIR_KEYS, "diff"]].reset_index(drop=True)


def paired_comparison(
    per_image: pd.DataFrame,
    best: int,
    others: Sequence[int],
    metrics: Sequence[str],
    *,
    n_resamples: int = 2000,
    seed: int = 0,
) -> pd.DataFrame:
    """One row per other point: ``point``, ``n_pairs`` and per metric ``diff.<m>`` (best -
    other, mean over pairs), ``diff.<m>_lo``/``_hi`` (95%) and ``verdict.<m>``."""
    rows = []
    for other in others:
        row: dict[str, object] = {"point": int(other)}
        n_pairs = 0
        for metric in metrics:
            pairs = paired_differences(per_image, best, other, metric)
            if pairs.empty:
                row.update({f"diff.{metric}": None, f"verdict.{metric}": "no pairs"})
                continue
            found = paired_bootstrap(
                pairs["diff"].to_numpy(),
                list(pairs["prompt"]),
                n_resamples=n_resamples,
                seed=seed,
            )
            n_pairs = max(n_pairs, found.n)
            row.update(
                {
                    f"diff.{metric}": found.mean,
                    f"diff.{metric}_lo": found.lo,
                    f"diff.{metric}_hi": found.hi,
                    f"verdict.{metric}": found.verdict,
                }
            )
        rows.append({**row, "n_pairs": n_pairs})
    return pd.DataFrame(rows)
