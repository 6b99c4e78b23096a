"""The DVC stages as plain functions (the CLI and ``dvc.yaml`` call these, nothing else).

``resolve``
    always runs (cheap): writes each resolved config section to ``runs/resolved/<section>.json``
    and a fingerprint of the subject's raw photos to ``runs/resolved/source.json``. Later stages
    depend on these files, so DVC reruns exactly the stages whose inputs really changed, whether
    the change came from ``params.yaml``, a preset in ``experiments/`` or new photos.
``prepare``
    the dataset stage (:mod:`harness.data`).
``sweep``
    the Optuna sweep (:mod:`harness.sweep`) with the real backend.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from harness.config import HarnessConfig

__all__ = [
    "RESOLVED_DIR",
    "prepared_subject_dir",
    "run_prepare",
    "run_resolve",
    "run_sweep_stage",
    "run_train",
]

logger = logging.getLogger(__name__)
RESOLVED_DIR = "runs/resolved"
SECTIONS = ("model", "data", "train", "eval", "metrics", "sweep", "tracking")


def _write_json(path: Path, data: Any) -> None:
    """Deterministic JSON, rewritten only when the content changes."""
    text = json.dumps(data, indent=2, sort_keys=True) + "\n"
    if not path.is_file() or path.read_text(encoding="utf-8") != text:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")


def run_resolve(cfg: HarnessConfig, root: Path, out_dir: Path | None = None) -> Path:
    """Write the resolved config sections (secrets masked) and the raw-photo fingerprint."""
    from harness.data import scan_source
    from harness.tracking import scrub_secrets

    out = out_dir or root / RESOLVED_DIR
    data = scrub_secrets(cfg.to_dict())
    for section in SECTIONS:
        _write_json(out / f"{section}.json", {"seed": data["seed"], section: data[section]})
    _write_json(out / "source.json", scan_source(cfg.data, root))
    return out


def prepared_subject_dir(cfg: HarnessConfig, root: Path) -> Path:
    """``<prepared_dir>/<subject>`` of the config."""
    return root / cfg.data.prepared_dir / cfg.data.subject


def run_prepare(cfg: HarnessConfig, root: Path, progress: bool = True) -> Any:
    """Prepare the configured subject (see :func:`harness.data.prepare_subject`)."""
    from harness.data import prepare_subject

    return prepare_subject(cfg.data, root, progress=progress)


def _load_model_and_subject(cfg: HarnessConfig, root: Path) -> tuple[Any, Any]:
    from harness.data import load_prepared
    from harness.models import load_pipeline

    subject = load_prepared(prepared_subject_dir(cfg, root))  # fails fast, before the model
    return load_pipeline(cfg.model), subject


def run_train(cfg: HarnessConfig, root: Path, run_dir: Path | None = None) -> Any:
    """One training run with the configured settings (``harness train``)."""
    from harness.tracking import create_tracker, default_tags
    from harness.train import train_lora

    loaded, subject = _load_model_and_subject(cfg, root)
    run_dir = run_dir or root / cfg.train.output_dir
    pairs = list(zip(subject.train_paths, subject.train_captions, strict=True))
    tracker = create_tracker(cfg.tracking, root)
    config = cfg.to_dict()
    with tracker.start_run(
        f"train/{cfg.data.subject}", config=config, tags=default_tags(config)
    ) as run:

        def on_log(record: dict[str, Any], step: int) -> None:
            run.log_scalars(record, step, title="train")

        result = train_lora(cfg, loaded, pairs, run_dir, on_log=on_log)
        for ckpt in result.checkpoints:
            run.upload_artifact(f"lora-step-{ckpt.step}", ckpt.weights_path)
    return result


def run_sweep_stage(cfg: HarnessConfig, root: Path, progress: bool = True) -> Any:
    """The sweep with the real backend: one loaded pipeline and scorer per worker."""
    from harness.evaluate import make_scorer
    from harness.sweep import run_sweep
    from harness.sweep.backend import HarnessBackend
    from harness.sweep.study import open_studies
    from harness.sweep.summary import publish_summary
    from harness.tracking import create_tracker

    open_studies(cfg, root)  # a mismatched resume fails here, before any model loads
    loaded, subject = _load_model_and_subject(cfg, root)
    scorer = make_scorer(cfg, device=str(loaded.device))
    backend = HarnessBackend(cfg, loaded, subject, scorer, progress=progress)
    tracker = create_tracker(cfg.tracking, root)
    summary = run_sweep(cfg, root, backend, tracker)
    references = backend.references(cfg, root / cfg.sweep.dir / "references")
    publish_summary(cfg, root, summary, tracker, references)
    return summary
