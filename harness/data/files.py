"""Small file helpers: hashing, stable JSON, path containment."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

_CHUNK = 1 << 20


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file's bytes, read in chunks (photos can be large)."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def dumps_json(data: Any) -> str:
    """Stable JSON text: sorted keys, fixed indentation, trailing newline.

    Sorted keys and no timestamps are what make the stage's outputs byte-identical.
    """
    return json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def write_json(path: Path, data: Any) -> None:
    """Write :func:`dumps_json` text as UTF-8 with ``\\n`` line endings on every platform."""
    path.write_text(dumps_json(data), encoding="utf-8", newline="\n")


def resolve_path(path_text: str, root: Path) -> Path:
    """A configured path: absolute as given (``~`` expanded), else relative to ``root``."""
    path = Path(path_text).expanduser()
    return path if path.is_absolute() else root / path


def is_within(path: Path, roots: list[Path]) -> bool:
    """Whether ``path`` (already resolved) lies inside one of the resolved ``roots``."""
    return any(path == r or path.is_relative_to(r) for r in roots)


def display_path(path: Path, root: Path) -> str:
    """``path`` relative to ``root`` when inside it (portable across clones), else absolute.

    Paths outside the project (a DreamBench folder) stay as configured; only the POSIX form
    is used so the manifest is the same on every OS.
    """
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return Path(os.path.normpath(path)).as_posix()
