"""``harness prepare`` / ``harness resolve`` on a folder holding an entry whose name is not
UTF-8, or a symlink loop: the entry is rejected like any unusable file, the rest prepared."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import pytest
from data_helpers import encode, photo
from e2e._helpers import new_project
from typer.testing import CliRunner

from harness.cli import app
from harness.data import prepare as prepare_module

Writer = Callable[..., list[Path]]
FOLDER = {"data": {"source": "folder", "subject": "my-dog", "class_name": "dog"}}
PREPARED = Path("data/prepared")


def invoke(project: Path, *args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, ["-p", str(project / "params.yaml"), *args])
    return result.exit_code, result.stdout, result.stderr


@pytest.fixture
def subject(tmp_path: Path, add_photos: Writer) -> Path:
    """A folder subject ``data/raw/my-dog`` with four good photos."""
    project = new_project(tmp_path / "proj", FOLDER)
    folder = project / "data" / "raw" / "my-dog"
    folder.mkdir(parents=True)
    add_photos(folder, 4)
    return folder


def project_of(subject: Path) -> Path:
    return subject.parents[2]


def add_latin1_named_photo(folder: Path) -> None:
    """``café.png`` named in Latin-1 (byte 0xE9): a name that is not valid UTF-8."""
    fd = os.open(os.fsencode(folder) + b"/caf\xe9.png", os.O_WRONLY | os.O_CREAT, 0o644)
    with os.fdopen(fd, "wb") as fh:
        fh.write(encode(photo(9), "PNG"))


def add_symlink_loop(folder: Path) -> None:
    (folder / "a.jpg").symlink_to("b.jpg")
    (folder / "b.jpg").symlink_to("a.jpg")


def rejects_of(project: Path) -> dict[str, str]:
    doc = json.loads((project / PREPARED / "my-dog" / "rejects.json").read_text("utf-8"))
    return {r["file"]: r["reason"] for r in doc["rejected"]}


def test_prepare_rejects_a_name_that_is_not_utf8(subject: Path) -> None:
    add_latin1_named_photo(subject)
    project = project_of(subject)
    code, out, err = invoke(project, "prepare")
    assert code == 0, out + err
    assert "(1 rejected)" in out
    assert rejects_of(project) == {"caf\\xe9.png": "file name is not valid UTF-8 (rename the file)"}
    text = (project / PREPARED / "my-dog" / "rejects.txt").read_text("utf-8")
    assert "caf\\xe9.png: file name is not valid UTF-8 (rename the file)" in text
    manifest = json.loads((project / PREPARED / "my-dog" / "manifest.json").read_text("utf-8"))
    assert manifest["counts"]["kept"] == 4
    assert sorted(p.name for p in (project / PREPARED).iterdir()) == ["my-dog"]  # no .tmp


def test_resolve_lists_a_name_that_is_not_utf8_as_a_problem(subject: Path) -> None:
    add_latin1_named_photo(subject)
    project = project_of(subject)
    code, out, err = invoke(project, "resolve")
    assert code == 0, out + err
    source = json.loads((project / "runs/resolved/source.json").read_text("utf-8"))
    entry = {"path": "caf\\xe9.png", "problem": "file name is not valid UTF-8 (rename the file)"}
    assert entry in source["files"]
    assert len(source["files"]) == 5


def test_prepare_rejects_a_symlink_loop(subject: Path) -> None:
    add_symlink_loop(subject)
    project = project_of(subject)
    code, out, err = invoke(project, "prepare")
    assert code == 0, out + err
    assert "(2 rejected)" in out
    assert rejects_of(project) == {"a.jpg": "symlink loop", "b.jpg": "symlink loop"}
    text = (project / PREPARED / "my-dog" / "rejects.txt").read_text("utf-8")
    assert "a.jpg: symlink loop" in text and "b.jpg: symlink loop" in text


def test_resolve_lists_a_symlink_loop_as_a_problem(subject: Path) -> None:
    add_symlink_loop(subject)
    project = project_of(subject)
    code, out, err = invoke(project, "resolve")
    assert code == 0, out + err
    source = json.loads((project / "runs/resolved/source.json").read_text("utf-8"))
    assert {"path": "a.jpg", "problem": "symlink loop"} in source["files"]
    assert {"path": "b.jpg", "problem": "symlink loop"} in source["files"]


@pytest.mark.parametrize("command", ["prepare", "resolve"])
def test_subject_folder_in_a_symlink_loop_is_one_error(tmp_path: Path, command: str) -> None:
    project = new_project(tmp_path / "proj", FOLDER)
    raw = project / "data" / "raw"
    raw.mkdir(parents=True)
    (raw / "my-dog").symlink_to("other", target_is_directory=True)
    (raw / "other").symlink_to("my-dog", target_is_directory=True)
    code, out, err = invoke(project, command)
    assert code == 2, out + err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert errors == ["error: data/raw/my-dog: the subject folder is a symlink loop"], err


def test_a_failed_write_leaves_no_staging_folder_and_keeps_the_previous_set(
    subject: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    project = project_of(subject)
    code, out, err = invoke(project, "prepare")
    assert code == 0, out + err
    before = (project / PREPARED / "my-dog" / "manifest.json").read_bytes()

    def full_disk(path: Path, data: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(prepare_module, "write_json", full_disk)
    code, out, err = invoke(project, "prepare")
    assert code == 2, out + err
    assert "no space left on device" in err.lower()
    assert sorted(p.name for p in (project / PREPARED).iterdir()) == ["my-dog"]
    assert (project / PREPARED / "my-dog" / "manifest.json").read_bytes() == before


def test_prepare_rejects_a_symlink_to_a_name_that_is_not_utf8(subject: Path) -> None:
    # Python holds the 0xE9 byte of a name that is not UTF-8 as the lone surrogate U+DCE9.
    (subject / "cafe.jpg").symlink_to(os.fsdecode(b"/nowhere/caf\xe9.jpg"))
    project = project_of(subject)
    code, out, err = invoke(project, "prepare")
    assert code == 0, out + err
    assert rejects_of(project) == {"cafe.jpg": "broken symlink (-> /nowhere/caf\\xe9.jpg)"}
