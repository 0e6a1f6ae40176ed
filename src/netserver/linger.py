"""Turning a client away so that it reads why: the line, a half-close, a bounded drain.

A socket closed while bytes from the client are still unread is reset by the kernel
(RFC 2525 2.17; Linux's tcp_close), not closed with a FIN: the client's next send or
shutdown fails (EPIPE, ENOTCONN), and a stack that drops its receive queue on a reset
never shows the line it was just sent. A refused client that spoke first -- an SMTP
client that pipelines EHLO before the greeting, a client of any protocol in which the
client talks first -- is in exactly that case. So a refusal here is: write the line,
``shutdown(SHUT_WR)`` (the client reads the line, then EOF), read and discard what the
client still sends until it closes its end, and only then close. The drain is bounded
per client, `LINGER_SECONDS` and `LINGER_BYTES`, and in total, `LINGER_MAX` sockets per
process: past that cap a socket is closed at once, after taking what had already
arrived, so a flood of refused clients can pin neither memory nor descriptors. This is
the lingering close of nginx (``lingering_close``) and Apache httpd.

Two forms, one rule: `Lingerer` for a bare socket the accept path refuses (the
supervisor, a worker that accepts itself), watched with ``add_reader`` and never read
blocking; `close_lingering` for an event-loop connection (a transport) that ends a
session the client did not end, such as an SMTP 421; it stays counted as a connection
until it is closed, so the connection limits bound those.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from .accepted import FdRegistry

__all__ = [
    "LINGER_BYTES",
    "LINGER_MAX",
    "LINGER_SECONDS",
    "Cancellable",
    "Lingerer",
    "Reactor",
    "close_lingering",
]

LINGER_SECONDS = 5.0  # how long a refused client may go on sending before we close
LINGER_BYTES = 65536  # how much it may send in that time
LINGER_MAX = 256  # refused sockets draining at once in one process; past it: close now
_CHUNK = 16384


class Cancellable(Protocol):
    def cancel(self) -> None: ...


class Reactor(Protocol):
    """What a `Lingerer` needs of its loop: an asyncio loop, or the exec spawner's own
    (modes.spawner, which has no asyncio loop)."""

    def add_reader(self, fd: int, callback: Callable[[int], object], arg: int, /) -> None: ...

    def remove_reader(self, fd: int, /) -> bool: ...

    def call_later(
        self, delay: float, callback: Callable[[int], object], arg: int, /
    ) -> Cancellable: ...


@dataclass(slots=True)
class _Draining:
    sock: socket.socket
    left: int
    timer: Cancellable | None = None


class Lingerer:
    """Refused sockets of one process, drained on its loop until they can be closed.

    `fds`: the registry of descriptors a forked child must close (the supervisor's),
    which holds each socket while it drains.
    """

    def __init__(
        self,
        loop: Reactor,
        fds: FdRegistry | None = None,
        *,
        seconds: float = LINGER_SECONDS,
        max_bytes: int = LINGER_BYTES,
        cap: int = LINGER_MAX,
    ) -> None:
        self.loop = loop
        self.fds = fds
        self.seconds = seconds
        self.max_bytes = max_bytes
        self.cap = cap
        self.draining: dict[int, _Draining] = {}
        self._buf: bytearray | None = None  # made at the first refusal, shared by all

    def refuse(self, sock: socket.socket, line: str | None) -> None:
        """Send `line` (CRLF added) if any, half-close, and drain `sock` until it can close."""
        sock.setblocking(False)
        if line:
            with contextlib.suppress(OSError):
                sock.send(line.encode() + b"\r\n")
        try:
            sock.shutdown(socket.SHUT_WR)
        except OSError:  # already reset by the client: nothing more to say
            sock.close()
            return
        entry = _Draining(sock, self.max_bytes)
        if not self._drain(entry) or len(self.draining) >= self.cap:
            sock.close()  # the client is done, or too many are draining: close now
            return
        fd = sock.fileno()
        self.draining[fd] = entry
        if self.fds is not None:
            self.fds.add(fd)
        self.loop.add_reader(fd, self._readable, fd)
        entry.timer = self.loop.call_later(self.seconds, self._end, fd)

    def close(self) -> None:
        """Close every socket still draining (the process is stopping)."""
        for fd in list(self.draining):
            self._end(fd)

    def _readable(self, fd: int) -> None:
        entry = self.draining.get(fd)
        if entry is not None and not self._drain(entry):
            self._end(fd)

    def _end(self, fd: int) -> None:
        entry = self.draining.pop(fd, None)
        if entry is None:
            return
        self.loop.remove_reader(fd)
        if entry.timer is not None:
            entry.timer.cancel()
        if self.fds is not None:
            self.fds.discard(fd)
        entry.sock.close()

    def _drain(self, entry: _Draining) -> bool:
        """Drop what has arrived; False once the socket should close (EOF, an error, or
        the client sent more than its allowance).

        With MSG_TRUNC, Linux's TCP discards the bytes in the kernel and only says how
        many there were: the supervisor, which may run as root, drains a refused client
        without its bytes ever entering the process (`_buf` is never written).
        """
        buf = self._buf
        if buf is None:
            buf = self._buf = bytearray(_CHUNK)
        while entry.left > 0:
            try:
                got = entry.sock.recv_into(buf, min(_CHUNK, entry.left), socket.MSG_TRUNC)
            except (BlockingIOError, InterruptedError):
                return True
            except OSError:
                return False
            if not got:
                return False
            entry.left -= got
        return False


class _Drain(asyncio.Protocol):
    """Stands in for a connection's protocol while it lingers: drops what arrives,
    closes at EOF or past the allowance, and hands the end back to the connection."""

    __slots__ = ("left", "owner", "timer", "transport")

    def __init__(
        self, transport: asyncio.Transport, owner: asyncio.BaseProtocol, left: int
    ) -> None:
        self.transport = transport
        self.owner = owner
        self.left = left
        self.timer: asyncio.TimerHandle | None = None

    def data_received(self, data: bytes) -> None:
        self.left -= len(data)
        if self.left <= 0:
            self.transport.close()

    def eof_received(self) -> bool:
        return False  # the client closed its end too: the transport closes

    def connection_lost(self, exc: Exception | None) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.owner.connection_lost(exc)


def close_lingering(
    transport: asyncio.Transport,
    *,
    seconds: float = LINGER_SECONDS,
    max_bytes: int = LINGER_BYTES,
) -> None:
    """Close `transport` once what was written is sent, the way `Lingerer` closes a socket.

    Its protocol is told of the end (`connection_lost`) as for any close, and of nothing
    the client sends meanwhile. A TLS transport is closed as it is: its close_notify is
    TLS's half-close, and asyncio's (and uvloop's) TLS layer reads on until the client's
    own close_notify, bounded by its shutdown timeout, before closing the socket.
    """
    if transport.is_closing() or isinstance(transport.get_protocol(), _Drain):
        return
    if not transport.can_write_eof():
        transport.close()
        return
    drain = _Drain(transport, transport.get_protocol(), max_bytes)
    transport.set_protocol(drain)
    transport.write_eof()
    transport.resume_reading()  # it may have been paused while a task decided
    loop = asyncio.get_running_loop()
    drain.timer = loop.call_later(seconds, transport.close)
