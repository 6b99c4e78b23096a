"""A study database written by an older Optuna (its schema needs ``optuna storage upgrade``) is
one error naming ``sweep.storage`` and the command that upgrades it, on every path that opens
the storage (a sweep, ``sweep status`` and the report), not Optuna's RuntimeError traceback."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from harness.sweep import open_studies
from harness.sweep.study import SweepError, existing_studies, storage_url

from .test_sweep_logic import make_cfg


def _downgrade(database: Path) -> None:
    """Mark the schema as Optuna 3.0's (a revision Optuna knows and can upgrade from)."""
    with sqlite3.connect(database) as db:
        db.execute("UPDATE alembic_version SET version_num = 'v3.0.0.d'")
        db.execute("UPDATE version_info SET library_version = '3.0.6'")


@pytest.mark.parametrize("opener", [open_studies, existing_studies])
def test_a_study_database_of_an_older_optuna_names_the_upgrade(
    tmp_path: Path, opener: object
) -> None:
    cfg = make_cfg(tmp_path)
    studies = open_studies(cfg, tmp_path)
    url = studies.storage_url
    assert url == storage_url(cfg, tmp_path) and url.startswith("sqlite:///")
    _downgrade(Path(url.removeprefix("sqlite:///")))
    with pytest.raises(SweepError) as err:
        opener(cfg, tmp_path)  # type: ignore[operator]
    message = str(err.value)
    assert message.startswith("sweep.storage: ")
    assert "optuna storage upgrade --storage" in message and "3.0.6" in message
