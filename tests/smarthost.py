"""A real SMTP server to deliver to: aiosmtpd on loopback, told how to answer.

`Smarthost` runs aiosmtpd's SMTP protocol on its own event loop in a thread, bound to
127.0.0.1 port 0 (the port is read back from the socket, so there is no race and no
sleep). It records every message it accepts with the envelope, ESMTP parameters, TLS
and AUTH facts, and can be told to refuse a sender, recipients or DATA with any reply,
to drop the connection at DATA, or to hang in DATA until released. TLS comes from a
`trustme` CA (STARTTLS, or implicit TLS for an smtps port) and AUTH from a dict of
users, as a provider's submission server would have them.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import pytest
import trustme
from aiosmtpd.smtp import SMTP, AuthResult, LoginPassword

from leafmail.spool import Spool

SINK_NAME = "smarthost.test"


@dataclass
class Received:
    """One message the smarthost accepted."""

    sender: str
    recipients: list[str]
    mail_options: list[str]
    rcpt_options: list[list[str]]
    content: bytes
    tls: bool
    login: str | None


@dataclass
class Behaviour:
    """How the smarthost answers; change it between deliveries (from the test thread)."""

    mail_reply: str | None = None
    rcpt_replies: dict[str, str] = field(default_factory=dict)
    data_reply: str | None = None
    drop_at_data: bool = False
    hang_at_data: bool = False


class Smarthost:
    """A controllable aiosmtpd server on 127.0.0.1:<ephemeral> (or `host`, `port`)."""

    def __init__(
        self,
        *,
        tls: ssl.SSLContext | None = None,
        implicit_tls: bool = False,
        require_starttls: bool = False,
        users: dict[str, str] | None = None,
        smtputf8: bool = True,
        size_limit: int | None = 33554432,
        port: int = 0,
        eightbitmime: bool = True,
        host: str = "127.0.0.1",
        pipelining: bool = True,
        auth_exclude: tuple[str, ...] = (),
    ) -> None:
        self.behaviour = Behaviour()
        self._auth_exclude = list(auth_exclude)  # AUTH mechanisms not offered, e.g. PLAIN
        self.received: list[Received] = []
        self.connections = 0
        self.data_sessions = 0  # sessions that reached handle_DATA (before any hang)
        self.auth_attempts: list[tuple[str, str]] = []  # (mechanism, login)
        self._tls = tls
        self._implicit = implicit_tls
        self._require_starttls = require_starttls
        self._users = users
        self._smtputf8 = smtputf8
        self._size_limit = size_limit
        self._eightbitmime = eightbitmime  # False: no 8BITMIME in EHLO (aiosmtpd decode_data)
        # aiosmtpd reads pipelined commands but does not say so; PIPELINING in EHLO
        # lets the clients under test send MAIL, RCPT and DATA in one write.
        self.pipelining = pipelining
        self._loop = asyncio.new_event_loop()
        self._release = asyncio.Event()
        self._server: asyncio.AbstractServer | None = None
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self.port = port  # 0: an ephemeral port, read back in start()
        self.host = host  # another loopback address (127.0.0.2) stands for another MX

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self) -> Smarthost:
        self._thread.start()
        future = asyncio.run_coroutine_threadsafe(self._listen(), self._loop)
        self.port = future.result(10)
        return self

    def stop(self) -> None:
        async def shutdown() -> None:
            self._release.set()
            if self._server is not None:
                self._server.close()
                await self._server.wait_closed()

        if self._thread.is_alive():
            asyncio.run_coroutine_threadsafe(shutdown(), self._loop).result(10)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
        if not self._thread.is_alive() and not self._loop.is_closed():
            self._loop.close()

    def release_hung(self) -> None:
        """Let sessions hanging in DATA (hang_at_data) go on."""
        self._loop.call_soon_threadsafe(self._release.set)

    async def _listen(self) -> int:
        self._server = await self._loop.create_server(
            self._protocol,
            self.host,
            self.port,
            ssl=self._tls if self._implicit else None,
        )
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    def _protocol(self) -> SMTP:
        self.connections += 1
        return SMTP(
            _Handler(self),
            hostname=SINK_NAME,
            ident="test smarthost",
            data_size_limit=self._size_limit,
            enable_SMTPUTF8=self._smtputf8,
            decode_data=not self._eightbitmime,
            tls_context=None if self._implicit else self._tls,
            require_starttls=self._require_starttls,
            auth_required=self._users is not None,
            auth_require_tls=True,
            authenticator=self._authenticate if self._users is not None else None,
            auth_exclude_mechanism=self._auth_exclude,
            timeout=30,
        )

    def _authenticate(
        self, server: SMTP, session: Any, envelope: Any, mechanism: str, auth_data: Any
    ) -> AuthResult:
        if not isinstance(auth_data, LoginPassword) or self._users is None:
            return AuthResult(success=False, handled=False)
        login = auth_data.login.decode()
        self.auth_attempts.append((mechanism, login))
        ok = self._users.get(login) == auth_data.password.decode()
        return AuthResult(success=ok, handled=False, auth_data=login if ok else None)


class _Handler:
    """aiosmtpd's hooks, answering as `Smarthost.behaviour` says."""

    def __init__(self, host: Smarthost) -> None:
        self.host = host

    async def handle_EHLO(
        self, server: SMTP, session: Any, envelope: Any, hostname: str, responses: list[str]
    ) -> list[str]:
        session.host_name = hostname
        if self.host.pipelining:
            responses.insert(-1, "250-PIPELINING")
        return responses

    async def handle_MAIL(
        self, server: SMTP, session: Any, envelope: Any, address: str, options: list[str]
    ) -> str:
        if self.host.behaviour.mail_reply:
            return self.host.behaviour.mail_reply
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        envelope.rcpt_options_list = []
        # A transaction begun under hang_at_data hangs even if its DATA is read after the
        # flag is cleared: a test that kills the client, then clears the flag, must not
        # see data the dead client had already sent be accepted by a lagging server.
        envelope.hang = self.host.behaviour.hang_at_data
        return "250 OK"

    async def handle_RCPT(
        self, server: SMTP, session: Any, envelope: Any, address: str, options: list[str]
    ) -> str:
        reply = self.host.behaviour.rcpt_replies.get(address)
        if reply:
            return reply
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options_list.append(list(options))
        return "250 OK"

    async def handle_DATA(self, server: SMTP, session: Any, envelope: Any) -> str:
        behaviour = self.host.behaviour
        self.host.data_sessions += 1
        if behaviour.drop_at_data:
            assert server.transport is not None  # handle_DATA runs on a live connection
            server.transport.close()
            return "421 4.3.0 dropping"  # never seen: the connection is gone
        if behaviour.hang_at_data or getattr(envelope, "hang", False):
            await self.host._release.wait()
        if behaviour.data_reply:
            return behaviour.data_reply
        login = session.auth_data if isinstance(session.auth_data, str) else None
        self.host.received.append(
            Received(
                sender=envelope.mail_from,
                recipients=list(envelope.rcpt_tos),
                mail_options=list(envelope.mail_options),
                rcpt_options=list(envelope.rcpt_options_list),
                content=bytes(envelope.original_content or envelope.content),
                tls=session.ssl is not None,
                login=login,
            )
        )
        return "250 2.0.0 accepted"


