"""Result records and typed errors of :func:`harness.train.train_lora`."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from harness.errors import HarnessError
from harness.train.layout import ADAPTER_WEIGHTS

__all__ = [
    "CheckpointInfo",
    "NonFiniteLossError",
    "TrainResult",
    "TrainStatus",
    "TrainingError",
    "TrainingOOMError",
]

TrainStatus = Literal["completed", "failed", "pruned"]
ErrorType = Literal["non_finite_loss", "oom", "error"]


class TrainingError(HarnessError, RuntimeError):
    """Training could not run or did not finish; the message says why."""


class NonFiniteLossError(TrainingError):
    """The loss became NaN or infinite; the run stopped and recorded the step."""


class TrainingOOMError(TrainingError):
    """The device ran out of memory; the batch size is never reduced automatically."""


@dataclass(frozen=True)
class CheckpointInfo:
    """One saved adapter: ``path`` holds ``pytorch_lora_weights.safetensors``."""

    step: int
    path: Path
    loss: float | None = None
    kohya_path: Path | None = None

    @property
    def weights_path(self) -> Path:
        """The diffusers-format LoRA file (load the folder with ``load_lora_weights``)."""
        return self.path / ADAPTER_WEIGHTS

    def to_dict(self) -> dict[str, Any]:
        """JSON-compatible form."""
        return {
            "step": self.step,
            "path": str(self.path),
            "loss": self.loss,
            "kohya_path": str(self.kohya_path) if self.kohya_path else None,
        }


@dataclass
class TrainResult:
    """What one call of :func:`harness.train.train_lora` produced (also in ``result.json``)."""

    status: TrainStatus
    run_dir: Path
    steps_done: int
    max_steps: int
    checkpoints: list[CheckpointInfo] = field(default_factory=list)
    final_loss: float | None = None
    reason: str | None = None
    error_type: ErrorType | None = None
    resumed_from: int | None = None
    config_hash: str = ""
    wall_s: float = 0.0
    info: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)  # e.g. a broken checkpoint skipped

    @property
    def log_path(self) -> Path:
        """The per-step JSONL log."""
        return self.run_dir / "train_log.jsonl"

    @property
    def result_path(self) -> Path:
        """The status JSON written at the start (``running``) and the end of every call."""
        return self.run_dir / "result.json"

    def to_dict(self) -> dict[str, Any]:
        """JSON-compatible form (written to ``result.json``)."""
        out = asdict(self)
        out["run_dir"] = str(self.run_dir)
        out["log_path"] = str(self.log_path)
        out["checkpoints"] = [c.to_dict() for c in self.checkpoints]
        return out

    def raise_for_status(self) -> None:
        """Raise the typed error of a failed run (no-op for completed or pruned runs)."""
        if self.status != "failed":
            return
        cls: type[TrainingError] = {
            "non_finite_loss": NonFiniteLossError,
            "oom": TrainingOOMError,
        }.get(self.error_type or "", TrainingError)
        raise cls(self.reason or "training failed")
