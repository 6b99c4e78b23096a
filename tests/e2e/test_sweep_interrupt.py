"""Issue 6: Ctrl-C / SIGTERM that lands while a proxy evaluation loads its checkpoint must stop
the sweep and re-queue the run, like anywhere else in the run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from optuna.trial import TrialState

from harness.config import load_config
from harness.data import load_prepared
from harness.evaluate import make_scorer
from harness.models import load_pipeline
from harness.stages import prepared_subject_dir
from harness.sweep import open_studies, run_sweep
from harness.sweep.backend import HarnessBackend

from ._helpers import clone_project


def test_interrupt_during_proxy_checkpoint_load_requeues_run(
    prepared_template: Path, tmp_path: Path
) -> None:
    root = clone_project(
        prepared_template,
        tmp_path / "project",
        {"sweep": {"study_name": "e2e-int", "n_trials": 1, "inference": {"lora_scale": [1.0]}}},
    )
    cfg = load_config(root / "params.yaml")
    loaded = load_pipeline(cfg.model)  # our own copy: this test leaves it half-loaded
    backend = HarnessBackend(
        cfg, loaded, load_prepared(prepared_subject_dir(cfg, root)), make_scorer(cfg), False
    )
    pipeline = loaded.pipeline
    original = pipeline.load_lora_weights

    def interrupted_load(*args: Any, **kwargs: Any) -> None:
        # The signal arrives once the UNet got its LoRA layers, before loading finished.
        pipeline.load_lora_into_unet = _raise_after(pipeline.load_lora_into_unet)
        original(*args, **kwargs)

    pipeline.load_lora_weights = interrupted_load
    with pytest.raises(KeyboardInterrupt):
        run_sweep(cfg, root, backend)
    runs = open_studies(cfg, root).runs.get_trials()
    assert [t.state for t in runs] == [TrialState.FAIL, TrialState.WAITING]
    assert runs[0].user_attrs.get("interrupted") is True
    assert "fail_reason" not in runs[0].user_attrs  # not counted as a failed run
    assert runs[1].user_attrs.get("retry_of") == 0


def _raise_after(fn: Any) -> Any:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        fn(*args, **kwargs)
        raise KeyboardInterrupt("signal 15")

    return wrapper
