"""Each cause of a refusal sends its own line (netserver.refusals), as Postfix answers a
connection limit (421 4.7.0), an access rule (554 5.7.1) and its own failure (421 4.3.0)
differently: a client must not retry a denial, and should retry the others.

Real servers on loopback, real sockets: the supervisor's accept path (a rule, a gate that
fails in its lookup, the per-source cap) and workers that accept themselves
(modes.direct: a rule and the shared per-source table). The clients come from different
loopback addresses (127.0.0.1-3), so each meets the cause meant for it.
"""

from __future__ import annotations

import asyncio
import io
import socket
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
from conftest import ROOT, ServerFactory
from lifecycle_handlers import HANDLER_ENV
from netclient import TIMEOUT, split_address
from test_gates import running

from netserver import AccessPolicy, Limits, Server
from netserver.accepted import Accepted
from netserver.admit.access_gate import AccessGate
from netserver.admit.gate import PASS, Gate, Pass, Refusal, Ruling
from netserver.admit.proxy import ProxyGate
from netserver.connlog import ServerLog
from netserver.endpoint import Endpoint
from netserver.modes.base import Mode, ModeContext
from netserver.modes.workers import PoolMode
from netserver.refusals import RefusalLines
from netserver.server import ModeSpec, RunOptions

if str(ROOT) not in sys.path:  # the examples package lives at the project root
    sys.path.insert(0, str(ROOT))
import examples.echo

LINES = RefusalLines(limit="421 4.7.0 busy", access="554 5.7.1 denied", error="421 4.3.0 error")
DENIED, FAILING = "127.0.0.2", "127.0.0.3"


class LookupFails:
    """A gate whose lookup for FAILING raises (a resolver that broke): the server must
    refuse that client, and say that the fault is its own."""

    def start(self, ctx: ModeContext, mode: Mode) -> Sequence[Mode]:
        return ()

    def reload(self, log: ServerLog) -> None:
        pass

    def quick(self, peer: Endpoint, local: Endpoint) -> Pass | Refusal | None:
        return None if peer.host == FAILING else PASS

    async def judge(self, conn: Accepted) -> Ruling:
        raise OSError("the lookup broke")


def first_line(port: int, source: str) -> bytes:
    """Connect from `source`, speak first, and read the server's first line."""
    with socket.create_connection(
        ("127.0.0.1", port), timeout=TIMEOUT, source_address=(source, 0)
    ) as sock:
        sock.sendall(b"ping\r\n")
        return read_line(sock)


def read_line(sock: socket.socket) -> bytes:
    """What the server sent up to its first LF (or its close)."""
    got = bytearray()
    while b"\n" not in got:
        chunk = sock.recv(100)
        if not chunk:
            break
        got += chunk
    return bytes(got)


def held(port: int) -> socket.socket:
    """A served client from 127.0.0.1, kept open: the per-source cap of 1 is then full."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
    sock.sendall(b"ping\r\n")
    assert read_line(sock) == b"ping\r\n"
    return sock


def test_the_supervisor_sends_each_cause_its_own_line() -> None:
    log = io.StringIO()
    gates: list[Gate] = [AccessGate(AccessPolicy(deny=[DENIED])), LookupFails()]
    server = Server(
        examples.echo.binary,
        "127.0.0.1:0",
        mode="thread",
        gates=gates,
        limits=Limits(max_per_source=1),
        log=ServerLog(log),
        options=RunOptions(refuse_message=LINES),
    )
    for address in running(server):
        _, port = split_address(address)
        assert first_line(port, DENIED) == b"554 5.7.1 denied\r\n"
        assert first_line(port, FAILING) == b"421 4.3.0 error\r\n"
        with held(port):
            assert first_line(port, "127.0.0.1") == b"421 4.7.0 busy\r\n"
    text = log.getvalue()
    assert "matched deny rule" in text and "access check failed" in text
    assert "more than 1 connections from 127.0.0.1" in text


def with_a_worker(gates: list[Gate], check: Callable[[Server, int], None]) -> None:
    """Serve the echo example with one worker process, the gates, a per-source cap of 1
    and LINES; run `check(server, port)` in a thread once it listens, then stop."""

    async def main() -> None:
        ready = asyncio.Event()
        server = Server(
            examples.echo.async_main,
            "127.0.0.1:0",
            mode=ModeSpec("async", workers=1),
            gates=gates,
            limits=Limits(max_per_source=1),
            log=ServerLog(io.StringIO()),
            options=RunOptions(
                loop="asyncio", signals=False, on_ready=lambda _: ready.set(), refuse_message=LINES
            ),
        )
        serving = asyncio.create_task(server.serve())
        try:
            async with asyncio.timeout(TIMEOUT):
                await ready.wait()
            port = server.addresses[0].port
            assert port is not None
            await asyncio.to_thread(check, server, port)
        finally:
            server.stop()
            await serving

    asyncio.run(main())


@pytest.mark.slow  # forks a worker process
def test_workers_that_accept_themselves_send_each_cause_its_own_line() -> None:
    """Only quick gates: each worker accepts, asks the rules and the shared table."""

    def check(server: Server, port: int) -> None:
        assert isinstance(server.mode, PoolMode) and server.mode.direct is not None
        assert first_line(port, DENIED) == b"554 5.7.1 denied\r\n"
        with held(port):
            assert first_line(port, "127.0.0.1") == b"421 4.7.0 busy\r\n"

    with_a_worker([AccessGate(AccessPolicy(deny=[DENIED]))], check)


@pytest.mark.slow  # forks a worker process
def test_a_worker_behind_a_balancer_sends_the_supervisors_line_for_each_cause() -> None:
    """Behind PROXY the worker reads the header and the supervisor judges the client it
    names (Server._name_proxied): the worker sends the line of that verdict's cause."""
    header = b"PROXY TCP4 %s 127.0.0.1 5555 25\r\n"

    def named(port: int, client: bytes) -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
        sock.sendall(header % client + b"ping\r\n")
        return sock

    def check(server: Server, port: int) -> None:
        with named(port, b"10.9.8.7") as denied:
            assert read_line(denied) == b"554 5.7.1 denied\r\n"
        with named(port, b"10.9.8.6") as first:
            assert read_line(first) == b"ping\r\n"  # served: the cap of 1 is full
            with named(port, b"10.9.8.6") as second:
                assert read_line(second) == b"421 4.7.0 busy\r\n"

    gates: list[Gate] = [ProxyGate(["127.0.0.1"]), AccessGate(AccessPolicy(deny=["10.9.8.7"]))]
    with_a_worker(gates, check)


