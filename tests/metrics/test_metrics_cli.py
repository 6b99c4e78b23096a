"""``python -m metrics score``: tables, JSON, and one-line errors with exit status 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from metrics.cli import main

TINY = ["--dino-model", "tiny://dino", "--clip-model", "tiny://clip", "--clip-pretrained", "none"]
ROOT = Path(__file__).resolve().parents[2]


def write_manifest(folder: Path, prompts: list[str]) -> Path:
    files = sorted(p.name for p in folder.iterdir())
    manifest = folder / "manifest.jsonl"
    with manifest.open("w") as handle:
        for i, name in enumerate(files):
            handle.write(
                json.dumps({"file": name, "prompt": prompts[i % len(prompts)], "seed": i}) + "\n"
            )
    return manifest


def test_score_prints_tables_and_writes_json(
    image_dir: Callable[[str, list[int]], Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    real = image_dir("real", [1, 2, 3])
    generated = image_dir("gen", list(range(10, 16)))
    manifest = write_manifest(generated, ["a photo of sks dog", "a sks dog on the beach"])
    out = tmp_path / "out" / "scores.json"
    code = main(
        [
            "score",
            "--real",
            str(real),
            "--generated",
            str(generated),
            "--prompts",
            str(manifest),
            "--json",
            str(out),
            "--class-name",
            "dog",
            "--bootstrap-samples",
            "100",
            "--lpips-weights",
            "tiny",
            *TINY,
        ]
    )
    assert code == 0
    stdout = capsys.readouterr().out
    for label in ("DINO", "CLIP-I", "CLIP-T", "DIV", "DIV-DINO", "real ceiling", "a photo of dog"):
        assert label in stdout
    payload = json.loads(out.read_text())
    assert set(payload["means"]) == {"dino", "clip_i", "clip_t", "div", "div_dino"}
    assert all(isinstance(v, float) for v in payload["means"].values())
    assert payload["means"]["div"] > 0 and payload["metadata"]["lpips_weights"] == "tiny:seed=0"
    assert payload["real_ceiling"]["n_real"] == 3
    assert len(payload["per_image"]) == 6 and len(payload["per_prompt"]) == 2
    assert payload["metadata"]["identifier_policy"] == "remove"
    assert payload["metadata"]["encoded_texts"]["a sks dog on the beach"] == "a dog on the beach"
    lo, hi = payload["ci95"]["dino"]
    assert lo <= payload["means"]["dino"] <= hi


def test_score_without_prompts_skips_clip_t(
    image_dir: Callable[[str, list[int]], Path], tmp_path: Path
) -> None:
    out = tmp_path / "s.json"
    code = main(
        [
            "score",
            "--real",
            str(image_dir("real", [1])),
            "--generated",
            str(image_dir("gen", [5, 6])),
            "--json",
            str(out),
            "--no-cache",
            *TINY,
        ]
    )
    assert code == 0
    payload = json.loads(out.read_text())
    assert payload["means"]["clip_t"] is None and payload["real_ceiling"] is None


def test_score_without_lpips_weights_reports_div_not_measured(
    image_dir: Callable[[str, list[int]], Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    generated = image_dir("gen", [5, 6, 7, 8])
    manifest = write_manifest(generated, ["a sks dog"])
    out = tmp_path / "s.json"
    args = ["--generated", str(generated), "--prompts", str(manifest), "--json", str(out)]
    assert main(["score", "--real", str(image_dir("real", [1])), *args, *TINY]) == 0
    assert "not measured: no LPIPS weights configured" in capsys.readouterr().out
    payload = json.loads(out.read_text())
    assert payload["means"]["div"] is None and payload["means"]["div_dino"] > 0


def _bad_case(
    kind: str, root: Path, image_dir: Callable[[str, list[int]], Path]
) -> tuple[list[str], str]:
    real = image_dir("real", [1, 2])
    generated = image_dir("gen", [3, 4])
    if kind == "empty":
        empty = root / "empty"
        empty.mkdir()
        return ["--real", str(empty), "--generated", str(generated)], str(empty)
    if kind == "non-image":
        (generated / "readme.txt").write_text("hello")
        return ["--real", str(real), "--generated", str(generated)], str(generated / "readme.txt")
    if kind == "lpips-weights":
        missing = root / "lpips_alex.safetensors"
        return [
            "--real",
            str(real),
            "--generated",
            str(generated),
            "--lpips-weights",
            str(missing),
        ], str(missing)
    if kind == "mismatch":
        prompts = root / "prompts.txt"
        prompts.write_text("img_003.png\ta sks dog\n")
        return [
            "--real",
            str(real),
            "--generated",
            str(generated),
            "--prompts",
            str(prompts),
        ], "img_004.png"
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["empty", "non-image", "mismatch", "lpips-weights"])
def test_bad_inputs_exit_2_with_one_line(
    kind: str,
    tmp_path: Path,
    image_dir: Callable[[str, list[int]], Path],
    capsys: pytest.CaptureFixture[str],
) -> None:
    args, named = _bad_case(kind, tmp_path, image_dir)
    assert main(["score", *args, *TINY]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and named in lines[0]
    assert captured.out == ""


def test_module_entry_point_no_traceback(
    tmp_path: Path, image_dir: Callable[[str, list[int]], Path]
) -> None:
    args, named = _bad_case("non-image", tmp_path, image_dir)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "metrics", "score", *args, *TINY],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [f"error: not an image file: {named}"]
