"""`AsyncConnection`: the connection handed to ``async def`` handlers in event-loop mode.

It is an asyncio Protocol with its own small buffer rather than a StreamReader/Writer
pair: a line already buffered is returned without creating a future, which keeps the
per-request cost close to a bare protocol. Lines are bounded (`LineTooLong`), reading
pauses when the handler falls behind, and a connection with no traffic either way for
`timeout` seconds is aborted (checked every timeout/4, so it ends within 1.25 x timeout;
traffic only sets a flag, which keeps clock reads off the per-request path). One timer
per loop and timeout checks every connection (`_IdleSweep`): a timer per connection
would cost each idle connection about 600 bytes.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import weakref
from typing import Any, cast

from .endpoint import Endpoint
from .stdio import DEFAULT_MAX_LINE, LineTooLong

READ_HIGH_WATER = 262144


class ServerStopping(Exception):
    """Raised once into a read of a connection whose handler asked to hear of a stop.

    A handler sets ``conn.interrupt_on_stop = True`` when it can end a session politely
    (an SMTP server says 421); other handlers are left to finish within the grace time.
    """


class AsyncConnection(asyncio.Protocol):
    """A client connection with async reads, buffered writes and both endpoints."""

    # Slots, not a __dict__: an idle session should cost as little memory as possible.
    __slots__ = (
        "_active",
        "_buf",
        "_drain_waiter",
        "_eof",
        "_error",
        "_idle",
        "_last",
        "_loop",
        "_lost",
        "_lost_waiter",
        "_out",
        "_reading_paused",
        "_waiter",
        "bytes_in",
        "bytes_out",
        "interrupt_on_stop",
        "local",
        "max_line",
        "peer",
        "stop_requested",
        "timed_out",
        "timeout",
        "transport",
    )

    def __init__(
        self,
        *,
        max_line: int = DEFAULT_MAX_LINE,
        timeout: float | None = None,
        peer: Endpoint | None = None,
        local: Endpoint | None = None,
    ) -> None:
        self.max_line = max_line
        self.timeout = timeout
        self.peer = peer or Endpoint()
        self.local = local or Endpoint()
        self._loop = asyncio.get_running_loop()
        self.bytes_in = 0
        self.bytes_out = 0
        self.transport: asyncio.Transport | None = None
        self._buf = bytearray()
        self._out: list[bytes] = []
        self._eof = False
        self._lost = False
        self._lost_waiter: asyncio.Future[None] | None = None
        self._error: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._drain_waiter: asyncio.Future[None] | None = None
        self._reading_paused = False
        self._last = 0.0
        self._active = False
        self._idle: _IdleSweep | None = None
        self.timed_out = False
        self.interrupt_on_stop = False
        self.stop_requested = False

    # -- Protocol callbacks -------------------------------------------------------------
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

    def data_received(self, data: bytes) -> None:
        self.bytes_in += len(data)
        self._buf += data
        self._active = True
        if len(self._buf) > READ_HIGH_WATER and self.transport is not None:
            self.transport.pause_reading()
            self._reading_paused = True
        self._wake()

    def eof_received(self) -> bool:
        self._eof = True
        self._wake()
        return True  # keep the write side open: the handler may still answer

    def connection_lost(self, exc: Exception | None) -> None:
        self._eof = True
        self._error = exc
        if self._idle is not None:
            self._idle.conns.discard(self)
            self._idle = None
        self._wake()
        waiter = self._drain_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        self._lost = True
        lost = self._lost_waiter
        if lost is not None and not lost.done():
            lost.set_result(None)

    def pause_writing(self) -> None:
        self._drain_waiter = self._loop.create_future()

    def resume_writing(self) -> None:
        waiter, self._drain_waiter = self._drain_waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # -- internals ----------------------------------------------------------------------
    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)

    def _check_idle(self, now: float) -> None:
        """Called by the sweep every timeout/4: abort if nothing moved for `timeout`."""
        assert self.timeout
        if self._active:
            self._active = False
            self._last = now
        elif now - self._last >= self.timeout:
            self.timed_out = True
            self.abort()

    def request_stop(self) -> None:
        """The server is stopping: interrupt a waiting read if the handler asked for it."""
        self.stop_requested = True
        waiter = self._waiter
        if self.interrupt_on_stop and waiter is not None and not waiter.done():
            self._waiter = None
            self.interrupt_on_stop = False
            waiter.set_exception(ServerStopping())

    def _wait(self) -> asyncio.Future[None]:
        if self._error is not None:
            raise ConnectionResetError(str(self._error))
        if self.stop_requested and self.interrupt_on_stop:
            self.interrupt_on_stop = False
            raise ServerStopping()
        if self._reading_paused and self.transport is not None:
            self._reading_paused = False
            self.transport.resume_reading()
        waiter = self._waiter = self._loop.create_future()
        return waiter

    def _take(self, n: int) -> bytes:
        buf = self._buf
        if n == len(buf):
            out = bytes(buf)
            buf.clear()
            return out
        out = bytes(buf[:n])
        del buf[:n]
        return out

    # -- handler API --------------------------------------------------------------------
    async def readline(self) -> bytes:
        """One line with its LF; b"" at EOF; LineTooLong past `max_line` bytes."""
        start = 0
        while True:
            idx = self._buf.find(b"\n", start)
            if 0 <= idx < self.max_line:
                return self._take(idx + 1)
            if len(self._buf) >= self.max_line:
                raise LineTooLong(f"line longer than {self.max_line} bytes")
            if self._eof:
                return self._take(len(self._buf))
            start = len(self._buf)
            await self._wait()

    async def read(self, n: int = -1) -> bytes:
        """Up to `n` bytes as soon as any are there (all until EOF when `n` < 0)."""
        while not self._buf or n < 0:
            if self._eof:
                break
            await self._wait()
        return self._take(len(self._buf) if n < 0 else n)

    async def readexactly(self, n: int) -> bytes:
        """Exactly `n` bytes; asyncio.IncompleteReadError if EOF comes first."""
        while len(self._buf) < n:
            if self._eof:
                partial = self._take(len(self._buf))
                raise asyncio.IncompleteReadError(partial, n)
            await self._wait()
        return self._take(n)

    def write(self, data: bytes | bytearray | memoryview) -> None:
        """Queue bytes for the client (await `drain` to respect flow control)."""
        if self.transport is None or self.transport.is_closing():
            raise ConnectionResetError("connection closed")
        self.bytes_out += len(data)
        self._active = True
        out = self._out
        if not out and not self._buf:
            self.transport.write(data)  # nothing more to answer yet: send now
            return
        # More input is already here (pipelined requests): answer them all with one send.
        if not out:
            self._loop.call_soon(self._flush)
        out.append(bytes(data))

    def _flush(self) -> None:
        """Send the answers gathered by `write` in one transport write."""
        out = self._out
        if out and self.transport is not None and not self.transport.is_closing():
            self.transport.write(out[0] if len(out) == 1 else b"".join(out))
        out.clear()

    async def drain(self) -> None:
        """Wait while the kernel and transport buffers are full."""
        if len(self._out) > 64:
            self._flush()
        waiter = self._drain_waiter
        if waiter is not None:
            await waiter
        if self._error is not None:
            raise ConnectionResetError(str(self._error))

    async def send(self, data: bytes | bytearray | memoryview) -> None:
        """`write` then `drain`."""
        self.write(data)
        if self._drain_waiter is not None:
            await self.drain()

    @property
    def is_lost(self) -> bool:
        """True once the transport is gone."""
        return self._lost

    @property
    def lost_error(self) -> BaseException | None:
        """Why the connection was lost, if it was lost by an error."""
        return self._error

    async def start_tls(self, context: ssl.SSLContext, timeout: float = 60.0) -> None:
        """Become the TLS server on this connection (STARTTLS).

        Plaintext the client sent after the command that asked for TLS is discarded
        unread: it cannot be trusted to come from the party that will hold the session.
        """
        if self.transport is None or self.transport.is_closing():
            raise ConnectionResetError("connection closed")
        self._flush()  # the reply that agreed to TLS goes out in plaintext, first
        self._buf.clear()
        loop = self._loop
        transport = await loop.start_tls(
            self.transport, self, context, server_side=True, ssl_handshake_timeout=timeout
        )
        if transport is None:
            raise ConnectionResetError("connection closed during the TLS handshake")
        self.transport = transport

    def get_extra_info(self, name: str) -> Any:
        """Transport details (``socket``, ``ssl_object``, ...)."""
        return None if self.transport is None else self.transport.get_extra_info(name)

    def abort(self) -> None:
        """Drop the connection now, discarding unsent data."""
        if self.transport is not None:
            self.transport.abort()

    async def close(self) -> None:
        """Send what is queued, close, and wait until the transport is gone."""
        self._flush()
        if self.transport is None or self._lost:
            return
        if not self.transport.is_closing():
            self.transport.close()
        if not self._lost:
            self._lost_waiter = self._loop.create_future()
            await self._lost_waiter


class _IdleSweep:
    """The connections of one loop that share one idle timeout, checked by one timer.

    The timer runs every timeout/4 while there are connections, and stops with the last.
    """

    __slots__ = ("conns", "loop", "timeout", "timer")

    def __init__(self, loop: asyncio.AbstractEventLoop, timeout: float) -> None:
        self.loop = loop
        self.timeout = timeout
        self.conns: set[AsyncConnection] = set()
        self.timer: asyncio.TimerHandle | None = None

    @classmethod
    def of(cls, loop: asyncio.AbstractEventLoop, timeout: float) -> _IdleSweep:
        """The sweep of `loop` for `timeout` (made at its first connection)."""
        sweeps = _SWEEPS.setdefault(loop, {})
        sweep = sweeps.get(timeout)
        if sweep is None:
            sweep = sweeps[timeout] = cls(loop, timeout)
        return sweep

    def add(self, conn: AsyncConnection) -> None:
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
