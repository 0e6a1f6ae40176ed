"""The client engine on real loopback connections (leafmail.delivery.wire).

Servers here misbehave on purpose, over a plain socket, in ways aiosmtpd never does:
replies injected after STARTTLS's 220, a reply line without end, a greeting that
refuses, a pipelined group answered in one write. The agents must stop early with a
clear reason (LinkDown for the smarthost, the next host for MX), never hang until a
timeout, never hold more than the reply bounds, and never read injected bytes as if
they came over TLS.
"""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Callable, Iterator
from typing import BinaryIO

import pytest
from smarthost import OneConnection, Script

from leafmail.delivery import LinkDown
from leafmail.delivery.smarthost import SmarthostAgent, SmarthostSettings
from leafmail.delivery.wire import WireError, open_connection
from leafmail.envelope import ClientInfo, Envelope, Recipient
from netserver.smtp.client import Awaited
from netserver.smtp.replyreader import MAX_LINE

pytestmark = pytest.mark.timeout(30)
MESSAGE = b"Subject: x\r\n\r\nhi\r\n"

MakeServer = Callable[[Script], OneConnection]


def read(reader: BinaryIO, lines: list[bytes]) -> bytes:
    """One line from the client, recorded."""
    line = reader.readline()
    lines.append(line)
    return line


@pytest.fixture
def raw() -> Iterator[MakeServer]:
    servers: list[OneConnection] = []

    def make(script: Script) -> OneConnection:
        servers.append(OneConnection(script))
        return servers[-1]

    yield make
    for server in servers:
        server.close()


def settings(port: int, tls: str = "none") -> SmarthostSettings:
    return SmarthostSettings(
        host="127.0.0.1",
        port=port,
        helo="client.test",
        tls=tls,
        connect_timeout=5.0,
        command_timeout=5.0,
        deadline=8.0,
    )


def envelope(*rcpts: str) -> Envelope:
    return Envelope(
        sender="alice@example.test",
        recipients=tuple(Recipient(r) for r in rcpts),
        client=ClientInfo("127.0.0.1", 40000, "client.test", "ESMTP"),
        received="2026-01-01T00:00:00Z",
    )


def finish(conn: socket.socket, reader: BinaryIO, lines: list[bytes], final: bytes) -> None:
    """Read the message up to its ".", answer `final`, then QUIT with 221."""
    while read(reader, lines) not in (b".\r\n", b""):
        pass
    conn.sendall(final)
    read(reader, lines)
    conn.sendall(b"221 bye\r\n")


def deliver_to(port: int, *rcpts: str) -> dict[int, str]:
    """Each recipient's result line after one delivery through the smarthost agent."""

    async def run() -> dict[int, str]:
        agent = SmarthostAgent(settings(port))
        try:
            env = envelope(*rcpts)
            results = await agent.deliver(env, MESSAGE, list(range(len(rcpts))))
        finally:
            await agent.close()
        return {i: r.line for i, r in results.items()}

    return asyncio.run(run())


def connect_only(settings: SmarthostSettings) -> str:
    """The LinkDown text of opening a connection (which must fail)."""

    async def run() -> None:
        agent = SmarthostAgent(settings)
        try:
            await agent.deliver(envelope("b@example.test"), MESSAGE, [0])
        finally:
            await agent.close()

    with pytest.raises(LinkDown) as error:
        asyncio.run(run())
    return str(error.value)


def test_replies_injected_after_starttls_are_refused(raw: MakeServer) -> None:
    """CVE-2011-0411's client side: a man in the middle appends a reply to the 220 of
    STARTTLS; read after the handshake, it would pass as the server's. Refused, and no
    handshake is even tried (nor any command sent after STARTTLS)."""

    lines: list[bytes] = []

    def script(conn: socket.socket, reader: BinaryIO) -> None:
        conn.sendall(b"220 mx.test ESMTP\r\n")
        read(reader, lines)  # EHLO
        conn.sendall(b"250-mx.test\r\n250-PIPELINING\r\n250 STARTTLS\r\n")
        read(reader, lines)  # STARTTLS
        conn.sendall(b"220 2.0.0 go ahead\r\n250-mx.test\r\n250 AUTH PLAIN\r\n")
        read(reader, lines)  # whatever comes next, if anything

    server = raw(script)
    text = connect_only(settings(server.port, tls="starttls"))
    server.close()  # its last read has returned
    assert "STARTTLS" in text and "before the TLS handshake" in text
    assert lines[:2] == [b"EHLO client.test\r\n", b"STARTTLS\r\n"]
    assert lines[2:] == [b""]  # the client closed; it sent no ClientHello, no EHLO


