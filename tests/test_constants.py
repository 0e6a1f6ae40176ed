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

The sysexits codes (``EX_TEMPFAIL`` and the others, netserver.errors) are also the
codes the tests and benchmarks check commands against; thirteen test modules once wrote
them out again (``EX_TEMPFAIL = 75`` in six). Outside src/ too, a module imports them:
any ``EX_*`` name bound to a literal there, tuple unpacking included, is a copy.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SRC = ROOT / "src"
PACKAGES = ("netserver", "leafmail")
OUTSIDE_SRC = ("tests", "bench", "examples")  # where exit codes are imported, never written


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


def exit_codes_written(source: str) -> list[str]:
    """The ``EX_*`` names the module binds to literals at its top level, unpacked
    tuples (``EX_A, EX_B = 65, 75``) included."""
    written: list[str] = []
    for stmt in ast.parse(source).body:
        if isinstance(stmt, ast.Assign):
            pairs = [_pairs(target, stmt.value) for target in stmt.targets]
        elif isinstance(stmt, ast.AnnAssign) and stmt.value is not None:
            pairs = [_pairs(stmt.target, stmt.value)]
        else:
            continue
        written += [name for each in pairs for name, value in each if _written_out(value)]
    return [name for name in written if name.startswith("EX_")]


def _pairs(target: ast.expr, value: ast.expr) -> list[tuple[str, ast.expr]]:
    """(name, value) for a plain or an unpacking assignment of a tuple written out."""
    if isinstance(target, ast.Name):
        return [(target.id, value)]
    sequence = ast.Tuple | ast.List
    if not (isinstance(target, sequence) and isinstance(value, sequence)):
        return []
    if len(target.elts) != len(value.elts):
        return []
    return [pair for t, v in zip(target.elts, value.elts, strict=True) for pair in _pairs(t, v)]


def _written_out(value: ast.expr) -> bool:
    """A value made of literals only (``75``, ``128 + 13``): it names nothing it comes from."""
    named = (ast.Name, ast.Attribute, ast.Call, ast.Subscript)
    return not any(isinstance(node, named) for node in ast.walk(value))


def exit_codes_outside_src(root: Path = ROOT, dirs: tuple[str, ...] = OUTSIDE_SRC) -> list[str]:
    """``path: NAME`` for each exit code a module outside src/ writes out itself."""
    return [
        f"{path.relative_to(root)}: {name}"
        for folder in dirs
        for path in sorted((root / folder).rglob("*.py"))
        for name in exit_codes_written(path.read_text(encoding="utf-8"))
    ]


def test_tests_and_benchmarks_import_the_exit_codes() -> None:
    assert exit_codes_outside_src() == []


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


@pytest.mark.parametrize(
    ("source", "names"),
    [
        ("EX_TEMPFAIL = 75\n", ["EX_TEMPFAIL"]),
        ("EX_TEMPFAIL: int = 75\n", ["EX_TEMPFAIL"]),
        ("EX_DATAERR, EX_TEMPFAIL = 65, 75\n", ["EX_DATAERR", "EX_TEMPFAIL"]),
        ("EX_PIPE = 128 + 13\n", ["EX_PIPE"]),  # literals combined are still written out
    ],
)
def test_an_exit_code_written_outside_src_is_found(
    tmp_path: Path, source: str, names: list[str]
) -> None:
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "test_x.py").write_text(source)
    found = exit_codes_outside_src(tmp_path, ("tests",))
    assert found == [f"tests/test_x.py: {name}" for name in names]


@pytest.mark.parametrize(
    "source",
    [
        "from netserver.errors import EX_TEMPFAIL\n",
        "CODE = EX_TEMPFAIL\n",  # a name, not a literal
        "def f() -> int:\n    EX_TEMPFAIL = 75\n    return EX_TEMPFAIL\n",  # local
        "TIMEOUT = 75\n",  # not an exit code by its name
    ],
)
def test_an_imported_exit_code_is_not_counted(tmp_path: Path, source: str) -> None:
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "test_x.py").write_text(source)
    assert exit_codes_outside_src(tmp_path, ("tests",)) == []
