"""Secret scrubbing for anything that leaves the process: tracker hyperparameters, logs, reports.

Three kinds of secret are removed:

* values under secret-looking keys (keys ending with ``password``, ``token``, ``secret``,
  ``api_key``, ``access_key``, ``private_key``, ``credentials`` ...; not ``token_seed``),
  replaced by ``***``;
* passwords inside URLs: ``postgresql://user:pw@host/db`` -> ``postgresql://user:***@host/db``
  (the password runs to the last ``@``, so it may hold ``/`` and ``@``), and secret query
  parameters (``?token=...``);
* the literal values of secret-looking environment variables (``HF_TOKEN``, ``PGPASSWORD``,
  ``CLEARML_API_SECRET_KEY`` ...) wherever they appear inside a string; numbers and short
  strings are never hunted as literals (they occur inside unrelated text and numbers).

``data.token`` is the DreamBooth identifier (``sks``), not a credential, so it is kept.

Example:
    >>> scrub_secrets({"db": "postgresql://u:pw@h/db", "api_key": "abc", "rank": 4})
    {'db': 'postgresql://u:***@h/db', 'api_key': '***', 'rank': 4}
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Collection, Iterable, Mapping
from typing import Any

__all__ = [
    "DEFAULT_KEEP_PATHS",
    "MASK",
    "RedactingFilter",
    "install_log_redaction",
    "is_secret_key",
    "redact_text",
    "scrub_secrets",
    "secret_values",
]

MASK = "***"

DEFAULT_KEEP_PATHS: frozenset[str] = frozenset({"data.token"})
"""Dotted paths whose keys look secret but are not (the DreamBooth identifier token)."""

_SECRET_WORDS = (
    r"password|passwd|pwd|pass|pgpassword|secret|token|api_?key|apikey|access_?key|secret_?key|"
    r"private_?key|credentials?|auth|authorization|session_?key|signature"
)
# A key names a secret when it ENDS with a secret word (whole words): ``hf_token``,
# ``DB-PASSWORD``, ``secretKey``, ``AWS_SECRET_ACCESS_KEY``. A secret word elsewhere describes
# something else: ``token_seed`` (an integer), ``password_file`` (a path), ``SSH_AUTH_SOCK``.
_SECRET_KEY_RE = re.compile(rf"(?:^|[_\-.\s])(?:{_SECRET_WORDS})$", re.IGNORECASE)
_CAMEL_RE = re.compile(r"(?<=[a-z0-9])(?=[A-Z])")
# scheme://user:password@host (user may be empty: redis://:pw@host). The password runs to the
# LAST "@" of the URL: it may hold "/" (sqlalchemy's make_url reads "Xy7/kP+q9Lm2") and "@"
# (urllib.parse.urlsplit reads "p@ss"); stopping at the first one would leave the rest in clear. It never
# crosses whitespace, quotes or brackets, so a URL inside JSON or a sentence ends where its
# string does (``{"db": "pg://u:pw@h", "mail": "me@x.org"}`` masks ``pw`` only). At most 256
# characters: an unbounded run made long "x://u:x://u:..." texts take quadratic time.
_URL_PASSWORD_RE = re.compile(
    r"(?P<head>\b[A-Za-z][A-Za-z0-9+.\-]*://[^\s:/@\"'`<>]*:)(?P<pw>[^\s\"'`<>]{1,256})@"
)
_QUERY_SECRET_RE = re.compile(
    rf"(?P<head>[?&;](?:[\w\-]*?)(?:{_SECRET_WORDS})=)(?P<val>[^&;#\s]+)", re.I
)
_MIN_ENV_LITERAL_LEN = 6
_NOT_SECRET_VALUES = frozenset({"true", "false", "none", "null", "yes", "no", "on", "off"})
# What a JSON number (or a date, a version) is made of: such a literal also occurs inside
# unrelated numbers ("2024" in 1.2024, in timestamps), and masking it there breaks the JSON.
_NUMBER_LIKE_RE = re.compile(r"[\d.eE+\-:_/ ]+")
# Environment variables whose names contain a secret word but whose values are locations: masking
# them would replace the working directory (PWD) or a socket path everywhere in logs and zips.
_NOT_SECRET_ENV = frozenset({"PWD", "OLDPWD", "SSH_AUTH_SOCK", "GPG_AGENT_INFO", "XAUTHORITY"})


def _plausible_secret(value: object) -> bool:
    """Whether ``value`` may be masked wherever it occurs as a literal substring.

    Literals are replaced in free text and in the JSON files of offline sessions, so only strings
    that cannot stand for something else qualify: not numbers or number-like strings (``2024``
    would turn ``1.2024`` into ``1.***``), not short strings, not flags like
    ``HF_HUB_DISABLE_TOKEN=true``. Values under secret keys are still masked by key; URL passwords
    are still masked inside their URLs.
    """
    if not isinstance(value, str):
        return False
    value = value.strip()
    return (
        len(value) >= _MIN_ENV_LITERAL_LEN
        and value.lower() not in _NOT_SECRET_VALUES
        and not _NUMBER_LIKE_RE.fullmatch(value)
    )


def is_secret_key(key: object) -> bool:
    """True when a mapping key names a credential (``password``, ``hf_token``, ``apiKey``...).

    The key's last words decide: ``token_seed`` or ``password_file`` name no credential.
    """
    if not isinstance(key, str):
        return False
    normalized = _CAMEL_RE.sub("_", key.strip())
    return bool(_SECRET_KEY_RE.search(normalized))


def secret_values(environ: Mapping[str, str] | None = None) -> set[str]:
    """Literal secret strings found in the environment (values of secret-looking variables and
    passwords embedded in URLs of any variable)."""
    env = os.environ if environ is None else environ
    found: set[str] = set()
    for name, value in env.items():
        if not value:
            continue
        if name.upper() in _NOT_SECRET_ENV:
            continue
        if is_secret_key(name) and _plausible_secret(value):
            found.add(value)
        found.update(
            m["pw"] for m in _URL_PASSWORD_RE.finditer(value) if _plausible_secret(m["pw"])
        )
    return found


def redact_text(text: str, extra_secrets: Iterable[str] = ()) -> str:
    """Mask URL passwords, secret query parameters, environment secrets and ``extra_secrets``."""
    text = _URL_PASSWORD_RE.sub(lambda m: f"{m['head']}{MASK}@", text)
    text = _QUERY_SECRET_RE.sub(lambda m: f"{m['head']}{MASK}", text)
    literals = secret_values() | {s for s in extra_secrets if _plausible_secret(s)}
    for literal in sorted(literals, key=len, reverse=True):
        if literal in text:
            text = text.replace(literal, MASK)
    return text


def scrub_secrets(obj: Any, *, keep_paths: Collection[str] = DEFAULT_KEEP_PATHS) -> Any:
    """A copy of ``obj`` (nested mappings, lists, tuples, strings) with secrets masked.

    Mappings come back as ``dict``; other leaves are returned unchanged. ``keep_paths`` lists
    dotted key paths that are kept although their key looks secret.
    """
    env_secrets = secret_values()
    return _scrub(obj, (), frozenset(keep_paths), env_secrets)


def _scrub(obj: Any, path: tuple[str, ...], keep: frozenset[str], env: set[str]) -> Any:
    if isinstance(obj, Mapping):
        out: dict[Any, Any] = {}
        for key, value in obj.items():
            sub = (*path, str(key))
            if is_secret_key(key) and ".".join(sub) not in keep and value not in (None, ""):
                out[key] = MASK
            else:
                out[key] = _scrub(value, sub, keep, env)
        return out
    if isinstance(obj, str):
        return redact_text(obj, env) if obj else obj
    if isinstance(obj, list):
        return [_scrub(v, path, keep, env) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_scrub(v, path, keep, env) for v in obj)
    return obj


def collect_secret_literals(
    obj: Any, *, keep_paths: Collection[str] = DEFAULT_KEEP_PATHS
) -> set[str]:
    """The literal secret strings inside ``obj``, to mask wherever they occur (log lines, session
    files): strings under secret keys and URL or query passwords, numbers and short strings left
    out (see :func:`_plausible_secret`)."""
    found: set[str] = set()
    keep = frozenset(keep_paths)

    def walk(value: Any, path: tuple[str, ...]) -> None:
        if isinstance(value, Mapping):
            for key, sub in value.items():
                sub_path = (*path, str(key))
                if is_secret_key(key) and ".".join(sub_path) not in keep and _plausible_secret(sub):
                    found.add(sub)
                walk(sub, sub_path)
        elif isinstance(value, str):
            found.update(m["pw"] for m in _URL_PASSWORD_RE.finditer(value))
            found.update(m["val"] for m in _QUERY_SECRET_RE.finditer(value))
        elif isinstance(value, list | tuple):
            for item in value:
                walk(item, path)

    walk(obj, ())
    return {s for s in found if _plausible_secret(s)}


class RedactingFilter(logging.Filter):
    """Logging filter that masks secrets in every record it sees (attach it to handlers).

    The message (arguments included), a traceback and a stack trace are masked; the record is
    changed in place, so every later handler sees the masked text.

    Example:
        >>> handler = logging.StreamHandler()
        >>> handler.addFilter(RedactingFilter())
    """

    def __init__(self, extra_secrets: Iterable[str] = ()) -> None:
        super().__init__()
        self.extra_secrets = set(extra_secrets)

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        redacted = redact_text(message, self.extra_secrets)
        if redacted != message:
            record.msg, record.args = redacted, None
        if record.exc_info and not record.exc_text:
            # What logging.Formatter.format would cache on the record, masked first.
            record.exc_text = _TRACEBACK_FORMATTER.formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact_text(record.exc_text, self.extra_secrets)
        if record.stack_info:
            record.stack_info = redact_text(record.stack_info, self.extra_secrets)
        return True


_TRACEBACK_FORMATTER = logging.Formatter()


def install_log_redaction() -> None:
    """Mask secrets in every log line: add a :class:`RedactingFilter` to the root logger's handlers.

    Call it once logging is configured (after ``logging.basicConfig``): records of every logger
    propagate to these handlers, and a handler filter sees them all (a logger filter would only
    see that logger's own records). Idempotent: a handler that already has a
    :class:`RedactingFilter` gets no second one. Handlers added later are not covered.

    Example:
        >>> logging.basicConfig(level=logging.INFO)
        >>> install_log_redaction()
        >>> logging.getLogger("db").info("postgresql://u:pw@h/db")  # doctest: +SKIP
        INFO:db:postgresql://u:***@h/db
    """
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, RedactingFilter) for f in handler.filters):
            handler.addFilter(RedactingFilter())