@pytest.mark.parametrize(
    ("replies", "reason"),
    [
        # A line without end is cut off after MAX_LINE octets, long before the timeout.
        ([b"220 mx.test ESMTP\r\n", b"250-" + b"x" * (4 * MAX_LINE)], "reply line too long"),
        ([b"554 5.3.2 no service for you\r\n"], "554 5.3.2 no service for you"),
        ([b"220 mx.test\r\n", b"250-mx.test\r\n550 no\r\n"], "inside a 250 reply"),
        ([b"220 mx.test\r\n", b"250-mx.test\r\n600 no\r\n"], "not an SMTP reply code"),
    ],
)
def test_broken_servers_are_a_link_down_with_the_reason(
    raw: MakeServer, replies: list[bytes], reason: str
) -> None:
    """Each reply is sent, then a line read; the connection must fail with `reason`."""

    def script(conn: socket.socket, reader: BinaryIO) -> None:
        for reply in replies:
            conn.sendall(reply)
            reader.readline()

    server = raw(script)
    assert reason in connect_only(settings(server.port))


def conversation(turns: list[tuple[int, bytes]], final: bytes, lines: list[bytes]) -> Script:
    """A server that reads `count` lines then sends `reply`, for each turn; then the
    message, answered `final`, and QUIT. What it read goes to `lines`."""

    def script(conn: socket.socket, reader: BinaryIO) -> None:
        for count, reply in turns:
            for _ in range(count):
                read(reader, lines)
            conn.sendall(reply)
        finish(conn, reader, lines, final)

    return script


def test_helo_fallback_when_ehlo_is_unknown(raw: MakeServer) -> None:
    """An old server without EHLO (RFC 5321 3.2): HELO, then a one-by-one transaction."""
    lines: list[bytes] = []
    turns = [(0, b"220 old.test SMTP\r\n"), (1, b"502 5.5.1 what?\r\n")]
    turns += [(1, reply) for reply in (b"250 old.test\r\n", b"250 ok\r\n", b"250 ok\r\n")]
    server = raw(conversation([*turns, (1, b"354 go\r\n")], b"250 2.0.0 taken\r\n", lines))
    assert deliver_to(server.port, "b@example.test") == {0: "250 2.0.0 taken"}
    server.close()
    verbs = [line.split()[0].split(b":")[0] for line in lines[:5]]
    assert verbs == [b"EHLO", b"HELO", b"MAIL", b"RCPT", b"DATA"]
    assert lines[-1] == b"QUIT\r\n"


def test_a_pipelined_group_answered_in_one_write(raw: MakeServer) -> None:
    """Replies that arrive together are each given to the command they answer; the
    server reads MAIL, both RCPTs and DATA before it answers any (RFC 2920)."""
    turns = [
        (0, b"220 mx.test ESMTP\r\n"),
        (1, b"250-mx.test\r\n250 PIPELINING\r\n"),
        (4, b"250 2.1.0 ok\r\n550 5.1.1 no such user\r\n250 2.1.5 ok\r\n354 go\r\n"),
    ]
    final = b"250-2.0.0 queued\r\n250 2.0.0 as Q1\r\n"
    server = raw(conversation(turns, final, []))
    assert deliver_to(server.port, "nobody@example.test", "b@example.test") == {
        0: "550 5.1.1 no such user",
        1: "250 2.0.0 queued as Q1",
    }


def test_command_timeout_is_a_wire_error(raw: MakeServer) -> None:
    """A server that stops answering: WireError after the command timeout (not the
    deadline's TimeoutError, which the agents report differently)."""
    silent = threading.Event()

    lines: list[bytes] = []

    def script(conn: socket.socket, reader: BinaryIO) -> None:
        conn.sendall(b"220 mx.test ESMTP\r\n")
        read(reader, lines)
        silent.wait(10)

    server = raw(script)

    async def run() -> None:
        link = await open_connection("127.0.0.1", server.port, timeout=0.2)
        try:
            await link.command(Awaited.EHLO, b"EHLO me\r\n")
        finally:
            link.abort()

    try:
        with pytest.raises(WireError, match="timed out"):
            asyncio.run(run())
    finally:
        silent.set()
