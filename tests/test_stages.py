"""The stage commands end to end on a tiny project: resolve, prepare, train, generate."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from typer.testing import CliRunner

from harness.cli import app

PARAMS = """\
preset: tiny-cpu
data:
  sample_images: 5
train:
  max_steps: 2
  checkpoint_steps: [1, 2]
eval:
  prompts: ["a photo of {token} {class_name}"]
  images_per_prompt: 2
  num_inference_steps: 2
tracking:
  mode: "off"
"""


def test_resolve_prepare_train_generate(repo_root: Path, tmp_path: Path) -> None:
    shutil.copytree(repo_root / "experiments", tmp_path / "experiments")
    params = tmp_path / "params.yaml"
    params.write_text(PARAMS)
    runner = CliRunner()

    def run(*args: str) -> str:
        result = runner.invoke(app, ["-p", str(params), *args])
        assert result.exit_code == 0, result.stdout + result.stderr
        return result.stdout

    run("resolve")
    resolved = tmp_path / "runs/resolved"
    assert json.loads((resolved / "train.json").read_text())["train"]["max_steps"] == 2
    source = json.loads((resolved / "source.json").read_text())
    assert len(source["files"]) == 5 and source["class_name"] == "toy"
    assert "identifier" not in source  # a fixed token: no model or prompt is an input of prepare

    assert "prepared 4 train / 1 val photos (0 rejected)" in run("prepare")
    manifest = json.loads((tmp_path / "data/prepared/sample/manifest.json").read_text())
    assert len(manifest["train"]) == 4

    out = run("train")
    assert "completed: 2/2 steps" in out
    ckpt = tmp_path / "runs/train/checkpoints/step-000002"
    assert (ckpt / "pytorch_lora_weights.safetensors").is_file()
    log = [
        json.loads(x) for x in (tmp_path / "runs/train/train_log.jsonl").read_text().splitlines()
    ]
    assert [r["step"] for r in log] == [1, 2] and all("loss" in r and "lr_unet" in r for r in log)

    gen = tmp_path / "gen"
    assert "generated 2 images" in run("generate", "--adapter", str(ckpt), "--out", str(gen))
    records = [json.loads(x) for x in (gen / "manifest.jsonl").read_text().splitlines()]
    assert [r["seed"] for r in records] == [0, 1]
    assert all(r["adapter"] == str(ckpt) and (gen / r["file"]).is_file() for r in records)

    bad = runner.invoke(app, ["-p", str(params), "generate", "--adapter", str(tmp_path / "nope")])
    assert bad.exit_code == 2 and "--adapter" in bad.stderr and "not found" in bad.stderr
