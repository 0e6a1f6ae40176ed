"""`LoopConnection`: what every event-loop connection keeps, whatever its handler form.

Both handler forms of event-loop mode (`AsyncConnection` for ``async def`` handlers,
`CallbackConnection` for callback objects) are asyncio Protocols built on this one. It
holds the endpoints, the byte counts the log reports, and the idle timeout: a connection
with no traffic either way for `timeout` seconds is aborted. The check runs every
timeout/4 and compares the byte counts with the last check's, so the per-request path
reads no clock and sets no flag; a connection ends within 1.25 x timeout of its last byte.
One timer per loop and timeout checks every connection (`_IdleSweep`): a timer per
connection would cost each idle connection about 600 bytes.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import weakref
from typing import Any, cast

from .endpoint import Endpoint


class LoopConnection(asyncio.Protocol):
    """A client connection on the event loop: transport, endpoints, byte counts, idle timer."""

    # Slots, not a __dict__: an idle session should cost as little memory as possible.
    __slots__ = (
        "_error",
        "_idle",
        "_last",
        "_loop",
        "_lost",
        "_seen",
        "bytes_in",
        "bytes_out",
        "complete",
        "local",
        "peer",
        "timed_out",
        "timeout",
        "transport",
    )

    def __init__(
        self,
        *,
        timeout: float | None = None,
        peer: Endpoint | None = None,
        local: Endpoint | None = None,
    ) -> None:
        self.timeout = timeout
        self.peer = peer or Endpoint()
        self.local = local or Endpoint()
        self._loop = asyncio.get_running_loop()
        self.bytes_in = 0
        self.bytes_out = 0
        self.transport: asyncio.Transport | None = None
        self._lost = False
        self._error: BaseException | None = None
        self._last = 0.0
        self._seen = 0
        self._idle: _IdleSweep | None = None
        self.timed_out = False
        # How the handler's own protocol ended, for the log's status: True when it
        # reached its end (SMTP's QUIT answered), so a reset or a TLS close without
        # close_notify while the transport is torn down is no "client-gone"; False when
        # the client left before that end, even by a clean EOF; None when it cannot say
        # (the transport's own end decides).
        self.complete: bool | None = None

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The loop serving this connection. A handler that schedules on it per request
        takes it from here: `asyncio.get_running_loop()` costs a getpid(2) system call
        each time on Python 3.11 (it checks that the loop was not inherited by fork)."""
        return self._loop

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        if self.peer.ip is None and self.peer.path is None:  # not given by the server
            sock: socket.socket = transport.get_extra_info("socket")
            self.peer = Endpoint.from_sockaddr(sock.family, transport.get_extra_info("peername"))
            self.local = Endpoint.from_sockaddr(sock.family, transport.get_extra_info("sockname"))
        if self.timeout:
            self._last = self._loop.time()
            self._idle = _IdleSweep.of(self._loop, self.timeout)
            self._idle.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self._error = exc
        self._lost = True
        if self._idle is not None:
            self._idle.conns.discard(self)
            self._idle = None

    async def tls_handshake(self, context: ssl.SSLContext, timeout: float | None = None) -> None:
        """Become the TLS server on this connection (STARTTLS), within `timeout` seconds
        (None: the loop's default); ConnectionResetError if the connection goes first."""
        if self.transport is None:
            raise ConnectionResetError("connection closed")
        try:
            transport = await self._loop.start_tls(
                self.transport, self, context, server_side=True, ssl_handshake_timeout=timeout
            )
            if transport is None:  # the connection was lost in the handshake
                raise ConnectionResetError("connection closed during the TLS handshake")
        except BaseException as exc:
            self.tls_failed(exc)
            raise
        self.transport = transport

    def tls_failed(self, exc: BaseException) -> None:
        """A handshake failed: end the connection here if it took the transport with it.

        The loop's TLS protocol (asyncio's and uvloop's) passes `connection_lost` on only
        if the handshake was over: a client that resets the connection in the middle of
        it (sslscan does, probing protocol versions) was never reported ended, so it
        stayed counted in the server's limits and `close` waited for ever. Subclasses
        whose `connection_lost` does more return at once from a second call (`_lost`).
        """
        transport = self.transport
        if transport is None or transport.is_closing():
            self.connection_lost(exc if isinstance(exc, Exception) else None)

    def _check_idle(self, now: float) -> None:
        """Called by the sweep every timeout/4: abort if nothing moved for `timeout`."""
        assert self.timeout
        seen = self.bytes_in + self.bytes_out
        if seen != self._seen:  # traffic since the last check
            self._seen = seen
            self._last = now
        elif now - self._last >= self.timeout:
            self.timed_out = True
            self.abort()

    @property
    def is_lost(self) -> bool:
        """True once the transport is gone."""
        return self._lost

    @property
    def lost_error(self) -> BaseException | None:
        """Why the connection was lost, if it was lost by an error."""
        return self._error

    def get_extra_info(self, name: str) -> Any:
        """Transport details (``socket``, ``ssl_object``, ...)."""
        return None if self.transport is None else self.transport.get_extra_info(name)

    def keep_open_after_eof(self) -> bool | None:
        """What eof_received returns to keep the write side open for the handler's answer.

        True on a plain socket. A TLS transport cannot be half-closed: it closes after the
        client's close_notify whatever the protocol answers, and asyncio and uvloop print
        a warning for True, a line outside the server's log format, once per client.
        """
        return None if self.get_extra_info("sslcontext") is not None else True

    def abort(self) -> None:
        """Drop the connection now, discarding unsent data."""
        if self.transport is not None:
            self.transport.abort()


class _IdleSweep:
    """The connections of one loop that share one idle timeout, checked by one timer.

    The timer runs every timeout/4 while there are connections, and stops with the last.
    """

    __slots__ = ("conns", "loop", "timeout", "timer")

    def __init__(self, loop: asyncio.AbstractEventLoop, timeout: float) -> None:
        self.loop = loop
        self.timeout = timeout
        self.conns: set[LoopConnection] = set()
        self.timer: asyncio.TimerHandle | None = None

    @classmethod
    def of(cls, loop: asyncio.AbstractEventLoop, timeout: float) -> _IdleSweep:
        """The sweep of `loop` for `timeout` (made at its first connection)."""
        sweeps = _SWEEPS.setdefault(loop, {})
        sweep = sweeps.get(timeout)
        if sweep is None:
            sweep = sweeps[timeout] = cls(loop, timeout)
        return sweep

    def add(self, conn: LoopConnection) -> None:
        self.conns.add(conn)
        if self.timer is None:
            self.timer = self.loop.call_later(self.timeout / 4, self._sweep)

    def _sweep(self) -> None:
        now = self.loop.time()
        for conn in list(self.conns):  # an abort may end a connection (and remove it)
            conn._check_idle(now)
        self.timer = None
        if self.conns:
            self.timer = self.loop.call_later(self.timeout / 4, self._sweep)


# Each loop's sweeps, by timeout; forgotten with the loop.
_SWEEPS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[float, _IdleSweep]] = (
    weakref.WeakKeyDictionary()
)
