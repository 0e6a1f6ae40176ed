"""A pool worker accepts its connections itself, as Postfix's smtpd and tcpserver do.

By default the supervisor accepts every connection, judges it and passes it to a worker
(modes.workers): one more process wakes up, and the descriptor crosses a channel twice
(there, and the end report back), for each connection. When every gate a server has is
quick -- only its limits, with no PROXY header to read and no access rule that needs a
lookup -- nothing the supervisor does needs the supervisor: each worker then watches the
inherited listening socket, accepts, counts the client in the limits table all workers
share (modes.shared), and serves it on its own loop. The supervisor still forks, restarts
and retires the workers, and when one dies it counts that worker's connections out.

The global cap still makes clients wait in the listen backlog: a worker that finds the
table full stops accepting and looks again when one of its own connections ends, or
every `RECHECK` seconds (another worker's connection may have ended). A worker that
accepted a client in the moment the last place was taken holds it, unread, until there
is room: to that client it is the same as waiting in the backlog.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable
from dataclasses import dataclass

from ..accepted import Accepted
from ..connlog import ConnRecord, ServerLog
from ..endpoint import Endpoint
from ..linger import Lingerer
from ..listen.accept import AcceptLoop, accepted_ends
from ..listen.listeners import Listener
from ..refusals import RefusalCause, RefusalLines
from .shared import FULL, SharedLimits

__all__ = ["RECHECK", "DirectAccept", "DirectService", "Judge"]

# The gates' quick rulings as one function (server builds it: modes never import the
# gates, which sit above them): why a connection from peer to local is refused and the
# kind of refusal (which line the client reads), or None.
Judge = Callable[[Endpoint, Endpoint], tuple[str, RefusalCause] | None]


def admit_all(peer: Endpoint, local: Endpoint) -> tuple[str, RefusalCause] | None:
    """No gate to ask."""
    return None


RECHECK = 0.02  # seconds between looks at a full table


@dataclass(frozen=True)
class DirectService:
    """What the workers need to accept a server's connections: made before they fork."""

    listeners: list[Listener]
    table: SharedLimits
    refusals: RefusalLines  # by the judge's cause; the table's refusals are LIMIT
    judge: Judge = admit_all  # every gate decides in `quick` (server.Server._quick_only)

    def fds(self) -> list[int]:
        """The listening descriptors a worker keeps."""
        return [listener.sock.fileno() for listener in self.listeners]


class DirectAccept:
    """One worker's accept on one server's listeners; its connections' ends count out."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        service: DirectService,
        log: ServerLog,
        ended: Callable[[Accepted], None],
        lingerer: Lingerer,
    ) -> None:
        self.loop = loop
        self.lingerer = lingerer  # the worker's: refused clients drain there
        self.table = service.table
        self.judge = service.judge
        self.refusals = service.refusals
        self.log = log
        self.ended = ended  # the worker's own bookkeeping, after ours
        self.dispatch: Callable[[Accepted], None] = lambda conn: None  # the mode's, once made
        self.open = 0
        self.acceptor = AcceptLoop(loop, service.listeners, self._accepted, log)
        self.acceptor.gate = self._room
        self._held: tuple[socket.socket, Endpoint, Endpoint] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._local = Endpoint()

    def start(self) -> None:
        self.table.accepting(True)
        self.acceptor.resume()

    def stop(self) -> None:
        """Accept no more: close our copies of the listeners, and a client held for room."""
        self.acceptor.close()
        self.table.accepting(False)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._held is not None:
            self._held[0].close()
            self._held = None

    def _room(self) -> bool:
        table = self.table
        if self._held is None and not table.full and not table.busier():
            return True
        # Not watching any more: nobody leaves a client to us until we watch again, so
        # some worker always watches (two that each left clients to the other would
        # take one per RECHECK between them).
        table.accepting(False)
        self._look_later()
        return False

    def _accepted(self, sock: socket.socket, addr: object, listener: Listener) -> None:
        ends = accepted_ends(listener, sock, addr, self._local)
        if ends is None:
            return
        peer, local = ends
        self._local = local
        refused = self.judge(peer, local)
        if refused is not None:
            reason, cause = refused
            self.log.refused(peer, reason)
            self.lingerer.refuse(sock, self.refusals.line(cause))
            return
        self._admit(sock, peer, local)

    def _admit(self, sock: socket.socket, peer: Endpoint, local: Endpoint) -> None:
        entry = self.table.admit(peer)
        if entry == FULL:
            self._held = (sock, peer, local)
            self.acceptor.pause()
            self.table.accepting(False)
            self._look_later()
            return
        if isinstance(entry, str):
            self.log.refused(peer, entry)
            self.lingerer.refuse(sock, self.refusals.limit)
            return
        conn = Accepted(sock, ConnRecord(peer, local, "async"))
        conn.fd = -1  # no registry here keeps the number; the socket object has it
        conn.entry = entry
        self.open += 1
        self.dispatch(conn)

    def finished(self, conn: Accepted) -> None:
        """The mode's end of a connection: count it out, log it, maybe accept again."""
        if conn.entry >= 0:
            self.table.release(conn.entry)
            conn.entry = -1
            self.open -= 1
            self.log.connection(conn.record)
            if self.acceptor.paused and not self.acceptor.closed:
                self._look()
        self.ended(conn)

    def _look_later(self) -> None:
        if self._timer is None and not self.acceptor.closed:
            self._timer = self.loop.call_later(RECHECK, self._look)

    def _look(self) -> None:
        """Room again? Serve the client held for it, then accept again."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        held, self._held = self._held, None
        if held is not None:
            self._admit(*held)
        if self._held is None and not self.table.full:
            self.table.accepting(True)
            self.acceptor.resume()
        else:
            self._look_later()
