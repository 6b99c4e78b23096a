"""Where each step's record goes: ``train_log.jsonl``, ``on_log`` and the progress bar.

Under several processes only the main one reports (the records already hold the averages
over all processes); the others train silently.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import torch
from tqdm.auto import tqdm

from harness.train.checkpointing import truncate_log

__all__ = ["LogCallback", "StepLog", "json_line", "memory_stats"]

LogCallback = Callable[[dict[str, Any], int], None]


def json_line(record: dict[str, Any]) -> str:
    """One JSONL line."""
    return json.dumps(record, sort_keys=True) + "\n"


def memory_stats(device: torch.device) -> dict[str, float]:
    """Peak CUDA memory (and utilisation when NVML is there), or the process's RSS on CPU."""
    if device.type == "cuda":
        stats = {"cuda_max_memory_mb": torch.cuda.max_memory_allocated(device) / 2**20}
        with contextlib.suppress(Exception):  # needs pynvml / NVML; optional
            stats["cuda_utilization"] = float(torch.cuda.utilization(device))
        return stats
    import psutil

    return {"rss_mb": psutil.Process(os.getpid()).memory_info().rss / 2**20}


class StepLog:
    """The per-step reporting of one run, from step ``start + 1`` on (a context manager).

    Entering drops the log records after ``start`` (a resumed run trains those steps again).
    """

    def __init__(
        self,
        path: Path,
        *,
        start: int,
        total: int,
        on_log: LogCallback | None,
        progress: bool,
        enabled: bool = True,
    ) -> None:
        self.path, self.start, self.total = path, start, total
        self.on_log, self.progress, self.enabled = on_log, progress, enabled
        self._file: IO[str] | None = None
        self._bar: Any = None

    def __enter__(self) -> StepLog:
        if self.enabled:
            truncate_log(self.path, self.start)
            self._bar = tqdm(
                total=self.total,
                initial=self.start,
                desc=f"train {self.path.parent.name}",
                disable=not self.progress,
                leave=False,
            )
            self._file = self.path.open("a", encoding="utf-8")
        return self

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._file is not None:
            self._file.close()

    def write(self, record: dict[str, Any], step: int) -> None:
        """Append ``record``, pass it to ``on_log`` and advance the bar."""
        if not self.enabled or self._file is None:
            return
        self._file.write(json_line(record))
        self._file.flush()
        if self.on_log is not None:
            self.on_log(record, step)
        self._bar.update(1)
        self._bar.set_postfix(loss=f"{record['loss']:.4f}")
