"""Score math on seeded random unit features, checked against brute-force loops."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from metrics.scores import (
    all_pairs_mean,
    bootstrap_ci,
    diversity,
    per_row_mean,
    self_pairs_mean,
    similarity,
)


def unit(n: int, d: int = 16, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=-1)


def cos(u: torch.Tensor, v: torch.Tensor) -> float:
    # Rows are unit vectors (the scores' contract), so the cosine is the plain dot product.
    return sum(float(p) * float(q) for p, q in zip(u, v, strict=True))


@pytest.mark.parametrize(("n_a", "n_b"), [(1, 1), (3, 5), (7, 2)])
def test_all_pairs_mean_equals_brute_force(n_a: int, n_b: int) -> None:
    a, b = unit(n_a, seed=1), unit(n_b, seed=2)
    expected = sum(cos(x, y) for x in a for y in b) / (n_a * n_b)
    assert all_pairs_mean(a, b) == pytest.approx(expected, abs=1e-10)


def test_all_pairs_mean_is_symmetric() -> None:
    a, b = unit(4, seed=3), unit(6, seed=4)
    assert all_pairs_mean(a, b) == pytest.approx(all_pairs_mean(b, a), abs=1e-12)
    assert torch.allclose(similarity(a, b), similarity(b, a).T)


def test_all_pairs_mean_ignores_row_order() -> None:
    a, b = unit(5, seed=5), unit(6, seed=6)
    perm_a, perm_b = torch.randperm(5), torch.randperm(6)
    assert all_pairs_mean(a[perm_a], b[perm_b]) == pytest.approx(all_pairs_mean(a, b), abs=1e-12)


def test_identical_features_score_one() -> None:
    x = unit(1, seed=7)
    assert all_pairs_mean(x, x) == pytest.approx(1.0, abs=1e-6)
    copies = x.repeat(4, 1)
    assert all_pairs_mean(copies, copies) == pytest.approx(1.0, abs=1e-6)
    assert self_pairs_mean(copies) == pytest.approx(1.0, abs=1e-6)
    assert diversity(copies) == pytest.approx(0.0, abs=1e-6)


def test_per_row_mean_matches_loop_and_all_pairs() -> None:
    a, b = unit(4, seed=8), unit(3, seed=9)
    rows = per_row_mean(a, b)
    assert rows.shape == (4,)
    for i in range(4):
        assert float(rows[i]) == pytest.approx(sum(cos(a[i], y) for y in b) / 3, abs=1e-10)
    assert float(rows.mean()) == pytest.approx(all_pairs_mean(a, b), abs=1e-12)


def test_self_pairs_mean_excludes_diagonal() -> None:
    x = unit(6, seed=10)
    expected = sum(cos(x[i], x[j]) for i in range(6) for j in range(6) if i != j) / 30
    assert self_pairs_mean(x) == pytest.approx(expected, abs=1e-10)
    # Including self-pairs would differ: the ceiling must not count an image with itself.
    assert all_pairs_mean(x, x) != pytest.approx(expected, abs=1e-3)
    assert diversity(x) == pytest.approx(1.0 - expected, abs=1e-10)


def test_shape_errors() -> None:
    with pytest.raises(ValueError, match="at least 2"):
        self_pairs_mean(unit(1))
    with pytest.raises(ValueError, match="feature sizes"):
        all_pairs_mean(unit(2, d=8), unit(2, d=4))
    with pytest.raises(ValueError, match="non-empty"):
        all_pairs_mean(torch.empty(0, 4), unit(2, d=4))


def test_bootstrap_contains_mean_and_is_seeded() -> None:
    rng = np.random.default_rng(0)
    for trial in range(20):
        groups = [list(rng.normal(0.5, 0.1, size=rng.integers(1, 5))) for _ in range(8)]
        pooled = sum(map(sum, groups)) / sum(map(len, groups))
        lo, hi = bootstrap_ci(groups, n=500, seed=trial)
        assert lo <= pooled <= hi
        assert lo < hi
        assert bootstrap_ci(groups, n=500, seed=trial) == (lo, hi)


def test_bootstrap_resamples_groups_not_values() -> None:
    # Two groups with constant values: any resample mean is a mix of whole groups.
    groups = [[0.0, 0.0, 0.0], [1.0]]
    lo, hi = bootstrap_ci(groups, n=2000, seed=1)
    assert lo == pytest.approx(0.0) and hi == pytest.approx(1.0)
    assert bootstrap_ci([[0.3, 0.5]], n=100) == pytest.approx((0.4, 0.4))


def test_bootstrap_errors() -> None:
    with pytest.raises(ValueError, match="at least one group"):
        bootstrap_ci([], n=10)
    with pytest.raises(ValueError, match="every group"):
        bootstrap_ci([[1.0], []], n=10)
    with pytest.raises(ValueError, match="n >= 1"):
        bootstrap_ci([[1.0]], n=0)
    assert math.isfinite(bootstrap_ci([[1.0], [2.0]], n=1)[0])
