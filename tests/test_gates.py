"""The Gate contract (netserver.admit.gate) on a real in-process server over loopback.

A gate is asked `quick(peer, local)` on the accept path; None sends the connection to
its `judge(conn)` in a task, which may pass, refuse or divert it. `Server` takes the
gates, a mode, TLS and limits, and no tcpd concept.
"""

from __future__ import annotations

import inspect
import io
import ipaddress
import socket
import sys
import threading
from collections.abc import Iterator, Sequence

import pytest
from conftest import ROOT
from netclient import TIMEOUT, exchange

from netserver import AccessPolicy, Limits, Server
from netserver.accepted import Accepted
from netserver.admit.access_gate import AccessGate
from netserver.admit.gate import PASS, Divert, Gate, Pass, Refusal, Ruling
from netserver.connlog import ServerLog
from netserver.endpoint import Endpoint
from netserver.modes.base import Mode, ModeContext
from netserver.server import RunOptions

if str(ROOT) not in sys.path:  # the examples package lives at the project root
    sys.path.insert(0, str(ROOT))
import examples.echo


class Recorder:
    """A gate that defers every client to `judge`, and rules as told."""

    def __init__(self, ruling: Ruling) -> None:
        self.ruling = ruling
        self.quick_calls = 0
        self.judged: list[Endpoint] = []

    def start(self, ctx: ModeContext, mode: Mode) -> Sequence[Mode]:
        return ()

    def reload(self, log: ServerLog) -> None:
        pass

    def quick(self, peer: Endpoint, local: Endpoint) -> Pass | Refusal | None:
        self.quick_calls += 1
        return None

    async def judge(self, conn: Accepted) -> Ruling:
        self.judged.append(conn.record.peer)
        return self.ruling


@pytest.fixture
def log() -> io.StringIO:
    return io.StringIO()


def running(server: Server) -> Iterator[str]:
    (endpoint,) = server.bind()
    thread = threading.Thread(target=server.run, name="test-gates")
    thread.start()
    assert server.ready.wait(TIMEOUT)
    try:
        yield str(endpoint)
    finally:
        server.stop()
        thread.join(TIMEOUT)
        assert not thread.is_alive()


def closed_unserved(address: str) -> bool:
    """Connect, send nothing, and see the server close without a byte (or reset)."""
    host, _, port = address.rpartition(":")
    with socket.create_connection((host, int(port)), timeout=TIMEOUT) as sock:
        try:
            return sock.recv(1) == b""
        except ConnectionResetError:
            return True


def serve(gates: Sequence[Gate], log: io.StringIO, message: str | None = None) -> Server:
    return Server(
        examples.echo.binary,
        "127.0.0.1:0",
        mode="thread",
        gates=gates,
        log=ServerLog(log),
        options=RunOptions(refuse_message=message),
    )


def test_server_takes_at_most_eight_parameters() -> None:
    params = [p for p in inspect.signature(Server.__init__).parameters if p != "self"]
    assert params == ["handler", "listen", "mode", "gates", "tls", "limits", "log", "options"]


def test_an_access_gate_refuses_by_address_on_the_accept_path(log: io.StringIO) -> None:
    gate = AccessGate(AccessPolicy(deny=["127.0.0.1"]))
    for address in running(serve([gate], log, message="go away")):
        # The client speaks first: the server drains what it sent before closing
        # (netserver.linger), so no reset overtakes the refusal line.
        assert exchange(address, b"hello\r\n") == b"go away\r\n"
    assert "refused" in log.getvalue() and "matched deny rule 127.0.0.1" in log.getvalue()


def test_an_undecided_gate_judges_in_a_task_then_the_mode_serves(log: io.StringIO) -> None:
    gate = Recorder(PASS)
    for address in running(serve([gate], log)):
        assert exchange(address, b"judged\r\n") == b"judged\r\n"
    assert gate.quick_calls == 1 and [p.host for p in gate.judged] == ["127.0.0.1"]


def test_a_refusing_judge_closes_the_connection_and_frees_its_count(log: io.StringIO) -> None:
    gate = Recorder(Refusal("judged no"))
    server = serve([gate], log)
    for address in running(server):
        assert closed_unserved(address)
        assert closed_unserved(address)
        assert server.admission.total == 0  # counted in by the limits gate, then out
    assert log.getvalue().count('reason="judged no"') == 2


def test_a_judge_may_divert_the_connection(log: io.StringIO) -> None:
    diverted: list[int] = []

    def start(conn: Accepted) -> None:
        diverted.append(conn.fd)
        conn.sock.sendall(b"diverted\r\n")
        conn.sock.close()
        server.admission.release(conn.record.peer)

    gate = Recorder(Divert(start))
    server = serve([gate], log)
    for address in running(server):
        assert exchange(address) == b"diverted\r\n"
    assert len(diverted) == 1


def test_quick_rulings_that_pass_allocate_nothing() -> None:
    """The accept path's common answer is the one shared PASS, never a new object."""
    loopback = ipaddress.ip_address("127.0.0.1")
    peer, local = Endpoint(loopback, 5000), Endpoint(loopback, 25)
    gate = AccessGate(AccessPolicy(allow=["127.0.0.0/8"]))
    assert gate.quick(peer, local) is PASS
    server = Server(examples.echo.binary, limits=Limits(max_per_source=1))
    assert server.admission.quick(peer, local) is PASS
    refused = server.admission.quick(peer, local)
    assert isinstance(refused, Refusal) and "more than 1 connections" in refused.reason
