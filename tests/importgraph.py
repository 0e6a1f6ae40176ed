"""The import graph of the source tree, read from the code's syntax without importing it.

Tests use it to hold the layering that DESIGN.md asks for (no cycle, no arrow pointing up
from a lower layer to a higher one). Reading the AST instead of importing keeps it fast and
free of side effects, and it also sees imports inside functions, which a lazy import would
otherwise hide from the rule.
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src"

Graph = dict[str, set[str]]


def module_name(path: Path, src: Path = SRC) -> str:
    """The dotted name of the module in ``path`` (a package's ``__init__`` is the package)."""
    parts = list(path.relative_to(src).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _base(importer: str, is_package: bool, node: ast.ImportFrom) -> str:
    """The absolute module a ``from X import ...`` statement names as X."""
    if not node.level:
        return node.module or ""
    parts = importer.split(".")
    if not is_package:
        parts = parts[:-1]
    parts = parts[: len(parts) - (node.level - 1)]
    return ".".join(parts + ([node.module] if node.module else []))


def _type_checking_nodes(tree: ast.Module) -> set[int]:
    """ids of the nodes inside ``if TYPE_CHECKING:`` blocks, which never run."""
    inside: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and (
            (isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING")
            or (isinstance(node.test, ast.Attribute) and node.test.attr == "TYPE_CHECKING")
        ):
            inside.update(id(sub) for stmt in node.body for sub in ast.walk(stmt))
    return inside


def imports_of(path: Path, known: set[str], *, typing_too: bool, src: Path = SRC) -> set[str]:
    """The modules among ``known`` that the file at ``path`` imports, anywhere in its body.

    ``from pkg import sub`` counts as an import of ``pkg.sub`` when that is a module, and of
    ``pkg`` otherwise. With ``typing_too`` false, imports under ``if TYPE_CHECKING:`` are
    left out: they never run, so they cannot make a cycle at run time.
    """
    importer = module_name(path, src)
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    skip = set() if typing_too else _type_checking_nodes(tree)
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = _base(importer, path.name == "__init__.py", node)
            subs = {f"{base}.{alias.name}" for alias in node.names} & known
            found.update(subs)
            if len(subs) < len(node.names):
                found.add(base)
    return (found & known) - {importer}


def build(
    packages: tuple[str, ...] = ("netserver", "leafmail"),
    *,
    typing_too: bool = False,
    src: Path = SRC,
) -> Graph:
    """Module -> the modules of ``packages`` it imports."""
    files = [p for pkg in packages for p in sorted((src / pkg).rglob("*.py"))]
    known = {module_name(p, src) for p in files}
    return {
        module_name(p, src): imports_of(p, known, typing_too=typing_too, src=src) for p in files
    }


def find_cycle(graph: Graph) -> list[str] | None:
    """One import cycle as a list of modules (first == last), or None when the graph has none.

    A package's ``__init__`` that re-exports its submodules is an edge from the package to
    each of them; callers that want to ignore those edges drop them before calling.
    """
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt) :], nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state:
            found = visit(start)
            if found:
                return found
    return None
