"""Pickle-based or unreadable weight files are refused by the harness with one clear line.

Through the CLI: ``harness generate --adapter x.bin`` and ``-S model.pretrained=fake.safetensors
harness model-info`` must exit 2 with one ``error:`` line naming the file, never reach
``torch.load`` and never print a traceback.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from typer.testing import CliRunner

from harness.cli import app

runner = CliRunner()


@pytest.fixture
def project(repo_root: Path, tmp_path: Path) -> Path:
    shutil.copytree(repo_root / "experiments", tmp_path / "experiments")
    (tmp_path / "params.yaml").write_text("preset: tiny-cpu\n")
    return tmp_path


@pytest.fixture(autouse=True)
def _no_torch_load(monkeypatch: pytest.MonkeyPatch) -> None:
    """Reaching torch.load at all is the bug (it unpickles), whatever it would then do."""

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("torch.load was called on a user-supplied file")

    monkeypatch.setattr(torch, "load", refuse)


def _pickle(path: Path) -> Path:
    """A real pickle checkpoint, written with torch.save."""
    torch.save({"lora.down.weight": torch.zeros(2, 2)}, path)
    return path


def _one_error_line(project: Path, *args: str) -> str:
    result = runner.invoke(app, ["-p", str(project / "params.yaml"), *args])
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert result.exit_code == 2, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    # Other stderr lines are log records and progress bars of the model load (``generate``
    # loads the base model before it looks at the adapter); the error is one line, the last.
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if "error" in line.lower()]
    assert len(errors) == 1 and errors[0] == lines[-1] and lines[-1].startswith("error: "), lines
    return lines[-1]


@pytest.mark.parametrize("suffix", [".bin", ".ckpt", ".pt", ".pth"])
def test_generate_refuses_pickle_adapter(project: Path, suffix: str) -> None:
    adapter = _pickle(project / f"lora{suffix}")
    line = _one_error_line(project, "generate", "--adapter", str(adapter), "--out", "gen")
    assert str(adapter) in line and "pickle" in line and suffix in line
    assert not (project / "gen" / "manifest.jsonl").exists()


def test_generate_refuses_pickle_renamed_to_safetensors_adapter(project: Path) -> None:
    adapter = _pickle(project / "lora.safetensors")
    line = _one_error_line(project, "generate", "--adapter", str(adapter), "--out", "gen")
    assert str(adapter) in line and "safetensors" in line


def test_generate_refuses_adapter_folder_with_renamed_pickle(project: Path) -> None:
    folder = project / "ckpt"
    folder.mkdir()
    weights = _pickle(folder / "pytorch_lora_weights.safetensors")
    line = _one_error_line(project, "generate", "--adapter", str(folder), "--out", "gen")
    assert str(weights) in line


def test_model_info_refuses_pickle_renamed_to_safetensors(project: Path) -> None:
    fake = _pickle(project / "fake.safetensors")
    line = _one_error_line(project, "-S", f"model.pretrained={fake}", "model-info")
    assert line.startswith(f"error: model.pretrained: {fake}: ")
    assert "not a valid safetensors file" in line


@pytest.mark.parametrize("suffix", [".bin", ".pth"])
def test_model_info_refuses_pickle_model(project: Path, suffix: str) -> None:
    model = _pickle(project / f"model{suffix}")
    line = _one_error_line(project, "-S", f"model.pretrained={model}", "model-info")
    assert str(model) in line and "pickle" in line


def test_model_info_refuses_truncated_safetensors(project: Path, tiny_sd15: Any) -> None:
    from .single_file import save_sd15_single_file

    path = save_sd15_single_file(tiny_sd15.pipeline, project / "model.safetensors")
    path.write_bytes(path.read_bytes()[:4096])
    line = _one_error_line(project, "-S", f"model.pretrained={path}", "model-info")
    assert str(path) in line and "truncated" in line
