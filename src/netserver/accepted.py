"""An accepted connection as the supervisor holds it, and the descriptors a child must close.

Every layer of the accept path handles these two: the accept loop makes an `Accepted`,
the gates judge it, TLS termination relays it and a mode serves it; each registers in
the `FdRegistry` what a forked child must not keep.
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Collection
from dataclasses import dataclass

from .connlog import ConnRecord


@dataclass(slots=True)
class Accepted:
    """A connection the supervisor admitted: the socket and its log record.

    `fd` is kept apart from the socket because the socket may be closed (handed to a
    worker) while the supervisor still has to forget the number in its `FdRegistry`.
    """

    sock: socket.socket
    record: ConnRecord
    fd: int = -1
    # A PROXY header is still to be read (by the worker that serves it): until the
    # supervisor learns the client it names, `record.peer` is the balancer.
    awaiting_proxy: bool = False
    # The supervisor's number for it, in a pool's worker (-1: none, or reported).
    cid: int = -1
    # Its entry in the limits table shared by the workers, when one accepted it itself
    # (modes.direct; -1: none, or counted out).
    entry: int = -1

    def __post_init__(self) -> None:
        self.fd = self.sock.fileno()


class FdRegistry:
    """Descriptors the supervisor holds that a forked child must close at once.

    Without this a child would keep the listening sockets, and other clients'
    connections, open for as long as it runs (a defect of the 1998 module).
    """

    def __init__(self) -> None:
        self._fds: set[int] = set()

    def add(self, fd: int) -> None:
        self._fds.add(fd)

    def discard(self, fd: int) -> None:
        self._fds.discard(fd)

    def close_in_child(self, keep: int | Collection[int] = ()) -> None:
        """Close every registered descriptor but `keep` (call only in a forked child)."""
        kept = (keep,) if isinstance(keep, int) else keep
        for fd in self._fds:
            if fd not in kept:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._fds.clear()
