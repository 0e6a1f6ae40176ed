"""TLS termination in every mode and for commands, with trustme certificates.

Handlers and commands must see plaintext; the client is a real `ssl` socket that trusts
only the throw-away CA. Readiness and reloads are observed through --ready-fd and the
server's own log lines, never by sleeping.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import ssl
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import pytest
import trustme
from conftest import RunningServer, ServerFactory
from lifecycle_handlers import HANDLER_ENV, connect, serve_args, wait_until
from test_proxy_protocol import v2_tcp4

SERVER_NAME = "service.test"
LOOPS = ["asyncio", "auto"]  # the relay on asyncio's TLS transport and on uvloop's


@dataclass
class Certs:
    """A CA the client trusts, and where the server's certificate and key files are."""

    ca: trustme.CA
    cert: Path
    key: Path

    def flags(self) -> list[str]:
        return ["--tls-cert", str(self.cert), "--tls-key", str(self.key)]

    def install(self, name: str) -> None:
        """Write a certificate for `name` over the server's files."""
        issued = self.ca.issue_cert(name)
        self.cert.write_bytes(b"".join(pem.bytes() for pem in issued.cert_chain_pems))
        self.key.write_bytes(issued.private_key_pem.bytes())

    def client_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context()
        self.ca.configure_trust(context)
        return context


@pytest.fixture
def certs(tmp_path: Path) -> Iterator[Certs]:
    certs = Certs(trustme.CA(), tmp_path / "cert.pem", tmp_path / "key.pem")
    certs.install(SERVER_NAME)
    yield certs


def tls_connect(
    server: RunningServer, certs: Certs, name: str = SERVER_NAME, prefix: bytes = b""
) -> ssl.SSLSocket:
    """A verified TLS connection (after `prefix` in plaintext, e.g. a PROXY header)."""
    sock = connect(server.host_port)
    sock.sendall(prefix)
    return certs.client_context().wrap_socket(sock, server_hostname=name)


def recv_until_eof(sock: ssl.SSLSocket) -> bytes:
    out = b""
    while data := sock.recv(65536):
        out += data
    return out


def recv_line(sock: ssl.SSLSocket) -> bytes:
    out = b""
    while not out.endswith(b"\n"):
        data = sock.recv(1)
        if not data:
            break
        out += data
    return out


def served_name(sock: ssl.SSLSocket) -> str:
    cert = sock.getpeercert()
    assert cert is not None
    san = cast(tuple[tuple[str, str], ...], cert["subjectAltName"])
    names = [value for kind, value in san if kind == "DNS"]
    return names[0]


def conn_statuses(server: RunningServer) -> list[str]:
    lines = [line for line in server.log().splitlines() if line.startswith("netserver: conn ")]
    return [line.rpartition("status=")[2] for line in lines]


@pytest.mark.parametrize("mode", ["fork", "prefork", "thread", "async", "fork-asyncio"])
def test_every_mode_serves_plaintext_handlers_over_tls(
    netserver_proc: ServerFactory, certs: Certs, mode: str
) -> None:
    mode, _, loop = mode.partition("-")
    server = netserver_proc(
        serve_args(mode, "--loop", loop or "auto", *certs.flags()), env=HANDLER_ENV
    )
    for _ in range(3):  # prefork: the same worker serves again
        with tls_connect(server, certs) as sock:
            assert sock.version() in ("TLSv1.2", "TLSv1.3")
            sock.sendall(b"ping\n")
            assert recv_line(sock) == b"ping\n"
            sock.sendall(b"pong\n")
            assert recv_line(sock) == b"pong\n"
    assert wait_until(lambda: conn_statuses(server).count("ok") == 3)


@pytest.mark.parametrize("handler", ["examples.echo:async_main", "examples.echo:Echo"])
def test_a_client_close_notify_leaves_no_stray_line_in_the_log(
    netserver_proc: ServerFactory, certs: Certs, handler: str
) -> None:
    """After a plain EOF the handler may still answer; a TLS connection cannot stay
    half-open, and asyncio and uvloop print a warning outside the log format (JSON too)
    when a protocol asks them to, once per client that sends close_notify first."""
    args = ["--listen", "127.0.0.1:0", "--mode", "async", "--handler", handler]
    server = netserver_proc([*args, *certs.flags()], env=HANDLER_ENV)
    with tls_connect(server, certs) as sock:
        sock.sendall(b"ping\n")
        assert recv_line(sock) == b"ping\n"
        with contextlib.suppress(OSError):
            sock.unwrap()  # close_notify: the end of the client's input
    assert wait_until(lambda: len(conn_statuses(server)) == 1), server.log()
    assert [line for line in server.log().splitlines() if not line.startswith("netserver: ")] == []


