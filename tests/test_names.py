"""One name, one meaning (DESIGN.md): a type name is defined in one module of src/.

Two classes called ``Envelope`` (the SMTP transaction and the spool's envelope) made
``leafmail.receive`` import one of them under another name, and a reader of any module
had to look up which ``Verdict`` or ``Policy`` it meant. The rule is read from the
syntax of every module (no import), so it is fast and sees every kind of definition:
a class (enums, dataclasses and protocols are classes), ``X: TypeAlias = ...``,
``X = NewType(...)`` and the other functional forms, ``type X = ...``, and a CapWords
name bound to a type expression (``X = A | B``, ``X = Callable[...]``, ``X = mod.Class``).

Left out on purpose: names starting with ``_``, which no other module imports, and type
variables, which are placeholders local to their module rather than types.
"""

from __future__ import annotations

import ast
import re
import textwrap
from collections import defaultdict
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parent.parent / "src"
PACKAGES = ("netserver", "leafmail")

_CAP_WORDS = re.compile(r"[A-Z](?=[A-Za-z0-9]*[a-z])[A-Za-z0-9]*")
# Calls that make a new type from their arguments (TypeVar and ParamSpec do not).
_TYPE_FACTORIES = frozenset(
    {"NewType", "NamedTuple", "namedtuple", "TypedDict", "Enum", "IntEnum", "StrEnum"}
    | {"Flag", "IntFlag"}
)


def _last_name(node: ast.expr) -> str | None:
    """``Name`` for ``Name`` and for ``a.b.Name``; None for any other expression."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return node.attr
    return None


def _is_type_expression(node: ast.expr) -> bool:
    """True for what can only be a type on the right of a CapWords name: an implicit alias."""
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr):
        return True  # A | B
    if isinstance(node, ast.Subscript):
        return True  # Union[...], Callable[...], dict[str, X]
    name = _last_name(node)
    return name is not None and _CAP_WORDS.fullmatch(name) is not None  # X = mod.Class


def _defined_by(stmt: ast.stmt) -> str | None:
    """The type name a top-level statement defines, if it defines one."""
    if isinstance(stmt, ast.ClassDef):
        return stmt.name
    type_alias = getattr(ast, "TypeAlias", None)  # ``type X = ...``, Python 3.12+
    if type_alias is not None and isinstance(stmt, type_alias):
        name: str = stmt.name.id
        return name
    if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
        return stmt.target.id if _last_name(stmt.annotation) == "TypeAlias" else None
    if isinstance(stmt, ast.Assign) and len(stmt.targets) == 1:
        target = stmt.targets[0]
        if not isinstance(target, ast.Name):
            return None
        value = stmt.value
        if isinstance(value, ast.Call):
            return target.id if _last_name(value.func) in _TYPE_FACTORIES else None
        if _CAP_WORDS.fullmatch(target.id) and _is_type_expression(value):
            return target.id
    return None


def _top_level(body: list[ast.stmt]) -> list[ast.stmt]:
    """The module's statements, with those of top-level ``if``/``try`` blocks."""
    found: list[ast.stmt] = []
    for stmt in body:
        if isinstance(stmt, ast.If):
            found += _top_level(stmt.body + stmt.orelse)
        elif isinstance(stmt, ast.Try):
            blocks = stmt.body + stmt.orelse + stmt.finalbody
            found += _top_level(blocks + [s for h in stmt.handlers for s in h.body])
        else:
            found.append(stmt)
    return found


def type_names(source: str) -> set[str]:
    """The public type names a module's source defines at its top level."""
    tree = ast.parse(source)
    names = {_defined_by(stmt) for stmt in _top_level(tree.body)}
    return {name for name in names if name is not None and not name.startswith("_")}


def collisions(src: Path = SRC, packages: tuple[str, ...] = PACKAGES) -> dict[str, list[str]]:
    """Each type name defined by more than one module, with those modules."""
    where: dict[str, list[str]] = defaultdict(list)
    for package in packages:
        for path in sorted((src / package).rglob("*.py")):
            parts = path.relative_to(src).with_suffix("").parts
            module = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            for name in type_names(path.read_text(encoding="utf-8")):
                where[name].append(module)
    return {name: modules for name, modules in sorted(where.items()) if len(modules) > 1}


def renamed_type_imports(src: Path = SRC, packages: tuple[str, ...] = PACKAGES) -> list[str]:
    """``from m import Name as Other`` of a CapWords name: how a collision gets hidden."""
    found: list[str] = []
    for package in packages:
        for path in sorted((src / package).rglob("*.py")):
            tree = ast.parse(path.read_text(encoding="utf-8"))
            for node in ast.walk(tree):
                if not isinstance(node, ast.ImportFrom):
                    continue
                for alias in node.names:
                    if alias.asname not in (None, alias.name) and _CAP_WORDS.fullmatch(alias.name):
                        found.append(f"{path.relative_to(src)}: {alias.name} as {alias.asname}")
    return found


def test_each_type_name_is_defined_in_one_module() -> None:
    assert collisions() == {}


