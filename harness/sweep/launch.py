"""Launch sweep workers on existing engines: N local processes, a SLURM array, ClearML agents.

Every launcher starts the same thing, ``harness -p <params> sweep worker``: one process (one
GPU) that pulls runs of the shared study until its budget is spent. The study, the claims and
the budget live in ``sweep.storage``, so workers need nothing from each other but that URL
(put a password in ``HARNESS_SWEEP_STORAGE``, never in the generated files).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from harness.config import HarnessConfig
from harness.errors import HarnessError

__all__ = [
    "LaunchError",
    "LocalWorker",
    "SlurmJob",
    "clearml_worker_script",
    "clearml_worker_spec",
    "launch_local",
    "local_workers",
    "refuse_secret_overrides",
    "slurm_script",
    "submit_slurm",
    "worker_command",
]

log = logging.getLogger(__name__)


class LaunchError(HarnessError):
    """Workers cannot be launched (wrong storage for the engine, sbatch missing or refusing)."""


def worker_command(
    params: Path, overrides: Sequence[str] = (), python: str | None = None
) -> list[str]:
    """The command line of one worker: the launcher's params file and ``-S`` overrides (so
    every worker opens the same study)."""
    sets = [arg for item in overrides for arg in ("-S", item)]
    return [python or sys.executable, "-m", "harness", "-p", str(params), *sets, "sweep", "worker"]


def refuse_secret_overrides(overrides: Sequence[str], carrier: str) -> None:
    """Refuse a ``-S key=value`` whose value holds a password or token: ``carrier`` (the sbatch
    script, the ClearML task, every worker's command line) would hold it in plain text.

    Raises:
        LaunchError: naming the key, and where the value goes instead.
    """
    from harness.sweep.study import STORAGE_ENV
    from harness.tracking.secrets import DEFAULT_KEEP_PATHS, is_secret_key, redact_text

    for item in overrides:
        key, _, value = item.partition("=")
        key = key.strip().lstrip("+~")
        named = is_secret_key(key.rsplit(".", 1)[-1]) and key not in DEFAULT_KEEP_PATHS
        if not named and redact_text(value) == value:  # data.token (sks) is no secret
            continue
        instead = (
            f"{STORAGE_ENV} (set where you launch; the workers inherit it)"
            if key == "sweep.storage"
            else "params.yaml or the environment"
        )
        raise LaunchError(
            f"-S {key}: its value holds a password or token, which {carrier} would carry in "
            f"plain text; put it in {instead}"
        )


def require_shared_storage(cfg: HarnessConfig, url: str, engine: str) -> None:
    """Workers on several machines need a database server or a shared journal file.

    Raises:
        LaunchError: for a SQLite URL (one machine only).
    """
    if url.startswith("sqlite"):
        raise LaunchError(
            f"sweep.storage: {engine} workers may run on several machines, and a SQLite file is "
            "for one machine only; use a PostgreSQL or MySQL URL (sweep.storage or "
            "HARNESS_SWEEP_STORAGE), or journal:///<shared path>/study.log on a shared file system"
        )


# -- local ---------------------------------------------------------------------------------
def _gpu_ids() -> list[str]:
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [g for g in visible.split(",") if g.strip()]
    try:
        import torch

        return [str(i) for i in range(torch.cuda.device_count())]
    except Exception:  # no torch CUDA: CPU workers
        return []


def _pump(stream: IO[str], prefix: str, out: IO[str]) -> None:
    for line in stream:
        out.write(f"{prefix}{line}")
        out.flush()


def worker_threads(n_workers: int) -> int | None:
    """CPU threads per local worker: the cores shared out (at least 1), or None when the user
    set ``OMP_NUM_THREADS``. Every PyTorch process would otherwise start one thread per core,
    and N workers on the same cores slow each other down many times over."""
    if "OMP_NUM_THREADS" in os.environ:
        return None
    return max(1, (os.cpu_count() or 1) // max(1, n_workers))


# Set for the workers of launch_local: they take the SIGINT it passes on even when it was
# started in the background, where they inherit SIGINT ignored (harness.sweep.runner).
LOCAL_LAUNCH_ENV = "HARNESS_LOCAL_LAUNCH"


@dataclass(frozen=True)
class LocalWorker:
    """One worker of ``launch --local``: the variables it gets on top of the launcher's
    environment, and its command."""

    env: dict[str, str]
    command: list[str]

    def describe(self) -> str:
        """The worker as a shell line (what ``--dry-run`` shows)."""
        return shlex.join([f"{k}={v}" for k, v in self.env.items()] + self.command)


def local_workers(params: Path, n_workers: int, overrides: Sequence[str] = ()) -> list[LocalWorker]:
    """The ``n_workers`` workers :func:`launch_local` starts: one GPU each when there are GPUs,
    the CPU cores shared out (:func:`worker_threads`).

    Raises:
        LaunchError: an override holds a password (:func:`refuse_secret_overrides`).
    """
    refuse_secret_overrides(overrides, "every worker's command line (which ps shows)")
    gpus = _gpu_ids()
    if gpus and n_workers > len(gpus):
        log.warning("%d workers on %d GPUs: some GPUs run several workers", n_workers, len(gpus))
    threads = worker_threads(n_workers)
    workers = []
    for i in range(n_workers):
        env = {"HARNESS_WORKER_ID": f"local-{os.getpid()}-{i}", LOCAL_LAUNCH_ENV: "1"}
        if gpus:
            env["CUDA_VISIBLE_DEVICES"] = gpus[i % len(gpus)]
        if threads is not None:
            env["OMP_NUM_THREADS"] = str(threads)
        workers.append(LocalWorker(env, worker_command(params, overrides)))
    return workers


def launch_local(
    params: Path,
    root: Path,
    n_workers: int,
    *,
    overrides: Sequence[str] = (),
    out: IO[str] | None = None,
) -> list[int]:
    """Start the ``n_workers`` workers of :func:`local_workers` here, wait for all.

    Their output is prefixed ``[w<i>]``; SIGINT/SIGTERM is passed on to every worker (each
    records its run as interrupted). Returns the workers' exit codes.
    """
    out = out or sys.stdout
    procs: list[subprocess.Popen[str]] = []
    pumps: list[threading.Thread] = []
    for i, worker in enumerate(local_workers(params, n_workers, overrides)):
        proc = subprocess.Popen(
            worker.command,
            cwd=root,
            env=dict(os.environ, **worker.env),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            bufsize=1,
        )
        procs.append(proc)
        assert proc.stdout is not None
        pump = threading.Thread(target=_pump, args=(proc.stdout, f"[w{i}] ", out), daemon=True)
        pump.start()
        pumps.append(pump)

    def forward(signum: int, frame: Any) -> None:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        codes = _wait_all(procs)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    for pump in pumps:
        pump.join(timeout=5)
    return codes


def _wait_all(procs: Sequence[subprocess.Popen[str]], poll_s: float = 0.2) -> list[int]:
    """Wait for every process, reaping each as soon as it exits: waiting in order left a worker
    that died first a zombie, which the others take for alive until its heartbeat goes stale."""
    while True:
        running = [proc for proc in procs if proc.poll() is None]  # poll() reaps the exited
        if not running:
            return [int(proc.returncode) for proc in procs]
        with contextlib.suppress(subprocess.TimeoutExpired):
            running[0].wait(timeout=poll_s)


# -- SLURM ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class SlurmJob:
    """A written (and maybe submitted) sbatch array script."""

    script: Path
    text: str
    job_id: str | None = None


# What sbatch's own #SBATCH parser (src/sbatch/opt.c, ``_get_argument``) does not take
# literally outside quotes: whitespace ends the value, quotes group, a backslash escapes, an
# unquoted ``#`` starts a comment.
_SBATCH_SPECIAL = re.compile(r"[\s\"'\\#]")


def _sbatch_word(value: str) -> str:
    """``value`` as one argument of an ``#SBATCH`` line: as is when sbatch reads it literally,
    else in double quotes with ``\\``, ``"`` and ``#`` escaped by a backslash (``#`` too: older
    sbatch versions end the line at a ``#`` even inside quotes).

    Raises:
        LaunchError: for a line break, which no #SBATCH line can hold.
    """
    if "\n" in value or "\r" in value:
        raise LaunchError(f"{value!r}: an #SBATCH directive cannot hold a line break")
    if value and not _SBATCH_SPECIAL.search(value):
        return value
    escaped = re.sub(r'([\\"#])', r"\\\1", value)
    return f'"{escaped}"'


def _sbatch_directive(option: str, value: str) -> str:
    """``#SBATCH --<option>=<value>`` with the value quoted for sbatch (:func:`_sbatch_word`)."""
    return f"#SBATCH --{option}={_sbatch_word(value)}"


def _log_pattern(folder: Path) -> str:
    """The ``--output`` file-name pattern of the array's logs in ``folder``: one file per task
    (``%A_%a``), a literal ``%`` of the folder's path doubled so sbatch does not replace it.

    Raises:
        LaunchError: for a backslash in the path: sbatch then replaces no ``%`` pattern at
            all and drops the backslashes (every task would write one file in a folder that
            does not exist); nothing escapes it.
    """
    path = str(folder.resolve())
    if "\\" in path:
        raise LaunchError(
            f"{path}: sbatch cannot write its logs under a path with a backslash (it turns "
            "off the per-task log names); move the project, or set sweep.dir to an absolute "
            "path without one"
        )
    return path.replace("%", "%%") + "/slurm-%A_%a.out"


def slurm_script(
    cfg: HarnessConfig, root: Path, params: Path, n_workers: int, overrides: Sequence[str] = ()
) -> str:
    """An sbatch array script: one task per worker, each ``harness sweep worker``."""
    slurm = cfg.launch.slurm
    lines = [
        "#!/bin/bash",
        _sbatch_directive("job-name", f"{cfg.sweep.study_name}-sweep"),
        f"#SBATCH --array=0-{n_workers - 1}",
        "#SBATCH --ntasks=1",
        f"#SBATCH --cpus-per-task={slurm.cpus_per_task}",
        _sbatch_directive("time", slurm.time),
        _sbatch_directive("output", _log_pattern(root / cfg.sweep.dir / "launch")),
    ]
    if slurm.gpus_per_task:
        lines.append(f"#SBATCH --gpus-per-task={slurm.gpus_per_task}")
    for key, value in (("partition", slurm.partition), ("account", slurm.account)):
        if value:
            lines.append(_sbatch_directive(key, value))
    if slurm.mem:
        lines.append(_sbatch_directive("mem", slurm.mem))
    # The user's own directives, written in sbatch's syntax already: kept as they are.
    lines += [f"#SBATCH {arg}" for arg in slurm.extra_args]
    lines += [
        "",
        "# Written by `harness sweep launch --slurm`: one sweep worker per array task, all on",
        "# one study in sweep.storage (the password, if any, comes from the environment).",
        "set -euo pipefail",
        f"cd {shlex.quote(str(root.resolve()))}",
        "# PyTorch starts one thread per core of the node otherwise (no CPU binding, or tasks",
        "# sharing a node); an OMP_NUM_THREADS of yours, or of a setup line below, wins.",
        'export OMP_NUM_THREADS="${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}"',
        *slurm.setup,
        'export HARNESS_WORKER_ID="slurm-${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}"',
        "exec " + shlex.join(worker_command(params.resolve(), overrides, slurm.python)),
        "",
    ]
    return "\n".join(lines)


def write_slurm_script(
    cfg: HarnessConfig, root: Path, params: Path, n_workers: int, overrides: Sequence[str] = ()
) -> SlurmJob:
    """Write the script under ``<sweep.dir>/launch/`` (kept: what ran is on disk)."""
    text = slurm_script(cfg, root, params, n_workers, overrides)
    folder = root / cfg.sweep.dir / "launch"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"sweep-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.sbatch"
    path.write_text(text, encoding="utf-8")
    path.chmod(0o755)
    return SlurmJob(path, text)


def submit_slurm(job: SlurmJob, sbatch: str = "sbatch") -> SlurmJob:
    """``sbatch --parsable`` the script; the job id, or a :class:`LaunchError` with sbatch's words."""
    try:
        proc = subprocess.run(
            [sbatch, "--parsable", str(job.script)],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
    except FileNotFoundError:
        raise LaunchError(
            f"sbatch not found: is this a SLURM login node? The script is {job.script}"
        ) from None
    if proc.returncode != 0:
        reason = (proc.stderr or proc.stdout).strip().splitlines()
        raise LaunchError(
            f"sbatch refused {job.script}: {reason[-1] if reason else proc.returncode}"
        )
    job_id = proc.stdout.strip().split(";")[0]
    return SlurmJob(job.script, job.text, job_id)


def launch_slurm(
    cfg: HarnessConfig,
    root: Path,
    params: Path,
    n_workers: int,
    *,
    overrides: Sequence[str] = (),
    submit: bool = True,
) -> SlurmJob:
    """Write the sbatch array script and (``submit``) submit it.

    Raises:
        LaunchError: for a password in an override, a SQLite storage, a missing ``sbatch`` or
            a refused submission.
    """
    from harness.sweep.study import storage_url

    refuse_secret_overrides(overrides, "the sbatch script")
    require_shared_storage(cfg, storage_url(cfg, root), "SLURM")
    job = write_slurm_script(cfg, root, params, n_workers, overrides)
    return submit_slurm(job) if submit else job


# -- ClearML agents ------------------------------------------------------------------------
# The file clearml-agent writes the task's script to (in its scratch folder) and runs.
CLEARML_WORKER_SCRIPT = "harness-sweep-worker.sh"


def clearml_worker_spec(
    cfg: HarnessConfig,
    root: Path,
    params: Path,
    queue: str,
    index: int,
    overrides: Sequence[str] = (),
) -> dict[str, Any]:
    """What one enqueued ClearML worker task runs (``clearml-agent`` executes it).

    The agent runs a task without a repository in a scratch folder of its own (it drops the
    working directory) and in a virtual environment built from the task's requirements, where
    a bare ``-m harness`` entry point found no project. The task is a bash script instead
    (``script``, written by the agent to ``entry_point`` and run with bash), like the SLURM
    engine's: it changes to the project folder and runs the launching interpreter, both on the
    file system the agents share with this machine (as they share the storage).
    """
    command = worker_command(params.resolve(), overrides)
    return {
        "project_name": cfg.tracking.project,
        "task_name": f"{cfg.sweep.study_name}/worker-{index}",
        "task_type": "training",
        "queue": queue,
        "command": shlex.join(command),
        "entry_point": CLEARML_WORKER_SCRIPT,
        "script": clearml_worker_script(root, command, index),
        "tags": [f"sweep:{cfg.sweep.study_name}", "worker"],
    }


def clearml_worker_script(root: Path, command: Sequence[str], index: int) -> str:
    """The bash script of one ClearML worker task (see :func:`clearml_worker_spec`)."""
    return "\n".join(
        [
            "#!/bin/bash",
            "# Written by `harness sweep launch --clearml-queue`: one sweep worker, run by",
            "# clearml-agent; the study is in sweep.storage (a password comes from the",
            "# agent's environment: HARNESS_SWEEP_STORAGE).",
            "set -euo pipefail",
            f"cd {shlex.quote(str(root.resolve()))}",
            # The agent sets CLEARML_TASK_ID: each task is a worker of its own in the study.
            f'export HARNESS_WORKER_ID="clearml-${{CLEARML_TASK_ID:-worker-{index}}}"',
            # ...and then not further: with it set ClearML runs "remotely", and every Task.init
            # of the worker returns this task; each training run is a task of its own.
            "unset CLEARML_TASK_ID",
            "exec " + shlex.join(command),
            "",
        ]
    )


def launch_clearml(
    cfg: HarnessConfig,
    root: Path,
    params: Path,
    n_workers: int,
    queue: str,
    *,
    overrides: Sequence[str] = (),
    enqueue: bool = True,
) -> list[str]:
    """Enqueue ``n_workers`` worker tasks on ClearML queue ``queue``; the definitions are
    written to ``<sweep.dir>/launch/clearml-*.json`` first. Returns one line per worker.

    Raises:
        LaunchError: for a password in an override, a SQLite storage, or when ClearML refuses
            (no server configured).
    """
    import json

    from harness.sweep.study import storage_url
    from harness.tracking import TrackingError, enqueue_worker_task

    refuse_secret_overrides(overrides, "the ClearML task")
    require_shared_storage(cfg, storage_url(cfg, root), "ClearML agent")
    specs = [clearml_worker_spec(cfg, root, params, queue, i, overrides) for i in range(n_workers)]
    folder = root / cfg.sweep.dir / "launch"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"clearml-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.json"
    path.write_text(json.dumps(specs, indent=2), encoding="utf-8")
    lines = [f"definitions: {path}"]
    if not enqueue:
        return [*lines, f"not enqueued (--dry-run): {n_workers} workers for queue {queue!r}"]
    for spec in specs:
        try:
            task_id = enqueue_worker_task(spec)
        except TrackingError as exc:
            raise LaunchError(f"--clearml-queue {queue}: {exc}") from None
        lines.append(f"enqueued {spec['task_name']} on {queue!r}: task {task_id}")
    return lines
