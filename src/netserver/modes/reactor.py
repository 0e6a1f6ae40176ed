"""The part of an event loop that a `linger.Lingerer` needs, on a plain epoll set.

An exec spawner that accepts on the listeners itself (modes.spawner) runs no asyncio
loop: it waits in one epoll set for its channel, the listeners and its commands'
pidfds. A client it refuses must still read the refusal line, so it drains like every
other refusal path (netserver.linger): watched for reading, closed after a delay. This
gives the Lingerer those two calls on the spawner's own epoll set; the spawner asks
it, in its loop, how long it may wait (`timeout`) and hands it what is its (`ready`,
`run_due`).
"""

from __future__ import annotations

import contextlib
import heapq
import select
import time
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["EpollReactor"]


@dataclass(slots=True)
class _Call:
    """A callback set by `call_later`; `cancel` stops it."""

    callback: Callable[[int], object]
    arg: int
    cancelled: bool = False

    def cancel(self) -> None:
        self.cancelled = True


class EpollReactor:
    """Readers and timers on an epoll set someone else waits on."""

    def __init__(self, poll: select.epoll) -> None:
        self.poll = poll
        self.readers: dict[int, tuple[Callable[[int], object], int]] = {}
        self._calls: list[tuple[float, int, _Call]] = []  # when, sequence, call
        self._seq = 0

    def add_reader(self, fd: int, callback: Callable[[int], object], arg: int, /) -> None:
        self.readers[fd] = (callback, arg)
        self.poll.register(fd, select.EPOLLIN)

    def remove_reader(self, fd: int, /) -> bool:
        if self.readers.pop(fd, None) is None:
            return False
        with contextlib.suppress(OSError):  # closed already: out of the set with it
            self.poll.unregister(fd)
        return True

    def call_later(self, delay: float, callback: Callable[[int], object], arg: int, /) -> _Call:
        call = _Call(callback, arg)
        self._seq += 1
        heapq.heappush(self._calls, (time.monotonic() + delay, self._seq, call))
        return call

    def ready(self, fd: int) -> bool:
        """Run the reader of `fd` if it is ours; whether it was."""
        reader = self.readers.get(fd)
        if reader is None:
            return False
        reader[0](reader[1])
        return True

    def timeout(self) -> float | None:
        """When the first call is due, as a monotonic time; None if none is set."""
        while self._calls and self._calls[0][2].cancelled:
            heapq.heappop(self._calls)
        return self._calls[0][0] if self._calls else None

    def run_due(self) -> None:
        now = time.monotonic()
        while self._calls and self._calls[0][0] <= now:
            _when, _seq, call = heapq.heappop(self._calls)
            if not call.cancelled:
                call.callback(call.arg)
