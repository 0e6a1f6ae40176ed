"""leafmail's import graph: no cycle, and the two sides of the spool apart.

Mail flows one way, as in Postfix: the smtpd side takes it in and commits it to the spool,
the qmgr side takes it out of the spool and delivers it. Their code meets only in the
modules both need (the spool, envelope and status records, the config, the states,
aliases, trace fields); neither side imports the other, directly or through any chain
of modules. The graph is read from the code (`importgraph`), imports inside functions
included, so a lazy import cannot hide an arrow.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from importgraph import Graph, build, find_cycle

SMTPD_SIDE = ("leafmail.receive", "leafmail.policy", "leafmail.checks", "leafmail.smtpd")
QMGR_SIDE = (
    "leafmail.queue",
    "leafmail.message",
    "leafmail.delivery",
    "leafmail.expansion",
    "leafmail.qmgr",
    "leafmail.localsvc",
)


def without_reexports(graph: Graph) -> Graph:
    """The graph less each package's edges to its own submodules (its re-exports)."""
    return {
        mod: {dep for dep in deps if not dep.startswith(mod + ".")} for mod, deps in graph.items()
    }


def on_side(module: str, side: tuple[str, ...]) -> bool:
    return any(module == root or module.startswith(root + ".") for root in side)


def crossing(graph: Graph, src: tuple[str, ...], dst: tuple[str, ...]) -> list[str] | None:
    """A chain of imports from a module of `src` to one of `dst`, or None."""
    for start in sorted(m for m in graph if on_side(m, src)):
        came_from: dict[str, str | None] = {start: None}
        todo = [start]
        while todo:
            here = todo.pop()
            for nxt in sorted(graph.get(here, ())):
                if nxt in came_from:
                    continue
                came_from[nxt] = here
                if on_side(nxt, dst):
                    chain = [nxt]
                    while (back := came_from[chain[-1]]) is not None:
                        chain.append(back)
                    return chain[::-1]
                todo.append(nxt)
    return None


@pytest.fixture(scope="module")
def graph() -> Graph:
    return without_reexports(build(("leafmail",)))


def test_leafmail_has_no_import_cycle(graph: Graph) -> None:
    assert find_cycle(graph) is None


def test_the_smtpd_side_does_not_import_the_qmgr_side(graph: Graph) -> None:
    assert crossing(graph, SMTPD_SIDE, QMGR_SIDE) is None


def test_the_qmgr_side_does_not_import_the_smtpd_side(graph: Graph) -> None:
    assert crossing(graph, QMGR_SIDE, SMTPD_SIDE) is None


def test_both_sides_are_in_the_graph(graph: Graph) -> None:
    """The rules above are about real modules (a renamed package would pass them empty)."""
    for root in (*SMTPD_SIDE, *QMGR_SIDE):
        assert root in graph, root


# --- the rules can fail: the arrows this tree had before, put back ---------------------


def test_a_cycle_put_back_is_found(graph: Graph) -> None:
    """The MX agent imported domain_of from the router, which builds the MX agent."""
    old = {
        **graph,
        "leafmail.delivery.mx": {*graph["leafmail.delivery.mx"], "leafmail.delivery.router"},
    }
    cycle = find_cycle(old)
    assert cycle is not None
    assert {"leafmail.delivery.mx", "leafmail.delivery.router"} <= set(cycle)


def test_a_crossing_put_back_is_found(graph: Graph) -> None:
    """The RCPT check lived in delivery.local, which imported the checks package."""
    policy = graph["leafmail.policy"]
    old = {**graph, "leafmail.policy": {*policy, "leafmail.delivery.local"}}
    assert crossing(old, SMTPD_SIDE, QMGR_SIDE) == ["leafmail.policy", "leafmail.delivery.local"]
    local = graph["leafmail.delivery.local"]
    old = {**graph, "leafmail.delivery.local": {*local, "leafmail.checks.loops"}}
    chain = crossing(old, QMGR_SIDE, SMTPD_SIDE)
    assert chain is not None and chain[-2:] == ["leafmail.delivery.local", "leafmail.checks.loops"]


def test_an_import_inside_a_function_counts(tmp_path: Path) -> None:
    """A cycle made of a top-level import and a lazy one, read from files."""
    pkg = tmp_path / "leafmail"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from . import b\n")
    (pkg / "b.py").write_text("def f() -> None:\n    from .a import g\n")
    found = find_cycle(without_reexports(build(("leafmail",), src=tmp_path)))
    assert found is not None and set(found) == {"leafmail.a", "leafmail.b"}


def test_the_reexport_edges_are_the_only_ones_dropped() -> None:
    graph = {"p": {"p.sub", "q"}, "p.sub": {"p"}, "q": set[str]()}
    assert without_reexports(graph) == {"p": {"q"}, "p.sub": {"p"}, "q": set()}


# --- commands are entry points, never libraries -----------------------------------------

COMMANDS = ("leafmail.flush", "leafmail.cli", "leafmail.sendmail")


def importers(graph: Graph, module: str) -> set[str]:
    return {mod for mod, deps in graph.items() if module in deps}


def test_only_commands_import_the_flush_command(graph: Graph) -> None:
    """The daemon and its queue manager build their runner from `leafmail.queue`, as
    `leafmail flush` does; they never reach into a command's module for it."""
    assert {m for m in importers(graph, "leafmail.flush") if not on_side(m, COMMANDS)} == set()
    assert "leafmail.queue" in graph["leafmail.daemon"] & graph["leafmail.qmgr"]


def test_a_daemon_importing_flush_is_caught(graph: Graph) -> None:
    old = {**graph, "leafmail.daemon": {*graph["leafmail.daemon"], "leafmail.flush"}}
    assert importers(old, "leafmail.flush") - set(COMMANDS) == {"leafmail.daemon"}