@pytest.mark.parametrize("loop", LOOPS)
def test_command_echo_over_tls_with_backpressure(
    netserver_proc: ServerFactory, certs: Certs, loop: str
) -> None:
    server = netserver_proc(
        ["--listen", "127.0.0.1:0", "--loop", loop, *certs.flags(), "--", "/bin/cat"]
    )
    payload = bytes(range(256)) * 8192  # 2 MiB: more than every buffer on the way
    got = asyncio.run(echo_while_sending(server.host_port, certs.client_context(), payload))
    assert got == payload


async def echo_while_sending(
    address: tuple[str, int], context: ssl.SSLContext, payload: bytes
) -> bytes:
    """Send `payload` and read its echo at the same time, on one thread.

    Not an SSLSocket written by one thread while another reads it: OpenSSL's SSL object
    is not thread-safe, and with a socket timeout (non-blocking underneath) a read that
    wants more data could see the writer's state and end as a "ragged EOF", b"", about
    once in 30 runs, while the server was still echoing. asyncio's TLS transport does
    both directions on one thread.
    """
    async with asyncio.timeout(60):
        reader, writer = await asyncio.open_connection(
            *address, ssl=context, server_hostname=SERVER_NAME
        )
        try:
            writer.write(payload)  # the transport sends it as the server takes it
            sending = asyncio.ensure_future(writer.drain())
            got = bytearray()
            while len(got) < len(payload):
                data = await reader.read(65536)
                assert data, "EOF before the echo was complete"
                got += data
            await sending
        finally:
            writer.close()
            with contextlib.suppress(OSError, ssl.SSLError):
                await writer.wait_closed()
    return bytes(got)


@pytest.mark.parametrize("loop", LOOPS)
def test_command_environment_over_tls(
    netserver_proc: ServerFactory, certs: Certs, loop: str
) -> None:
    server = netserver_proc(
        ["--listen", "127.0.0.1:0", "--loop", loop, *certs.flags(), "--", "env"]
    )
    with tls_connect(server, certs) as sock:
        client_port = sock.getsockname()[1]
        env = dict(line.partition("=")[::2] for line in recv_until_eof(sock).decode().splitlines())
    assert env["TCPREMOTEIP"] == "127.0.0.1"
    assert env["TCPREMOTEPORT"] == str(client_port)
    assert env["PROTO"] == "TCP"


def test_proxy_header_then_tls(netserver_proc: ServerFactory, certs: Certs) -> None:
    server = netserver_proc(
        ["--listen", "127.0.0.1:0", "--proxy-from", "127.0.0.1", *certs.flags(), "--", "env"]
    )
    header = v2_tcp4("192.0.2.7", "198.51.100.1", 5555, 443)
    with tls_connect(server, certs, prefix=header) as sock:
        env = dict(line.partition("=")[::2] for line in recv_until_eof(sock).decode().splitlines())
    assert (env["TCPREMOTEIP"], env["TCPREMOTEPORT"]) == ("192.0.2.7", "5555")
    assert (env["TCPLOCALIP"], env["TCPLOCALPORT"]) == ("198.51.100.1", "443")


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1_1 is deprecated:DeprecationWarning")
@pytest.mark.parametrize("mode", ["fork", "prefork", "thread", "async", "command"])
def test_failed_handshake_never_reaches_the_handler(
    netserver_proc: ServerFactory, certs: Certs, mode: str
) -> None:
    if mode == "command":
        args = ["--listen", "127.0.0.1:0", *certs.flags(), "--", "/bin/cat"]
    else:
        args = serve_args(mode, *certs.flags())
    server = netserver_proc(args, env=HANDLER_ENV)
    with connect(server.host_port) as sock:  # plaintext to a TLS port
        sock.sendall(b"ping\n" * 100)
        with pytest.raises(ConnectionResetError):
            while sock.recv(65536):
                pass
            raise ConnectionResetError  # a clean EOF is a close too
    old = certs.client_context()
    old.maximum_version = ssl.TLSVersion.TLSv1_1
    old.minimum_version = ssl.TLSVersion.MINIMUM_SUPPORTED
    with connect(server.host_port) as raw, pytest.raises((ssl.SSLError, ConnectionError)):
        old.wrap_socket(raw, server_hostname=SERVER_NAME)
    assert wait_until(lambda: server.log().count("TLS handshake failed") == 2)
    assert wait_until(lambda: conn_statuses(server).count("tls-failed") == 2)
    assert "ping" not in server.log()


