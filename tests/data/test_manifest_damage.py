"""A prepared subject's ``manifest.json`` that is damaged or hand-edited into another shape:
one DataError naming it and what to do, never an AttributeError or KeyError traceback."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from harness.data import DataError, load_prepared
from harness.data.loader import _SCHEMA_VERSION

GOOD_IMAGE = {"file": "images/0.png", "caption": "a sks toy", "split": "train", "reference": True}


@pytest.mark.parametrize(
    "manifest",
    [
        [1, 2],
        {"schema_version": _SCHEMA_VERSION},
        {"schema_version": _SCHEMA_VERSION, "images": [{"caption": "no file"}]},
        {"schema_version": _SCHEMA_VERSION, "images": "images/0.png"},
        {"schema_version": _SCHEMA_VERSION, "images": [GOOD_IMAGE]},  # no subject, token...
    ],
    ids=["a list", "no images", "an image without file", "images not a list", "no token"],
)
def test_a_manifest_of_another_shape_is_a_data_error_naming_it(
    tmp_path: Path, manifest: object
) -> None:
    (tmp_path / "images").mkdir()
    (tmp_path / "images/0.png").write_bytes(b"png")
    path = tmp_path / "manifest.json"
    path.write_text(json.dumps(manifest))
    with pytest.raises(DataError, match=rf"^{path}: .*rerun prepare"):
        load_prepared(tmp_path)


def test_a_manifest_that_is_not_utf8_is_a_data_error_naming_it(tmp_path: Path) -> None:
    path = tmp_path / "manifest.json"
    path.write_text(json.dumps({"schema_version": _SCHEMA_VERSION}), encoding="utf-16")
    with pytest.raises(DataError, match=rf"^{path}: unreadable manifest"):
        load_prepared(tmp_path)
