"""Accepting connections on the event loop, with back-off when descriptors run out.

When accept() fails with EMFILE or ENFILE the pending connection stays in the backlog
and the listener stays readable, so a naive loop spins at 100% CPU. Here the listeners
are taken off the loop and put back after a delay that doubles up to one second, and
the episode is logged once. Errors that concern only one aborted client are skipped.
"""

from __future__ import annotations

import asyncio
import errno
import socket
from collections.abc import Callable, Sequence

from ..connlog import ServerLog
from ..endpoint import Endpoint
from ..errors import RESOURCE_ERRNOS
from .listeners import Listener

_BATCH = 64
_MIN_DELAY = 0.05
_MAX_DELAY = 1.0

OnAccept = Callable[[socket.socket, object, Listener], None]


class AcceptLoop:
    """Watches the listeners and calls `on_accept` for each new connection."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        listeners: Sequence[Listener],
        on_accept: OnAccept,
        log: ServerLog,
    ) -> None:
        self.loop = loop
        self.listeners = list(listeners)
        self.on_accept = on_accept
        self.log = log
        self.paused = True
        self.closed = False
        self._delay = _MIN_DELAY
        self._retry: asyncio.TimerHandle | None = None
        self.gate: Callable[[], bool] = lambda: True

    def resume(self) -> None:
        """Start (or restart) watching the listeners."""
        if self.paused and not self.closed and self._retry is None:
            for listener in self.listeners:
                self.loop.add_reader(listener.sock.fileno(), self._readable, listener)
            self.paused = False

    def pause(self) -> None:
        """Stop watching; clients wait in the listen backlog."""
        if not self.paused:
            for listener in self.listeners:
                self.loop.remove_reader(listener.sock.fileno())
            self.paused = True

    def close(self) -> None:
        """Stop for good and close the listening sockets."""
        self.pause()
        self.closed = True
        if self._retry is not None:
            self._retry.cancel()
            self._retry = None
        for listener in self.listeners:
            listener.close()

    def _readable(self, listener: Listener) -> None:
        for _ in range(_BATCH):
            if not self.gate():
                self.pause()
                return
            try:
                sock, addr = listener.sock.accept()
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno in RESOURCE_ERRNOS:
                    self._back_off(exc)
                    return
                if exc.errno == errno.EINVAL:
                    self._stopped_listening(listener)
                    return
                continue  # ECONNABORTED, EPROTO, EPERM (firewall): that client only
            try:
                self.on_accept(sock, addr, listener)
            except OSError as exc:  # the mode ran out of descriptors or processes
                if exc.errno not in RESOURCE_ERRNOS:
                    raise
                self._back_off(exc)
                return
            self._delay = _MIN_DELAY

    def _stopped_listening(self, listener: Listener) -> None:
        """The socket no longer listens: `netserver run` shut it down in a reload.

        Linux then wakes every process that shares it with EINVAL from accept; without
        this, each would spin until the TERM that retires it arrives.
        """
        if listener in self.listeners:
            self.listeners.remove(listener)
            if not self.paused:
                self.loop.remove_reader(listener.sock.fileno())

    def _back_off(self, exc: OSError) -> None:
        if self._delay == _MIN_DELAY:
            self.log.error("accept failed, backing off", error=exc.strerror or str(exc))
        self.pause()
        self._retry = self.loop.call_later(self._delay, self._retry_now)
        self._delay = min(self._delay * 2, _MAX_DELAY)

    def _retry_now(self) -> None:
        self._retry = None
        self.resume()


def local_end(listener: Listener, sock: socket.socket, last: Endpoint) -> Endpoint | None:
    """The address a client reached: the listener's own, or for a wildcard or a handed-over
    socket the one the kernel says (None if it cannot); `last` when it is the same, so
    the connections to one address share one Endpoint (a record lives as long as its
    connection)."""
    if listener.local is not None:
        return listener.local
    try:
        local = Endpoint.from_sockaddr(listener.family, sock.getsockname())
    except OSError:
        return None
    return last if local == last else local


def accepted_ends(
    listener: Listener, sock: socket.socket, addr: object, last: Endpoint
) -> tuple[Endpoint, Endpoint] | None:
    """A client just accepted on `listener`: its address and the one it reached
    (`local_end`), or None, with the socket closed, when the kernel cannot say which.

    accept() gives a blocking descriptor; only a default timeout set with
    socket.setdefaulttimeout makes the socket object otherwise, so it is put back to
    blocking then (no system call when it is not).
    """
    local = local_end(listener, sock, last)
    if local is None:
        sock.close()
        return None
    if sock.gettimeout() is not None:
        sock.setblocking(True)
    return Endpoint.from_sockaddr(listener.family, addr), local
