"""What the report reads: the sweep's and the evaluate stage's outputs, and the run folders.

Only files (no study, no model): ``<sweep.dir>/results.parquet`` and ``metrics.json``,
``<evaluate.dir>/results.parquet`` and ``references.json``, the per-image score tables when
they exist (``per_image.parquet`` in both folders), and each training run's ``result.json`` and
``train_log.jsonl`` for its cost.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from harness.config import HarnessConfig
from harness.errors import HarnessError
from harness.outputs import read_json_object, read_table
from harness.sweep._base import run_folder
from harness.sweep.results import full_fidelity
from harness.sweep.summary import results_study

__all__ = [
    "PER_IMAGE",
    "ReportError",
    "ReportInputs",
    "load_inputs",
    "run_cost",
    "run_costs",
]

RESULTS = "results.parquet"
REFERENCES = "references.json"
SWEEP_METRICS = "metrics.json"
PER_IMAGE = "per_image.parquet"
EVALUATE_METRICS = "reports/metrics.json"  # harness.sweep.confirm.METRICS_FILE


class ReportError(HarnessError):
    """The report cannot be made: an input stage has not run (or ran for another study)."""


@dataclass
class ReportInputs:
    """Everything the report reads, loaded once."""

    sweep: pd.DataFrame
    evaluate: pd.DataFrame
    references: dict[str, Any]  # <evaluate.dir>/references.json: the fresh seeds' baseline
    sweep_metrics: dict[str, Any]  # <sweep.dir>/metrics.json: counts, the sweep seeds' baseline
    study: str
    per_image_eval: pd.DataFrame | None = None
    per_image_sweep: pd.DataFrame | None = None
    paths: dict[str, Path] = field(default_factory=dict)  # relative to the project root


def _read_json(path: Path, writer: str) -> dict[str, Any]:
    return read_json_object(path, writer, ReportError)


def _optional_parquet(path: Path, writer: str) -> pd.DataFrame | None:
    return read_table(path, writer, ReportError) if path.is_file() else None


def _required(path: Path, stage: str) -> Path:
    if not path.is_file():
        raise ReportError(
            f"{path}: no {stage} output; run `harness {stage}` first (`dvc repro` runs it)"
        )
    return path


def _study(swept: str | None, evaluate_metrics: dict[str, Any], cfg: HarnessConfig) -> str:
    """The study both tables belong to (as recorded with the sweep's tables and by the
    evaluate stage)."""
    confirmed = evaluate_metrics.get("study")
    if swept and confirmed and swept != confirmed:
        raise ReportError(
            f"{EVALUATE_METRICS}: the evaluate output is of study {confirmed!r} but the sweep "
            f"results are of study {swept!r}; run `harness evaluate` first (`dvc repro` does)"
        )
    return str(swept or confirmed or cfg.sweep.study_name)


def load_inputs(cfg: HarnessConfig, root: Path) -> ReportInputs:
    """Read the report's inputs.

    Raises:
        ReportError: the evaluate output (or the sweep's table) is missing or empty, or the
            two are of different studies.
    """
    sweep_dir, evaluate_dir = root / cfg.sweep.dir, root / cfg.evaluate.dir
    evaluate_path = _required(evaluate_dir / RESULTS, "evaluate")
    references_path = _required(evaluate_dir / REFERENCES, "evaluate")
    sweep_path = _required(sweep_dir / RESULTS, "sweep")
    evaluate = read_table(evaluate_path, "harness evaluate", ReportError)
    if evaluate.empty:
        raise ReportError(f"{evaluate_path}: no confirmed point; run `harness evaluate` first")
    sweep_metrics = _read_json(sweep_dir / SWEEP_METRICS, "harness sweep")
    swept = results_study(sweep_dir, ReportError)
    study = _study(swept, _read_json(root / EVALUATE_METRICS, "harness evaluate"), cfg)
    if "selection_rank" in evaluate:
        evaluate = evaluate.sort_values("selection_rank").reset_index(drop=True)
    return ReportInputs(
        # Full-fidelity points only: adaptive evaluation's cheap rungs rank nothing here.
        sweep=full_fidelity(read_table(sweep_path, "harness sweep", ReportError)),
        evaluate=evaluate,
        references=_read_json(references_path, "harness evaluate"),
        sweep_metrics=sweep_metrics,
        study=study,
        per_image_eval=_optional_parquet(evaluate_dir / PER_IMAGE, "harness evaluate"),
        per_image_sweep=_optional_parquet(sweep_dir / PER_IMAGE, "harness sweep"),
        paths={
            name: _relative(path, root)
            for name, path in (
                ("sweep", sweep_path),
                ("evaluate", evaluate_path),
                ("references", references_path),
                ("per_image_eval", evaluate_dir / PER_IMAGE),
                ("per_image_sweep", sweep_dir / PER_IMAGE),
            )
        },
    )


def _relative(path: Path, root: Path) -> Path:
    """``path`` relative to the project root when inside it (what the report names)."""
    try:
        return path.resolve().relative_to(root.resolve())
    except ValueError:
        return path


def _log_memory(path: Path) -> tuple[str | None, float | None]:
    """``(device, peak MiB)`` from a ``train_log.jsonl``: CUDA's peak allocation on a GPU, the
    process's largest resident size on a CPU; ``(None, None)`` when nothing is recorded."""
    if not path.is_file():
        return None, None
    cuda: list[float] = []
    rss: list[float] = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue  # a line being written
        for key, into in (("cuda_max_memory_mb", cuda), ("rss_mb", rss)):
            value = record.get(key) if isinstance(record, dict) else None
            if isinstance(value, int | float) and math.isfinite(value):
                into.append(float(value))
    if cuda:
        return "GPU", max(cuda)
    return ("CPU", max(rss)) if rss else (None, None)


def run_cost(run_dir: Path) -> dict[str, Any]:
    """One training run's recorded cost: ``train_s`` (wall time of its last training call,
    ``result.json``), ``processes``, ``device_s`` (wall time x processes), ``device`` and
    ``peak_mib``; None for what its folder does not record."""
    try:  # a run's own record: a damaged one costs the report its cost columns, no more
        result = read_json_object(run_dir / "result.json", "harness sweep", ReportError)
    except ReportError:
        result = {}
    wall = result.get("wall_s")
    processes = (result.get("info") or {}).get("num_processes") or 1
    device, peak = _log_memory(run_dir / "train_log.jsonl")
    train_s = float(wall) if isinstance(wall, int | float) and wall > 0 else None
    return {
        "train_s": train_s,
        "processes": int(processes) if train_s is not None else None,
        "device_s": train_s * int(processes) if train_s is not None else None,
        "device": device,
        "peak_mib": peak,
        "status": result.get("status"),
    }


def run_costs(cfg: HarnessConfig, root: Path, study: str, sweep: pd.DataFrame) -> pd.DataFrame:
    """Per training run of the sweep (``run_key``): its cost (:func:`run_cost`, from
    ``<sweep.dir>/runs/<study>/<run_key>``) and how many points it gave."""
    if sweep.empty or "run_key" not in sweep:
        return pd.DataFrame(columns=["run_key", "points_of_run"])
    counts = sweep.groupby("run_key").size()
    rows = []
    for key, points in counts.items():
        cost = run_cost(run_folder(root / cfg.sweep.dir, study, str(key)))
        per_point = cost["device_s"] / points if cost["device_s"] is not None else None
        rows.append(
            {"run_key": key, "points_of_run": int(points), **cost, "device_s_per_point": per_point}
        )
    return pd.DataFrame(rows)
