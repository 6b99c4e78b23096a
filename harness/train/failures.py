"""How a training step fails without crashing the run: a NaN/inf loss, or out of memory.

Both end the run as ``status="failed"`` with an ``error_type`` and a reason that says what to
change; nothing is retried or shrunk automatically.
"""

from __future__ import annotations

import torch

from harness.train.records import ErrorType

__all__ = ["StepFailure", "first_line", "is_oom", "oom_reason"]


class StepFailure(Exception):
    """A step that cannot complete; the run records it and stops (on every process)."""

    def __init__(self, error_type: ErrorType, reason: str) -> None:
        super().__init__(reason)
        self.error_type: ErrorType = error_type
        self.reason = reason


def is_oom(exc: BaseException) -> bool:
    """Whether ``exc`` is the device running out of memory."""
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def oom_reason(step: int, batch_size: int, message: str) -> str:
    """The recorded reason of an out-of-memory failure (what to lower or enable)."""
    return (
        f"out of memory at step {step} with batch_size={batch_size} "
        f"(never reduced automatically; lower train.batch_size, raise "
        f"gradient_accumulation_steps, enable gradient_checkpointing or "
        f"mixed precision): {message}"
    )


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type name when it has none)."""
    return (str(exc).splitlines() or [type(exc).__name__])[0]