@pytest.mark.parametrize("mode", ["fork", "thread", "async", "command"])
def test_stalled_handshake_times_out(
    netserver_proc: ServerFactory, certs: Certs, mode: str
) -> None:
    if mode == "command":
        args = ["--listen", "127.0.0.1:0", *certs.flags(), "--timeout", "0.5", "--", "/bin/cat"]
    else:
        args = serve_args(mode, *certs.flags(), "--timeout", "0.5")
    server = netserver_proc(args, env=HANDLER_ENV)
    with connect(server.host_port) as sock, contextlib.suppress(ConnectionResetError):
        assert sock.recv(100) == b""
    assert wait_until(lambda: "TLS handshake failed" in server.log())


@pytest.mark.parametrize("mode", ["fork", "thread", "async"])
def test_certificate_reloads_on_sighup_and_a_broken_one_is_ignored(
    netserver_proc: ServerFactory, certs: Certs, mode: str
) -> None:
    server = netserver_proc(serve_args(mode, *certs.flags()), env=HANDLER_ENV)
    with tls_connect(server, certs) as sock:
        assert served_name(sock) == SERVER_NAME
    certs.install("renewed.test")
    server.signal(signal.SIGHUP)
    assert wait_until(lambda: "TLS context reloaded" in server.log())
    with tls_connect(server, certs, name="renewed.test") as sock:
        assert served_name(sock) == "renewed.test"
        sock.sendall(b"after reload\n")
        assert recv_line(sock) == b"after reload\n"
    certs.key.write_text("not a key\n")
    server.signal(signal.SIGHUP)
    assert wait_until(lambda: "TLS reload failed" in server.log())
    assert str(certs.key) in server.log()
    with tls_connect(server, certs, name="renewed.test") as sock:
        assert served_name(sock) == "renewed.test"


def test_bad_certificate_files_at_start_exit_78(tmp_path: Path) -> None:
    missing = str(tmp_path / "missing.pem")
    tls = ["--tls-cert", missing, "--tls-key", missing]
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "netserver.cli",
            "serve",
            "--listen",
            "127.0.0.1:0",
            *tls,
            "--",
            "cat",
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 78
    assert missing in proc.stderr


def test_relay_closes_when_the_client_goes(netserver_proc: ServerFactory, certs: Certs) -> None:
    server = netserver_proc(["--listen", "127.0.0.1:0", *certs.flags(), "--", "/bin/cat"])
    with tls_connect(server, certs) as sock:
        sock.sendall(b"x\n")
        assert recv_line(sock) == b"x\n"
        sock.shutdown(socket.SHUT_RDWR)
    assert wait_until(lambda: len(conn_statuses(server)) == 1)


def read_all_raw(sock: socket.socket) -> bytes:
    """Everything a plain socket reads until the server closes (a reset ends it too)."""
    got = b""
    with contextlib.suppress(ConnectionResetError):
        while data := sock.recv(4096):
            got += data
    return got


@pytest.mark.parametrize("mode", ["thread", "workers", "command"])
def test_a_refused_client_of_a_tls_server_reads_no_plaintext(
    netserver_proc: ServerFactory, certs: Certs, mode: str
) -> None:
    """A refusal is made before the handshake, so a refusal line would reach the client as
    plaintext where it waits for a TLS record (Python's ssl: "wrong version number").
    Found against leafmail's implicit-TLS listener (its per-source limit's 421 line) with
    a TLS client; before, the refused client here read the --refuse-message line."""
    extra = (*certs.flags(), "--max-per-source", "1", "--refuse-message", "421 4.7.0 busy")
    if mode == "command":
        args = ["--listen", "127.0.0.1:0", *extra, "--", "/bin/cat"]
    elif mode == "workers":
        args = serve_args("async", "--workers", "2", *extra)
    else:
        args = serve_args(mode, *extra)
    server = netserver_proc(args, env=HANDLER_ENV)
    with tls_connect(server, certs) as held:
        held.sendall(b"ping\n")
        assert recv_line(held) == b"ping\n"  # served: it holds the source's one place
        with connect(server.host_port) as refused:
            assert read_all_raw(refused) == b""
    assert wait_until(lambda: "more than 1 connections from 127.0.0.1" in server.log())
