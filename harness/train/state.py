"""Checkpoints: adapters + resumable training state, written without pickle, atomically.

A checkpoint folder ``<run>/checkpoints/step-000010/`` holds::

    pytorch_lora_weights.safetensors   diffusers format (``pipeline.load_lora_weights(folder)``);
                                       the EMA weights when ``train.ema_decay`` is set
    kohya_lora.safetensors             only with ``train.export_kohya``
    state/lora.safetensors             PEFT-format adapter tensors ("<component>::<key>")
    state/ema.safetensors              only with ``train.ema_decay``: their average, same keys
    state/optimizer.safetensors        optimizer tensors ("<param index>.<name>")
    state/optimizer.json               param groups (with e.g. Prodigy's step-size estimate)
                                       and non-tensor optimizer state
    state/rng.safetensors              torch CPU / CUDA / trainer-generator states (uint8)
    state/trainer.json                 lr scheduler, grad scaler, step, loss
    checkpoint.json                    step, config hash, data hash, written last

It is written into ``checkpoints/.tmp-step-000010-*`` and renamed into place, so a crash while
saving leaves earlier checkpoints untouched and never exposes half a folder. A resume continues
from the newest checkpoint whose state files all exist and parse (:func:`resumable_checkpoints`):
a newer one damaged later (truncated copy, full disk) is skipped with a warning and rewritten
when training reaches its step again. State tensors are read through
:func:`harness.models.check_weights_file`, like every other weights file.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from harness.errors import HarnessError
from harness.models import WeightsFileError, check_weights_file
from harness.train.layout import (
    ADAPTER_WEIGHTS,
    CHECKPOINT_JSON,
    EMA_TENSORS,
    KOHYA_WEIGHTS,
    STATE_DIR,
    STATE_JSON,
    STATE_TENSORS,
)
from harness.train.tensorfiles import atomic_write_json, atomic_write_tensors, read_json

__all__ = [
    "CHECKPOINT_JSON",
    "EMA_TENSORS",
    "TrainingState",
    "capture_rng",
    "checkpoint_dir",
    "complete_checkpoints",
    "load_optimizer",
    "read_state_tensors",
    "restore_rng",
    "resumable_checkpoints",
    "save_optimizer",
    "write_checkpoint_atomically",
]


def read_state_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a checkpoint's state file, through the harness' one gate for weight files.

    Raises:
        WeightsFileError: the file is missing, truncated or not safetensors (names the file).
    """
    check_weights_file(path, "checkpoint state")
    try:
        return load_file(str(path))
    except Exception as exc:  # SafetensorError has no public class
        raise WeightsFileError(f"checkpoint state: {path}: unreadable ({exc})") from None


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    """``<run>/checkpoints/step-000010``."""
    return run_dir / "checkpoints" / f"step-{step:06d}"


NESTED = "::"  # "<index>.<name>::<key>": a tensor of a per-parameter dict (bitsandbytes')


def save_optimizer(optimizer: torch.optim.Optimizer, out_dir: Path) -> None:
    """Optimizer state: tensors to safetensors, structure and scalars to JSON.

    A per-parameter value may itself be a dict (bitsandbytes >= 0.45 nests its quantization
    state so): its tensors are stored as ``<index>.<name>::<key>``, the rest in the JSON.
    """
    state = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, values in state["state"].items():
        for name, value in values.items():
            if torch.is_tensor(value):
                tensors[f"{index}.{name}"] = value
            elif isinstance(value, dict):
                for key, item in value.items():
                    if torch.is_tensor(item):
                        tensors[f"{index}.{name}{NESTED}{key}"] = item
                    else:
                        scalars.setdefault(str(index), {}).setdefault(name, {})[key] = item
            else:
                scalars.setdefault(str(index), {})[name] = value
    atomic_write_tensors(out_dir / "optimizer.safetensors", tensors)
    atomic_write_json(
        out_dir / "optimizer.json",
        {"param_groups": state["param_groups"], "scalars": scalars},
    )


def load_optimizer(optimizer: torch.optim.Optimizer, in_dir: Path) -> None:
    """Inverse of :func:`save_optimizer`."""
    meta = read_json(in_dir / "optimizer.json")
    tensors = read_state_tensors(in_dir / "optimizer.safetensors")
    per_param: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        index, name = key.split(".", 1)
        values = per_param.setdefault(int(index), {})
        if NESTED in name:
            name, inner = name.split(NESTED, 1)
            values.setdefault(name, {})[inner] = value
        else:
            values[name] = value
    for index, scalars in meta["scalars"].items():
        values = per_param.setdefault(int(index), {})
        for name, value in scalars.items():
            if isinstance(value, dict):
                values.setdefault(name, {}).update(value)
            else:
                values[name] = value
    groups = meta["param_groups"]
    for group in groups:
        if isinstance(group.get("betas"), list):
            group["betas"] = tuple(group["betas"])
    optimizer.load_state_dict({"state": per_param, "param_groups": groups})


def capture_rng(generator: torch.Generator) -> dict[str, torch.Tensor]:
    """All torch RNG states that affect training, as uint8 tensors."""
    states = {"torch_cpu": torch.get_rng_state(), "trainer": generator.get_state()}
    if torch.cuda.is_available():
        for i, cuda_state in enumerate(torch.cuda.get_rng_state_all()):
            states[f"cuda_{i}"] = cuda_state
    return states


