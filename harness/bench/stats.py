"""Repeated, interleaved measurements and their summary (median, min, max)."""

from __future__ import annotations

import statistics
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TypeVar

__all__ = ["Figure", "interleaved"]

T = TypeVar("T")


@dataclass(frozen=True)
class Figure:
    """One benchmark figure over its repeats: ``samples`` in ``unit``."""

    name: str
    unit: str
    samples: tuple[float, ...]

    @property
    def median(self) -> float:
        """The figure: the median of the repeats (robust to one slow outlier)."""
        return float(statistics.median(self.samples))

    def line(self) -> str:
        """``name  median unit  (min .., max .., n=..)``."""
        low, high = min(self.samples), max(self.samples)
        return (
            f"{self.name:<48} {self.median:12.4g} {self.unit:<10} "
            f"(min {low:.4g}, max {high:.4g}, n={len(self.samples)})"
        )


def interleaved(runs: Mapping[str, Callable[[], T]], repeats: int) -> dict[str, list[T]]:
    """``repeats`` results of every run, after one discarded warm-up call of each.

    Rounds alternate the order (A B, B A, A B, ...), so neither run is always first or always
    finds the other's leftovers (a warm allocator, a hot file cache).
    """
    if repeats < 1:
        raise ValueError("repeats must be at least 1")
    names = list(runs)
    for name in names:  # warm-up: imports, kernels, caches, allocator
        runs[name]()
    out: dict[str, list[T]] = {name: [] for name in names}
    for round_ in range(repeats):
        for name in names if round_ % 2 == 0 else reversed(names):
            out[name].append(runs[name]())
    return out
