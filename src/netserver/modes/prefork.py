"""Prefork mode: a pool of worker processes that grows under load and recycles workers.

The supervisor still accepts every connection and decides access and limits in one
place; it then passes the descriptor to an idle worker over a unix socketpair
(SCM_RIGHTS). A worker reports each end with its byte counts and outcome, and retires
after `recycle` connections; a new worker is forked when none is idle and the pool is
below its maximum. Workers that die are replaced, and a connection a dead worker held
is logged with the signal that killed it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import struct
import sys
from collections import deque
from dataclasses import dataclass, field

from ..accepted import Accepted
from ..children import fork_with_channel, kill_and_reap, receive_fds, watch_child
from ..connection import Connection
from ..endpoint import Endpoint
from ..errors import EX_SOFTWARE
from .base import ModeContext, run_sync, status_for_exit
from .fork import bind_process_stdio, flush_quietly, reset_child_signals
from .handoff import decode_endpoints, encode_endpoints

_REPORT = struct.Struct("=cQQi")  # kind, bytes in, bytes out, exit code
_DONE, _RETIRING, _QUIT, _CONN = b"D", b"R", b"Q", b"C"
_MAX_MSG = 2048  # a connection message: kind and two endpoints (a unix path is < 108 bytes)
RETRY_SPAWN = 1.0  # seconds before trying again to start a worker when none runs


@dataclass(frozen=True)
class PoolSize:
    """How many workers to keep, the most to run, and when to recycle one."""

    minimum: int = 2
    maximum: int = 32
    recycle: int = 1000


@dataclass
class _Worker:
    pid: int
    chan: socket.socket
    pidfd: int = -1
    conn: Accepted | None = None
    retiring: bool = False
    served: int = field(default=0)


# -- the worker process ------------------------------------------------------------------


def worker_main(ctx: ModeContext, chan: socket.socket, recycle: int) -> int:
    """A worker's life: take descriptors from the supervisor and serve them."""
    reset_child_signals()
    ctx.fds.close_in_child(keep=chan.fileno())
    devnull = os.open(os.devnull, os.O_RDWR)
    for served in range(1, recycle + 1):
        try:
            msg, fds = receive_fds(chan, _MAX_MSG, 1)
        except OSError:
            return 0
        if msg[:1] != _CONN or not fds:
            return 0
        code, bytes_in, bytes_out = serve_one(ctx, fds[0], decode_endpoints(msg[1:]))
        for fd in (0, 1):
            os.dup2(devnull, fd)
        kind = _RETIRING if served >= recycle else _DONE
        try:
            chan.sendall(_REPORT.pack(kind, bytes_in, bytes_out, code))
        except OSError:
            return 0
    return 0


def serve_one(ctx: ModeContext, fd: int, ends: tuple[Endpoint, Endpoint]) -> tuple[int, int, int]:
    """Serve one passed descriptor; returns (exit code, bytes in, bytes out)."""
    sock = socket.socket(fileno=fd)
    peer, local = ends
    conn = Connection(sock, peer, local, timeout=ctx.limits.timeout, max_line=ctx.limits.max_line)
    code = run_sync(ctx.handler, conn, bind_process_stdio)
    conn.close()
    flush_quietly(sys.stderr)
    return (code, conn.bytes_in, conn.bytes_out)


# -- the supervisor's side -----------------------------------------------------------------


