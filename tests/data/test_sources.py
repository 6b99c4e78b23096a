"""Real DreamBench subjects and the generated sample subject."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from PIL import Image, ImageOps

from harness.config import DataConfig
from harness.data import (
    DataError,
    load_prepared,
    make_sample_subject,
    prepare_subject,
    resolve_source,
    scan_source,
)
from harness.data.source import parse_dreambench_file

DREAMBENCH_SUBJECTS = {
    "dog": ("dog", 5),
    "cat2": ("cat", 5),
    "backpack": ("backpack", 6),
    "teapot": ("teapot", 5),
}


def bench_cfg(dreambench_dir: Path, subject: str, **kw: object) -> DataConfig:
    base = {"source": "dreambench", "subject": subject, "dreambench_dir": str(dreambench_dir)}
    return DataConfig.model_validate({**base, **kw})


@pytest.mark.parametrize("subject", sorted(DREAMBENCH_SUBJECTS))
def test_dreambench_subjects_prepare_without_rejections(
    dreambench_dir: Path, tmp_path: Path, subject: str
) -> None:
    class_name, n = DREAMBENCH_SUBJECTS[subject]
    result = prepare_subject(bench_cfg(dreambench_dir, subject), tmp_path, progress=False)
    assert result.n_rejected == 0 and result.n_found == n
    loaded = load_prepared(result.out_dir)
    assert loaded.class_name == class_name and len(loaded.reference) == n
    assert loaded.train_captions == [f"a photo of sks {class_name}"] * (n - 1)
    assert len(loaded.prompts) == 25 and all("{token}" in p for p in loaded.prompts)
    assert json.loads((result.out_dir / "rejects.json").read_text())["rejected"] == []
    assert not (tmp_path / "data" / "raw").exists()  # read in place, never copied


def test_dreambench_prompt_file(dreambench_dir: Path) -> None:
    classes, objects, live = parse_dreambench_file(dreambench_dir / "prompts_and_classes.txt")
    assert classes["cat2"] == "cat" and classes["bear_plushie"] == "stuffed animal"
    assert len(objects) == len(live) == 25
    assert objects[0] == "a {token} {class_name} in the jungle"
    assert "a {token} {class_name} wearing a red hat" in live


def test_dreambench_live_vs_object_prompts(dreambench_dir: Path, tmp_path: Path) -> None:
    assert resolve_source(bench_cfg(dreambench_dir, "dog"), tmp_path).live is True
    teapot = resolve_source(bench_cfg(dreambench_dir, "teapot"), tmp_path)
    assert teapot.live is False and not any("hat" in p for p in teapot.prompts)


def test_dreambench_class_wins_over_config_and_fingerprint(
    dreambench_dir: Path, tmp_path: Path
) -> None:
    src = resolve_source(bench_cfg(dreambench_dir, "dog", class_name="corgi"), tmp_path)
    assert src.class_name == "dog" and src.live is True
    assert src.warnings == (
        "data.class_name 'corgi' ignored for DreamBench subject 'dog': the dataset's class "
        "'dog' (prompts_and_classes.txt) is used",
    )
    assert resolve_source(bench_cfg(dreambench_dir, "dog"), tmp_path).warnings == ()
    fingerprint = scan_source(bench_cfg(dreambench_dir, "dog"), tmp_path)
    assert fingerprint["class_name"] == "dog" and len(fingerprint["files"]) == 5
    assert "prompts_sha256" in fingerprint


def test_config_class_names_a_subject_the_dataset_file_does_not_list(
    dreambench_dir: Path, tmp_path: Path
) -> None:
    bench = tmp_path / "bench"
    (bench / "mine").mkdir(parents=True)
    shutil.copy2(dreambench_dir / "prompts_and_classes.txt", bench / "prompts_and_classes.txt")
    src = resolve_source(bench_cfg(bench, "mine", class_name="robot"), tmp_path)
    assert (src.class_name, src.live, src.warnings) == ("robot", False, ())
    with pytest.raises(DataError, match=r"no class for subject 'mine' .*set data\.class_name"):
        resolve_source(bench_cfg(bench, "mine"), tmp_path)


def test_sample_is_deterministic_and_mixed(tmp_path: Path) -> None:
    a = make_sample_subject(tmp_path / "a", 10, seed=3)
    b = make_sample_subject(tmp_path / "b", 10, seed=3)
    assert [p.read_bytes() for p in a] == [p.read_bytes() for p in b]
    assert [p.read_bytes() for p in make_sample_subject(tmp_path / "c", 10, seed=4)] != [
        p.read_bytes() for p in a
    ]
    assert {p.suffix for p in a} == {".jpg", ".png", ".webp", ".heic"}
    rotated = 0
    for path in a:
        with Image.open(path) as im:
            rotated += ImageOps.exif_transpose(im).size != im.size
    assert rotated >= 2


def test_sample_regeneration_keeps_files_and_drops_extras(tmp_path: Path) -> None:
    paths = make_sample_subject(tmp_path, 10)
    mtimes = [p.stat().st_mtime_ns for p in paths]
    (tmp_path / "mine.txt").write_text("keep me")
    fewer = make_sample_subject(tmp_path, 4)
    assert [p.stat().st_mtime_ns for p in fewer] == mtimes[:4]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [*(p.name for p in fewer), "mine.txt"]
    )


def test_sample_subject_generated_and_prepared(tmp_path: Path) -> None:
    cfg = DataConfig.model_validate({"source": "sample", "subject": "sample", "sample_images": 10})
    fingerprint = scan_source(cfg, tmp_path)
    assert len(fingerprint["files"]) == 10 and fingerprint["class_name"] == "toy"
    assert (tmp_path / "data" / "sample" / "sample").is_dir()
    result = prepare_subject(cfg, tmp_path, progress=False)
    assert (result.n_found, result.n_rejected, result.n_train, result.n_val) == (10, 0, 8, 2)
    first = {p.name: p.read_bytes() for p in result.out_dir.rglob("*.png")}
    shutil.rmtree(tmp_path / "data")  # a fresh clone: no data at all
    assert scan_source(cfg, tmp_path) == fingerprint
    again = prepare_subject(cfg, tmp_path, progress=False)
    assert {p.name: p.read_bytes() for p in again.out_dir.rglob("*.png")} == first
    manifest = json.loads((result.out_dir / "manifest.json").read_text())
    assert {r["format"] for r in manifest["images"]} == {"JPEG", "PNG", "WEBP", "HEIF"}
    assert {r["orientation"] for r in manifest["images"]} >= {1, 3, 6, 8}


def test_a_dreambench_prompt_file_that_is_not_utf8_is_a_data_error_naming_it(
    dreambench_dir: Path, tmp_path: Path
) -> None:
    """A copy saved as UTF-16 (a Windows editor): one DataError naming it, not a
    UnicodeDecodeError traceback."""
    from harness.data import DataError

    copy = tmp_path / "prompts_and_classes.txt"
    text = (dreambench_dir / "prompts_and_classes.txt").read_text(encoding="utf-8-sig")
    copy.write_text(text, encoding="utf-16")
    with pytest.raises(DataError, match=rf"^{copy}: cannot read DreamBench prompt file"):
        parse_dreambench_file(copy)
