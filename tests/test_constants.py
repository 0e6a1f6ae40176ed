"""One constant, one definition: a value the code means once is written once in src/.

``EX_TEMPFAIL = 75`` stood in netserver.errors and again in leafmail's pipe delivery,
``LOOKUP_TIMEOUT = 5.0`` in three gates, ``PROXY_TIMEOUT`` in the PROXY gate and the
worker, ``KILL_AFTER`` in fork mode and the spawner: a change to one copy would leave
the others behind, and a reader could not tell whether they are meant to agree. Each now
lives in the lowest layer that needs it (tests/test_layout.py's LAYERS) and the others
import it.

The rule, read from the syntax of every module (no import): an upper-case name bound at
the top level to a literal (a number, a string, bytes, or a tuple of those) is a
constant, and the same name with the same value in two modules is one constant written
twice. The same name with different values (a ``MAX_MSG`` per channel) is two
constants and allowed.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parent.parent / "src"
PACKAGES = ("netserver", "leafmail")


def constants(source: str) -> dict[str, object]:
    """The module's top-level ``NAME = literal`` constants, with their values."""
    found: dict[str, object] = {}
    for stmt in ast.parse(source).body:
        if isinstance(stmt, ast.Assign):
            targets, value = stmt.targets, stmt.value
        elif isinstance(stmt, ast.AnnAssign) and stmt.value is not None:
            targets, value = [stmt.target], stmt.value
        else:
            continue
        try:
            literal = ast.literal_eval(value)
        except ValueError:
            continue  # computed: not a literal written out
        for target in targets:
            if isinstance(target, ast.Name) and target.id.isupper():
                found[target.id] = literal
    return found


def repeated(src: Path = SRC, packages: tuple[str, ...] = PACKAGES) -> dict[str, list[str]]:
    """Each constant (name and value) defined by more than one module, with those modules."""
    where: dict[tuple[str, str], list[str]] = defaultdict(list)
    for package in packages:
        for path in sorted((src / package).rglob("*.py")):
            module = ".".join(path.relative_to(src).with_suffix("").parts)
            for name, value in constants(path.read_text(encoding="utf-8")).items():
                where[(name, repr(value))].append(module)
    twice = sorted((key, mods) for key, mods in where.items() if len(mods) > 1)
    return {f"{name} = {value}": mods for (name, value), mods in twice}


def test_each_constant_is_defined_in_one_module() -> None:
    assert repeated() == {}


# -- the rule can fail -------------------------------------------------------------------


def _tree(tmp_path: Path, first: str, second: str) -> Path:
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "one.py").write_text(first)
    (tmp_path / "pkg" / "two.py").write_text(second)
    return tmp_path


@pytest.mark.parametrize(
    "source",
    ["TIMEOUT = 5.0\n", "TIMEOUT: float = 5.0\n", "TIMEOUT = 5.0  # seconds\nOTHER = 1\n"],
)
def test_a_constant_written_twice_is_found(tmp_path: Path, source: str) -> None:
    src = _tree(tmp_path, "TIMEOUT = 5.0\n", source)
    assert repeated(src, ("pkg",)) == {"TIMEOUT = 5.0": ["pkg.one", "pkg.two"]}


@pytest.mark.parametrize(
    "source",
    [
        "TIMEOUT = 6.0\n",  # another value: another constant
        "from .one import TIMEOUT\n",  # imported, not written again
        "timeout = 5.0\n",  # not a constant by its name
        "TIMEOUT = float('5')\n",  # computed
        "def f() -> float:\n    TIMEOUT = 5.0\n    return TIMEOUT\n",  # local
    ],
)
def test_what_is_not_a_second_definition_is_not_counted(tmp_path: Path, source: str) -> None:
    src = _tree(tmp_path, "TIMEOUT = 5.0\n", source)
    assert repeated(src, ("pkg",)) == {}
