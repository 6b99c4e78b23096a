"""Repeated, interleaved measurements and their summary (median, min, max)."""

from __future__ import annotations

import logging
import statistics
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TypeVar

__all__ = ["Figure", "interleaved", "logged_passes"]

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


def logged_passes(
    name: str,
    run: Callable[[], T],
    repeats: int,
    describe: Callable[[T], str],
    logger: logging.Logger,
) -> Callable[[], T]:
    """``run`` (as :func:`interleaved` calls it: a warm-up, then ``repeats`` passes), with one
    line per pass on ``logger``, ``<name> warm-up: ...`` or ``<name> pass 2/3: ...`` and
    ``describe(result)``: a pass can take minutes, and a run stopped by a time limit keeps the
    passes it finished."""
    done = [0]

    def logged() -> T:
        result = run()
        label = "warm-up" if done[0] == 0 else f"pass {done[0]}/{repeats}"
        done[0] += 1
        logger.info("%s %s: %s", name, label, describe(result))
        return result

    return logged


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
