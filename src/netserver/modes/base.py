"""The contract between the supervisor and a mode, and what the sync modes share.

The supervisor accepts, judges access and limits, and then hands the socket to a mode
with `Mode.dispatch`. From then on the mode owns the socket and must call
`ModeContext.finished` exactly once, whatever happens, so the limits are released and
one log line is written.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import ssl
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from ..accepted import Accepted, FdRegistry
from ..connection import Connection
from ..connlog import ServerLog
from ..errors import EX_DATAERR, EX_IOERR, EX_OK, EX_SOFTWARE, EX_TEMPFAIL
from ..handlers import ConnectionHandler, Handler, StdioHandler
from ..limits import Limits
from ..stdio import LineTooLong

# Signals a child process gets back at their default disposition. SIGPIPE matters most:
# Python ignores it, and programs that inherit the ignore misbehave on a closed pipe.
RESET_SIGNALS = (
    signal.SIGPIPE,
    signal.SIGINT,
    signal.SIGTERM,
    signal.SIGHUP,
    signal.SIGCHLD,
    signal.SIGQUIT,
    signal.SIGUSR1,
    signal.SIGUSR2,
    signal.SIGALRM,
    signal.SIGXFSZ,
    signal.SIGTSTP,
    signal.SIGTTIN,
    signal.SIGTTOU,
    signal.SIGWINCH,
)

# What a spawned program (an exec command, a twist or spawn shell) gets: every signal back
# at its default disposition, not only those the server's own code ignores or catches:
# one the server's parent left ignored (nohup does that) would stay ignored through the
# exec. glibc's posix_spawn also makes one system call in the child for a signal given
# here and two (query, then set) for any other: 62 rt_sigaction per spawn instead of 109.
DEFAULT_SIGNALS = frozenset(signal.valid_signals()) - {signal.SIGKILL, signal.SIGSTOP}

# Seconds between the TERM a server sends a child it ends (a forked handler, a command, a
# spawner) and the KILL that follows if the child is still there.
KILL_AFTER = 5.0


@dataclass
class ModeContext:
    """What every mode gets from the supervisor."""

    handler: Handler
    limits: Limits
    log: ServerLog
    loop: asyncio.AbstractEventLoop
    fds: FdRegistry
    finished: Callable[[Accepted], None]
    mode_name: str
    # TLS on every connection: the thread and event-loop modes use it themselves; for
    # processes the supervisor relays plaintext instead (see listen.tls). Reloaded on SIGHUP.
    tls: ssl.SSLContext | None = None


class Mode(Protocol):
    """A way of running handlers: fork, prefork, thread, async (and exec for commands)."""

    def start(self) -> None:
        """Get ready to take connections (start a pool, say)."""

    def dispatch(self, conn: Accepted) -> None:
        """Take ownership of an admitted connection."""

    def active(self) -> int:
        """How many connections are being served."""

    def begin_stop(self) -> None:
        """The server stopped accepting: let running connections know, if the mode can."""

    def terminate(self) -> None:
        """Grace is over: make every running connection end now."""

    async def closed(self) -> None:
        """Wait until every connection has ended and the mode's resources are released."""


# -- running a sync handler (fork, prefork and thread modes) ----------------------------

EXIT_STATUS = {
    EX_OK: "ok",
    EX_DATAERR: "line-too-long",
    EX_IOERR: "client-gone",
    EX_TEMPFAIL: "idle-timeout",
    EX_SOFTWARE: "error",
}


def status_for_exit(code: int) -> str:
    """Log text for a child's exit status (`waitstatus_to_exitcode` form)."""
    if code < 0:
        return "client-gone" if -code == 13 else f"signal-{-code}"
    return EXIT_STATUS.get(code, f"exit-{code}")


def run_sync(
    handler: Handler, conn: Connection, bind_stdio: Callable[[Connection], None] | None
) -> int:
    """Run a stdio or connection handler on `conn`; return an exit code for the outcome."""
    try:
        if isinstance(handler, StdioHandler):
            if bind_stdio is not None:
                bind_stdio(conn)
            handler.func()
        elif isinstance(handler, ConnectionHandler):
            handler.func(conn)
        else:
            raise TypeError(f"{type(handler).__name__} is not a sync handler")
        conn.finish()
        return 0
    except SystemExit as exc:
        with contextlib.suppress(OSError):
            conn.finish()
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except LineTooLong:
        return EX_DATAERR
    except TimeoutError:
        return EX_TEMPFAIL
    except (BrokenPipeError, ConnectionResetError, EOFError):
        return EX_IOERR  # EOFError: input() found the client gone
    except Exception:
        traceback.print_exc(file=sys.stderr)
        return EX_SOFTWARE
