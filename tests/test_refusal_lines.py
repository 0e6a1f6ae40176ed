"""A refused client that speaks first still reads its refusal line (netserver.linger).

Closed with the client's bytes unread, a connection is reset, not closed: the client's
next send or half-close fails (EPIPE, ENOTCONN) and the refusal line may be lost. Every
refusal path now writes the line, half-closes, and drains what the client still sends
(bounded) before it closes. The client here is the kind that caught it: it sends a
line before it reads, reads the refusal, sends more, half-closes and reads to the end;
a reset anywhere fails the test. Real servers on loopback, real sockets.
"""

from __future__ import annotations

import asyncio
import io
import os
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import RunningServer, ServerFactory, served
from lifecycle_handlers import HANDLER_ENV, IO_TIMEOUT, connect, recv_line, serve_args, wait_until

from netserver import Callbacks, Server
from netserver.accepted import FdRegistry
from netserver.connlog import ServerLog
from netserver.linger import Lingerer
from netserver.refusals import MAX_LINE_OCTETS
from netserver.server import RunOptions

REFUSAL = "554 go away"
ROUNDS = 10  # a client of this kind saw a reset in 1 to 3 rounds of 3 before (timing)


TCP_CLOSE = 7  # include/net/tcp_states.h


def tcp_state(sock: socket.socket) -> int:
    return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)[0]


def finish(sock: socket.socket) -> bytes:
    """Say more, half-close, read to the end; then, once both ends are closed, no
    reset may have come on the way (a server that closed on unread bytes sends one,
    which the end of file alone does not show). What was read after the last line."""
    sock.sendall(b"QUIT\r\n")
    sock.shutdown(socket.SHUT_WR)
    got = bytearray()
    while chunk := sock.recv(4096):
        got += chunk
    assert wait_until(lambda: tcp_state(sock) == TCP_CLOSE)
    error = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
    assert error == 0, os.strerror(error)
    return bytes(got)


def speaks_first(address: tuple[str, int], source: str | None = None) -> bytes:
    """Send a line, read a line, then `finish`: everything the server sent."""
    with connect(address, source) as sock:
        sock.sendall(b"EHLO client.example\r\n")
        line = recv_line(sock)
        return line + finish(sock)


def refused_cleanly(address: tuple[str, int], expected: bytes, source: str | None = None) -> None:
    for _ in range(ROUNDS):
        assert speaks_first(address, source) == expected


DENY = ("--deny", "127.0.0.1", "--refuse-message", REFUSAL)
PATHS = {
    # the supervisor's accept path, whatever serves the admitted clients
    "fork": serve_args("fork", *DENY),
    "prefork": serve_args("prefork", *DENY),
    "thread": serve_args("thread", *DENY),
    "async": serve_args("async", *DENY),
    "exec": ["--listen", "127.0.0.1:0", *DENY, "--", "/bin/cat"],
    # the workers accept and refuse themselves (modes.direct)
    "workers": serve_args("async", "--workers", "2", *DENY),
}


@pytest.mark.parametrize("path", sorted(PATHS))
def test_an_address_refusal_is_read_by_a_client_that_speaks_first(
    netserver_proc: ServerFactory, path: str
) -> None:
    server = netserver_proc(PATHS[path], env=HANDLER_ENV)
    refused_cleanly(server.host_port, (REFUSAL + "\r\n").encode())
    assert "matched deny rule 127.0.0.1" in server.log()


@pytest.mark.parametrize("mode", ["thread", "workers", "exec"])
def test_a_per_source_refusal_is_read_by_a_client_that_speaks_first(
    netserver_proc: ServerFactory, mode: str
) -> None:
    """`workers` and `exec`: the processes that accept refuse (modes.direct, and the
    exec spawners)."""
    extra = ("--max-per-source", "1", "--refuse-message", REFUSAL)
    args = {
        "workers": serve_args("async", "--workers", "2", *extra),
        "exec": ["--listen", "127.0.0.1:0", *extra, "--", "/bin/cat"],
    }.get(mode)
    server = netserver_proc(args or serve_args(mode, *extra), env=HANDLER_ENV)
    with connect(server.host_port) as held:
        held.sendall(b"ping\n")
        assert recv_line(held) == b"ping\n"  # served: it holds the source's one place
        refused_cleanly(server.host_port, (REFUSAL + "\r\n").encode())
    assert "more than 1 connections from 127.0.0.1" in server.log()


