"""Atomic on-disk writes of the trainer and its caches: safetensors, JSON, content hashes.

Every write goes to a temp file that is renamed into place, so readers never see half a file.
Nothing here pickles.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

__all__ = [
    "atomic_write_json",
    "atomic_write_tensors",
    "content_hash",
    "file_sha256",
    "read_json",
    "read_tensors",
]


def content_hash(obj: Any) -> str:
    """SHA-256 of the canonical JSON form of ``obj`` (sorted keys)."""
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def file_sha256(path: Path) -> str:
    """SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _tmp_path(target: Path) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    return Path(name)


def atomic_write_json(path: Path, data: Any) -> None:
    """Write ``data`` as JSON (strict: no non-JSON values) via a temp file and rename."""
    text = json.dumps(data, indent=2, sort_keys=True, allow_nan=True)
    tmp = _tmp_path(path)
    try:
        tmp.write_text(text + "\n", encoding="utf-8")
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_tensors(
    path: Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None
) -> None:
    """Save tensors with safetensors via a temp file and rename."""
    clean = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    tmp = _tmp_path(path)
    try:
        save_file(clean, str(tmp), metadata=dict(metadata) if metadata else None)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def read_json(path: Path) -> Any:
    """Parse a JSON file."""
    return json.loads(path.read_text(encoding="utf-8"))


def read_tensors(path: Path) -> dict[str, torch.Tensor] | None:
    """Load a safetensors file; ``None`` when missing or unreadable (treated as a cache miss)."""
    if not path.is_file():
        return None
    try:
        return load_file(str(path))
    except Exception:  # a truncated or corrupt cache entry is rebuilt, not fatal
        return None
