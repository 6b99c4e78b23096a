"""Wheels for a GPU machine that cannot reach a package index (``make gpu-wheels``).

The lent GPU machine (see ``.ci/gpu-check``) has Python 3.12 with PyTorch, transformers,
accelerate, peft, timm and the scientific stack, but not diffusers, optuna, open_clip, pydantic
and the rest of what the harness imports, and it cannot download. This script downloads, here,
the cp312 manylinux wheels of those packages (at this venv's versions, so both machines run the
same code) and of every requirement of theirs the machine lacks, into ``.whl/`` (ignored by
git); ``.ci/gpu-check`` installs them there with ``pip --no-index --no-deps``. bitsandbytes
(41 MiB, for the 8-bit AdamW test) does not fit beside them in the 64 MiB that travel in one
call: that test skips there.

Run with the project's venv: ``.venv/bin/python .ci/gpu_wheels.py`` (``make gpu-wheels``).
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import re
import subprocess
import sys
import zipfile
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]

# The packages the harness imports (or its GPU tests do) that the machine lacks, or has at a
# version other than the project's pins (transformers, peft, timm).
WANTED = (
    "diffusers",
    "optuna",
    "open_clip_torch",
    "pydantic",
    "prodigyopt",
    "imagehash",
    "pillow_heif",
    "omegaconf",
    "lpips",
    "transformers",
    "peft",
    "timm",
)

# What the machine's Python has (its package list, read 2026-11-17, device tool's KINDS.md).
# A requirement named here is not carried, whatever version it asks for: `.ci/gpu-check` runs
# `pip check` there and prints what does not fit.
ON_DEVICE = """
absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch
build certifi charset-normalizer chex click cloudpickle cmake colorama contourpy coverage
cuda-bindings cuda-core cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn
einops equinox etils execnet filelock flatbuffers flax fonttools formulaic frozenlist fsspec
gpytorch grpcio h11 h5py hf-xet httpcore httpx huggingface-hub humanize hypothesis idna imageio
iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib
kiwisolver lazy-loader lightning lightning-utilities linear-operator lineax llvmlite lxml
markdown markdown-it-py markupsafe matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack
multidict multipledispatch mypy-extensions nanobind narwhals networkx ninja numba numba-cuda
numpy numpyro nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime
nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse
nvidia-cusparselt-cu13 nvidia-ml-py nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13
nvidia-nvtx onnx onnx-ir onnxruntime onnxscript opencv-python-headless optax opt-einsum
opt-einsum-fx optimistix orbax-checkpoint packaging pandas pathspec patsy pillow pip pluggy
portalocker prometheus-client propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments
pyparsing pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock
pytest-timeout pytest-xdist python-dateutil pytorch-lightning pyyaml regex requests rich
sacrebleu safetensors scikit-build-core scikit-image scikit-learn scipy seaborn sentencepiece
sentence-transformers setuptools shellingham simplejson six sortedcontainers statsmodels sympy
tabulate tensorboard tensorboard-data-server tensorstore threadpoolctl tifffile tiktoken
tokenizers toolz torch torchaudio torchdiffeq torch-geometric torchmetrics torchvision tqdm
triton typer typing-extensions typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel wrapt
xarray xxhash yarl zipp
"""
DEVICE = {canonicalize_name(name) for name in ON_DEVICE.split()}
CARRIED_ANYWAY = {canonicalize_name(n) for n in ("transformers", "peft", "timm")}
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64")
PLATFORMS += ("manylinux2014_x86_64", "manylinux1_x86_64")
LIMIT_MIB = 56  # of the 64 MiB that travel: the project's own files need the rest
# The machine's environment, for the requirements' markers: CPython 3.12 on x86_64 Linux.
MARKERS = {
    **default_environment(),
    "python_version": "3.12",
    "python_full_version": "3.12.3",
    "implementation_name": "cpython",
    "platform_python_implementation": "CPython",
    "sys_platform": "linux",
    "platform_system": "Linux",
    "platform_machine": "x86_64",
    "os_name": "posix",
    "extra": "",
}


def _download(spec: str, dest: Path) -> None:
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:"]
    cmd += ["--python-version", "3.12", "--implementation", "cp", "-d", str(dest)]
    for platform in PLATFORMS:
        cmd += ["--platform", platform]
    if subprocess.run([*cmd, spec], check=False).returncode == 0:
        return
    # No wheel on the index (antlr4-python3-runtime 4.9.3, omegaconf's): build it here, which
    # is right only for pure-Python packages; collect() refuses a platform wheel of another Python.
    build = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(dest), spec]
    subprocess.run(build, check=True)


def _wheel_of(name: str, dest: Path) -> Path:
    matches = [p for p in dest.glob("*.whl") if canonicalize_name(p.name.split("-")[0]) == name]
    if len(matches) != 1:
        raise SystemExit(f"expected one wheel of {name} in {dest}, found {matches}")
    return matches[0]


def _requirements(wheel: Path) -> list[str]:
    """The names ``wheel`` needs on the machine (markers evaluated there, extras left out)."""
    with zipfile.ZipFile(wheel) as archive:
        meta = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
        lines = archive.read(meta).decode().splitlines()
    needs = []
    for line in lines:
        if not line.startswith("Requires-Dist:"):
            continue
        req = Requirement(line.removeprefix("Requires-Dist:").strip())
        if req.marker is None or req.marker.evaluate(MARKERS):
            needs.append(canonicalize_name(req.name))
    return needs


def _spec(name: str) -> str:
    """``name==<this venv's version>``, or the newest release when the venv lacks it."""
    try:
        return f"{name}=={md.version(name)}"
    except md.PackageNotFoundError:
        return name


def collect(dest: Path, wanted: tuple[str, ...]) -> list[Path]:
    """Download ``wanted`` and, transitively, every requirement the machine lacks."""
    dest.mkdir(parents=True, exist_ok=True)
    queue = [canonicalize_name(n) for n in wanted]
    done: dict[str, Path] = {}
    while queue:
        name = queue.pop(0)
        if name in done or (name in DEVICE and name not in CARRIED_ANYWAY):
            continue
        _download(_spec(name), dest)
        done[name] = _wheel_of(name, dest)
        if not re.search(r"-(cp312|abi3|none)-[^-]*(manylinux|any)", done[name].name):
            raise SystemExit(f"{done[name].name} would not install on CPython 3.12 x86_64")
        queue += _requirements(done[name])
    return sorted(done.values())


def main() -> int:
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args()
    wheels = collect(ROOT / ".whl", WANTED)
    stale = set((ROOT / ".whl").glob("*.whl")) - set(wheels)
    for path in stale:  # an older version left by an earlier run: pip would refuse two
        path.unlink()
    total = sum(p.stat().st_size for p in wheels) / 2**20
    for path in wheels:
        print(f"{path.stat().st_size / 2**20:7.2f} MiB  {path.name}")
    print(f"{len(wheels)} wheels, {total:.1f} MiB in .whl/ (limit {LIMIT_MIB} MiB)")
    return 0 if total <= LIMIT_MIB else 1


if __name__ == "__main__":
    raise SystemExit(main())
