"""Lingering refusals on an exec spawner's own epoll set (modes.reactor).

The spawner has no asyncio loop; `EpollReactor` gives `linger.Lingerer` its readers and
timers on a plain epoll set, which the test drives the way the spawner's loop does:
wait for the next event or the first timer, hand the reactor its descriptors, run
what is due. Real sockets on loopback.
"""

from __future__ import annotations

import select
import socket
import time
from collections.abc import Callable, Iterator

import pytest
from lifecycle_handlers import IO_TIMEOUT, recv_line

from netserver.linger import Lingerer
from netserver.modes.reactor import EpollReactor

REFUSAL = "554 go away"


class Spawnerish:
    """An epoll set with a reactor and a lingerer on it, and a listener to refuse on."""

    def __init__(self, seconds: float) -> None:
        self.poll = select.epoll()
        self.reactor = EpollReactor(self.poll)
        self.lingerer = Lingerer(self.reactor, seconds=seconds)
        self.listener = socket.create_server(("127.0.0.1", 0))

    def refuse_client(self) -> tuple[socket.socket, socket.socket]:
        """A client that speaks first, refused: (client, the refused socket)."""
        client = socket.create_connection(self.listener.getsockname(), timeout=IO_TIMEOUT)
        client.sendall(b"HELLO\r\n")
        sock, _ = self.listener.accept()
        self.lingerer.refuse(sock, REFUSAL)
        assert recv_line(client) == (REFUSAL + "\r\n").encode()
        return client, sock

    def run_until(self, done: Callable[[], bool]) -> bool:
        """Turn the loop until `done` (at most IO_TIMEOUT seconds)."""
        deadline = time.monotonic() + IO_TIMEOUT
        while not done():
            now = time.monotonic()
            if now >= deadline:
                return False
            due = self.reactor.timeout()
            wait = deadline - now if due is None else max(0.0, min(due, deadline) - now)
            for fd, _events in self.poll.poll(wait + 0.001):
                assert self.reactor.ready(fd)  # nothing else is in this set
            self.reactor.run_due()
        return True

    def close(self) -> None:
        self.lingerer.close()
        self.listener.close()
        self.poll.close()


@pytest.fixture
def spawnerish() -> Iterator[Spawnerish]:
    state = Spawnerish(seconds=60.0)
    yield state
    state.close()


def test_a_refused_client_that_closes_is_drained_then_closed(spawnerish: Spawnerish) -> None:
    client, sock = spawnerish.refuse_client()
    with client:
        assert len(spawnerish.lingerer.draining) == 1
        assert client.recv(64) == b""  # the half-close: an end of file, not a reset
        client.sendall(b"more\r\n")  # dropped unread
        client.shutdown(socket.SHUT_WR)
        assert spawnerish.run_until(lambda: not spawnerish.lingerer.draining)
    assert sock.fileno() == -1
    assert not spawnerish.reactor.readers
    assert spawnerish.reactor.timeout() is None  # its timer was cancelled, not left due


def test_a_silent_client_is_closed_when_its_time_is_up() -> None:
    state = Spawnerish(seconds=0.2)
    try:
        client, sock = state.refuse_client()
        with client:
            assert state.reactor.timeout() is not None
            assert state.run_until(lambda: sock.fileno() == -1)  # by the timer alone
            assert not state.lingerer.draining and not state.reactor.readers
    finally:
        state.close()
