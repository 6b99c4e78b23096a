"""The report as plain objects: a :class:`Report` of :class:`Section` s holding paragraphs,
:class:`Table` s and :class:`Figure` s, and the one number format every renderer uses.

:mod:`harness.report.html` and :mod:`harness.report.markdown` render the same objects with
:func:`format_value`, so a number reads the same in ``index.html``, in ``summary.md`` and in the
results table it comes from (rounded alike: :data:`DIGITS` decimals for scores).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd

__all__ = [
    "DIGITS",
    "Figure",
    "Kind",
    "Report",
    "Section",
    "Table",
    "format_value",
    "is_missing",
]

DIGITS = 3  # decimals of every score, interval bound, difference and importance
MISSING = "–"  # a value that was not measured or recorded
Kind = Literal["score", "signed", "int", "seconds", "mib", "setting", "text"]


def is_missing(value: Any) -> bool:
    """None, NaN or pandas' NA (a list or a string is never missing)."""
    if value is None:
        return True
    if isinstance(value, float):
        return math.isnan(value)
    try:
        return bool(pd.isna(value))
    except (TypeError, ValueError):
        return False


def format_value(value: Any, kind: Kind = "text") -> str:
    """The text of one number or value: ``score`` ``0.821``, ``signed`` ``+0.004``, ``int``,
    ``seconds`` / ``mib`` with one decimal, ``setting`` (a configured value such as a learning
    rate) with 6 significant digits, ``text`` as is; booleans are ``yes``/``no``."""
    if is_missing(value):
        return MISSING
    if isinstance(value, np.generic):
        value = value.item()  # numpy scalars format as their Python kind
    if isinstance(value, bool):
        return "yes" if value else "no"
    if kind == "text" or not isinstance(value, int | float):
        return str(value)
    number = float(value)
    if kind in ("score", "signed") and math.isfinite(number):
        number = round(number, DIGITS) + 0.0  # no "-0.000": a rounded zero has no sign
    if kind == "setting":
        return str(value) if isinstance(value, int) else f"{number:g}"
    if kind == "score":
        return f"{number:.{DIGITS}f}"
    if kind == "signed":
        return f"{number:+.{DIGITS}f}"
    if kind == "int":
        return str(round(number))
    return f"{number:.1f}"


def default_kind(column: str, value: Any) -> Kind:
    """The kind a column gets when its table names none: by its name, else by its values."""
    if column.startswith(("shrinkage.", "shrinkage_base.", "selection_bias.", "diff.")):
        return "signed"
    if column.endswith("_s") or column.endswith("_s_per_point"):
        return "seconds"
    if column.endswith("_mib"):
        return "mib"
    if isinstance(value, bool) or not isinstance(value, int | float):
        return "text"
    return "int" if isinstance(value, int) else "score"


@dataclass
class Table:
    """One table: the raw values (``frame``, one row per line) and how to show them.

    A shown column ``c`` whose frame also has ``c_lo`` and ``c_hi`` is shown with that 95%
    interval. ``key`` names the column identifying a row (renderers mark rows with it).
    """

    frame: pd.DataFrame
    columns: list[str]
    labels: dict[str, str] = field(default_factory=dict)
    kinds: dict[str, Kind] = field(default_factory=dict)
    key: str | None = None
    caption: str = ""
    collapsed: bool = False  # shown folded (HTML ``<details>``), e.g. a long list of settings

    def label(self, column: str) -> str:
        """The column's heading."""
        return self.labels.get(column, column)

    def kind(self, column: str) -> Kind:
        """The column's number kind: given, or from its name and first present value."""
        if column in self.kinds:
            return self.kinds[column]
        present = (
            [v for v in self.frame[column] if not is_missing(v)] if column in self.frame else []
        )
        value = present[0] if present else None
        if isinstance(value, np.generic):
            value = value.item()  # numpy scalars: their Python kind
        return default_kind(column, value)

    def shown(self) -> pd.DataFrame:
        """The frame's shown columns with their interval bounds, in order."""
        wanted = [c for s in self.columns for c in (s, f"{s}_lo", f"{s}_hi") if c in self.frame]
        return self.frame[wanted].reset_index(drop=True)

    def records(self) -> list[dict[str, Any]]:
        """The rows as dicts (every frame column)."""
        return list(self.frame.to_dict(orient="records"))

    def cell(self, row: Mapping[str, Any], column: str) -> str:
        """The text of ``row``'s value in ``column``."""
        return format_value(row.get(column), self.kind(column))

    def interval(self, row: Mapping[str, Any], column: str) -> tuple[str, str] | None:
        """``(lo, hi)`` texts of ``column``'s interval, or None when it has none."""
        lo, hi = f"{column}_lo", f"{column}_hi"
        if lo not in self.frame or hi not in self.frame:
            return None
        if is_missing(row.get(lo)) and is_missing(row.get(hi)):
            return None
        kind = self.kind(column)
        return format_value(row.get(lo), kind), format_value(row.get(hi), kind)


@dataclass
class Figure:
    """A figure: an inline PNG (``png``) or an image file (``path``, embedded or linked), with
    the manifest of an image grid when it has one."""

    title: str
    png: bytes | None = None
    path: Path | None = None
    manifest: Path | None = None
    kind: str = ""


@dataclass
class Section:
    """One ``<section id=...>`` of the report. Paragraphs are plain text; a word in backticks
    is code."""

    id: str
    title: str
    paragraphs: list[str] = field(default_factory=list)
    tables: list[Table] = field(default_factory=list)
    figures: list[Figure] = field(default_factory=list)


@dataclass
class Report:
    """The whole report: title, header facts (study, preset, ...), sections in order, and the
    leaderboard frame the tracker logs."""

    title: str
    header: dict[str, str]
    sections: list[Section]
    leaderboard: pd.DataFrame = field(default_factory=pd.DataFrame)

    def section(self, section_id: str) -> Section:
        """The section with ``section_id``."""
        for section in self.sections:
            if section.id == section_id:
                return section
        raise KeyError(section_id)
