"""netserver's layering (issue 14, DESIGN.md "Layout"), checked on the import graph.

netserver imports nothing from leafmail, has no import cycle, and no module imports from
a higher layer than its own. The layers, lowest first:

core      the shared primitives at the top level (endpoint, errors, connlog, accepted,
          the resolver protocol ...)
listen    binding, inherited sockets, accept, the PROXY header, TLS termination
modes     every way of running handlers (fork, prefork, thread, async, exec, twist)
admit     the Gate contract and the gates: allow/deny, limits, PROXY trust
tcpd      hosts.allow/hosts.deny: parse, match, options, names, and its gate
server    Server, and the standard gate list the commands build
smtp      the sans-I/O SMTP engine: above the generic server, which never needs it
inetd     ``netserver run``
cli       the ``netserver`` command (``__main__``: ``python -m netserver``), then the
          package's public API

Gates sit above modes because a gate may divert a connection to a mode of its own
(tcpd's twist); no mode ever judges a connection. Imports under ``if TYPE_CHECKING:``
count too: a type an upper layer owns is still a dependency on it.

The checks are functions of a graph, so the tests at the end run them on small trees
written to tmp_path with the real graph builder, and see each of them fail.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from importgraph import Graph, build, find_cycle

CORE = frozenset(
    {
        "accepted",
        "aio",
        "callbacks",
        "childexits",
        "children",
        "connection",
        "connlog",
        "dnsresolver",
        "endpoint",
        "errors",
        "handlers",
        "lazy",
        "limits",
        "linger",
        "loopconn",
        "memo",
        "privileges",
        "readiness",
        "refusals",
        "resolver",
        "stdio",
        "strictconf",
        "tcpinfo",
        "usage",
    }
)
# Subpackages and top-level modules above the core, lowest first.
LAYERS: tuple[frozenset[str], ...] = (
    CORE,
    frozenset({"listen"}),
    frozenset({"modes"}),
    frozenset({"admit"}),
    frozenset({"tcpd"}),
    frozenset({"server", "gates"}),
    frozenset({"smtp"}),
    frozenset({"inetd"}),
    frozenset({"cli", "__main__"}),  # __main__: `python -m netserver`
    frozenset({""}),  # netserver/__init__.py: the public API
)


def layer_of(module: str) -> int | None:
    """The layer of a netserver module, by its first name below ``netserver``."""
    first = module.split(".")[1] if "." in module else ""
    return next((i for i, names in enumerate(LAYERS) if first in names), None)


def unplaced(graph: Graph) -> list[str]:
    """netserver modules no layer claims (a new module must be given its place)."""
    return sorted(m for m in graph if m.split(".")[0] == "netserver" and layer_of(m) is None)


def upward_arrows(graph: Graph) -> list[str]:
    """Every import from a lower layer into a higher one, as "importer -> imported"."""
    found = []
    for importer, imported in sorted(graph.items()):
        low = layer_of(importer)
        for target in sorted(imported):
            high = layer_of(target) if target.startswith("netserver") else None
            if low is not None and high is not None and high > low:
                found.append(f"{importer} -> {target}")
    return found


def leafmail_imports(graph: Graph) -> list[str]:
    """Imports of leafmail from netserver."""
    return [
        f"{importer} -> {target}"
        for importer, imported in sorted(graph.items())
        if importer.split(".")[0] == "netserver"
        for target in sorted(imported)
        if target.split(".")[0] == "leafmail"
    ]


def netserver_graph(src: Path | None = None) -> Graph:
    if src is None:
        return build(("netserver",), typing_too=True)
    return build(("netserver",), typing_too=True, src=src)


# -- the real tree -----------------------------------------------------------------------


def test_netserver_imports_nothing_from_leafmail() -> None:
    assert leafmail_imports(build(("netserver", "leafmail"), typing_too=True)) == []


def test_netserver_has_no_import_cycle() -> None:
    assert find_cycle(netserver_graph()) is None


def test_every_netserver_module_has_a_layer() -> None:
    assert unplaced(netserver_graph()) == []


def test_no_import_points_up_a_layer() -> None:
    assert upward_arrows(netserver_graph()) == []


def test_server_knows_nothing_of_tcpd() -> None:
    """tcpd concepts left server.py: it takes gates and never imports tcpd."""
    imported = netserver_graph()["netserver.server"]
    assert not [m for m in imported if m.startswith("netserver.tcpd")]


# -- the checks can fail -----------------------------------------------------------------


def _tree(tmp_path: Path, files: dict[str, str]) -> Path:
    src = tmp_path / "src"
    for name, text in files.items():
        path = src / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    for package in ("netserver", "netserver/listen", "netserver/tcpd", "leafmail"):
        (src / package).mkdir(parents=True, exist_ok=True)
        (src / package / "__init__.py").touch()
    return src


def test_an_upward_import_is_found(tmp_path: Path) -> None:
    src = _tree(
        tmp_path,
        {
            "netserver/server.py": "from .tcpd import gate\n",  # down: fine
            "netserver/cli.py": "",
            "netserver/tcpd/gate.py": "from .. import cli\n",
            "netserver/listen/accept.py": (
                "from typing import TYPE_CHECKING\n"
                "if TYPE_CHECKING:\n    from ..server import Server\n"
            ),
        },
    )
    assert upward_arrows(netserver_graph(src)) == [
        "netserver.listen.accept -> netserver.server",
        "netserver.tcpd.gate -> netserver.cli",
    ]


def test_a_cycle_a_leafmail_import_and_an_unplaced_module_are_found(tmp_path: Path) -> None:
    src = _tree(
        tmp_path,
        {
            "netserver/errors.py": "from . import endpoint\n",
            "netserver/endpoint.py": "from .errors import X\n",
            "netserver/helpers.py": "import leafmail.spool\n",
            "leafmail/spool.py": "",
        },
    )
    graph = netserver_graph(src)
    assert find_cycle(graph) in (
        ["netserver.endpoint", "netserver.errors", "netserver.endpoint"],
        ["netserver.errors", "netserver.endpoint", "netserver.errors"],
    )
    assert unplaced(graph) == ["netserver.helpers"]
    both = build(("netserver", "leafmail"), typing_too=True, src=src)
    assert leafmail_imports(both) == ["netserver.helpers -> leafmail.spool"]


@pytest.mark.parametrize(
    ("module", "layer"),
    [("netserver.endpoint", 0), ("netserver.listen.tls", 1), ("netserver.tcpd.gate", 4)],
)
def test_layers_are_read_from_the_module_name(module: str, layer: int) -> None:
    assert layer_of(module) == layer
