"""The prepare stage end to end: outputs, bad inputs, failures, determinism, split, loader."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import pytest
from data_helpers import encode, exif_bytes, photo
from PIL import Image

from harness.config import DataConfig, validation_count
from harness.data import DataError, load_prepared, prepare_subject, resolve_source, scan_source
from harness.data import ingest as ingest_module
from harness.data.split import assign_splits

CfgFactory = Callable[..., DataConfig]
Writer = Callable[..., list[Path]]


def prepared(project: Path, subject: str = "subj") -> Path:
    return project / "data" / "prepared" / subject


def rejects_of(project: Path, subject: str = "subj") -> dict[str, str]:
    doc = json.loads((prepared(project, subject) / "rejects.json").read_text())
    return {r["file"]: r["reason"] for r in doc["rejected"]}


def tree_bytes(folder: Path) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def test_outputs_layout_and_manifest(
    project: Path, raw_subject: Path, folder_cfg: CfgFactory, add_photos: Writer
) -> None:
    add_photos(raw_subject, 5)
    result = prepare_subject(folder_cfg(), project, progress=False)
    out = prepared(project)
    assert (
        result.n_found,
        result.n_train,
        result.n_val,
        result.n_reference,
        result.n_rejected,
    ) == (5, 4, 1, 5, 0)
    manifest = json.loads((out / "manifest.json").read_text())
    assert sorted(p.name for p in out.iterdir()) == [
        "manifest.json",
        "rejects.json",
        "rejects.txt",
        "train",
        "val",
    ]
    rec = manifest["images"][0]
    assert {
        "source",
        "sha256",
        "original_size",
        "orientation",
        "crop_box",
        "caption",
        "split",
    } <= set(rec)
    assert rec["crop_box"] == [8, 0, 88, 80] and rec["caption"] == "a photo of sks toy"
    for rec in manifest["images"]:
        with Image.open(out / rec["file"]) as im:
            assert (im.format, im.mode, im.size) == ("PNG", "RGB", (64, 64))
            assert not im.info  # no metadata chunks
    assert manifest["source"] == {"folder": "data/raw/subj", "kind": "folder"}


def test_every_format_and_rotation_in_one_folder(
    project: Path, raw_subject: Path, folder_cfg: CfgFactory
) -> None:
    for i, (fmt, suffix) in enumerate(
        [("JPEG", "jpg"), ("PNG", "png"), ("WEBP", "webp"), ("HEIF", "heic"), ("AVIF", "avif")]
    ):
        (raw_subject / f"p{i}.{suffix}").write_bytes(encode(photo(i + 10), fmt, quality=95))
    stored = photo(20, (120, 80)).transpose(Image.Transpose.ROTATE_90)
    (raw_subject / "rot.jpg").write_bytes(encode(stored, "JPEG", exif=exif_bytes(6), quality=95))
    prepare_subject(folder_cfg(val_fraction=0.0), project, progress=False)
    manifest = json.loads((prepared(project) / "manifest.json").read_text())
    assert sorted(r["format"] for r in manifest["images"]) == [
        "AVIF",
        "HEIF",
        "JPEG",
        "JPEG",
        "PNG",
        "WEBP",
    ]
    rot = next(r for r in manifest["images"] if r["source"] == "rot.jpg")
    assert (rot["orientation"], rot["original_size"], rot["upright_size"]) == (
        6,
        [80, 120],
        [120, 80],
    )
    assert rejects_of(project) == {}


def test_bad_inputs_are_reported_and_good_ones_kept(
    project: Path,
    raw_subject: Path,
    folder_cfg: CfgFactory,
    add_photos: Writer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    good = add_photos(raw_subject, 3)
    data = encode(photo(40, (200, 200)), "JPEG", quality=95)
    (raw_subject / "cut.jpg").write_bytes(data[: len(data) // 2])
    (raw_subject / "zero.jpg").write_bytes(b"")
    (raw_subject / "text.jpg").write_text("hello, I am text\n")
    (raw_subject / "phone.heic").write_bytes(encode(photo(41), "HEIF"))
    (raw_subject / "bomb.png").write_bytes(encode(Image.new("L", (300, 300)), "PNG"))
    (raw_subject / "captions.txt").write_text(
        "".join(f"{p.name}\tsks toy {i}\n" for i, p in enumerate(good))
        + "znear.png\tsks toy again\n../../etc/passwd\tsks\n/abs.jpg\tsks\n"
    )
    (raw_subject / "nocap.png").write_bytes(encode(photo(42), "PNG"))
    outside = project.parent / "outside.jpg"
    outside.write_bytes(encode(photo(43), "JPEG"))
    (raw_subject / "escape.jpg").symlink_to(outside)
    (raw_subject / "zcopy.jpg").write_bytes(good[0].read_bytes())
    photo(0).resize((80, 66)).save(raw_subject / "znear.png")  # a resized re-encode of good_00
    (raw_subject / "tiny.jpg").write_bytes(encode(photo(44, (20, 20)), "JPEG"))
    (raw_subject / "notes.pdf").write_bytes(b"%PDF-1.4")
    monkeypatch.setattr(ingest_module, "heif_support", lambda: False)

    result = prepare_subject(
        folder_cfg(max_image_pixels=50_000, missing_caption="reject"), project, progress=False
    )

    reasons = rejects_of(project)
    expected = {
        "cut.jpg": "truncated",
        "zero.jpg": "empty file",
        "text.jpg": "contains text",
        "phone.heic": "pillow-heif is not installed",
        "bomb.png": "decompression-bomb",
        "captions.txt:5": "leaves the subject folder",
        "captions.txt:6": "absolute path",
        "nocap.png": "missing caption",
        "escape.jpg": "symlink leaves the dataset root",
        "zcopy.jpg": "exact duplicate of good_00.jpg",
        "znear.png": "near-duplicate of good_00.jpg",
        "tiny.jpg": "too small (20x20",
        "notes.pdf": "unsupported file type",
    }
    assert set(reasons) == set(expected)
    for name, fragment in expected.items():
        assert fragment in reasons[name], (name, reasons[name])
    assert result.n_train + result.n_val == 3 and result.n_rejected == len(expected)
    text = (prepared(project) / "rejects.txt").read_text()
    assert "escape.jpg: symlink leaves the dataset root" in text


def test_partial_captions_fall_back_to_the_template_with_a_warning(
    project: Path, raw_subject: Path, folder_cfg: CfgFactory, add_photos: Writer
) -> None:
    add_photos(raw_subject, 5)
    (raw_subject / "captions.txt").write_text(
        "good_00.jpg\tsks toy on a desk\ngood_01.jpg\ta {token} {class_name} outside\n"
    )
    (raw_subject / "good_02.txt").write_text("sks toy from a sidecar\n")
    result = prepare_subject(folder_cfg(), project, progress=False)
    assert (result.n_found, result.n_rejected, result.n_train + result.n_val) == (5, 0, 5)
    manifest = json.loads((prepared(project) / "manifest.json").read_text())
    by_source = {r["source"]: r for r in manifest["images"]}
    assert {name: (r["caption"], r["caption_source"]) for name, r in by_source.items()} == {
        "good_00.jpg": ("sks toy on a desk", "captions.txt:1"),
        "good_01.jpg": ("a sks toy outside", "captions.txt:2"),
        "good_02.jpg": ("sks toy from a sidecar", "sidecar:good_02.txt"),
        "good_03.jpg": ("a photo of sks toy", "template"),
        "good_04.jpg": ("a photo of sks toy", "template"),
    }
    assert any("data.caption_template" in n for n in by_source["good_03.jpg"]["notes"])
    assert by_source["good_00.jpg"]["notes"] == []
    missing = [w for w in result.warnings if "no caption" in w]
    assert len(missing) == 1
    assert "2 photo(s)" in missing[0] and "good_03.jpg, good_04.jpg" in missing[0]
    assert "data.caption_template" in missing[0] and "missing_caption: reject" in missing[0]
    assert missing[0] in manifest["warnings"]
    report = json.loads((prepared(project) / "rejects.json").read_text())
    assert report["rejected"] == [] and missing[0] in report["warnings"]
    assert f"# warning: {missing[0]}" in (prepared(project) / "rejects.txt").read_text()


def test_partial_captions_rejected_with_missing_caption_reject(
    project: Path, raw_subject: Path, folder_cfg: CfgFactory, add_photos: Writer
) -> None:
    add_photos(raw_subject, 5)
    (raw_subject / "captions.txt").write_text(
        "".join(f"good_{i:02d}.jpg\tsks toy {i}\n" for i in range(3))
    )
    result = prepare_subject(folder_cfg(missing_caption="reject"), project, progress=False)
    assert (result.n_found, result.n_rejected, result.n_train + result.n_val) == (5, 2, 3)
    reasons = rejects_of(project)
    assert set(reasons) == {"good_03.jpg", "good_04.jpg"}
    assert all(r.startswith("missing caption: no entry in captions.txt") for r in reasons.values())
    assert not [w for w in result.warnings if "no caption" in w]


def test_missing_caption_config_values() -> None:
    assert DataConfig().missing_caption == "template"
    assert DataConfig(missing_caption="reject").missing_caption == "reject"
    with pytest.raises(ValueError, match="missing_caption"):
        DataConfig.model_validate({"missing_caption": "skip"})


def test_too_few_photos_fails_with_report_and_no_stale_outputs(
    project: Path, raw_subject: Path, folder_cfg: CfgFactory, add_photos: Writer
) -> None:
    photos = add_photos(raw_subject, 4)
    prepare_subject(folder_cfg(), project, progress=False)
    assert (prepared(project) / "manifest.json").is_file()
    for path in photos[:2]:
        path.write_bytes(b"")
    with pytest.raises(DataError) as info:
        prepare_subject(folder_cfg(), project, progress=False)
    message = str(info.value)
    assert (
        "data/raw/subj" in message
        and "2 usable photo(s) of 4 found" in message
        and "min_images=3" in message
    )
    assert message.endswith("See data/prepared/subj/rejects.txt")
    out = prepared(project)
    assert sorted(p.name for p in out.iterdir()) == ["rejects.json", "rejects.txt"]
    doc = json.loads((out / "rejects.json").read_text())
    assert doc["error"] == message and len(doc["rejected"]) == 2
    with pytest.raises(DataError, match=r"no manifest\.json"):
        load_prepared(out)


def test_too_few_photos_counts_add_up_with_other_entries_rejected(
    project: Path, raw_subject: Path, folder_cfg: CfgFactory, add_photos: Writer, tmp_path: Path
) -> None:
    """It said "2 usable photo(s) of 4 found (4 rejection(s))": the rejected symlink and the
    unsupported file were never among the photos found."""
    photos = add_photos(raw_subject, 4)
    for path in photos[:2]:
        path.write_bytes(b"")
    outside = tmp_path / "outside.jpg"
    outside.write_bytes(photos[2].read_bytes())
    (raw_subject / "escape.jpg").symlink_to(outside)
    (raw_subject / "notes.docx").write_bytes(b"x")
    with pytest.raises(DataError) as info:
        prepare_subject(folder_cfg(), project, progress=False)
    message = str(info.value)
    assert "2 usable photo(s) of 4 found (2 rejected; 2 other entries rejected too)" in message


def test_empty_subject_folder(project: Path, raw_subject: Path, folder_cfg: CfgFactory) -> None:
    with pytest.raises(DataError, match=r"data/raw/subj: 0 usable photo\(s\) of 0 found"):
        prepare_subject(folder_cfg(), project, progress=False)
    assert "no photos in the subject folder" in rejects_of(project)["."]


def test_missing_subject_folder(project: Path, folder_cfg: CfgFactory) -> None:
    with pytest.raises(DataError, match="data/raw/subj: subject folder not found"):
        prepare_subject(folder_cfg(), project, progress=False)
    assert (prepared(project) / "rejects.json").is_file()


def test_folder_source_needs_a_class_name(project: Path, folder_cfg: CfgFactory) -> None:
    with pytest.raises(DataError, match="class_name is required"):
        resolve_source(folder_cfg(class_name=None), project)


def test_deterministic_and_stale_files_removed(
    project: Path, raw_subject: Path, folder_cfg: CfgFactory, add_photos: Writer
) -> None:
    add_photos(raw_subject, 6)
    cfg = folder_cfg()
    prepare_subject(cfg, project, progress=False)
    first = tree_bytes(prepared(project))
    (prepared(project) / "train" / "stale.png").write_bytes(b"old")
    os.utime(raw_subject / "good_00.jpg", (1, 1))  # mtimes must not matter
    prepare_subject(cfg, project, progress=False)
    assert tree_bytes(prepared(project)) == first


def test_small_photos_can_be_upscaled_with_a_note(
    project: Path, raw_subject: Path, folder_cfg: CfgFactory
) -> None:
    for i in range(3):
        (raw_subject / f"s{i}.png").write_bytes(encode(photo(i, (40, 40)), "PNG"))
    with pytest.raises(DataError):
        prepare_subject(folder_cfg(min_side=48), project, progress=False)
    assert "too small (40x40: shorter side 40 px < min_side 48)" in rejects_of(project)["s0.png"]
    prepare_subject(folder_cfg(min_side=48, upscale_small=True), project, progress=False)
    manifest = json.loads((prepared(project) / "manifest.json").read_text())
    assert all("upscaled a small photo" in r["notes"][0] for r in manifest["images"])


def test_crop_none_keeps_aspect(
    project: Path, raw_subject: Path, folder_cfg: CfgFactory, add_photos: Writer
) -> None:
    add_photos(raw_subject, 3)  # 96x80
    prepare_subject(folder_cfg(crop="none", val_fraction=0.0), project, progress=False)
    manifest = json.loads((prepared(project) / "manifest.json").read_text())
    assert {tuple(r["size"]) for r in manifest["images"]} == {(77, 64)}
    assert {tuple(r["crop_box"]) for r in manifest["images"]} == {(0, 0, 96, 80)}


@pytest.mark.parametrize(("n", "fraction"), [(3, 0.2), (5, 0.2), (6, 0.2), (10, 0.25), (4, 0.0)])
def test_split_sizes_follow_validation_count(
    project: Path,
    raw_subject: Path,
    folder_cfg: CfgFactory,
    add_photos: Writer,
    n: int,
    fraction: float,
) -> None:
    add_photos(raw_subject, n)
    result = prepare_subject(folder_cfg(val_fraction=fraction), project, progress=False)
    assert result.n_val == validation_count(n, fraction) and result.n_train == n - result.n_val


def test_split_depends_on_content_and_seed_not_names(
    project: Path, raw_subject: Path, folder_cfg: CfgFactory, add_photos: Writer
) -> None:
    add_photos(raw_subject, 6)

    def val_hashes(seed: int) -> set[str]:
        prepare_subject(folder_cfg(split_seed=seed, val_fraction=0.34), project, progress=False)
        images = json.loads((prepared(project) / "manifest.json").read_text())["images"]
        return {r["sha256"] for r in images if r["split"] == "val"}

    before = val_hashes(0)
    for path in sorted(raw_subject.iterdir()):
        path.rename(path.with_name("renamed_" + path.name))
    assert val_hashes(0) == before
    assert any(val_hashes(seed) != before for seed in (1, 2, 3))


def test_reference_policy(
    project: Path, raw_subject: Path, folder_cfg: CfgFactory, add_photos: Writer
) -> None:
    add_photos(raw_subject, 5)
    prepare_subject(folder_cfg(reference="val"), project, progress=False)
    subject = load_prepared(prepared(project))
    assert len(subject.train) == 4 and subject.reference == tuple(i.path for i in subject.val)
    assert subject.train_captions == ["a photo of sks toy"] * 4 and subject.token == "sks"
    prepare_subject(folder_cfg(reference="all"), project, progress=False)
    assert len(load_prepared(prepared(project)).reference) == 5
    # The config itself refuses a validation reference when nothing is held out.
    with pytest.raises(ValueError, match="reference 'val' needs val_fraction > 0"):
        folder_cfg(reference="val", val_fraction=0.0)


def test_split_leaving_no_training_photo_fails() -> None:
    # Unreachable through a valid DataConfig (its validator checks min_images); kept defensive.
    with pytest.raises(DataError, match=r"subj: val_fraction=0\.9 puts all 2 usable photo"):
        assign_splits([("a", "1"), ("b", "2")], 0.9, 0, "subj")


def test_fingerprint_changes_only_with_photos(
    project: Path, raw_subject: Path, folder_cfg: CfgFactory, add_photos: Writer
) -> None:
    add_photos(raw_subject, 3)
    first = scan_source(folder_cfg(), project)
    assert [f["path"] for f in first["files"]] == ["good_00.jpg", "good_01.jpg", "good_02.jpg"]
    assert scan_source(folder_cfg(), project) == first
    add_photos(raw_subject, 1, start=3)
    assert scan_source(folder_cfg(), project) != first
    json.dumps(first)  # JSON-able
