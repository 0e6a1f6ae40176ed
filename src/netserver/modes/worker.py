"""Inside one worker process of `WorkerPool` (see modes.workers): serve what arrives.

The supervisor sends descriptors with a small header over a SOCK_SEQPACKET channel and
short commands (stop, retire, terminate); the worker serves each connection with the
event-loop mode on its own loop and reports each end. The end of the channel means the
supervisor is gone: the worker then stops at once, as it does when the kernel's
PR_SET_PDEATHSIG signal arrives first.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import os
import signal
import socket
import ssl
import struct
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass

from ..accepted import Accepted, FdRegistry
from ..children import receive_ready, send_fd
from ..connlog import ConnRecord, ServerLog
from ..endpoint import Endpoint
from ..handlers import LoopHandler
from ..limits import Limits
from ..linger import Lingerer
from ..listen.proxy import ProxyError, header_timeout, read_header
from ..listen.proxy import apply as proxy_endpoints
from .base import ModeContext
from .direct import DirectAccept, DirectService
from .eventloop import EventLoopMode
from .handoff import decode_conn, encode_conn

CONN, STOP, RETIRE, TERMINATE, END, READY = b"C", b"S", b"R", b"T", b"E", b"Y"
# A balancer's connection: the worker reads its PROXY header, asks the supervisor to
# NAME the client it names, and is told the VERDICT (serve it, or the line to refuse with).
PROXIED, NAME, VERDICT = b"P", b"N", b"V"
END_HEAD = struct.Struct("=cQQQ")  # kind, connection id, bytes in, bytes out; then status
MAX_MSG = 4096
_PR_SET_PDEATHSIG = 1


@dataclass
class WorkerApp:
    """What a pool's `setup` returns in a new worker, all run on the worker's own loop.

    `start` before the worker says it is ready; `run` as a task for the worker's life (a
    queue manager's work; if it ends, so does the worker); `close` at the end.
    """

    start: Callable[[], Awaitable[None]] | None = None
    run: Callable[[], Awaitable[None]] | None = None
    close: Callable[[], Awaitable[None]] | None = None


@dataclass
class PoolService:
    """A server whose connections a pool serves: its handler, TLS and descriptors, and
    when its workers accept them themselves, its listeners and limits (modes.direct)."""

    handler: LoopHandler
    tls: ssl.SSLContext | None
    fds: FdRegistry
    direct: DirectService | None = None


class Worker:
    """One worker process: takes descriptors from its channel and serves them."""

    def __init__(
        self,
        chan: socket.socket,
        app: WorkerApp,
        services: Mapping[str, PoolService],
        limits: Limits,
        log: ServerLog,
        seat: int = -1,
    ) -> None:
        self.seat = seat  # ours in the shared limits tables; -1: accept nothing directly
        self.chan = chan
        self.app = app
        self.services = services
        self.limits = limits
        self.log = log
        self.modes: dict[str, EventLoopMode] = {}
        self.direct: list[DirectAccept] = []
        self.serving = 0  # connections taken and not yet reported (their `cid` is set)
        self._local = Endpoint()  # shared by the connections to one listener (as server.py)
        self.verdicts: dict[int, asyncio.Future[str | None]] = {}
        self.reading: set[asyncio.Task[None]] = set()
        self.lingerer: Lingerer | None = None  # made with the loop, in `run`
        self.done = asyncio.Event()
        self.leaving = False
        self.failed = False

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        registry = FdRegistry()
        lingerer = self.lingerer = Lingerer(loop)
        for name, service in self.services.items():
            finished = self._finished
            acceptor = None
            if service.direct is not None and self.seat >= 0:
                service.direct.table.take_seat(self.seat)
                acceptor = DirectAccept(loop, service.direct, self.log, self._finished, lingerer)
                finished = acceptor.finished
                self.direct.append(acceptor)
            ctx = ModeContext(
                service.handler, self.limits, self.log, loop, registry, finished, "async",
                service.tls,
            )  # fmt: skip
            self.modes[name] = mode = EventLoopMode(ctx, service.handler)
            if acceptor is not None:
                acceptor.dispatch = mode.dispatch
        self.chan.setblocking(False)
        loop.add_reader(self.chan.fileno(), self._message)
        loop.add_signal_handler(signal.SIGTERM, self._leave, True)
        loop.add_signal_handler(signal.SIGINT, self._leave, True)
        task: asyncio.Task[None] | None = None
        try:
            if self.app.start is not None:
                await self.app.start()
            if not self.leaving:  # accepting before READY: the pool is ready when we are
                for acceptor in self.direct:
                    acceptor.start()
            self.chan.send(READY)
            if self.app.run is not None:
                task = asyncio.ensure_future(self.app.run())
                task.add_done_callback(lambda _t: self._leave(True))
            await self.done.wait()
            for mode in self.modes.values():
                await mode.closed()
        finally:
            loop.remove_reader(self.chan.fileno())
            if task is not None and not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            elif task is not None and not task.cancelled() and task.exception() is not None:
                self.log.error("worker task failed", error=repr(task.exception()))
                self.failed = True
            if self.app.close is not None:
                await self.app.close()
            lingerer.close()

    def _message(self) -> None:
        while True:
            received = receive_ready(self.chan, MAX_MSG, 1)
            if received is None:
                return
            data, fds = received
            if not data:
                # The supervisor is gone: end now, as the PR_SET_PDEATHSIG kill would
                # (no clean-up either way: serve nobody, unsupervised, a moment longer).
                os._exit(0)
            self._handle(data, fds)

    def _handle(self, data: bytes, fds: list[int]) -> None:
        kind = data[:1]
        if kind in (CONN, PROXIED) and fds:
            self._serve(data[1:], fds[0], proxied=kind == PROXIED)
            return
        if kind == VERDICT:
            cid, refusal = json.loads(data[1:])
            waiting = self.verdicts.pop(int(cid), None)
            if waiting is not None and not waiting.done():
                waiting.set_result(None if refusal is None else str(refusal))
            return
        for fd in fds:
            os.close(fd)
        if kind == STOP:
            self._leave(True)
        elif kind == RETIRE:
            self._leave(False)
        elif kind == TERMINATE:
            self._terminate()

    def _serve(self, header: bytes, fd: int, *, proxied: bool = False) -> None:
        cid, service, peer, local = decode_conn(header)
        if local == self._local:
            local = self._local
        else:
            self._local = local
        mode = self.modes.get(service)
        sock = socket.socket(fileno=fd)
        conn = Accepted(sock, ConnRecord(peer, local, "async"))
        conn.fd = -1  # no registry here keeps the number; the socket object has it
        if mode is None or self.leaving:
            sock.close()
            conn.record.status = "not-served"
            self._send_end(cid, conn)
            return
        conn.cid = cid  # a field, not a map: an idle connection should cost little
        self.serving += 1
        if proxied:
            task = asyncio.get_running_loop().create_task(self._serve_proxied(cid, mode, conn))
            self.reading.add(task)
            task.add_done_callback(self.reading.discard)
            return
        mode.dispatch(conn)

    async def _serve_proxied(self, cid: int, mode: EventLoopMode, conn: Accepted) -> None:
        """Read the balancer's PROXY header here (never in the supervisor), have the
        supervisor judge and count the client it names, then serve it as that client."""
        record, sock = conn.record, conn.sock
        timeout = header_timeout(self.limits.timeout)
        sock.setblocking(False)
        try:
            info = await read_header(sock, timeout)
        except (ProxyError, OSError) as exc:
            self.log.refused(record.peer, f"PROXY protocol: {exc}")
            self._drop(conn, "proxy-error", None)
            return
        peer, local = proxy_endpoints(info, record.peer, record.local)
        waiting: asyncio.Future[str | None] = asyncio.get_running_loop().create_future()
        self.verdicts[cid] = waiting
        # With the connection: a rule of the supervisor's may write to it (a banner).
        self._send(NAME + encode_conn(cid, "", peer, local), sock.fileno())
        refusal = await waiting
        if refusal is not None:
            self._drop(conn, "refused", refusal)
            return
        record.peer, record.local = peer, local
        sock.setblocking(True)
        mode.dispatch(conn)

    def _drop(self, conn: Accepted, status: str, line: str | None) -> None:
        """End a connection that is not served: say `line` if any, close once the client
        has read it (netserver.linger), report it."""
        assert self.lingerer is not None, "connections come after run() starts"
        self.lingerer.refuse(conn.sock, line)
        conn.record.status = status
        self._finished(conn)

    def _finished(self, conn: Accepted) -> None:
        cid = conn.cid
        if cid >= 0:
            conn.cid = -1
            self.serving -= 1
            self._send_end(cid, conn)
        if self.leaving and self._idle():
            self.done.set()

    def _idle(self) -> bool:
        """Nothing is served: neither a connection handed over nor one we accepted."""
        return not self.serving and not any(acceptor.open for acceptor in self.direct)

    def _send_end(self, cid: int, conn: Accepted) -> None:
        record = conn.record
        head = END_HEAD.pack(END, cid, record.bytes_in or 0, record.bytes_out or 0)
        self._send(head + record.status.encode("ascii", "replace")[:200])

    def _send(self, message: bytes, fd: int = -1) -> None:
        """Send now, with descriptor `fd` if one is given; only when the channel is full,
        wait for room (never drop a report).

        One send per report: switching the channel to blocking and back around every
        send cost two more system calls per connection.
        """
        try:
            self._send_now(message, fd)
            return
        except BlockingIOError:
            pass
        except OSError:
            return  # the supervisor is gone: the channel's end tells us (see _message)
        with contextlib.suppress(OSError):
            self.chan.setblocking(True)
            try:
                self._send_now(message, fd)
            finally:
                self.chan.setblocking(False)

    def _send_now(self, message: bytes, fd: int) -> None:
        if fd < 0:
            self.chan.send(message)
        else:
            send_fd(self.chan, message, fd)

    def _leave(self, stop_sessions: bool) -> None:
        """No more connections; with `stop_sessions`, ask the running ones to end."""
        self.leaving = True
        for acceptor in self.direct:
            acceptor.stop()
        if stop_sessions:
            for mode in self.modes.values():
                mode.begin_stop()
        if self._idle():
            self.done.set()

    def _terminate(self) -> None:
        for mode in self.modes.values():
            mode.terminate()


def die_with_parent(parent_pid: int) -> None:
    """Have the kernel SIGKILL this process when its parent dies (Linux prctl).

    If the parent died before the request was made, the kernel will never send it, so
    the parent is checked afterwards: a worker must never serve unsupervised.
    """
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent_pid:
        os._exit(0)
