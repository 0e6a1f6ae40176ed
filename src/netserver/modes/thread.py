"""Thread mode: a bounded pool of threads, each serving one connection at a time.

The pool never holds more threads than ``max_conns`` and reuses them, so nothing grows
per connection. In stdio form each thread sees its own connection as sys.stdin and
sys.stdout (`ThreadStdio`); subprocesses cannot inherit a per-thread stdin, so a handler
that runs programs on the socket wants fork mode or a command. With TLS the handshake
runs in the worker thread, under a deadline, before the handler is called.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from concurrent.futures import ThreadPoolExecutor

from ..accepted import Accepted
from ..connection import Connection
from ..errors import EX_SOFTWARE
from ..listen.tls import TlsConnection, accept_in_thread, handshake_timeout
from ..stdio import ThreadStdio
from .base import ModeContext, run_sync, status_for_exit


class ThreadMode:
    """Runs handlers on a thread pool, reporting each end back to the event loop."""

    def __init__(self, ctx: ModeContext) -> None:
        self.ctx = ctx
        self.pool = ThreadPoolExecutor(
            max_workers=max(1, ctx.limits.max_conns or 256), thread_name_prefix="netserver"
        )
        self.stdio = ThreadStdio()
        self.running: dict[int, Accepted] = {}
        self._empty = asyncio.Event()
        self._empty.set()

    def start(self) -> None:
        self.stdio.install()

    def dispatch(self, conn: Accepted) -> None:
        self.running[id(conn)] = conn
        self._empty.clear()
        self.pool.submit(self._serve, conn)

    def _bind(self, conn: Connection) -> None:
        self.stdio.bind(conn.stdin, conn.stdout)

    def _connect(self, conn: Accepted) -> Connection | None:
        """The handler's connection; with TLS, after a handshake in this thread."""
        record, limits, tls = conn.record, self.ctx.limits, self.ctx.tls
        if tls is None:
            return Connection(
                conn.sock,
                record.peer,
                record.local,
                timeout=limits.timeout,
                max_line=limits.max_line,
            )
        try:
            conn.sock = accept_in_thread(tls, conn.sock, handshake_timeout(limits))
        except (OSError, ValueError) as exc:  # ssl.SSLError and TimeoutError are OSErrors
            record.status = "tls-failed"
            self.ctx.log.error("TLS handshake failed", peer=str(record.peer), error=str(exc))
            return None
        return TlsConnection(
            conn.sock, record.peer, record.local, timeout=limits.timeout, max_line=limits.max_line
        )

    def _serve(self, conn: Accepted) -> None:
        record = conn.record
        code = EX_SOFTWARE
        connection: Connection | None = None
        try:
            connection = self._connect(conn)
            if connection is None:
                return
            code = run_sync(self.ctx.handler, connection, self._bind)
        finally:
            self.stdio.bind(None, None)
            if connection is not None:
                record.bytes_in, record.bytes_out = connection.bytes_in, connection.bytes_out
                connection.close()
            else:
                conn.sock.close()
            if record.status == "ok":
                record.status = status_for_exit(code)
            with contextlib.suppress(RuntimeError):
                self.ctx.loop.call_soon_threadsafe(self._done, conn)

    def _done(self, conn: Accepted) -> None:
        self.running.pop(id(conn), None)
        self.ctx.finished(conn)
        if not self.running:
            self._empty.set()

    def active(self) -> int:
        return len(self.running)

    def begin_stop(self) -> None:
        """Threads run to their end within the grace period; nothing to tell them."""

    def terminate(self) -> None:
        """Threads cannot be killed: shut their sockets so their I/O fails at once."""
        for conn in list(self.running.values()):
            conn.record.status = "terminated"
            with contextlib.suppress(OSError):
                conn.sock.shutdown(socket.SHUT_RDWR)

    async def closed(self) -> None:
        await self._empty.wait()
        self.pool.shutdown(wait=False)
        self.stdio.uninstall()
