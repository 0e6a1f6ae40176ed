"""leafmail's 421s are read by a client that goes on sending (netserver.linger).

An SMTP client may pipeline, or not notice a 421 before its next command. When the
server ends a session the client did not end -- too many connections from its address,
too many errors, a stop -- it writes the 421, half-closes and drains what the client
still sends before closing, so the client reads the 421 and a clean end, not a reset.
Real `leafmail serve` processes, real sockets; `finish` checks the end.
"""

from __future__ import annotations

import os
import pwd
import signal
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from leafmail_fixtures import (
    HOSTNAME,
    LeafmailFactory,
    RawSMTP,
    leafmail_servers,
    make_tls,
    toml_string,
)
from lifecycle_handlers import recv_line
from test_refusal_lines import ROUNDS, finish

from leafmail.daemon import refusal_replies
from netserver.refusals import RefusalCause


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[LeafmailFactory]:
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("leafmail")
        except KeyError:
            pytest.skip("no leafmail user (.ci/run creates it)")
    yield from leafmail_servers(tmp_path)


def test_a_client_over_its_sessions_reads_the_421_though_it_spoke_first(
    servers: LeafmailFactory,
) -> None:
    # Loopback is a relay network by default, and those are exempt from the limit.
    server = servers("[relay]\nrelay_networks = []\n[smtp]\nmax_sessions_per_source = 1\n")
    with RawSMTP(server.address()) as held:
        held.greeting()
        for _ in range(ROUNDS):
            with socket.create_connection(server.address(), timeout=5.0) as sock:
                sock.sendall(b"EHLO client.example\r\n")  # before any greeting
                line = recv_line(sock)
                assert line.startswith(b"421 4.7.0 ") and b"Too many connections" in line
                assert finish(sock) == b""


def test_a_client_past_max_errors_reads_the_421_and_a_clean_end(
    servers: LeafmailFactory,
) -> None:
    server = servers("[smtp]\nmax_errors = 1\n")
    for _ in range(ROUNDS):
        with RawSMTP(server.address()) as raw:
            raw.greeting()
            raw.send(b"BOGUS\r\nBOGUS\r\n")
            assert raw.reply().code == 500
            closing = raw.reply()
            assert closing.code == 421, closing
            assert finish(raw.sock) == b""  # its QUIT came too late, and is dropped


def test_a_session_stopped_by_the_server_reads_the_421_and_a_clean_end(
    servers: LeafmailFactory,
) -> None:
    server = servers()
    raw = RawSMTP(server.address())
    with raw:
        raw.greeting()
        raw.ehlo()
        server.proc.send_signal(signal.SIGTERM)
        server.terminated = True
        closing = raw.reply()
        assert closing.code == 421 and HOSTNAME in closing.text, closing
        assert finish(raw.sock) == b""
    assert server.stop() == 0


def test_over_tls_a_client_past_max_errors_reads_the_421_and_the_close(
    servers: LeafmailFactory, tmp_path: Path
) -> None:
    """TLS has its own half-close, close_notify, after which the TLS layer reads on
    until the client's (bounded): the transport is closed as it is."""
    tls = make_tls(tmp_path)
    server = servers(
        f"[smtp]\nmax_errors = 1\ntls_cert = {toml_string(tls.cert)}\n"
        f"tls_key = {toml_string(tls.key)}\n"
    )
    with RawSMTP(server.address()) as raw:
        raw.greeting()
        raw.ehlo()
        assert raw.command("STARTTLS").code == 220
        raw.start_tls(tls.client_context())
        raw.send(b"BOGUS\r\nBOGUS\r\n")
        assert raw.reply().code == 500
        assert raw.reply().code == 421
        raw.send(b"QUIT\r\n")  # too late: dropped
        assert raw.sock.recv(64) == b""  # close_notify, well before any timeout


def test_each_refusal_at_connect_has_its_own_reply() -> None:
    """A limit (421 4.7.0), a rule (421 4.7.1) and our own failure (421 4.3.0) each have
    their reply, whose enhanced code is of the reply's class (RFC 3463), each naming the
    host (netserver.refusals); all are 421, since a 554 at connect would oblige the
    server to keep the session until QUIT (RFC 5321, 3.1)."""
    lines = refusal_replies("mx.test")
    replies = {cause: lines.line(cause) for cause in RefusalCause}
    assert replies == {
        RefusalCause.LIMIT: "421 4.7.0 mx.test Too many connections from your address, "
        "try again later",
        RefusalCause.ACCESS: "421 4.7.1 mx.test Access denied, closing connection",
        RefusalCause.ERROR: "421 4.3.0 mx.test Local error in processing, try again later",
    }
