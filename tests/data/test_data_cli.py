"""``harness prepare`` / ``harness resolve`` on a folder subject, as a user runs them.

Partial captions (``data.missing_caption``) and a subject folder that is a symlink leaving
``data.raw_dir``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
from e2e._helpers import new_project
from typer.testing import CliRunner

from harness.cli import app

runner = CliRunner()
Writer = Callable[..., list[Path]]

FOLDER = {"data": {"source": "folder", "subject": "my-dog", "class_name": "dog"}}


def invoke(project: Path, *args: str) -> tuple[int, str, str]:
    result = runner.invoke(app, ["-p", str(project / "params.yaml"), *args])
    return result.exit_code, result.stdout, result.stderr


def flat(text: str) -> str:
    """Console output with rich's line wrapping undone."""
    return " ".join(text.split())


@pytest.fixture
def folder_project(tmp_path: Path) -> Path:
    return new_project(tmp_path / "proj", FOLDER)


def test_prepare_cli_partial_captions_use_the_template_with_a_warning(
    folder_project: Path, add_photos: Writer
) -> None:
    subject = folder_project / "data" / "raw" / "my-dog"
    subject.mkdir(parents=True)
    add_photos(subject, 5)
    (subject / "captions.txt").write_text(
        "".join(f"good_{i:02d}.jpg\tsks dog, shot {i}\n" for i in range(3))
    )

    code, out, err = invoke(folder_project, "prepare")
    assert code == 0, out + err
    assert "(0 rejected)" in out
    assert "warning:" in err
    assert "2 photo(s)" in flat(err) and "good_03.jpg, good_04.jpg" in flat(err)
    manifest = json.loads((folder_project / "data/prepared/my-dog/manifest.json").read_text())
    captions = {r["source"]: r["caption"] for r in manifest["images"]}
    assert captions["good_00.jpg"] == "sks dog, shot 0"
    assert captions["good_03.jpg"] == captions["good_04.jpg"] == "a photo of sks dog"

    code, out, err = invoke(folder_project, "-S", "data.missing_caption=reject", "prepare")
    assert code == 0, out + err
    assert "prepared" in out and "(2 rejected)" in out
    rejects = (folder_project / "data/prepared/my-dog/rejects.txt").read_text()
    assert "good_03.jpg: missing caption" in rejects and "good_04.jpg: missing caption" in rejects


@pytest.mark.parametrize("command", ["prepare", "resolve"])
def test_subject_folder_symlink_leaving_raw_dir_is_rejected(
    folder_project: Path, tmp_path: Path, add_photos: Writer, command: str
) -> None:
    elsewhere = tmp_path / "elsewhere" / "photos"
    elsewhere.mkdir(parents=True)
    add_photos(elsewhere, 5)
    raw = folder_project / "data" / "raw"
    raw.mkdir(parents=True)
    (raw / "my-dog").symlink_to(elsewhere, target_is_directory=True)

    code, out, err = invoke(folder_project, command)
    assert code == 2, out + err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, err
    assert errors[0] == (
        f"error: data/raw/my-dog: the subject folder is a symlink leaving data/raw "
        f"(-> {elsewhere.resolve()}); move or copy the photos into data/raw/my-dog"
    )
    assert not (folder_project / "data/prepared/my-dog/manifest.json").exists()
    assert not (folder_project / "runs/resolved/source.json").exists()


def test_subject_folder_symlink_inside_raw_dir_is_fine(
    folder_project: Path, add_photos: Writer
) -> None:
    raw = folder_project / "data" / "raw"
    (raw / "photos-2024").mkdir(parents=True)
    add_photos(raw / "photos-2024", 4)
    (raw / "my-dog").symlink_to("photos-2024", target_is_directory=True)
    code, out, err = invoke(folder_project, "prepare")
    assert code == 0, out + err
    assert "(0 rejected)" in out
    manifest = json.loads((folder_project / "data/prepared/my-dog/manifest.json").read_text())
    assert manifest["counts"]["kept"] == 4


def test_broken_subject_folder_symlink_is_named(folder_project: Path, tmp_path: Path) -> None:
    raw = folder_project / "data" / "raw"
    raw.mkdir(parents=True)
    gone = tmp_path / "gone"
    (raw / "my-dog").symlink_to(gone, target_is_directory=True)
    code, out, err = invoke(folder_project, "prepare")
    assert code == 2, out + err
    assert f"error: data/raw/my-dog: the subject folder is a broken symlink (-> {gone})" in err


@pytest.mark.slow
def test_each_prepare_warning_is_printed_once(folder_project: Path, add_photos: Writer) -> None:
    """A real ``harness prepare`` printed every warning twice: logged when found, and again
    after the result line."""
    import subprocess

    from e2e._helpers import cli_env, harness_cmd, imported_modules

    subject = folder_project / "data" / "raw" / "my-dog"
    subject.mkdir(parents=True)
    add_photos(subject, 5)
    (subject / "captions.txt").write_text("good_00.jpg\tsks dog on a sofa\n")

    def prepare(*args: str) -> subprocess.CompletedProcess[str]:
        python, *command = harness_cmd(folder_project, "-S", "data.token=dog", *args, "prepare")
        return subprocess.run(
            [python, "-X", "importtime", *command],
            cwd=folder_project,
            env=cli_env(folder_project.parent / "home"),
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )

    proc = prepare()
    assert proc.returncode == 0, proc.stderr
    # The token checks read CLIP's vocabulary without torch: seconds of every prepare.
    imported = imported_modules(proc.stderr)
    assert "harness.data.captions" in imported
    assert not imported & {"torch", "open_clip", "diffusers"}, "heavy imports"
    proc.stderr = "\n".join(
        line for line in proc.stderr.splitlines() if not line.startswith("import time:")
    )
    err = flat(proc.stderr)
    assert err.count("is a common word") == 1, proc.stderr  # the token
    assert err.count("good_01.jpg") == 1, proc.stderr  # the photos captioned by the template
    assert err.count("warning: ") == 3, proc.stderr  # and the token is the class noun
    assert "WARNING" not in proc.stderr, proc.stderr
    failed = prepare("-S", "data.min_images=50")
    assert failed.returncode == 2, failed.stderr
    assert flat(failed.stderr).count("is a common word") == 1, failed.stderr  # still shown
    assert failed.stderr.count("need at least min_images=50") == 1, failed.stderr
