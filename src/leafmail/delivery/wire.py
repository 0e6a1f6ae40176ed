"""The asyncio side of an SMTP client connection: bytes to and from `ClientProtocol`.

The dialogue's rules (what may be sent when, pipelining, pairing replies with commands,
the reply syntax and its bounds) are `netserver.smtp.client`'s, which does no I/O; this
module only moves bytes: `ClientLink` is the transport's protocol, feeds what arrives to
the engine and hands the replies to whoever awaits them, one `Answered` at a time, in
order. A pipelined group is one write (`send`), its replies arrive as they come.

Every failure that ends the connection, whatever its cause (the peer closed it, a reply
broke the protocol, no reply within the command timeout), is a `WireError`, so the
agents catch one exception (with OSError, which connecting and TLS raise) and say why.
A timer handle bounds each wait; it is cheaper than an asyncio.timeout() per reply.
"""

from __future__ import annotations

import asyncio
import ssl
from collections import deque

from netserver.smtp.client import Answered, Awaited, ClientProtocol, ClientState
from netserver.smtp.core import LocalProtocolError
from netserver.smtp.replies import Reply
from netserver.smtp.replyreader import BadReply

_COMMANDS = ClientState.COMMANDS  # bound once (Enum attribute access is slow on 3.11)


class WireError(Exception):
    """The connection cannot go on; the text says why in one line."""


def describe(reply: Reply) -> str:
    """A reply as one line of text ("550 5.1.1 no such user"), for errors and logs."""
    text = " ".join(" ".join(reply.lines).split())
    return " ".join(part for part in (str(reply.code), reply.enhanced or "", text) if part)


def message_of(reply: Reply) -> str:
    """The reply's text after its code, enhanced code first, as `Result.from_reply` reads it."""
    text = " ".join(reply.lines)
    return f"{reply.enhanced} {text}" if reply.enhanced else text


class ClientLink(asyncio.Protocol):
    """One SMTP client connection; make it with `open_connection`."""

    def __init__(self, timeout: float | None) -> None:
        self.timeout = timeout  # seconds to wait for one reply
        self.engine = ClientProtocol()
        self.transport: asyncio.Transport | None = None
        self._answers: deque[Answered] = deque()
        self._error: WireError | None = None
        self._waiter: asyncio.Future[None] | None = None

    @property
    def is_connected(self) -> bool:
        t = self.transport
        usable = self.engine.state is _COMMANDS
        return self._error is None and usable and t is not None and not t.is_closing()

    @property
    def encrypted(self) -> bool:
        t = self.transport
        return t is not None and t.get_extra_info("sslcontext") is not None

    def supports(self, keyword: str) -> bool:
        return self.engine.supports(keyword)

    def send(self, sends: tuple[tuple[Awaited, bytes], ...] | list[tuple[Awaited, bytes]]) -> None:
        """Write a group of commands in one write (the engine checks it may go)."""
        if self._error is not None:
            raise self._error
        engine = self.engine
        try:
            data = b"".join([engine.send(awaited, line) for awaited, line in sends])
        except LocalProtocolError as exc:
            raise WireError(f"not sent: {exc}") from None
        assert self.transport is not None
        self.transport.write(data)

    async def reply(self) -> Answered:
        """The next reply, in the order the commands were sent."""
        while not self._answers:
            if self._error is not None:
                raise self._error
            loop = asyncio.get_running_loop()
            self._waiter = waiter = loop.create_future()
            timer = None if self.timeout is None else loop.call_later(self.timeout, _late, waiter)
            try:
                await waiter
            finally:
                self._waiter = None
                if timer is not None:
                    timer.cancel()
        return self._answers.popleft()

    async def command(self, awaited: Awaited, line: bytes) -> Reply:
        """Send one command and return its reply."""
        self.send([(awaited, line)])
        return (await self.reply()).reply

    async def starttls(self, context: ssl.SSLContext, server_hostname: str) -> None:
        """STARTTLS, then the handshake; WireError when refused, OSError when it fails."""
        reply = await self.command(Awaited.STARTTLS, b"STARTTLS\r\n")
        if reply.code != 220:
            raise WireError(f"STARTTLS refused: {describe(reply)}")
        assert self.transport is not None
        loop = asyncio.get_running_loop()
        tls = await loop.start_tls(
            self.transport, self, context, server_hostname=server_hostname or None
        )
        if tls is None:
            raise WireError("connection lost during the TLS handshake")
        self.transport = tls
        self.engine.tls_started()

    def abort(self) -> None:
        """Close now, without waiting for the peer (nor a TLS close_notify)."""
        if self.transport is not None:
            self.transport.abort()

    # -- asyncio.Protocol ---------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # a stream transport

    def data_received(self, data: bytes) -> None:
        if self._error is not None:
            return
        try:
            self._answers.extend(self.engine.receive_data(data))
        except BadReply as exc:
            self._fail(WireError(f"bad reply: {exc}"))
            self.abort()
        self._wake()

    def eof_received(self) -> bool:
        self._fail(WireError("connection closed by the server"))
        return False  # the transport closes itself

    def connection_lost(self, exc: Exception | None) -> None:
        why = f": {exc}" if exc is not None else ""
        self._fail(WireError(f"connection lost{why}"))

    def _fail(self, error: WireError) -> None:
        if self._error is None:
            self._error = error
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)


def _late(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_exception(WireError("timed out waiting for the server's reply"))


async def open_connection(
    host: str,
    port: int,
    *,
    timeout: float | None,
    context: ssl.SSLContext | None = None,
    server_hostname: str = "",
) -> ClientLink:
    """Connect (with TLS from the start when `context` is given) and read the greeting.

    WireError when the greeting is not 220 (a 554 greeting means "no service here",
    RFC 5321 3.1) or does not come; OSError when the connection or handshake fails.
    """
    loop = asyncio.get_running_loop()
    if context is None:
        _transport, conn = await loop.create_connection(lambda: ClientLink(timeout), host, port)
    else:
        _transport, conn = await loop.create_connection(
            lambda: ClientLink(timeout),
            host,
            port,
            ssl=context,
            server_hostname=server_hostname or host,
        )
    try:
        greeting = (await conn.reply()).reply
        if greeting.code != 220:
            raise WireError(describe(greeting))
    except BaseException:
        conn.abort()
        raise
    return conn