def restore_rng(states: dict[str, torch.Tensor], generator: torch.Generator) -> None:
    """Inverse of :func:`capture_rng`."""
    torch.set_rng_state(states["torch_cpu"])
    generator.set_state(states["trainer"])
    cuda_keys = sorted((k for k in states if k.startswith("cuda_")), key=lambda k: int(k[5:]))
    if cuda_keys and torch.cuda.is_available() and len(cuda_keys) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([states[k] for k in cuda_keys])


@dataclass
class TrainingState:
    """What is needed to continue from a checkpoint."""

    step: int
    path: Path
    meta: dict[str, Any]

    @property
    def state_dir(self) -> Path:
        """The ``state/`` folder."""
        return self.path / STATE_DIR

    def lora_state(self) -> dict[str, dict[str, torch.Tensor]]:
        """PEFT-format adapter tensors per component."""
        flat = read_state_tensors(self.state_dir / "lora.safetensors")
        out: dict[str, dict[str, torch.Tensor]] = {}
        for key, value in flat.items():
            component, name = key.split("::", 1)
            out.setdefault(component, {})[name] = value
        return out

    @property
    def has_ema(self) -> bool:
        """Whether the run averaged its weights (``train.ema_decay``): then ``ema.safetensors``
        belongs to the state."""
        return self.meta.get("train_config", {}).get("ema_decay") is not None

    def ema_state(self) -> dict[str, torch.Tensor]:
        """The weights' average, ``{"<component>::<key>": tensor}``."""
        return read_state_tensors(self.state_dir / EMA_TENSORS)

    def rng(self) -> dict[str, torch.Tensor]:
        """Saved RNG states."""
        return read_state_tensors(self.state_dir / "rng.safetensors")

    def trainer(self) -> dict[str, Any]:
        """Scheduler / grad-scaler state and counters."""
        data: dict[str, Any] = read_json(self.state_dir / "trainer.json")
        return data

    def problem(self) -> str | None:
        """Why training cannot continue from here (a state file missing, truncated or not
        parseable: e.g. a disk that filled up, or a partial copy), or ``None``. The adapter
        files are checked too: the checkpoint is what evaluation loads, so a resume past a
        broken one would report success and leave it broken."""
        kohya = self.path / KOHYA_WEIGHTS
        adapters = [self.path / ADAPTER_WEIGHTS, *([kohya] if kohya.exists() else [])]
        tensors = STATE_TENSORS + ((EMA_TENSORS,) if self.has_ema else ())
        weights = [(path, "checkpoint adapter") for path in adapters]
        weights += [(self.state_dir / name, "checkpoint state") for name in tensors]
        for path, what in weights:
            try:
                check_weights_file(path, what)
            except HarnessError as exc:
                return str(exc)
        for name in STATE_JSON:
            try:
                read_json(self.state_dir / name)
            except (OSError, ValueError) as exc:
                return f"checkpoint state: {self.state_dir / name}: unreadable ({exc})"
        return None


def complete_checkpoints(run_dir: Path) -> list[TrainingState]:
    """Complete checkpoints of a run (``checkpoint.json`` present), by step."""
    root = run_dir / "checkpoints"
    found: list[TrainingState] = []
    for folder in sorted(root.glob("step-*")) if root.is_dir() else []:
        meta_file = folder / CHECKPOINT_JSON
        if not meta_file.is_file():
            continue
        try:
            meta = read_json(meta_file)
        except ValueError:
            continue
        found.append(TrainingState(int(meta["step"]), folder, meta))
    return sorted(found, key=lambda s: s.step)


def resumable_checkpoints(states: list[TrainingState]) -> tuple[list[TrainingState], list[str]]:
    """Drop checkpoints that cannot be resumed from off the end of ``states`` (by step).

    Returns:
        The checkpoints up to the newest usable one, and one warning per dropped checkpoint
        (naming the broken file and the step training continues from instead).
    """
    kept, dropped = list(states), []
    while kept and (problem := kept[-1].problem()) is not None:
        dropped.append((kept.pop(), problem))
    start = f"resuming from step {kept[-1].step}" if kept else "starting from step 0"
    warnings = [
        f"checkpoint of step {bad.step} cannot be resumed from ({problem}); {start}"
        for bad, problem in dropped
    ]
    return kept, warnings


def write_checkpoint_atomically(
    run_dir: Path, step: int, write: Callable[[Path], dict[str, Any]]
) -> Path:
    """Let ``write(tmp_dir)`` fill a temp folder and return the checkpoint metadata, then write
    ``checkpoint.json`` and rename the folder to its final name.

    Raises whatever ``write`` raises; the temp folder is removed and nothing else changes.
    """
    final = checkpoint_dir(run_dir, step)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=final.parent))
    try:
        (tmp / STATE_DIR).mkdir()
        meta = write(tmp)
        atomic_write_json(tmp / CHECKPOINT_JSON, {**meta, "step": step, "complete": True})
        if final.exists():  # an older run to the same step (e.g. resume=False): replace it
            old = final.with_name(f".old-{final.name}")
            shutil.rmtree(old, ignore_errors=True)
            final.rename(old)
            tmp.rename(final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final
