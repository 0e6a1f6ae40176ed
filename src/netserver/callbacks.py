"""Callback handlers for event-loop mode: an object whose methods netserver calls.

A coroutine per connection (`AsyncConnection`) is the easy form to write a dialogue in,
but every read that waits costs a future and a task switch, which is more than the whole
work of a small request. A callback handler is told of each chunk as it arrives, on the
loop, with no task and no future in between: subclass `Callbacks`, override
`data_received`, and write with ``self.conn.write``::

    class Echo(netserver.Callbacks):
        def data_received(self, data: bytes) -> None:
            self.conn.write(data)

The connection stays netserver's (`CallbackConnection`): it is closed when the handler
or the client ends it and in any case when the server drops it; the idle timeout, TLS,
the PROXY protocol, the access rules, the connection limits and the byte counts in the
log apply as in every mode. While the client does not read what it is sent (the
transport's buffer is above its high-water mark), netserver stops reading from it, so a
client cannot make the server buffer without bound. An exception from a callback ends
the connection and is logged with its traceback (status ``error``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from .endpoint import Endpoint
from .linger import close_lingering
from .loopconn import LoopConnection


class Callbacks:
    """A callback handler: one instance per connection, made by netserver with the connection.

    Override `data_received`; the other methods have defaults that suit most protocols.
    The object may write in ``__init__`` (a greeting): the connection is ready by then.
    """

    __slots__ = ("conn",)  # subclasses may use slots too (thousands may be idle at once)

    def __init__(self, conn: CallbackConnection) -> None:
        self.conn = conn

    def data_received(self, data: bytes) -> None:
        """Bytes from the client, as they came (any split: not lines, not messages)."""
        raise NotImplementedError(f"{type(self).__name__} must define data_received")

    def eof_received(self) -> None:
        """The client will send no more; by default the connection closes once sent out."""
        self.conn.close()

    def connection_lost(self, exc: BaseException | None) -> None:
        """The connection is gone (`exc` says why when an error ended it); nothing by default."""

    def stop_requested(self) -> None:
        """The server is stopping; by default the handler may finish within the grace time."""


class CallbackConnection(LoopConnection):
    """The connection a `Callbacks` object gets: write, close, endpoints, byte counts."""

    __slots__ = ("_done", "_on_end", "callbacks", "factory", "failure", "stop_requested")

    def __init__(
        self,
        factory: Callable[[CallbackConnection], Callbacks],
        *,
        timeout: float | None = None,
        peer: Endpoint | None = None,
        local: Endpoint | None = None,
    ) -> None:
        super().__init__(timeout=timeout, peer=peer, local=local)
        self.factory = factory
        self.callbacks: Callbacks | None = None
        self.failure: BaseException | None = None
        self.stop_requested = False
        # Both made only when asked for: an idle connection should carry neither.
        self._done: asyncio.Future[None] | None = None
        self._on_end: Callable[[CallbackConnection], None] | None = None

    # -- Protocol callbacks -------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        try:
            self.callbacks = self.factory(self)
        except Exception as exc:
            self._fail(exc)

    def data_received(self, data: bytes) -> None:
        self.bytes_in += len(data)
        callbacks = self.callbacks
        if callbacks is None:  # its factory failed; the transport is closing
            return
        try:
            callbacks.data_received(data)
        except Exception as exc:
            self._fail(exc)

    def eof_received(self) -> bool | None:
        if self.callbacks is not None:
            try:
                self.callbacks.eof_received()
            except Exception as exc:
                self._fail(exc)
        return self.keep_open_after_eof()  # the write side stays open until the handler closes it

    def connection_lost(self, exc: Exception | None) -> None:
        if self._lost:  # already ended by `tls_failed`; the loop's own call comes late
            return
        super().connection_lost(exc)
        if self.callbacks is not None:
            try:
                self.callbacks.connection_lost(exc)
            except Exception as failure:
                self._fail(failure)
        done, on_end = self._done, self._on_end
        if done is not None and not done.done():
            done.set_result(None)
        if on_end is not None:
            self._on_end = None
            on_end(self)

    def pause_writing(self) -> None:
        """The client is not reading what it is sent: stop reading what it sends."""
        if self.transport is not None:
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()

    def fail(self, exc: BaseException) -> None:
        """End the connection because of `exc` (a handler's own task failed, say): the
        first error is kept for the mode to log, as when a callback raises."""
        self._fail(exc)

    def tls_failed(self, exc: BaseException) -> None:
        """A STARTTLS handshake failed: the error is kept for the mode to log (`_fail`),
        and the connection ends here, whatever the loop does (`LoopConnection`)."""
        self._fail(exc)
        super().tls_failed(exc)

    def _fail(self, exc: BaseException) -> None:
        """A callback raised: keep the first error for the mode to log, drop the connection."""
        if self.failure is None:
            self.failure = exc
        self.abort()

    # -- handler API --------------------------------------------------------------------
    def write(self, data: bytes | bytearray | memoryview) -> None:
        """Send bytes to the client (buffered by the transport; never blocks)."""
        transport = self.transport
        if transport is None or transport.is_closing():
            raise ConnectionResetError("connection closed")
        self.bytes_out += len(data)
        transport.write(data)

    def close(self) -> None:
        """Close once what was written has been sent."""
        if self.transport is not None:
            self.transport.close()

    def close_lingering(self) -> None:
        """Close an exchange the client did not end (a refusal, a 421): once what was
        written is sent, half-close, then drop what the client still sends until it
        closes too, within netserver.linger's bounds. Closed at once, a connection with
        unread input is reset, and the client may never read the last line."""
        if self.transport is not None:
            close_lingering(self.transport)

    def request_stop(self) -> None:
        """The server is stopping: tell the handler (`Callbacks.stop_requested`)."""
        self.stop_requested = True
        if self.callbacks is not None:
            try:
                self.callbacks.stop_requested()
            except Exception as exc:
                self._fail(exc)

    async def finished(self) -> None:
        """Wait until the connection is gone; raise what a callback raised, if one did."""
        if not self._lost:
            if self._done is None:
                self._done = self._loop.create_future()
            await self._done
        if self.failure is not None:
            raise self.failure

    def on_end(self, callback: Callable[[CallbackConnection], None]) -> None:
        """Have `callback(self)` called once the connection is gone (at once if it is).

        What event-loop mode uses instead of a task that awaits `finished`: a task per
        idle connection costs about 0.8 KB, a callback nothing.
        """
        if self._lost:
            callback(self)
        else:
            self._on_end = callback
