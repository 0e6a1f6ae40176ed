"""Event-loop mode: every connection is a task on the supervisor's own loop.

Handlers are ``async def handler(conn: AsyncConnection)``, or a `Callbacks` subclass
whose methods the loop calls (the task then only waits for the connection to end and
does the same bookkeeping). uvloop is used when it is installed (``pip install
netserver[uvloop]``); the supervisor picks the loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import ssl
import sys
import traceback
import types

from ..accepted import Accepted
from ..aio import AsyncConnection, drive
from ..callbacks import CallbackConnection
from ..handlers import AsyncHandler, LoopHandler
from ..listen.tls import handshake_timeout
from ..stdio import LineTooLong
from .base import ModeContext

# An idle connection keeps its task, so what a task carries is paid 10,000 times at
# 10,000 idle sessions. The task's own context stays per task (handlers may set context
# variables), but these are the same for every task: one name instead of a "Task-N"
# string each, and one bound `_forget` and one (empty) context for its done callback,
# which reads no context variable, instead of a method object and a context copy each.
TASK_NAME = "netserver-connection"
_CALLBACK_CONTEXT = contextvars.Context()


class EventLoopMode:
    """Runs loop handlers, a task per connection; cancels what is left when grace runs out."""

    def __init__(self, ctx: ModeContext, handler: LoopHandler) -> None:
        self.ctx = ctx
        self.handler = handler
        self.tasks: set[asyncio.Task[None]] = set()
        # Connections being started or served by a task (told of a stop by begin_stop)...
        self.live: set[AsyncConnection | CallbackConnection] = set()
        # ... and callback connections past their start: no task, their end is a callback.
        self.parked: dict[CallbackConnection, Accepted] = {}
        self.stopping = False
        self._empty = asyncio.Event()
        self._empty.set()
        self._forget_task = self._forget  # bound once: see TASK_NAME
        self._parked_end = self._unpark  # bound once, shared by every parked connection

    def start(self) -> None:
        """Nothing to prepare."""

    def dispatch(self, conn: Accepted) -> None:
        # The task's context is made here (as create_task would) so that `drive` can
        # resume the handler in it from the connection's callbacks.
        context = contextvars.copy_context()
        task = self.ctx.loop.create_task(
            self._serve(conn, context), name=TASK_NAME, context=context
        )
        self.tasks.add(task)
        self._empty.clear()
        task.add_done_callback(self._forget_task, context=_CALLBACK_CONTEXT)

    def _forget(self, task: asyncio.Task[None]) -> None:
        self.tasks.discard(task)
        if not self.tasks and not self.parked:
            self._empty.set()

    async def _serve(self, conn: Accepted, context: contextvars.Context) -> None:
        record = conn.record
        proto = self._protocol(conn)
        self.live.add(proto)
        parked = False
        try:
            # With ssl= the loop returns its own TLS protocol (uvloop does), so the
            # handler gets the object made here, not what connect_accepted_socket returns.
            if not await self._connect(proto, conn):
                return
            if self.stopping:
                proto.request_stop()
            if isinstance(proto, CallbackConnection):
                # The task ends here; the loop's callbacks drive the connection, and
                # its end does the bookkeeping below (`_unpark`). An idle callback
                # connection then costs no task, coroutine or future.
                self.parked[proto] = conn  # `live` needs them no more (begin_stop)
                self.live.discard(proto)
                parked = True
                proto.on_end(self._parked_end)
                return
            assert isinstance(self.handler, AsyncHandler)
            run = self.handler.func(proto)
            if isinstance(run, types.CoroutineType):
                await drive(proto, run, context)
            else:  # an awaitable of another kind: awaited as it is
                await run
            await proto.close()
        except asyncio.CancelledError:
            record.status = "terminated"
        except Exception as exc:  # every failure ends in a status
            record.status = _status_of(exc)
        finally:
            if not parked:
                self._end(conn, proto)

    def _unpark(self, proto: CallbackConnection) -> None:
        """A callback connection ended: its status, then the same end as a task's."""
        conn = self.parked.pop(proto)
        if proto.failure is not None:
            conn.record.status = _status_of(proto.failure)
        self._end(conn, proto)
        if not self.tasks and not self.parked:
            self._empty.set()

    def _end(self, conn: Accepted, proto: AsyncConnection | CallbackConnection) -> None:
        """Close what is left of the connection, complete its record, report its end."""
        record = conn.record
        self.live.discard(proto)
        if proto.transport is not None and not proto.is_lost:
            proto.abort()
        elif proto.transport is None:
            with contextlib.suppress(OSError):
                conn.sock.close()
        record.bytes_in, record.bytes_out = proto.bytes_in, proto.bytes_out
        if proto.timed_out:
            record.status = "idle-timeout"
        elif record.status == "ok" and _cut_short(proto):
            record.status = "client-gone"
        self.ctx.finished(conn)

    def _protocol(self, conn: Accepted) -> AsyncConnection | CallbackConnection:
        """The connection object the handler form needs, with the server's limits."""
        limits, record = self.ctx.limits, conn.record
        if isinstance(self.handler, AsyncHandler):
            return AsyncConnection(
                max_line=limits.max_line,
                timeout=limits.timeout,
                peer=record.peer,
                local=record.local,
            )
        return CallbackConnection(
            self.handler.factory, timeout=limits.timeout, peer=record.peer, local=record.local
        )

    async def _connect(self, proto: AsyncConnection | CallbackConnection, conn: Accepted) -> bool:
        """Attach the protocol; False if the TLS handshake failed or was too slow."""
        tls, loop = self.ctx.tls, self.ctx.loop
        if tls is None:
            await loop.connect_accepted_socket(lambda: proto, conn.sock)
            return True
        try:
            await loop.connect_accepted_socket(
                lambda: proto,
                conn.sock,
                ssl=tls,
                ssl_handshake_timeout=handshake_timeout(self.ctx.limits),
            )
        except (OSError, ssl.SSLError) as exc:
            conn.record.status = "tls-failed"
            self.ctx.log.error("TLS handshake failed", peer=str(conn.record.peer), error=str(exc))
            return False
        return True

    def active(self) -> int:
        return len(self.tasks) + len(self.parked)

    def begin_stop(self) -> None:
        """Tell every connection the server is stopping (see `AsyncConnection.request_stop`)."""
        self.stopping = True
        for proto in [*self.live, *self.parked]:
            proto.request_stop()

    def terminate(self) -> None:
        for task in list(self.tasks):
            task.cancel()
        for proto, conn in list(self.parked.items()):
            conn.record.status = "terminated"
            proto.abort()

    async def closed(self) -> None:
        await self._empty.wait()


def _cut_short(proto: AsyncConnection | CallbackConnection) -> bool:
    """Whether a connection whose handler ended without error was cut by its client: as
    its handler says (`LoopConnection.complete`), else if the transport was lost by an
    error."""
    if proto.complete is not None:
        return not proto.complete
    return proto.lost_error is not None


def _status_of(exc: BaseException) -> str:
    """The log status of a connection that `exc` ended (a traceback if unexpected)."""
    if isinstance(exc, asyncio.CancelledError):
        return "terminated"
    if isinstance(exc, LineTooLong):
        return "line-too-long"
    if isinstance(exc, ssl.SSLError):
        return "tls-failed"
    if isinstance(exc, (ConnectionError, asyncio.IncompleteReadError)):
        return "client-gone"
    traceback.print_exception(exc, file=sys.stderr)
    return "error"
