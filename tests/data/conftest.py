"""Fixtures for the data-stage tests: a throw-away project root and config/photo factories."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from data_helpers import encode, photo

from harness.config import DataConfig


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """An empty project root."""
    root = tmp_path / "proj"
    root.mkdir()
    return root


@pytest.fixture
def raw_subject(project: Path) -> Path:
    """``<project>/data/raw/subj``, empty."""
    folder = project / "data" / "raw" / "subj"
    folder.mkdir(parents=True)
    return folder


@pytest.fixture
def folder_cfg() -> Callable[..., DataConfig]:
    """Config for source='folder', subject 'subj', class 'toy'; keyword overrides."""

    def make(**overrides: Any) -> DataConfig:
        base: dict[str, Any] = {
            "source": "folder",
            "subject": "subj",
            "class_name": "toy",
            "min_side": 32,
        }
        return DataConfig.model_validate({**base, **overrides})

    return make


@pytest.fixture
def add_photos() -> Callable[..., list[Path]]:
    """Write ``n`` distinct valid JPEGs ``good_00.jpg``... into a folder."""

    def write(folder: Path, n: int, start: int = 0) -> list[Path]:
        paths = []
        for i in range(start, start + n):
            path = folder / f"good_{i:02d}.jpg"
            path.write_bytes(encode(photo(i), "JPEG", quality=95))
            paths.append(path)
        return paths

    return write
