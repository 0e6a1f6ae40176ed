"""Fork mode: one process per connection, as a traditional UNIX internet server.

The child resets every signal to its default (SIGPIPE included, so programs it runs do
not inherit an ignored SIGPIPE), closes the listeners and every other descriptor the
supervisor holds, puts the socket on fd 0 and fd 1 (subprocesses inherit it), runs the
handler and leaves with ``os._exit``, never returning into the supervisor's code.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from typing import TextIO

from ..accepted import Accepted
from ..connection import Connection
from ..errors import EX_SOFTWARE
from .base import RESET_SIGNALS, ModeContext, run_sync
from .process import ProcessMode


def reset_child_signals() -> None:
    """Default dispositions and no wakeup fd: the child must not touch the parent's loop."""
    signal.set_wakeup_fd(-1)
    for sig in RESET_SIGNALS:
        signal.signal(sig, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_SETMASK, ())


def bind_process_stdio(conn: Connection) -> None:
    """Make fd 0/1 and sys.stdin/sys.stdout the connection, for this whole process."""
    fd = conn.sock.fileno()
    os.dup2(fd, 0)
    os.dup2(fd, 1)
    sys.stdin = conn.stdin
    sys.stdout = conn.stdout


def serve_in_child(ctx: ModeContext, conn: Accepted) -> int:
    """Everything a forked child does; returns its exit code."""
    reset_child_signals()
    ctx.fds.close_in_child(keep=conn.sock.fileno())
    record = conn.record
    connection = Connection(
        conn.sock,
        record.peer,
        record.local,
        timeout=ctx.limits.timeout,
        max_line=ctx.limits.max_line,
    )
    try:
        return run_sync(ctx.handler, connection, bind_process_stdio)
    finally:
        flush_quietly(sys.stdout)  # what the handler printed before it failed still goes out
        connection.close()
        flush_quietly(sys.stderr)


def flush_quietly(stream: TextIO) -> None:
    """Flush a stream whose peer may be gone."""
    with contextlib.suppress(OSError, ValueError):
        stream.flush()


class ForkMode(ProcessMode):
    """Forks a child per connection; the parent only tracks and reaps."""

    def start_child(self, conn: Accepted) -> int:
        pid = os.fork()
        if pid == 0:
            code = EX_SOFTWARE
            try:
                code = serve_in_child(self.ctx, conn)
            finally:
                os._exit(code)
        return pid
