"""Freeing removed spool files on helper threads, off the event loop, in batches.

A delivered message is unlinked while its lock descriptor is still open, so the unlink
itself is cheap; the file's blocks are freed when that last descriptor is closed. On a
file system mounted with ``discard`` (ext4 here) freeing them issues a synchronous
TRIM to the disk, which measured 0.1 to 1 ms of waiting per file: on the queue
manager's event loop that wait stopped every other delivery, once per message.

Nothing depends on when the close happens. The name is gone, so no other process can
find the message; one that opened it before the unlink and waits for its lock finds,
once it has the lock, that the path no longer names its file, and lets it be
(`Spool._acquire`). A crash leaves the file on the file system's orphan list, which the
kernel frees at the next mount, as for any file open when a process dies.

How the descriptors reach the threads matters as much. Handed over one by one, each
close made a thread take the GIL back from the loop: 24 futex calls and 11 context
switches per message were measured. So they go in batches, and a batch travels as
in-flight descriptors (SCM_RIGHTS) on a fresh socket pair: the loop sends it in one
call and closes its own copies (cheap, the message holds a reference), and a thread
frees the whole batch with one close(2) of the receiving socket, in the kernel, without
the GIL. A batch goes when it is full or `DELAY` seconds after its first descriptor;
several threads run because the disk serves TRIMs side by side (on this machine, busy
with other work, one managed 500 a second and four several thousand). At most `limit`
descriptors wait, in flight included; past that the caller closes its own, so what is
held stays bounded however slow the disk is.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import queue
import socket
import threading

PENDING_LIMIT = 256  # descriptors held for the threads; beyond, closed by the caller
BATCH = 32  # descriptors per batch (a message carries at most 253: SCM_MAX_FD)
DELAY = 0.05  # seconds a batch waits to fill
THREADS = 4


class Reaper:
    """Closes descriptors in batches on daemon threads started on first use."""

    def __init__(
        self, limit: int = PENDING_LIMIT, threads: int = THREADS, batch: int = BATCH
    ) -> None:
        self.limit = limit
        self.size = threads
        self.batch = batch
        self._pending: list[int] = []
        self._timer: asyncio.TimerHandle | None = None
        self._timer_loop: asyncio.AbstractEventLoop | None = None
        self._sockets: queue.SimpleQueue[int | None] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._pid = os.getpid()
        self.closed_at_once = 0  # by the caller, past the limit (tests and benchmarks)
        self._in_flight = 0  # batches sent and not yet freed (under _freed)
        self._freed = threading.Condition()

    def close(self, fd: int) -> None:
        """Close `fd` soon, with a batch; at once when too many wait or no loop runs."""
        if not self._threads or self._pid != os.getpid():
            self._start()
        if len(self._pending) + self._sockets.qsize() * self.batch >= self.limit:
            os.close(fd)  # (batches a thread is freeing are not counted: a few more)
            self.closed_at_once += 1
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # not on an event loop: nothing to keep waiting for
            os.close(fd)
            return
        if self._timer is not None and self._timer_loop is not loop:
            self.flush()  # the timer belongs to a loop that has ended
        self._pending.append(fd)
        if len(self._pending) >= self.batch:
            self.flush()
        elif self._timer is None:
            self._timer = loop.call_later(DELAY, self.flush)
            self._timer_loop = loop

    def flush(self) -> None:
        """Send what is pending to the threads now."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        fds, self._pending = self._pending, []
        if not fds:
            return
        try:
            sending, receiving = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        except OSError:
            self._close_now(fds)
            return
        with sending:
            try:
                socket.send_fds(sending, [b"\0"], fds)
            except OSError:  # e.g. too many descriptors in flight for this user
                receiving.close()
                self._close_now(fds)
                return
        for fd in fds:
            os.close(fd)  # the batch in flight keeps each file open until its close
        with self._freed:
            self._in_flight += 1
        self._sockets.put(receiving.detach())

    async def settle(self) -> None:
        """Send what is pending and wait, off the loop, until every batch is freed.

        A forced pass (a flush) ends with it, so once a flush reports done the space
        of every message it removed is free again, as when the loop closed them.
        """
        self.flush()
        with self._freed:
            if self._in_flight == 0:
                return
        await asyncio.to_thread(self._wait_freed)

    def _wait_freed(self) -> None:
        with self._freed:
            self._freed.wait_for(lambda: self._in_flight == 0 or not self._threads)

    def stop(self) -> None:
        """Free everything pending, then end the threads (idempotent)."""
        threads, self._threads = self._threads, []
        if self._pid != os.getpid():
            return  # a forked child's copy: those threads are not ours
        self._close_now(self._pending)
        self._pending = []
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for _thread in threads:
            self._sockets.put(None)
        for thread in threads:
            thread.join()

    def _close_now(self, fds: list[int]) -> None:
        for fd in fds:
            with contextlib.suppress(OSError):
                os.close(fd)
            with self._freed:
                self._in_flight -= 1
                self._freed.notify_all()

    def _start(self) -> None:
        """Threads of this process's own (a forked child inherits none that run)."""
        self._pid = os.getpid()
        self._pending, self._timer = [], None
        self._in_flight = 0
        self._freed = threading.Condition()
        self._sockets = queue.SimpleQueue()
        self._threads = [
            threading.Thread(target=self._run, name="leafmail-reaper", daemon=True)
            for _ in range(self.size)
        ]
        for thread in self._threads:
            thread.start()

    def _run(self) -> None:
        sockets = self._sockets
        while (fd := sockets.get()) is not None:
            # Closing the receiving end drops every descriptor in flight on it: the
            # batch's files are freed here, in one system call.
            with contextlib.suppress(OSError):
                os.close(fd)
            with self._freed:
                self._in_flight -= 1
                self._freed.notify_all()


_SHARED = Reaper()


def shared() -> Reaper:
    """The process's one reaper (its threads start on first use, in each process)."""
    return _SHARED
