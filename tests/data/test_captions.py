"""Captions: captions.txt, sidecars, template, path safety, token presence and token warnings."""

from __future__ import annotations

from pathlib import Path

import pytest

from harness.data.captions import (
    CaptionError,
    check_entry_name,
    read_captions,
    render,
    token_warnings,
)

IMAGES = ["a.jpg", "b.png", "c.jpg"]


def write(folder: Path, name: str, text: str) -> str:
    (folder / name).write_text(text, encoding="utf-8")
    return name


def test_template_when_no_caption_files(tmp_path: Path) -> None:
    caps, rejects = read_captions(tmp_path, IMAGES, [])
    assert rejects == [] and not caps.given
    assert caps.caption_for("a.jpg", "a photo of {token} {class_name}", "sks", "dog") == (
        "a photo of sks dog",
        "template",
    )


def test_captions_file_tab_and_colon_forms(tmp_path: Path) -> None:
    write(
        tmp_path,
        "captions.txt",
        "# comment\n\na.jpg\tsks toy on a desk\nb.png: a {token} {class_name}, side\n",
    )
    caps, rejects = read_captions(tmp_path, IMAGES, ["captions.txt"])
    assert rejects == []
    assert caps.caption_for("a.jpg", "{token}", "sks", "toy") == (
        "sks toy on a desk",
        "captions.txt:3",
    )
    assert caps.caption_for("b.png", "{token}", "sks", "toy") == (
        "a sks toy, side",
        "captions.txt:4",
    )


def test_missing_caption_falls_back_to_the_template_by_default(tmp_path: Path) -> None:
    write(tmp_path, "captions.txt", "a.jpg\tsks toy on a desk\n")
    caps, rejects = read_captions(tmp_path, IMAGES, ["captions.txt"])
    assert rejects == [] and caps.given
    template = "a photo of {token} {class_name}"
    assert caps.caption_for("a.jpg", template, "sks", "toy") == (
        "sks toy on a desk",
        "captions.txt:1",
    )
    assert caps.caption_for("c.jpg", template, "sks", "toy") == ("a photo of sks toy", "template")
    assert caps.caption_for("c.jpg", template, "sks", "toy", missing="template") == (
        "a photo of sks toy",
        "template",
    )
    assert caps.missing(IMAGES) == ["b.png", "c.jpg"]


def test_missing_caption_is_an_error_with_missing_reject(tmp_path: Path) -> None:
    write(tmp_path, "captions.txt", "a.jpg\tsks toy\n")
    caps, _ = read_captions(tmp_path, IMAGES, ["captions.txt"])
    with pytest.raises(CaptionError, match=r"missing caption: no entry in captions\.txt"):
        caps.caption_for("c.jpg", "{token}", "sks", "toy", missing="reject")
    assert caps.caption_for("a.jpg", "{token}", "sks", "toy", missing="reject") == (
        "sks toy",
        "captions.txt:1",
    )


def test_no_caption_files_means_nothing_is_missing(tmp_path: Path) -> None:
    caps, _ = read_captions(tmp_path, IMAGES, [])
    assert caps.missing(IMAGES) == []
    assert caps.caption_for("c.jpg", "{token} x", "sks", None, missing="reject") == (
        "sks x",
        "template",
    )


@pytest.mark.parametrize(
    ("entry", "expected"),
    [
        ("../outside.jpg", "leaves the subject folder"),
        ("..\\outside.jpg", "leaves the subject folder"),
        ("/etc/passwd", "absolute path"),
        ("C:\\photos\\a.jpg", "absolute path"),
        ("sub/a.jpg", "sub-folder"),
    ],
)
def test_unsafe_caption_entries_are_rejected(tmp_path: Path, entry: str, expected: str) -> None:
    write(tmp_path, "captions.txt", f"a.jpg\tsks toy\n{entry}\tsks toy\n")
    caps, rejects = read_captions(tmp_path, IMAGES, ["captions.txt"])
    assert (
        len(rejects) == 1 and rejects[0].file == "captions.txt:2" and expected in rejects[0].reason
    )
    assert set(caps.text) == {"a.jpg"}
    assert check_entry_name(entry) is not None


def test_bad_lines_duplicates_and_unknown_files(tmp_path: Path) -> None:
    write(
        tmp_path,
        "captions.txt",
        "no separator here\na.jpg\tsks one\na.jpg\tsks two\nzzz.jpg\tsks\n",
    )
    caps, rejects = read_captions(tmp_path, IMAGES, ["captions.txt"])
    reasons = {r.file: r.reason for r in rejects}
    assert "expected" in reasons["captions.txt:1"]
    assert "duplicate" in reasons["captions.txt:3"]
    assert "not a photo in the folder" in reasons["captions.txt:4"]
    assert caps.text["a.jpg"] == "sks one"


def test_sidecars_override_and_orphans(tmp_path: Path) -> None:
    write(tmp_path, "captions.txt", "a.jpg\tsks from file\n")
    write(tmp_path, "a.txt", "sks from stem sidecar\n")
    write(tmp_path, "b.png.txt", "sks from full-name sidecar")
    write(tmp_path, "b.txt", "sks from stem, loses")
    write(tmp_path, "README.txt", "not a caption")
    caps, rejects = read_captions(
        tmp_path, IMAGES, ["captions.txt", "a.txt", "b.png.txt", "b.txt", "README.txt"]
    )
    assert caps.text["a.jpg"] == "sks from stem sidecar" and caps.source["a.jpg"] == "sidecar:a.txt"
    assert caps.text["b.png"] == "sks from full-name sidecar"
    assert [(r.file, r.reason) for r in rejects] == [
        ("README.txt", "sidecar caption without a matching photo")
    ]


def test_stray_text_file_does_not_require_captions(tmp_path: Path) -> None:
    write(tmp_path, "README.txt", "notes")
    caps, _ = read_captions(tmp_path, IMAGES, ["README.txt"])
    assert not caps.given


def test_token_must_appear_as_a_word(tmp_path: Path) -> None:
    write(tmp_path, "a.txt", "a photo of a toy")
    write(tmp_path, "b.txt", "a photo of sksy toy")
    write(tmp_path, "c.txt", "SKS toy")
    caps, _ = read_captions(tmp_path, IMAGES, ["a.txt", "b.txt", "c.txt"])
    for name in ("a.jpg", "b.png"):
        with pytest.raises(CaptionError, match="lacks the identifier token 'sks'"):
            caps.caption_for(name, "{token}", "sks", "toy")
    assert caps.caption_for("c.jpg", "{token}", "sks", "toy")[0] == "SKS toy"


def test_empty_sidecar(tmp_path: Path) -> None:
    write(tmp_path, "a.txt", "  \n")
    caps, _ = read_captions(tmp_path, IMAGES, ["a.txt"])
    with pytest.raises(CaptionError, match="empty caption"):
        caps.caption_for("a.jpg", "{token}", "sks", "toy")


def test_render_keeps_other_braces() -> None:
    assert render("{token} {class_name} {other}", "sks", "dog") == "sks dog {other}"


def test_token_warnings() -> None:
    assert token_warnings("sks", "dog") == []
    assert any("split into 5 CLIP BPE pieces" in w for w in token_warnings("zxqvbn", "dog"))
    assert any("common word" in w for w in token_warnings("table", "dog"))
    assert any("class noun" in w for w in token_warnings("dog", "dog"))