def test_a_tcpd_refusal_after_a_banner_is_read_by_a_client_that_speaks_first(
    netserver_proc: ServerFactory, tmp_path: Path
) -> None:
    """A rule with a banner is carried out off the accept path (`judge`), so its
    refusal takes the other way out of the supervisor (Server._drop)."""
    banners = tmp_path / "banners"
    banners.mkdir()
    (banners / "echo").write_text("No service for %a\n")
    (tmp_path / "hosts.allow").write_text("")
    (tmp_path / "hosts.deny").write_text(f"ALL: ALL: banners {banners}\n")
    flags = ["--hosts-allow", str(tmp_path / "hosts.allow"), "--hosts-deny"]
    flags += [str(tmp_path / "hosts.deny"), "--daemon-name", "echo", "--refuse-message", REFUSAL]
    server = netserver_proc(serve_args("thread", *flags), env=HANDLER_ENV)
    for _ in range(ROUNDS):
        with connect(server.host_port) as sock:
            sock.sendall(b"EHLO client.example\r\n")
            assert recv_line(sock) == b"No service for 127.0.0.1\r\n"
            assert recv_line(sock) == (REFUSAL + "\r\n").encode()
            assert finish(sock) == b""


PROXY_HEADER = b"PROXY TCP4 {client} 127.0.0.1 5555 25\r\n"


def proxied_workers(netserver_proc: ServerFactory, *flags: str) -> RunningServer:
    """netserver with two workers behind PROXY from loopback, holding each client."""
    return netserver_proc(
        [
            "--mode", "async", "--workers", "2", "--listen", "127.0.0.1:0",
            "--proxy-from", "127.0.0.1", *flags,
            "--handler", "proxy_tls_handlers:async_peer_held",
        ],
        env=HANDLER_ENV,
    )  # fmt: skip


def test_a_refusal_behind_proxy_with_workers_is_read_by_a_client_that_speaks_first(
    netserver_proc: ServerFactory,
) -> None:
    """The worker that read the PROXY header sends the supervisor's refusal (Worker._drop)."""
    server = proxied_workers(netserver_proc, "--max-per-source", "1", "--refuse-message", REFUSAL)
    header = PROXY_HEADER.replace(b"{client}", b"10.9.8.7")
    with connect(server.host_port) as first:
        first.sendall(header)
        assert recv_line(first).startswith(b"10.9.8.7:5555 ")
        for _ in range(ROUNDS):
            with connect(server.host_port) as sock:
                sock.sendall(header + b"EHLO client.example\r\n")
                assert recv_line(sock) == (REFUSAL + "\r\n").encode()
                assert finish(sock) == b""


def test_tcpd_banners_reach_clients_behind_proxy_with_workers(
    netserver_proc: ServerFactory, tmp_path: Path
) -> None:
    """The supervisor judges a client a worker named, and a banner is written to the
    connection the worker holds: it comes first, before the service or the refusal."""
    banners = tmp_path / "banners"
    banners.mkdir()
    (banners / "svc").write_text("Hello %a\n")
    (tmp_path / "hosts.allow").write_text(f"ALL: 10.9.8.6: banners {banners}\n")
    (tmp_path / "hosts.deny").write_text(f"ALL: ALL: banners {banners}\n")
    server = proxied_workers(
        netserver_proc,
        "--hosts-allow", str(tmp_path / "hosts.allow"),
        "--hosts-deny", str(tmp_path / "hosts.deny"),
        "--daemon-name", "svc", "--refuse-message", REFUSAL,
    )  # fmt: skip
    with connect(server.host_port) as granted:
        granted.sendall(PROXY_HEADER.replace(b"{client}", b"10.9.8.6"))
        assert recv_line(granted) == b"Hello 10.9.8.6\r\n"
        assert recv_line(granted).startswith(b"10.9.8.6:5555 127.0.0.1:25")
    with connect(server.host_port) as denied:
        denied.sendall(PROXY_HEADER.replace(b"{client}", b"10.9.8.7"))
        assert recv_line(denied) == b"Hello 10.9.8.7\r\n"
        assert recv_line(denied) == (REFUSAL + "\r\n").encode()
        assert finish(denied) == b""
    assert "verdict=denied" in server.log()


class RefuseOnFirstLine(Callbacks):
    """Says 421 to whatever the client sends first and ends the exchange itself."""

    def data_received(self, data: bytes) -> None:
        self.conn.write(b"421 closing\r\n")
        self.conn.close_lingering()


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_a_callback_connection_closed_lingering_ends_cleanly(loop: str) -> None:
    """`CallbackConnection.close_lingering` (leafmail's 421s) on either event loop: the
    client gets the line and a clean end though it goes on sending (with `close` it
    is reset)."""
    server = Server(
        RefuseOnFirstLine,
        "127.0.0.1:0",
        log=ServerLog(io.StringIO()),
        options=RunOptions(loop=loop, signals=False),
    )
    (endpoint,) = server.bind()
    with served(server):
        assert endpoint.port is not None
        refused_cleanly(("127.0.0.1", endpoint.port), b"421 closing\r\n")


# --- the drain's bounds, on a real loop and real sockets ---------------------------------


