"""``harness train`` as two data-parallel processes under ``accelerate launch`` (CPU, gloo).

``accelerate launch --cpu --num_processes 2`` starts a single process in accelerate 1.15
(without MPI); ``--multi_gpu`` starts two through torchrun, and a model on the CPU makes them
join over gloo. CUDA is hidden so the same happens on a machine with GPUs.
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
from pathlib import Path
from typing import Any

import pytest
import torch
from e2e._helpers import VENV_BIN, cli_env, harness_cmd, new_project
from safetensors.torch import load_file

from harness.config import ModelConfig
from harness.models import load_pipeline

pytestmark = pytest.mark.slow

SAVED = re.compile(r"saved checkpoint step (\d+) \(process (\d+) of (\d+)\)")
CHECKSUM = re.compile(r"process (\d+) of (\d+) stopped at step (\d+); adapter checksum (\S+)")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _launch_env(home: Path) -> dict[str, str]:
    """The CLI test environment, without CUDA and without any caller's accelerate settings."""
    env = cli_env(
        home, {"OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "HF_HOME": str(home / "hf")}
    )
    return {k: v for k, v in env.items() if not k.startswith("ACCELERATE_")}


def _unet_output(pipe: Any, adapter: Path | None) -> torch.Tensor:
    """The UNet's prediction for fixed inputs, with ``adapter`` loaded when given."""
    if adapter is not None:
        pipe.load_lora_weights(adapter)
    tokenizer = pipe.tokenizer
    ids = tokenizer(
        ["a photo of sks toy"],
        padding="max_length",
        max_length=tokenizer.model_max_length,
        return_tensors="pt",
    ).input_ids
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        hidden = pipe.text_encoder(ids)[0]
        sample = torch.randn(1, pipe.unet.config.in_channels, 16, 16, generator=gen)
        out: torch.Tensor = pipe.unet(sample, 10, encoder_hidden_states=hidden).sample
    return out


def test_two_processes_train_one_run(tmp_path: Path) -> None:
    project = new_project(tmp_path / "project")  # tiny-cpu, 4 steps, checkpoints at 2 and 4
    env = _launch_env(tmp_path / "home")
    prepare = subprocess.run(
        harness_cmd(project, "prepare"),
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert prepare.returncode == 0, prepare.stdout + prepare.stderr
    launch = [
        *(str(VENV_BIN / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2"),
        *("--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"),
        *("--main_process_port", str(_free_port()), "-m", "harness"),
        *("-p", str(project / "params.yaml"), "-S", "tracking.mode=offline", "train"),
    ]
    proc = subprocess.run(
        launch,
        cwd=project,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=300,
        check=False,
    )
    out = proc.stdout
    assert proc.returncode == 0, out[-6000:]

    run = project / "runs" / "train"
    result = json.loads((run / "result.json").read_text())
    assert result["status"] == "completed", result["reason"]
    assert result["steps_done"] == result["max_steps"] == 4
    # One tracked run, from the main process only (not one ClearML task per process).
    # (Tracked from both, the two processes share one ClearML task and race on its zip.)
    assert len(re.findall(r"tracking: train run .* started", out)) == 1, out[-6000:]
    assert "finishing offline session" not in out, out[-6000:]
    sessions = (project / "runs/clearml/sessions.jsonl").read_text().splitlines()
    assert len(sessions) == 1, sessions
    assert result["info"]["num_processes"] == 2, result["info"]
    assert result["info"]["distributed_type"] == "MULTI_CPU"
    # every checkpoint written once, by the main process; the log written once per step
    assert SAVED.findall(out) == [("2", "0", "2"), ("4", "0", "2")], out[-6000:]
    steps = [
        json.loads(line)["step"] for line in (run / "train_log.jsonl").read_text().splitlines()
    ]
    assert steps == [1, 2, 3, 4]
    # averaged gradients keep both replicas identical, though each drew its own data and noise
    checksums = {m[0]: m[3] for m in CHECKSUM.findall(out)}
    assert checksums.keys() == {"0", "1"} and len(set(checksums.values())) == 1, checksums
    ckpt = run / "checkpoints" / "step-000004"
    assert json.loads((ckpt / "checkpoint.json").read_text())["num_processes"] == 2
    rng = load_file(str(ckpt / "state" / "rng.safetensors"))
    assert not torch.equal(rng["trainer"], rng["process1.trainer"])

    pipe = load_pipeline(ModelConfig(pretrained="tiny://sd15", device="cpu")).pipeline
    base = _unet_output(pipe, None)
    tuned = _unet_output(pipe, ckpt)
    assert (tuned - base).abs().max() > 1e-6
