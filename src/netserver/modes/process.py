"""Modes whose every connection is served by a child process (fork mode and commands).

Each child is watched through a pidfd on the event loop (`netserver.children.watch_child`),
so it is reaped the moment it exits. The supervisor keeps its own copy of the socket
until then, to read the byte counts and idle time from TCP_INFO.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
from dataclasses import dataclass

from .. import tcpinfo
from ..accepted import Accepted
from ..children import kill_and_reap, watch_child
from ..errors import RESOURCE_ERRNOS
from .base import KILL_AFTER, ModeContext, status_for_exit


@dataclass
class _Child:
    conn: Accepted
    pidfd: int
    idle: asyncio.TimerHandle | None = None


class ProcessConnections:
    """The table of children serving connections, shared by fork and exec modes."""

    def __init__(self, ctx: ModeContext) -> None:
        self.ctx = ctx
        self.children: dict[int, _Child] = {}
        self._empty = asyncio.Event()
        self._empty.set()

    def adopt(self, pid: int, conn: Accepted) -> None:
        """Track `pid` as serving `conn`; the parent keeps `conn.sock` open until exit."""
        pidfd = watch_child(self.ctx.loop, pid, lambda code: self._exited(pid, code))
        self.ctx.fds.add(pidfd)
        child = _Child(conn, pidfd)
        self.children[pid] = child
        self._empty.clear()
        if self.ctx.limits.timeout and conn.sock.family != socket.AF_UNIX:
            child.idle = self.ctx.loop.call_later(self.ctx.limits.timeout, self._check_idle, pid)

    def _exited(self, pid: int, code: int) -> None:
        child = self.children.pop(pid)
        self.ctx.fds.discard(child.pidfd)
        if child.idle is not None:
            child.idle.cancel()
        record = child.conn.record
        stats = tcpinfo.read(child.conn.sock)
        if stats is not None:
            record.bytes_in, record.bytes_out = stats.bytes_received, stats.bytes_sent
        if record.status == "ok":
            record.status = status_for_exit(code)
        self.ctx.fds.discard(child.conn.fd)
        child.conn.sock.close()
        self.ctx.finished(child.conn)
        if not self.children:
            self._empty.set()

    def _check_idle(self, pid: int) -> None:
        """Kill a child whose connection saw no data either way for `timeout` seconds."""
        child = self.children.get(pid)
        timeout = self.ctx.limits.timeout
        if child is None or not timeout:
            return
        stats = tcpinfo.read(child.conn.sock)
        idle = 0.0 if stats is None else stats.idle_ms / 1000.0
        if idle >= timeout:
            child.conn.record.status = "idle-timeout"
            self._kill(pid, child)
        else:
            child.idle = self.ctx.loop.call_later(timeout - idle, self._check_idle, pid)

    def _kill(self, pid: int, child: _Child) -> None:
        with contextlib.suppress(OSError):
            child.conn.sock.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        self.ctx.loop.call_later(KILL_AFTER, self._force, pid)

    def _force(self, pid: int) -> None:
        if pid in self.children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    def active(self) -> int:
        return len(self.children)

    def terminate(self) -> None:
        """End every child now: TERM, then KILL after a few seconds."""
        for pid, child in list(self.children.items()):
            child.conn.record.status = "terminated"
            self._kill(pid, child)

    async def closed(self) -> None:
        await self._empty.wait()


class ProcessMode:
    """A mode whose every connection is served by a child process (fork, exec).

    Subclasses say how to start the child; this class tracks, reaps and stops them.
    """

    def __init__(self, ctx: ModeContext) -> None:
        self.ctx = ctx
        self.table = ProcessConnections(ctx)

    def start_child(self, conn: Accepted) -> int:
        """Start a process serving `conn` and return its pid (in the parent)."""
        raise NotImplementedError

    def start(self) -> None:
        """Nothing to prepare: each connection gets its own process."""

    def dispatch(self, conn: Accepted) -> None:
        """Start the child and watch it; on failure end the connection cleanly.

        A resource error (EMFILE after the fork, say) is raised again once the
        connection is accounted for, so the accept loop backs off.
        """
        pid = 0
        try:
            pid = self.start_child(conn)
            self.table.adopt(pid, conn)
        except OSError as exc:
            if pid > 0:
                kill_and_reap(pid)
            self.ctx.log.error("cannot start a process", error=str(exc))
            conn.record.status = "spawn-failed"
            conn.sock.close()
            self.ctx.finished(conn)
            if exc.errno in RESOURCE_ERRNOS:
                raise

    def active(self) -> int:
        return self.table.active()

    def begin_stop(self) -> None:
        """Children run to their end within the grace period; nothing to tell them."""

    def terminate(self) -> None:
        self.table.terminate()

    async def closed(self) -> None:
        await self.table.closed()