# --- the command line: --refuse-message and a line per cause ----------------------------

PROXY = b"PROXY TCP4 %s 127.0.0.1 5555 25\r\n"
CAUSE_FLAGS = {
    "every cause its own": [
        *("--refuse-message", "500 fallback", "--refuse-limit", "421 4.7.0 busy"),
        *("--refuse-access", "554 5.7.1 denied", "--refuse-error", "421 4.3.0 error"),
    ],
    "the others fall back": [
        "--refuse-message",
        "500 fallback",
        "--refuse-access",
        "554 5.7.1 denied",
    ],
}


@pytest.mark.slow  # forks a worker process
@pytest.mark.parametrize("flags", sorted(CAUSE_FLAGS))
def test_the_command_line_sets_the_line_of_each_cause(
    netserver_proc: ServerFactory, tmp_path: Path, flags: str
) -> None:
    """A real `netserver serve` behind a balancer with one worker: the supervisor judges
    each client the PROXY header names (10.9.8.7 is denied by a rule, 10.9.8.5 meets a
    hosts.allow twist that cannot be carried out behind PROXY with workers: the server's
    own failure, and 10.9.8.6 twice is over the per-source cap)."""
    (tmp_path / "hosts.allow").write_text("svc: 10.9.8.5: twist /bin/echo twisted\n")
    (tmp_path / "hosts.deny").write_text("")
    server = netserver_proc(
        [
            *("--mode", "async", "--workers", "1", "--listen", "127.0.0.1:0"),
            *("--proxy-from", "127.0.0.1", "--deny", "10.9.8.7", "--max-per-source", "1"),
            *("--hosts-allow", str(tmp_path / "hosts.allow"), "--daemon-name", "svc"),
            *("--hosts-deny", str(tmp_path / "hosts.deny")),
            *("--handler", "proxy_tls_handlers:async_peer_held", *CAUSE_FLAGS[flags]),
        ],
        env=HANDLER_ENV,
    )
    own = flags == "every cause its own"

    def line(client: bytes) -> bytes:
        with socket.create_connection(server.host_port, timeout=TIMEOUT) as sock:
            sock.sendall(PROXY % client)
            return read_line(sock)

    assert line(b"10.9.8.7") == b"554 5.7.1 denied\r\n"
    assert line(b"10.9.8.5") == (b"421 4.3.0 error\r\n" if own else b"500 fallback\r\n")
    with socket.create_connection(server.host_port, timeout=TIMEOUT) as first:
        first.sendall(PROXY % b"10.9.8.6")
        assert read_line(first).startswith(b"10.9.8.6:5555 ")  # served: the cap is full
        assert line(b"10.9.8.6") == (b"421 4.7.0 busy\r\n" if own else b"500 fallback\r\n")
    log = server.log()
    assert "matched deny rule" in log and "cannot apply behind PROXY" in log