class Draining:
    """A `Lingerer` on a loop in a thread, and a listener whose clients it refuses."""

    def __init__(self, **bounds: Any) -> None:
        self.loop = asyncio.new_event_loop()
        self.fds = FdRegistry()
        self.lingerer = Lingerer(self.loop, self.fds, **bounds)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.thread = threading.Thread(target=self.loop.run_forever, name="test-linger")
        self.thread.start()
        self.refused: list[socket.socket] = []

    def refuse_client(self) -> socket.socket:
        """Connect a client that sent a line first; the server refuses it."""
        client = socket.create_connection(self.listener.getsockname(), timeout=IO_TIMEOUT)
        client.sendall(b"HELLO\r\n")
        sock, _ = self.listener.accept()
        self.refused.append(sock)
        done = threading.Event()

        def refuse() -> None:
            self.lingerer.refuse(sock, REFUSAL)
            done.set()

        self.loop.call_soon_threadsafe(refuse)
        assert done.wait(IO_TIMEOUT)
        assert recv_line(client) == (REFUSAL + "\r\n").encode()
        return client

    def count(self) -> int:
        return len(self.lingerer.draining)

    def all_closed(self) -> bool:
        """Nothing draining, and each refused socket closed and forgotten. Asked from
        the test's thread while the loop's thread ends the drain: `_end` forgets the
        socket before it closes it, so the three are waited for together."""
        closed = all(sock.fileno() == -1 for sock in self.refused)
        return self.count() == 0 and closed and not self.fds._fds

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.lingerer.close)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(IO_TIMEOUT)
        self.loop.close()
        self.listener.close()


@pytest.fixture
def draining(request: pytest.FixtureRequest) -> Iterator[Draining]:
    bounds = getattr(request, "param", {})
    state = Draining(**bounds)
    yield state
    state.close()


def test_a_draining_socket_closes_when_the_client_closes(draining: Draining) -> None:
    client = draining.refuse_client()
    assert draining.count() == 1
    assert draining.refused[0].fileno() in draining.fds._fds  # a forked child closes it
    assert client.recv(64) == b""  # the refusal, then the end: a half-close, not a reset
    client.sendall(b"more\r\n")  # dropped unread
    client.close()
    assert wait_until(draining.all_closed)
    # discarded in the kernel: a root supervisor never holds a refused client's bytes
    assert not any(draining.lingerer._buf or b"")


@pytest.mark.parametrize("draining", [{"max_bytes": 5000, "seconds": 60.0}], indirect=True)
def test_a_client_that_sends_past_the_allowance_is_closed(draining: Draining) -> None:
    client = draining.refuse_client()
    with client:
        assert draining.count() == 1
        client.sendall(b"x" * 4000)  # within the allowance: still draining
        client.sendall(b"x" * 2000)  # past it: closed long before the minute is up
        assert wait_until(draining.all_closed)


@pytest.mark.parametrize("draining", [{"seconds": 0.2}], indirect=True)
def test_a_client_that_neither_closes_nor_sends_is_closed_after_the_time(
    draining: Draining,
) -> None:
    client = draining.refuse_client()
    with client:
        assert wait_until(draining.all_closed)


@pytest.mark.parametrize("draining", [{"cap": 2}], indirect=True)
def test_past_the_cap_a_refused_socket_is_closed_at_once(draining: Draining) -> None:
    clients = [draining.refuse_client() for _ in range(3)]
    try:
        assert draining.count() == 2
        assert [s.fileno() == -1 for s in draining.refused] == [False, False, True]
        clients[0].close()  # a place is free again
        assert wait_until(lambda: draining.count() == 1)
        clients.append(draining.refuse_client())
        assert draining.count() == 2
    finally:
        for client in clients:
            client.close()


# The longest refusal lines allowed, each in the characters whose JSON form is longest
# for their UTF-8 octets (three times: "\u00e9" for two octets, a surrogate pair for four).
LONGEST = {
    "ascii": "554 " + "x" * (MAX_LINE_OCTETS - 4),
    "two octets": "554 " + "\u00e9" * ((MAX_LINE_OCTETS - 4) // 2),
    "three octets": "554 " + "\u20ac" * ((MAX_LINE_OCTETS - 4) // 3),
    "four octets": "554 " + "\U0001f600" * ((MAX_LINE_OCTETS - 4) // 4),
}


@pytest.mark.parametrize("kind", sorted(LONGEST))
def test_the_longest_refusal_line_reaches_a_client_behind_proxy_with_workers(
    netserver_proc: ServerFactory, kind: str
) -> None:
    """The supervisor's verdict for a proxied client travels to the worker as one
    message of at most the worker's MAX_MSG; a line of 4,500 octets was cut there, and
    its client never heard it (the bound, refusals.MAX_LINE_OCTETS, is checked by
    test_cli::test_a_refusal_line_that_cannot_be_sent_is_a_usage_error)."""
    line = LONGEST[kind]
    assert len(line.encode()) <= MAX_LINE_OCTETS
    server = proxied_workers(netserver_proc, "--deny", "10.9.8.7", "--refuse-access", line)
    with connect(server.host_port) as sock:
        sock.sendall(PROXY_HEADER.replace(b"{client}", b"10.9.8.7"))
        assert recv_line(sock) == (line + "\r\n").encode()
        assert finish(sock) == b""
