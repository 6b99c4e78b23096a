"""Code shape: no function in ``harness/`` or ``metrics/`` is longer than 60 lines, and every
``click.echo``/``typer.echo`` there names its stream.

A function's length runs from its ``def`` line to the last line of its body (decorators
excluded); a nested function counts inside its parent and is checked on its own too.
"""

from __future__ import annotations

import ast
from pathlib import Path

MAX_FUNCTION_LINES = 60
ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("harness", "metrics")


def long_functions(source: str, limit: int = MAX_FUNCTION_LINES) -> list[tuple[int, str, int]]:
    """``(line, name, length)`` of every function in ``source`` longer than ``limit`` lines."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            assert node.end_lineno is not None
            length = node.end_lineno - node.lineno + 1
            if length > limit:
                found.append((node.lineno, node.name, length))
    return sorted(found)


SAMPLE = """
@decorator
@another
def four():
    a = 1
    b = 2
    return a + b


class C:
    async def outer(self):
        def inner():
            c = 3
            d = 4
            return c + d

        return inner
"""


def test_length_runs_from_def_to_last_body_line() -> None:
    # Decorators do not count; a nested function counts inside its parent and on its own.
    assert long_functions(SAMPLE, limit=3) == [(4, "four", 4), (11, "outer", 7), (12, "inner", 4)]
    assert long_functions(SAMPLE, limit=4) == [(11, "outer", 7)]


def test_no_function_over_60_lines() -> None:
    files = sorted(p for package in PACKAGES for p in (ROOT / package).rglob("*.py"))
    assert files, "no Python files found under harness/ or metrics/"
    offenders = [
        f"{path.relative_to(ROOT).as_posix()}:{line} {name} ({length} lines)"
        for path in files
        for line, name, length in long_functions(path.read_text(encoding="utf-8"))
    ]
    assert not offenders, (
        f"{len(offenders)} function(s) over {MAX_FUNCTION_LINES} lines; split them into "
        "named steps:\n" + "\n".join(offenders)
    )


def echoes_without_a_stream(source: str) -> list[int]:
    """Lines of the ``click``/``typer`` ``echo``/``secho`` calls in ``source`` with no ``file``."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
            continue
        owner = node.func.value
        if (
            node.func.attr in {"echo", "secho"}
            and isinstance(owner, ast.Name)
            and owner.id in {"click", "typer"}
            and not any(keyword.arg == "file" for keyword in node.keywords)
        ):
            found.append(node.lineno)
    return sorted(found)


def test_an_echo_that_names_no_stream_is_found() -> None:
    source = (
        "import click, sys, typer\n"
        'click.echo("a")\n'
        'typer.secho("b", fg="red")\n'
        'click.echo("c", file=sys.stderr)\n'
        'echo("d")\n'
    )
    assert echoes_without_a_stream(source) == [2, 3]


def test_every_echo_names_its_stream() -> None:
    """After a tracked run, click's default streams lose what is written to them when they are
    first resolved then (ClearML leaves ``sys.__stdout__`` patched; tests/tracking/test_offline.py
    shows the console given back). ``harness.cli.echo`` names ``sys.stdout``/``sys.stderr``."""
    files = sorted(p for package in PACKAGES for p in (ROOT / package).rglob("*.py"))
    offenders = [
        f"{path.relative_to(ROOT).as_posix()}:{line}"
        for path in files
        for line in echoes_without_a_stream(path.read_text(encoding="utf-8"))
    ]
    assert not offenders, "use harness.cli.echo (or pass file=):\n" + "\n".join(offenders)
