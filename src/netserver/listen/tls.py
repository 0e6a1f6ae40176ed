"""TLS termination for every mode, so handlers and commands only ever see plaintext.

* The event-loop mode lets the loop's own TLS transport do it (`EventLoopMode`).
* The thread mode wraps the socket in the worker thread (`accept_in_thread`), with a
  handshake deadline; `TlsConnection` sends close_notify when the handler finishes.
* Processes -- fork and prefork children, spawned commands -- cannot share the TLS state
  the supervisor would need to keep, so the supervisor terminates TLS on its event loop
  and relays plaintext over a unix socketpair whose other end becomes the child's
  stdin/stdout (`Relay`). The relay forwards with flow control both ways (a side whose
  writes back up stops the other side's reads), passes a half-close from the client on
  to the child, ends the TLS session when the child is done, and aborts both sides after
  the idle timeout.

The handshake always finishes before anything is dispatched: a client that fails it, or
stalls, is logged and dropped, and never reaches a handler. Certificates reload on
SIGHUP through `load_context`, keeping the old context when the new files are bad.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
from typing import cast

from ..accepted import Accepted, FdRegistry
from ..connection import Connection
from ..connlog import ServerLog
from ..errors import ConfigError
from ..limits import Limits

HANDSHAKE_TIMEOUT = 10.0


def load_context(cert: str, key: str) -> ssl.SSLContext:
    """A server context for the certificate chain and key files, at least TLS 1.2.

    Raises ConfigError naming the files and the reason, so a reload can log it.
    """
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ConfigError(f"TLS certificate {cert} / key {key}: {reason}") from None
    return harden(context)


def harden(context: ssl.SSLContext) -> ssl.SSLContext:
    """Refuse anything older than TLS 1.2 on a context the server will use."""
    floor = context.minimum_version
    if floor in (ssl.TLSVersion.MINIMUM_SUPPORTED, ssl.TLSVersion.SSLv3) or (
        floor in (ssl.TLSVersion.TLSv1, ssl.TLSVersion.TLSv1_1)
    ):
        context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


def handshake_timeout(limits: Limits) -> float:
    """The handshake deadline: HANDSHAKE_TIMEOUT, or the idle timeout if shorter."""
    return min(HANDSHAKE_TIMEOUT, limits.timeout or HANDSHAKE_TIMEOUT)


# -- thread mode --------------------------------------------------------------------------


def accept_in_thread(context: ssl.SSLContext, sock: socket.socket, timeout: float) -> ssl.SSLSocket:
    """Run the server handshake on blocking `sock` within `timeout` seconds."""
    sock.setblocking(True)
    sock.settimeout(timeout)
    tls = context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
    try:
        tls.do_handshake()
    except BaseException:
        tls.close()
        raise
    return tls


class TlsConnection(Connection):
    """A `Connection` over an SSLSocket whose `finish` ends the session with close_notify.

    SSLSocket.shutdown() drops the TLS state and sends a bare FIN; a client would see a
    truncated stream. Here close_notify goes out first, without waiting for the
    client's own (a non-blocking unwrap sends ours and stops at "want read").
    """

    _finished = False

    def finish(self) -> None:
        if self._finished:
            return
        self.wfile.flush()
        self._finished = True
        tls = cast(ssl.SSLSocket, self.sock)
        with contextlib.suppress(OSError, ValueError):
            tls.setblocking(False)
            tls.unwrap()
        with contextlib.suppress(OSError):
            socket.socket.shutdown(tls, socket.SHUT_WR)


# -- process modes: the relay ---------------------------------------------------------------


class _End(asyncio.Protocol):
    """One side of a relay: what it receives is written to the other side."""

    def __init__(self, relay: Relay, from_client: bool) -> None:
        self.relay = relay
        self.from_client = from_client
        self.transport: asyncio.Transport | None = None
        self.fd = -1  # registered in the FdRegistry while open
        self.other: _End | None = None
        self.lost = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.relay.moved(self.from_client, len(data))
        other = self.other
        if other is not None and other.transport is not None and not other.lost:
            other.transport.write(data)

    def eof_received(self) -> bool | None:
        self.relay.eof_from(self)
        return None if self.from_client else True  # asyncio warns if TLS says True

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.relay.lost(self)

    def pause_writing(self) -> None:
        if self.other is not None and self.other.transport is not None:
            self.other.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.other is not None and self.other.transport is not None and not self.other.lost:
            self.other.transport.resume_reading()


class Relay:
    """Plaintext between a TLS client and a child's socketpair end, on the event loop."""

    def __init__(self, conn: Accepted, fds: FdRegistry, timeout: float | None) -> None:
        self.conn = conn
        self.fds = fds
        self.timeout = timeout
        self.client = _End(self, from_client=True)
        self.child = _End(self, from_client=False)
        self.client.other, self.child.other = self.child, self.client
        self.done = asyncio.get_running_loop().create_future()
        self._active = False
        self._timer: asyncio.TimerHandle | None = None
        conn.record.bytes_in = conn.record.bytes_out = 0

    async def start(self, context: ssl.SSLContext, deadline: float) -> socket.socket:
        """Handshake with the client, then return the socket end the child gets."""
        loop = asyncio.get_running_loop()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.child.fd, self.client.fd = ours.fileno(), self.conn.fd
        self.fds.add(self.child.fd)
        try:
            await loop.connect_accepted_socket(lambda: self.child, ours)
            await loop.connect_accepted_socket(
                lambda: self.client, self.conn.sock, ssl=context, ssl_handshake_timeout=deadline
            )
        except BaseException:
            self.fds.discard(self.child.fd)
            self.fds.discard(self.client.fd)
            theirs.close()
            self.abort()
            with contextlib.suppress(OSError):
                ours.close()
            with contextlib.suppress(OSError):
                self.conn.sock.close()
            self._release()
            raise
        if self.timeout:
            self._timer = loop.call_later(self.timeout, self._check_idle)
        return theirs

    def _release(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        if not self.done.done():
            self.done.set_result(None)

    def moved(self, from_client: bool, n: int) -> None:
        self._active = True
        record = self.conn.record
        if from_client:
            record.bytes_in = (record.bytes_in or 0) + n
        else:
            record.bytes_out = (record.bytes_out or 0) + n

    def eof_from(self, end: _End) -> None:
        """Client done: the child reads EOF. Child done: the TLS session ends."""
        other = end.other
        if other is None or other.transport is None or other.lost:
            return
        if end.from_client:
            if other.transport.can_write_eof():
                other.transport.write_eof()
        else:
            other.transport.close()

    def lost(self, end: _End) -> None:
        """One side is gone: forget its descriptor now (before the number is reused),
        and end the other side after what is queued for it is sent."""
        self.fds.discard(end.fd)
        other = end.other
        if other is not None and other.transport is not None and not other.lost:
            if end.from_client and other.transport.can_write_eof():
                other.transport.write_eof()  # the child sees EOF even if its fd leaked
            other.transport.close()
        if self.client.lost and self.child.lost:
            self._release()

    def abort(self) -> None:
        """Drop both sides now."""
        for end in (self.client, self.child):
            if end.transport is not None and not end.lost:
                end.transport.abort()

    def _check_idle(self) -> None:
        assert self.timeout
        if self._active:
            self._active = False
            self._timer = asyncio.get_running_loop().call_later(self.timeout, self._check_idle)
            return
        self.conn.record.status = "idle-timeout"
        self.abort()


class TlsTerminator:
    """Starts relays for the supervisor and lets it wait for them at shutdown."""

    def __init__(self, fds: FdRegistry, limits: Limits, log: ServerLog) -> None:
        self.fds = fds
        self.limits = limits
        self.log = log
        self.relays: set[Relay] = set()

    async def terminate(self, conn: Accepted, context: ssl.SSLContext) -> Accepted | None:
        """Handshake and relay; the child's end as a new `Accepted`, None if it failed."""
        relay = Relay(conn, self.fds, self.limits.timeout)
        try:
            theirs = await relay.start(context, handshake_timeout(self.limits))
        except (OSError, ssl.SSLError, TimeoutError) as exc:
            self.log.error("TLS handshake failed", peer=str(conn.record.peer), error=str(exc))
            conn.record.status = "tls-failed"
            return None
        self.relays.add(relay)
        relay.done.add_done_callback(lambda _: self.relays.discard(relay))
        return Accepted(theirs, conn.record)

    async def closed(self, timeout: float) -> None:
        """Wait a little for relays still flushing to their clients, then drop them."""
        pending = [relay.done for relay in self.relays]
        if pending:
            _, late = await asyncio.wait(pending, timeout=timeout)
            for relay in list(self.relays):
                if relay.done in late:
                    relay.abort()
