"""Prompts files (JSONL manifest or TAB text) and folder listing errors."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
from PIL import Image

from metrics.errors import MetricsInputError
from metrics.images import list_image_files, load_image
from metrics.manifest import match_prompts, read_prompts_file


def write_jsonl(path: Path, rows: list[dict[str, object]]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_jsonl_manifest_with_extra_keys_inside_the_folder(
    image_dir: Callable[[str, list[int]], Path],
) -> None:
    folder = image_dir("gen", [1, 2])
    manifest = write_jsonl(
        folder / "manifest.jsonl",  # next to the images: not mistaken for a non-image file
        [
            {"file": "img_002.png", "prompt": "a sks dog", "seed": 2, "step": 100},
            {"file": "img_001.png", "prompt": "a red sks dog", "guidance": 7.5},
        ],
    )
    paths, prompts = match_prompts(folder, manifest)
    assert [p.name for p in paths] == ["img_001.png", "img_002.png"]
    assert prompts == ["a red sks dog", "a sks dog"]


def test_tab_text_format(image_dir: Callable[[str, list[int]], Path], tmp_path: Path) -> None:
    folder = image_dir("gen", [1, 2])
    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_text(
        "# comment\nimg_001.png\ta sks dog\n\nimg_002.png\ta sks dog, in the snow\n"
    )
    assert read_prompts_file(prompts_file) == [
        ("img_001.png", "a sks dog"),
        ("img_002.png", "a sks dog, in the snow"),
    ]
    assert match_prompts(folder, prompts_file)[1] == ["a sks dog", "a sks dog, in the snow"]


def test_listed_files_in_sub_folders(
    tmp_path: Path, make_image: Callable[..., Image.Image]
) -> None:
    (tmp_path / "gen" / "p0").mkdir(parents=True)
    make_image(1).save(tmp_path / "gen" / "p0" / "a.png")
    manifest = write_jsonl(tmp_path / "m.jsonl", [{"file": "p0/a.png", "prompt": "a sks dog"}])
    paths, _ = match_prompts(tmp_path / "gen", manifest)
    assert paths == [tmp_path / "gen" / "p0" / "a.png"]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("img_001.png a sks dog\n", r"m\.txt:1: expected a JSON object"),
        ('{"file": "img_001.png"\n', r"m\.txt:1: invalid JSON"),
        (
            '{"file": "img_001.png", "text": "x"}\n',
            r'm\.txt:1: needs string keys "file" and "prompt"',
        ),
        ("\n# only a comment\n", r"no prompts in prompts file .*m\.txt"),
        ("img_001.png\ta\nimg_001.png\tb\nimg_002.png\tc\n", r"image listed twice: .*img_001\.png"),
        (
            "img_001.png\ta\nimg_009.png\tb\nimg_002.png\tc\n",
            r"listed image not found: .*img_009\.png",
        ),
        ("img_001.png\ta\n", r"image has no prompt in .*m\.txt: .*img_002\.png"),
    ],
)
def test_prompts_file_errors_name_the_file(
    image_dir: Callable[[str, list[int]], Path], tmp_path: Path, content: str, message: str
) -> None:
    folder = image_dir("gen", [1, 2])
    prompts_file = tmp_path / "m.txt"
    prompts_file.write_text(content)
    with pytest.raises(MetricsInputError, match=message):
        match_prompts(folder, prompts_file)


def test_folder_errors(tmp_path: Path, image_dir: Callable[[str, list[int]], Path]) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / ".DS_Store").write_bytes(b"x")  # hidden files are skipped
    with pytest.raises(MetricsInputError, match=r"no images in folder: .*empty"):
        list_image_files(tmp_path / "empty")
    with pytest.raises(MetricsInputError, match=r"not a folder: .*missing"):
        list_image_files(tmp_path / "missing")
    folder = image_dir("real", [1])
    (folder / "notes.png").write_text("not really a png")
    with pytest.raises(MetricsInputError, match=r"not an image file: .*notes\.png"):
        list_image_files(folder)


def test_load_image_upright_rgb(tmp_path: Path, make_image: Callable[..., Image.Image]) -> None:
    rgba = make_image(1, size=(40, 20)).convert("RGBA")
    rgba.putalpha(0)  # fully transparent: composited on white
    path = tmp_path / "a.png"
    rgba.save(path)
    loaded = load_image(path)
    assert loaded.mode == "RGB" and loaded.getpixel((0, 0)) == (255, 255, 255)
    rotated = make_image(2, size=(40, 20))
    exif = rotated.getexif()
    exif[0x0112] = 6  # orientation: rotate 90° clockwise to display
    rotated.save(tmp_path / "r.jpg", exif=exif)
    assert load_image(tmp_path / "r.jpg").size == (20, 40)
    truncated = tmp_path / "t.png"
    truncated.write_bytes(path.read_bytes()[:60])
    with pytest.raises(MetricsInputError, match=r"t\.png"):
        load_image(truncated)
