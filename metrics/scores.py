"""Pure tensor math on L2-normalised embeddings: the DreamBooth similarity scores.

Every function takes rows that are already unit vectors, so a dot product *is* the cosine
similarity. Nothing here loads a model; the functions are tested against brute-force loops on
seeded random features.

Example:
    >>> import torch
    >>> x = torch.nn.functional.normalize(torch.randn(4, 8), dim=-1)
    >>> round(all_pairs_mean(x[:1], x[:1]), 5)
    1.0
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

__all__ = [
    "all_pairs_mean",
    "bootstrap_ci",
    "diversity",
    "per_row_mean",
    "self_pairs_mean",
    "similarity",
]


def _check_2d(name: str, x: torch.Tensor) -> None:
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"{name} must be a non-empty [N, D] tensor, got shape {tuple(x.shape)}")


def similarity(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine-similarity matrix ``[len(a), len(b)]`` of two sets of unit vectors (fp64)."""
    _check_2d("a", a)
    _check_2d("b", b)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature sizes differ: {a.shape[1]} vs {b.shape[1]}")
    # float64 so that means over thousands of pairs do not depend on summation order
    # (file order independence is tested to 1e-6).
    return a.double() @ b.double().T


def per_row_mean(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean similarity of each row of ``a`` to every row of ``b``: shape ``[len(a)]``.

    With ``a`` the generated images and ``b`` the real photos this is the per-image score;
    its mean over ``a`` equals :func:`all_pairs_mean`.
    """
    return similarity(a, b).mean(dim=1)


def all_pairs_mean(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean cosine similarity over all ``len(a) * len(b)`` pairs (the DreamBooth DINO/CLIP-I).

    Symmetric in its arguments. Note that ``all_pairs_mean(x, x)`` includes the self-pairs
    (each exactly 1); use :func:`self_pairs_mean` for the similarity *within* one set.
    """
    return float(similarity(a, b).mean())


def self_pairs_mean(x: torch.Tensor) -> float:
    """Mean similarity over the ``n * (n - 1)`` ordered pairs of distinct rows of ``x``.

    The diagonal (an image with itself) is excluded, as for the paper's "Real images" ceiling.
    Needs at least two rows.
    """
    _check_2d("x", x)
    n = x.shape[0]
    if n < 2:
        raise ValueError(f"self_pairs_mean needs at least 2 rows, got {n}")
    sim = similarity(x, x)
    off_diagonal_sum = sim.sum() - sim.diagonal().sum()
    return float(off_diagonal_sum / (n * (n - 1)))


def diversity(x: torch.Tensor) -> float:
    """DIV-DINO (``div_dino``): ``1 - self_pairs_mean(x)`` for the DINO embeddings of images
    generated from one prompt (higher = more diverse). The paper's DIV is LPIPS-based: see
    :class:`metrics.lpips.LpipsEncoder`."""
    return 1.0 - self_pairs_mean(x)


def bootstrap_ci(
    values_per_group: Sequence[Sequence[float]],
    n: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> tuple[float, float]:
    """Percentile bootstrap interval of the pooled mean, resampling whole groups.

    Each group is one prompt with the per-image scores of its images. A bootstrap sample draws
    ``len(values_per_group)`` groups with replacement and takes the mean over all their values,
    which equals the reported all-pairs mean on the original sample. Resampling prompts rather
    than images keeps images of the same prompt (which are correlated) together.

    Args:
        values_per_group: per-group values; every group must be non-empty.
        n: number of bootstrap samples (>= 1).
        seed: seed of the numpy generator (same seed, same interval).
        level: coverage of the interval, 0.95 for the 2.5th..97.5th percentiles.

    Returns:
        ``(lo, hi)``. A single group gives the degenerate interval ``(mean, mean)``.
    """
    if not values_per_group:
        raise ValueError("bootstrap_ci needs at least one group")
    if any(len(group) == 0 for group in values_per_group):
        raise ValueError("bootstrap_ci: every group needs at least one value")
    if n < 1:
        raise ValueError(f"bootstrap_ci needs n >= 1 samples, got {n}")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    sums = np.array([float(np.sum(group)) for group in values_per_group], dtype=np.float64)
    counts = np.array([len(group) for group in values_per_group], dtype=np.float64)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(sums), size=(n, len(sums)))
    stats = sums[idx].sum(axis=1) / counts[idx].sum(axis=1)
    alpha = (1.0 - level) / 2.0
    lo, hi = np.quantile(stats, [alpha, 1.0 - alpha])
    return float(lo), float(hi)
