"""Closing the descriptors of removed spool files on a thread, off the event loop.

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

A few long-lived threads take the descriptors from a queue and close them. They block
in close(2) without the GIL; the loop pays a queue put per message. There are several
because the disk serves TRIMs side by side: on this machine, busy with other work, one
thread managed 500 closes a second and four several thousand. At most `limit`
descriptors wait; past that, the caller closes its own, so the descriptor table stays
bounded however slow the disk is.
"""

from __future__ import annotations

import contextlib
import os
import queue
import threading

PENDING_LIMIT = 256  # descriptors waiting for the threads; beyond, closed by the caller
THREADS = 4


class Reaper:
    """Closes descriptors on daemon threads started on first use (in each process)."""

    def __init__(self, limit: int = PENDING_LIMIT, threads: int = THREADS) -> None:
        self.limit = limit
        self.size = threads
        self._fds: queue.SimpleQueue[int | None] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._pid = os.getpid()

    def close(self, fd: int) -> None:
        """Close `fd` soon, on a thread; at once when too many already wait."""
        if not self._threads or self._pid != os.getpid():
            self._start()
        if self._fds.qsize() >= self.limit:
            os.close(fd)
        else:
            self._fds.put(fd)

    def stop(self) -> None:
        """Close everything queued, then end the threads (idempotent)."""
        threads, self._threads = self._threads, []
        if self._pid != os.getpid():
            return  # a forked child's copy: those threads are not ours
        for _thread in threads:
            self._fds.put(None)
        for thread in threads:
            thread.join()

    def _start(self) -> None:
        """Threads of this process's own (a forked child inherits none that run)."""
        self._pid = os.getpid()
        self._fds = queue.SimpleQueue()
        self._threads = [
            threading.Thread(target=self._run, name="leafmail-reaper", daemon=True)
            for _ in range(self.size)
        ]
        for thread in self._threads:
            thread.start()

    def _run(self) -> None:
        fds = self._fds
        while (fd := fds.get()) is not None:
            with contextlib.suppress(OSError):  # nothing to free if it is closed already
                os.close(fd)


_SHARED = Reaper()


def shared() -> Reaper:
    """The process's one reaper (its thread starts on first use, in each process)."""
    return _SHARED