def test_no_type_name_is_imported_under_another_name() -> None:
    assert renamed_type_imports() == []


# The rule itself, on small trees written for the purpose: each kind of definition, in
# two modules, is a collision; what is not a type definition is not.
DEFINITIONS = {
    "class": "class Thing:\n    pass\n",
    "enum class": "class Thing(StrEnum):\n    A = 'a'\n",
    "TypeAlias": "Thing: TypeAlias = int | str\n",
    "typing.TypeAlias": "Thing: typing.TypeAlias = 'int'\n",
    "NewType": "Thing = NewType('Thing', int)\n",
    "functional enum": "Thing = enum.Enum('Thing', 'A B')\n",
    "union": "Thing = Accept | Reject\n",
    "Union[]": "Thing = Union[int, str]\n",
    "Callable alias": "Thing = Callable[[int], None]\n",
    "class alias": "Thing = other.Thing\n",
    "inside if": "if TYPE_CHECKING:\n    class Thing: ...\n",
    "inside try": "try:\n    from x import y\nexcept ImportError:\n    Thing = int | None\n",
}
NOT_DEFINITIONS = {
    "private class": "class _Thing:\n    pass\n",
    "type variable": "Thing = TypeVar('Thing')\n",
    "constant": "THING = Thing()\n",
    "instance": "Thing = make_thing()\n",
    "nested class": "def f() -> None:\n    class Thing:\n        pass\n",
    "lowercase alias": "thing = int | str\n",
}


def _tree(tmp_path: Path, first: str, second: str) -> Path:
    for name, source in (("one", first), ("two", second)):
        (tmp_path / "pkg" / f"{name}.py").parent.mkdir(exist_ok=True)
        (tmp_path / "pkg" / f"{name}.py").write_text(source)
    return tmp_path


@pytest.mark.parametrize("kind", DEFINITIONS)
def test_a_second_definition_of_each_kind_is_a_collision(tmp_path: Path, kind: str) -> None:
    src = _tree(tmp_path, DEFINITIONS["class"], DEFINITIONS[kind])
    assert collisions(src, ("pkg",)) == {"Thing": ["pkg.one", "pkg.two"]}


@pytest.mark.skipif(not hasattr(ast, "TypeAlias"), reason="`type X = ...` is Python 3.12+")
def test_a_type_statement_is_a_definition(tmp_path: Path) -> None:
    src = _tree(tmp_path, DEFINITIONS["class"], "type Thing = int | str\n")
    assert collisions(src, ("pkg",)) == {"Thing": ["pkg.one", "pkg.two"]}


@pytest.mark.parametrize("kind", NOT_DEFINITIONS)
def test_what_defines_no_type_is_not_counted(tmp_path: Path, kind: str) -> None:
    src = _tree(tmp_path, NOT_DEFINITIONS[kind], NOT_DEFINITIONS[kind])
    assert collisions(src, ("pkg",)) == {}


def test_a_renamed_import_of_a_type_is_found(tmp_path: Path) -> None:
    source = textwrap.dedent(
        """
        from netserver.smtp import Transaction as SmtpTransaction
        from leafmail.cli import COMMANDS as LEAF_COMMANDS
        from leafmail.envelope import Envelope as Envelope
        """
    )
    src = _tree(tmp_path, source, "")
    assert renamed_type_imports(src, ("pkg",)) == ["pkg/one.py: Transaction as SmtpTransaction"]


# Names once defined at the top level of two modules with two meanings; now of one.
ONE_MEANING = {
    "domain_of": "delivery's routing domain; qshape's row label is qshape.row_name",
    "lookup_name": "aliases' key for a local part; MX's DNS query name is mx.dns_name",
    "printable": "escaped for a terminal; checks' ASCII line for a reply is ascii_line",
    "STATE_DIRS": "the spool's directories; the tools' state names are STATE_BY_SHOWN_NAME",
}


def _top_level_names(stmt: ast.stmt) -> list[str]:
    """The names a top-level statement binds: a function, or a plain assignment."""
    if isinstance(stmt, ast.FunctionDef | ast.AsyncFunctionDef):
        return [stmt.name]
    targets = stmt.targets if isinstance(stmt, ast.Assign) else []
    if isinstance(stmt, ast.AnnAssign):
        targets = [stmt.target]
    return [target.id for target in targets if isinstance(target, ast.Name)]


def defining_modules(name: str, src: Path = SRC, packages: tuple[str, ...] = PACKAGES) -> list[str]:
    """The modules that bind `name` at their top level (a function or a constant)."""
    found: list[str] = []
    for package in packages:
        for path in sorted((src / package).rglob("*.py")):
            tree = ast.parse(path.read_text(encoding="utf-8"))
            if any(name in _top_level_names(stmt) for stmt in tree.body):
                found.append(str(path.relative_to(src)))
    return found


@pytest.mark.parametrize("name", ONE_MEANING)
def test_a_name_that_had_two_meanings_now_has_one(name: str) -> None:
    assert len(defining_modules(name)) == 1, (defining_modules(name), ONE_MEANING[name])
