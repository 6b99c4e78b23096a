"""Secrets (a password inside a database URL, a token in the environment) leak nowhere."""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from harness.config import TrackingConfig
from harness.tracking import (
    RedactingFilter,
    create_tracker,
    install_log_redaction,
    is_secret_key,
    redact_text,
    scrub_secrets,
)

DB_PASSWORD = "Pw-in-url-7f3a9"
ENV_TOKEN = "hf_EnvTokenValue0123456789"
API_KEY = "sk-config-api-key-4242"


@pytest.mark.parametrize(
    ("key", "secret"),
    [
        ("password", True),
        ("DB_PASSWORD", True),
        ("hf_token", True),
        ("apiKey", True),
        ("api_key", True),
        ("aws_secret_access_key", True),
        ("credentials", True),
        ("token", True),
        ("tokenizer", False),
        ("max_tokens", False),
        ("learning_rate", False),
        ("author", False),
    ],
)
def test_is_secret_key(key: str, secret: bool) -> None:
    assert is_secret_key(key) is secret


def test_scrub_secrets_masks_keys_urls_and_env_values(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_TOKEN", ENV_TOKEN)
    monkeypatch.setenv("HF_HUB_DISABLE_TOKEN", "true")  # a flag, not a secret
    config = {
        "db": {"url": f"postgresql://optuna:{DB_PASSWORD}@db:5432/study", "password": "x"},
        "hub": {"token": ENV_TOKEN, "api_key": API_KEY, "empty_token": None},
        "data": {"token": "sks", "subject": "dog"},
        "notes": [f"pulled with {ENV_TOKEN}", "https://h/x?access_token=abc123&page=2", True],
        "pair": ("redis://:redispw@cache:6379", 3),
    }
    assert scrub_secrets(config) == {
        "db": {"url": "postgresql://optuna:***@db:5432/study", "password": "***"},
        "hub": {"token": "***", "api_key": "***", "empty_token": None},
        "data": {"token": "sks", "subject": "dog"},
        "notes": ["pulled with ***", "https://h/x?access_token=***&page=2", True],
        "pair": ("redis://:***@cache:6379", 3),
    }
    assert config["hub"]["token"] == ENV_TOKEN  # input untouched
    assert redact_text("flag is true") == "flag is true"


def test_redacting_filter_masks_log_records(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("GITHUB_TOKEN", ENV_TOKEN)
    logger = logging.getLogger("harness.test.redact")
    logger.addFilter(RedactingFilter())
    try:
        with caplog.at_level(logging.INFO, logger="harness.test.redact"):
            logger.info("db %s token %s", f"mysql://u:{DB_PASSWORD}@h/db", ENV_TOKEN)
    finally:
        logger.filters.clear()
    assert DB_PASSWORD not in caplog.text and ENV_TOKEN not in caplog.text
    assert "mysql://u:***@h/db" in caplog.text


@pytest.fixture
def root_handler() -> Iterator[tuple[logging.Handler, io.StringIO]]:
    """A root-logger handler writing to a string, as ``logging.basicConfig`` would install;
    every root handler's filters are restored afterwards."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    before = {h: list(h.filters) for h in root.handlers}
    root.addHandler(handler)
    try:
        yield handler, stream
    finally:
        root.removeHandler(handler)
        for other, filters in before.items():
            other.filters[:] = filters


def test_install_log_redaction_masks_every_logger(
    monkeypatch: pytest.MonkeyPatch, root_handler: tuple[logging.Handler, io.StringIO]
) -> None:
    handler, stream = root_handler
    monkeypatch.setenv("HF_TOKEN", ENV_TOKEN)
    install_log_redaction()
    install_log_redaction()  # idempotent
    assert sum(isinstance(f, RedactingFilter) for f in handler.filters) == 1
    logger = logging.getLogger("harness.test.install")  # no filter of its own: propagates
    logger.setLevel(logging.INFO)
    try:
        logger.info("storage %s, token %s", f"postgresql://optuna:{DB_PASSWORD}@db/x", ENV_TOKEN)
        try:
            raise RuntimeError(f"cannot connect to redis://:{DB_PASSWORD}@cache:6379")
        except RuntimeError:
            logger.exception("failed with %s", ENV_TOKEN)
    finally:
        logger.setLevel(logging.NOTSET)
    text = stream.getvalue()
    assert DB_PASSWORD not in text and ENV_TOKEN not in text
    assert "INFO harness.test.install: storage postgresql://optuna:***@db/x, token ***" in text
    assert "ERROR harness.test.install: failed with ***" in text
    assert "RuntimeError: cannot connect to redis://:***@cache:6379" in text


def test_no_secret_in_offline_zip_folder_index_or_logs(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
    read_zip: Any,
) -> None:
    monkeypatch.delenv("CLEARML_OFFLINE_MODE", raising=False)
    monkeypatch.setenv("HF_TOKEN", ENV_TOKEN)
    monkeypatch.setenv("OPTUNA_STORAGE", f"postgresql://optuna:{DB_PASSWORD}@db/study")
    config = {
        "sweep": {"storage": f"postgresql://optuna:{DB_PASSWORD}@db/study"},
        "hub": {"api_key": API_KEY},
        "train": {"rank": 4},
    }
    secrets = [DB_PASSWORD, ENV_TOKEN, API_KEY]
    with caplog.at_level(logging.DEBUG, logger="harness.tracking"):
        tracker = create_tracker(TrackingConfig(), tmp_path)
        run = tracker.start_run(
            f"trial-{DB_PASSWORD}", config=config, tags=[f"storage:{ENV_TOKEN}"], project="p"
        )
        run.log_text(f"using {ENV_TOKEN} and {API_KEY}")
        print(f"third-party code prints postgresql://optuna:{DB_PASSWORD}@db/study {ENV_TOKEN}")
        run.log_scalar("loss", "train", 0.5, 1)
        zip_path = run.close()
    assert zip_path is not None
    printed = capsys.readouterr()

    members = read_zip(zip_path)
    assert {"task.json", "metrics.jsonl", "log.jsonl"} <= set(members)
    assert b"optuna:***@db/study" in members["task.json"]
    for secret in secrets:
        needle = secret.encode()
        assert not [name for name, data in members.items() if needle in data], secret
        for file in (tmp_path / "runs").rglob("*"):
            assert not file.is_file() or needle not in file.read_bytes(), (secret, file)
        assert secret not in caplog.text
        assert secret not in printed.err  # ClearML's own console lines, our warnings
    assert b"using *** and ***" in members["log.jsonl"]
