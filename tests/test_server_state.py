"""A Server's state is declared, never probed: no ``getattr``/``hasattr`` on ``self``.

`Server.set_limits` and `Server.reload_tls` may be called before the server serves
(leafmail's reload hands limits to every server it has); the mode and its context exist
only once serving starts. They used to be found with ``getattr(self, "mode", None)`` and
``hasattr(self, "mode_context")``, which mypy cannot check and a rename would silently
break. They are now attributes declared in ``__init__`` as ``None`` until serving starts.

The rule is read from the syntax of every module of src/: a ``getattr``/``hasattr`` whose
first argument is ``self`` is reflection on an object's own state.
"""

from __future__ import annotations

import ast
import socket
import ssl
import sys
from pathlib import Path

import trustme
from conftest import ROOT, served
from netclient import TIMEOUT

from netserver import Limits, Server

if str(ROOT) not in sys.path:  # the examples package lives at the project root
    sys.path.insert(0, str(ROOT))
import examples.echo

SRC = Path(__file__).resolve().parent.parent / "src"
REFLECTION = frozenset({"getattr", "hasattr", "setattr", "delattr"})


def self_reflection(src: Path = SRC) -> list[str]:
    """Each ``getattr(self, ...)`` and the like in src/, as "path:line name"."""
    found: list[str] = []
    for path in sorted(src.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)):
                continue
            first = node.args[0] if node.args else None
            if node.func.id in REFLECTION and isinstance(first, ast.Name) and first.id == "self":
                found.append(f"{path.relative_to(src)}:{node.lineno} {node.func.id}")
    return found


def test_no_object_probes_its_own_attributes() -> None:
    assert self_reflection() == []


def test_a_probe_of_self_is_found(tmp_path: Path) -> None:
    (tmp_path / "one.py").write_text(
        "class A:\n"
        "    def f(self) -> None:\n"
        "        mode = getattr(self, 'mode', None)\n"
        "        if hasattr(self, 'ctx'):\n"
        "            pass\n"
        "        getattr(other, 'mode')\n"  # another object's: not counted
    )
    assert self_reflection(tmp_path) == ["one.py:3 getattr", "one.py:4 hasattr"]


def test_limits_and_tls_given_before_serving_are_the_ones_served_with() -> None:
    """set_limits and reload_tls before `run()`: no error, and the connection that
    follows is served over the new context with the new limits."""
    ca = trustme.CA()
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("localhost").configure_cert(server_ctx)
    client_ctx = ssl.create_default_context()
    ca.configure_trust(client_ctx)
    server = Server(examples.echo.binary, "127.0.0.1:0", mode="thread")
    assert server.mode is None and server.mode_context is None
    limits = Limits(timeout=30.0, max_conns=7)
    server.set_limits(limits)
    server.reload_tls(server_ctx)
    (endpoint,) = server.bind()
    with served(server):
        assert server.mode_context is not None
        assert server.mode_context.limits is limits
        assert server.mode_context.tls is server.tls
        assert endpoint.ip is not None
        raw = socket.create_connection((str(endpoint.ip), endpoint.port), timeout=TIMEOUT)
        with client_ctx.wrap_socket(raw, server_hostname="localhost") as tls:
            tls.sendall(b"over tls\n")
            assert tls.recv(100) == b"over tls\n"