def delivery_counts(host: Smarthost) -> dict[str, int]:
    """How often each recipient got a message at the smarthost (at-least-once checks)."""
    counts: dict[str, int] = {}
    for got in host.received:
        for rcpt in got.recipients:
            counts[rcpt] = counts.get(rcpt, 0) + 1
    return counts


class Greeter:
    """A server that greets every connection with one fixed line and hangs up (or never greets).

    With `line=b""` it hangs up at once: a next hop that is down (no greeting), whose
    `accepts` count proves whether a client tried to connect at all.

    It stands for an MX that is overloaded ("421 ...") or one that accepted the TCP
    connection and then went silent (`line=None`).
    """

    def __init__(self, host: str, port: int, line: bytes | None) -> None:
        self.line = line
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.sock.listen(8)
        self.port: int = self.sock.getsockname()[1]
        self.accepts = 0
        self._held: list[socket.socket] = []
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:  # closed by stop()
                return
            self.accepts += 1
            if self.line is None:
                self._held.append(conn)  # silent: keep it open, say nothing
                continue
            with contextlib.suppress(OSError):
                conn.sendall(self.line)
            conn.close()

    def stop(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        self._thread.join(5)
        for conn in self._held:
            conn.close()


Script = Callable[[socket.socket, BinaryIO], None]


class OneConnection:
    """A server for replies no real server (and so not aiosmtpd) gives: one connection
    on 127.0.0.1 port 0, handled by `script(conn, reader)` in a thread.

    `reader` reads the client's lines (conn.makefile); the script writes whatever it
    likes with conn.sendall. An OSError (the client cut it short) just ends it, and
    `close` returns once the script has.
    """

    def __init__(self, script: Script) -> None:
        self.script = script
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        self._listener.settimeout(10)
        try:
            conn, _ = self._listener.accept()
        except OSError:
            return
        with conn, contextlib.suppress(OSError):
            conn.settimeout(10)
            self.script(conn, conn.makefile("rb"))

    def close(self) -> None:
        self._listener.close()
        self._thread.join(15)


class ManyConnections:
    """`OneConnection` for any number of connections, at once: each is handled by
    `script(conn, reader)` in a thread of its own; `connections` counts them."""

    def __init__(self, script: Script) -> None:
        self.script = script
        self.connections = 0
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._threads: list[threading.Thread] = []
        self._acceptor = threading.Thread(target=self._accept, daemon=True)
        self._acceptor.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:  # shut down by close()
                return
            self.connections += 1
            thread = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            self._threads.append(thread)
            thread.start()

    def _serve(self, conn: socket.socket) -> None:
        with conn, contextlib.suppress(OSError):
            conn.settimeout(10)
            self.script(conn, conn.makefile("rb"))

    def close(self) -> None:
        with contextlib.suppress(OSError):  # wakes the accept(), which close alone does not
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        self._acceptor.join(15)
        for thread in self._threads:
            thread.join(15)


@dataclass(frozen=True)
class SinkTLS:
    """A CA and a certificate for 127.0.0.1 (names would need a resolver)."""

    ca: trustme.CA
    server_context: ssl.SSLContext
    ca_file: str


def make_sink_tls(directory: Any) -> SinkTLS:
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(context)
    ca_file = str(directory / "smarthost-ca.pem")
    ca.cert_pem.write_to_path(ca_file)
    return SinkTLS(ca, context, ca_file)


@pytest.fixture
def sink() -> Iterator[Smarthost]:
    """A plain smarthost (no TLS, no AUTH); sessions left hanging in DATA are released."""
    host = Smarthost().start()
    try:
        yield host
    finally:
        host.release_hung()
        host.stop()


@pytest.fixture
def spool(tmp_path: Path) -> Spool:
    """An empty spool in the test's directory."""
    return Spool(tmp_path / "spool")
