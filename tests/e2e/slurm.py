"""A real one-node SLURM cluster for the tests: slurmctld and slurmd on 127.0.0.1, started from a
generated slurm.conf in a temporary folder and shut down afterwards (Debian's ``slurm-wlm``;
no munge, no cgroups: ``auth/none``, ``proctrack/pgid``)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

BINARIES = ("slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "sinfo")


@dataclass(frozen=True)
class Slurm:
    """A running cluster: its config file (``SLURM_CONF``) and folder."""

    conf: Path
    folder: Path

    def env(self) -> dict[str, str]:
        return {"SLURM_CONF": str(self.conf)}

    def run(self, *args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            list(args),
            env={**os.environ, **self.env()},
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def jobs(self) -> list[str]:
        """Lines of ``squeue`` (pending or running jobs)."""
        out = self.run("squeue", "-h", "-o", "%i %T").stdout
        return [line for line in out.splitlines() if line.strip()]


def missing_reason() -> str | None:
    """Why no cluster can start here, or None."""
    absent = [b for b in BINARIES if shutil.which(b) is None]
    if absent:
        return f"SLURM binaries not installed ({', '.join(absent)}): apt-get install slurm-wlm"
    return None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _node_line() -> str:
    """slurmd's own view of this machine (so the node is not drained as misconfigured)."""
    out = subprocess.run(["slurmd", "-C"], capture_output=True, text=True, timeout=30).stdout
    line = next((x for x in out.splitlines() if x.startswith("NodeName=")), "")
    return f"{line} NodeAddr=127.0.0.1 State=UNKNOWN"


def _config(folder: Path, host: str, user: str) -> str:
    return "\n".join(
        [
            "ClusterName=harness-test",
            f"SlurmctldHost={host}(127.0.0.1)",
            f"SlurmctldPort={_free_port()}",
            f"SlurmdPort={_free_port()}",
            "AuthType=auth/none",
            "CredType=cred/none",
            f"SlurmUser={user}",
            f"SlurmdUser={user}",
            f"StateSaveLocation={folder / 'state'}",
            f"SlurmdSpoolDir={folder / 'spool'}",
            f"SlurmctldPidFile={folder / 'slurmctld.pid'}",
            f"SlurmdPidFile={folder / 'slurmd.pid'}",
            f"SlurmctldLogFile={folder / 'slurmctld.log'}",
            f"SlurmdLogFile={folder / 'slurmd.log'}",
            "ProctrackType=proctrack/pgid",
            "TaskPlugin=task/none",
            "JobAcctGatherType=jobacct_gather/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_CPU",
            "ReturnToService=2",
            "MpiDefault=none",
            "SchedulerType=sched/backfill",
            _node_line(),
            f"PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP "
            "OverSubscribe=FORCE:4",
            "",
        ]
    )


@contextmanager
def slurm_cluster(timeout: float = 60) -> Iterator[Slurm]:
    """Start the cluster; raise RuntimeError with the daemons' last log lines if it does not
    come up (the caller turns that into a skip naming the reason)."""
    folder = Path(tempfile.mkdtemp(prefix="harness-slurm-"))
    (folder / "state").mkdir()
    (folder / "spool").mkdir()
    host = socket.gethostname().split(".")[0]
    user = os.environ.get("USER") or ("root" if os.geteuid() == 0 else str(os.geteuid()))
    if os.geteuid() == 0:
        user = "root"
    conf = folder / "slurm.conf"
    conf.write_text(_config(folder, host, user), encoding="utf-8")
    slurm = Slurm(conf, folder)
    try:
        for daemon in (["slurmctld", "-i"], ["slurmd"]):
            started = slurm.run(daemon[0], "-f", str(conf), *daemon[1:])
            if started.returncode != 0:
                raise RuntimeError(f"{daemon[0]} failed: {started.stderr.strip()[-500:]}")
            time.sleep(0.5)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            state = slurm.run("sinfo", "-h", "-o", "%T").stdout.strip()
            if state in ("idle", "mixed", "allocated"):
                break
            time.sleep(0.5)
        else:
            logs = "".join(
                (folder / name).read_text()[-800:]
                for name in ("slurmctld.log", "slurmd.log")
                if (folder / name).is_file()
            )
            raise RuntimeError(f"the SLURM node did not become idle (sinfo: {state!r}): {logs}")
        yield slurm
    finally:
        slurm.run("scontrol", "shutdown")
        for pid_file in ("slurmd.pid", "slurmctld.pid"):
            path = folder / pid_file
            if path.is_file():
                with suppress(ValueError, ProcessLookupError, PermissionError):
                    os.kill(int(path.read_text().strip()), 9)
        shutil.rmtree(folder, ignore_errors=True)