class PreforkMode:
    """Keeps the pool, hands out connections, and queues them while all workers are busy."""

    def __init__(self, ctx: ModeContext, size: PoolSize) -> None:
        self.ctx = ctx
        self.size = size
        self.workers: dict[int, _Worker] = {}
        self.idle: deque[_Worker] = deque()
        self.pending: deque[Accepted] = deque()
        self.stopping = False
        self._retry_pending = False
        self._empty = asyncio.Event()

    def start(self) -> None:
        for _ in range(self.size.minimum):
            self._spawn()

    def _spawn(self) -> _Worker | None:
        """Start a worker; None (logged, retried later) when the system says no."""
        try:
            pid, channel = fork_with_channel(socket.SOCK_SEQPACKET)
        except OSError as exc:
            self._cannot_spawn(exc)
            return None
        if pid == 0:
            code = EX_SOFTWARE
            try:
                code = worker_main(self.ctx, channel, self.size.recycle)
            finally:
                os._exit(code)
        worker = _Worker(pid, channel)
        try:
            worker.pidfd = watch_child(self.ctx.loop, pid, lambda code: self._exited(worker, code))
        except OSError as exc:
            kill_and_reap(pid)
            channel.close()
            self._cannot_spawn(exc)
            return None
        self.ctx.fds.add(channel.fileno())
        self.ctx.fds.add(worker.pidfd)
        self.ctx.loop.add_reader(channel.fileno(), self._report, worker)
        self.workers[pid] = worker
        self.idle.append(worker)
        self._empty.clear()
        return worker

    def _cannot_spawn(self, exc: OSError) -> None:
        self.ctx.log.error("cannot start a worker", error=str(exc))
        if not self.workers and not self._retry_pending:
            self._retry_pending = True
            self.ctx.loop.call_later(RETRY_SPAWN, self._retry_spawn)

    def _retry_spawn(self) -> None:
        self._retry_pending = False
        if not self.stopping:
            while len(self.workers) < self.size.minimum and self._spawn():
                pass
            self._assign()

    def dispatch(self, conn: Accepted) -> None:
        self.pending.append(conn)
        self._assign()

    def _assign(self) -> None:
        """Give queued connections to idle workers, growing the pool if there are none."""
        while self.pending and not self.stopping:
            if not self.idle and len(self.workers) < self.size.maximum:
                self._spawn()
            if not self.idle:
                return
            worker = self.idle.popleft()
            conn = self.pending.popleft()
            try:
                ends = encode_endpoints(conn.record.peer, conn.record.local)
                socket.send_fds(worker.chan, [_CONN + ends], [conn.sock.fileno()])
            except OSError:
                self.pending.appendleft(conn)
                continue
            worker.conn = conn
            self.ctx.fds.discard(conn.fd)
            conn.sock.close()

    def _report(self, worker: _Worker) -> None:
        try:
            data = worker.chan.recv(_REPORT.size)
        except OSError:
            data = b""
        if len(data) != _REPORT.size:
            self.ctx.loop.remove_reader(worker.chan.fileno())
            return
        kind, bytes_in, bytes_out, code = _REPORT.unpack(data)
        conn, worker.conn = worker.conn, None
        worker.served += 1
        if conn is not None:
            conn.record.bytes_in, conn.record.bytes_out = bytes_in, bytes_out
            if conn.record.status == "ok":
                conn.record.status = status_for_exit(code)
            self.ctx.finished(conn)
        if kind == _RETIRING:
            worker.retiring = True
        elif self.stopping:
            self._quit(worker)
        else:
            self.idle.append(worker)
        self._assign()

    def _quit(self, worker: _Worker) -> None:
        with contextlib.suppress(OSError):
            worker.chan.send(_QUIT)

    def _exited(self, worker: _Worker, code: int) -> None:
        self.workers.pop(worker.pid, None)
        with contextlib.suppress(ValueError):
            self.idle.remove(worker)
        self.ctx.fds.discard(worker.pidfd)
        self.ctx.fds.discard(worker.chan.fileno())
        self.ctx.loop.remove_reader(worker.chan.fileno())
        worker.chan.close()
        if worker.conn is not None:
            if worker.conn.record.status == "ok":
                worker.conn.record.status = status_for_exit(code)
            self.ctx.finished(worker.conn)
        if self.stopping:
            if not self.workers:
                self._empty.set()
            return
        while len(self.workers) < self.size.minimum and self._spawn():
            pass
        self._assign()

    def active(self) -> int:
        return sum(1 for w in self.workers.values() if w.conn is not None) + len(self.pending)

    def begin_stop(self) -> None:
        """Stop handing out work; idle workers leave now, busy ones after their client."""
        self.stopping = True
        for conn in self.pending:
            conn.record.status = "not-served"
            self.ctx.fds.discard(conn.fd)
            conn.sock.close()
            self.ctx.finished(conn)
        self.pending.clear()
        for worker in list(self.idle):
            self._quit(worker)
        if not self.workers:
            self._empty.set()

    def terminate(self) -> None:
        for worker in list(self.workers.values()):
            if worker.conn is not None:
                worker.conn.record.status = "terminated"
            with contextlib.suppress(ProcessLookupError):
                os.kill(worker.pid, 15)

    async def closed(self) -> None:
        self.begin_stop()
        await self._empty.wait()
