"""Fixtures of the report tests: the synthetic project, a stub grids module, and a parser
that reads the report page back."""

from __future__ import annotations

import sys
import types
from collections.abc import Callable, Iterator
from html.parser import HTMLParser
from pathlib import Path

import pytest

from harness.config import HarnessConfig

from .synthetic import FakeGrid, Project, make_cfg, write_project


@pytest.fixture
def project(tmp_path: Path) -> Project:
    """The synthetic project with per-image scores."""
    return write_project(tmp_path, make_cfg())


@pytest.fixture
def fake_grids(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., None]]:
    """``harness.report.grids`` replaced by a stub (no grid unless a test asks for some), so
    the report tests neither depend on nor break with the real module (whose own tests are in
    test_grids.py); request it (``pytestmark = pytest.mark.usefixtures("fake_grids")``)."""
    module = types.ModuleType("harness.report.grids")
    made: list[Callable[[HarnessConfig, Path, Path], list[FakeGrid]]] = []

    def make_grids(cfg: HarnessConfig, root: Path, out_dir: Path) -> list[FakeGrid]:
        return made[0](cfg, root, out_dir) if made else []

    module.make_grids = make_grids  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "harness.report.grids", module)
    yield made.append


class _ReportParser(HTMLParser):
    """Reads the report page back: section ids, headings, and per section the table cells as
    ``{(row key, data-col): text}`` (the number as shown; the first table of a section wins
    where two show the same cell)."""

    def __init__(self) -> None:
        super().__init__()
        self.sections: dict[str, dict[tuple[str, str], str]] = {}
        self.headings: dict[str, str] = {}
        self.images: list[str] = []
        self.links: list[str] = []
        self._section: str | None = None
        self._key: str | None = None
        self._cells: list[tuple[str, list[str]]] = []  # open data-col spans: (column, text)
        self._heading: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = dict(attrs)
        if tag == "section":
            self._section = values.get("id") or ""
            self.sections[self._section] = {}
        elif tag == "tr":
            self._key = values.get("data-key")
        elif tag == "h2" and self._section is not None:
            self._heading = []
        elif tag == "img":
            self.images.append(values.get("src") or "")
        elif tag == "a":
            self.links.append(values.get("href") or "")
        elif tag == "span" and values.get("data-col"):
            self._cells.append((str(values["data-col"]), []))

    def handle_endtag(self, tag: str) -> None:
        if tag == "span" and self._cells and self._section is not None:
            column, text = self._cells.pop()
            self.sections[self._section].setdefault((str(self._key), column), "".join(text))
        elif tag == "h2" and self._section is not None and self._heading is not None:
            self.headings[self._section] = "".join(self._heading)
            self._heading = None
        elif tag == "section":
            self._section = None

    def handle_data(self, data: str) -> None:
        if self._heading is not None:
            self._heading.append(data)
        if self._cells:
            self._cells[-1][1].append(data)


@pytest.fixture
def parse_report() -> Callable[[str], _ReportParser]:
    """``parse(html) -> parser`` with ``sections``, ``headings``, ``images`` and ``links``."""

    def parse(text: str) -> _ReportParser:
        parser = _ReportParser()
        parser.feed(text)
        return parser

    return parse
