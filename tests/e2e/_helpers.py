"""Shared helpers of the end-to-end tests: tmp projects, CLI subprocesses, study polling."""

from __future__ import annotations

import contextlib
import copy
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import yaml

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = REPO / ".venv" / "bin"
T = TypeVar("T")

# The real tiny-cpu preset, shrunk so a 4-run sweep takes seconds on 2 CPU cores.
BASE_OVERRIDES: dict[str, Any] = {
    "data": {"sample_images": 5},
    "train": {"max_steps": 4, "checkpoint_steps": [2, 4]},
    "eval": {
        "prompts": ["a photo of {token} {class_name}", "a {token} {class_name} on the beach"],
        "images_per_prompt": 1,
        "num_inference_steps": 2,
        "prior_preservation_images": 0,
    },
    "metrics": {"bootstrap_samples": 20},
    "sweep": {
        "n_trials": 4,
        "pruner": "none",  # deterministic run counts (pruning has its own unit tests)
        "inference": {"num_inference_steps": [2]},
        "proxy": {"prompts": 1},
    },
    "tracking": {"mode": "off"},
}

# ClearML server settings that must never leak into a test from the caller's environment.
CLEARML_SERVER_VARS = (
    "CLEARML_API_HOST",
    "CLEARML_WEB_HOST",
    "CLEARML_FILES_HOST",
    "CLEARML_API_ACCESS_KEY",
    "CLEARML_API_SECRET_KEY",
    "CLEARML_CONFIG_FILE",
    "TRAINS_API_HOST",
    "TRAINS_CONFIG_FILE",
    "TRAINS_API_ACCESS_KEY",
    # Set by an in-process Task.init of an earlier test: a subprocess would attach to that task.
    "CLEARML_PROC_MASTER_ID",
    "TRAINS_PROC_MASTER_ID",
    "CLEARML_TASK_ID",
)


def deep_merge(base: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` updated recursively with ``new`` (copies, inputs untouched)."""
    out = copy.deepcopy(dict(base))
    for key, value in new.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def write_params(root: Path, overrides: Mapping[str, Any] | None = None) -> Path:
    """``root/params.yaml`` naming the tiny-cpu preset with the shrunk settings + ``overrides``."""
    data = {"preset": "tiny-cpu", **deep_merge(BASE_OVERRIDES, overrides or {})}
    path = root / "params.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


def new_project(root: Path, overrides: Mapping[str, Any] | None = None) -> Path:
    """A fresh project folder: the repo's presets and a params.yaml (nothing prepared)."""
    root.mkdir(parents=True, exist_ok=True)
    shutil.copytree(REPO / "experiments", root / "experiments")
    write_params(root, overrides)
    return root


def clone_project(template: Path, dest: Path, overrides: Mapping[str, Any] | None = None) -> Path:
    """A copy of a prepared template project with its own params.yaml."""
    shutil.copytree(template, dest)
    write_params(dest, overrides)
    return dest


def cli_env(home: Path, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The test environment for a ``harness`` subprocess: isolated HOME and ClearML cache."""
    env = dict(os.environ)
    for name in CLEARML_SERVER_VARS:
        env.pop(name, None)
    home.mkdir(parents=True, exist_ok=True)
    env["HOME"] = str(home)
    env["CLEARML_CACHE_DIR"] = str(home / "clearml-cache")
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


def harness_cmd(project: Path, *args: str) -> list[str]:
    """``python -m harness -p <project>/params.yaml ARGS`` with this interpreter."""
    return [sys.executable, "-m", "harness", "-p", str(project / "params.yaml"), *args]


def run_cli(
    project: Path, args: list[str], env: Mapping[str, str], log: Path, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """Run ``harness ARGS`` to completion, stdout and stderr appended to ``log``."""
    with log.open("a", encoding="utf-8") as out:
        out.write(f"$ harness {' '.join(args)}\n")
        out.flush()
        proc = subprocess.run(
            harness_cmd(project, *args),
            cwd=project,
            env=dict(env),
            stdout=out,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=timeout,
            check=False,
        )
    return proc


def start_cli(
    project: Path, args: list[str], env: Mapping[str, str], log: Path
) -> subprocess.Popen[bytes]:
    """Start ``harness ARGS`` in its own process group (so :func:`stop_process` can kill it and
    its children), stdout and stderr written to ``log``."""
    with log.open("w") as out:
        return subprocess.Popen(
            harness_cmd(project, *args),
            cwd=project,
            env=dict(env),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def stop_process(proc: subprocess.Popen[Any]) -> None:
    """Kill a started process (and its group) if it is still alive; never raises."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        proc.kill()
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=10)


def wait_for(
    what: str,
    probe: Callable[[], T | None],
    timeout: float,
    proc: subprocess.Popen[Any] | None = None,
    log: Path | None = None,
    interval: float = 0.25,
) -> T:
    """Poll ``probe`` until it returns a truthy value; fail after ``timeout`` seconds or when
    ``proc`` exits first (the log tail goes into the message)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = probe()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            value = probe()
            if value:
                return value
            raise AssertionError(
                f"process exited with {proc.returncode} before {what}:\n{tail(log)}"
            )
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}:\n{tail(log)}")


def imported_modules(stderr: str) -> set[str]:
    """The modules a ``python -X importtime`` run imported, from its stderr."""
    return {
        line.rsplit("|", 1)[1].strip()
        for line in stderr.splitlines()
        if line.startswith("import time:")
    }


def tail(log: Path | None, lines: int = 40) -> str:
    """The last lines of a log file (for assertion messages)."""
    if log is None or not log.is_file():
        return ""
    return "\n".join(log.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:])


def retrained_tiny_cache(cache: Path) -> Path:
    """A model cache (``HARNESS_CACHE_DIR``) whose tiny SD 1.5 has every UNet weight moved a
    little, as further training moves them: the same ``tiny://sd15``, other weights."""
    from safetensors.torch import load_file, save_file

    from harness.models.tiny import tiny_pipeline_dir

    built = tiny_pipeline_dir("sd15")  # this session's (HARNESS_CACHE_DIR), built if need be
    shutil.copytree(built, cache / "tiny" / built.name)
    unet = cache / "tiny" / built.name / "unet/diffusion_pytorch_model.safetensors"
    save_file({k: v + 0.01 for k, v in load_file(unet).items()}, unet)
    return cache
