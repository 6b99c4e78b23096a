"""The base of every config section and the errors they raise."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict

from harness.errors import HarnessError


class ConfigError(HarnessError, ValueError):
    """A configuration problem; its message names the file and the key path of each error."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("\n".join(problems))


class _KeysError(ValueError):
    """A section-level check that names the keys it is about (dotted, relative to the section).

    The error is still reported at the section, but blamed on the file that set those keys last,
    not on whichever file happened to set some unrelated key of the same section.
    """

    def __init__(self, keys: tuple[str, ...], message: str) -> None:
        self.keys = keys
        super().__init__(message)


def _yaml_bool_word(value: Any, false_word: str, allowed: tuple[str, ...]) -> Any:
    """Give back the documented word for a YAML 1.1 boolean read from an unquoted word.

    YAML 1.1 reads an unquoted ``off`` or ``no`` as ``False``, so ``mode: off`` or
    ``-S train.mixed_precision=no`` arrive as ``False``; that is mapped to ``false_word``.
    ``True`` (an unquoted ``on``/``yes``/``true``) has no meaning here and stays an error that
    names the allowed values.
    """
    if value is False:
        return false_word
    if value is True:
        words = [repr(a) for a in allowed]
        listed = f"{', '.join(words[:-1])} or {words[-1]}" if len(words) > 1 else words[0]
        raise ValueError(
            f"must be one of {listed}, got True (YAML reads an unquoted on/yes/true as true)"
        )
    return value


class _Strict(BaseModel):
    """Base of every config section: immutable, no unknown keys, no silent type coercion."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)
