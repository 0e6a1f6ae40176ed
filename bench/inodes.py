"""Keeping files one server deleted from taxing the next server's file creation.

On ext4 without a journal (this VM's root file system: ``/sys/fs/ext4/vda/journal_task``
reads ``<none>``), the inode allocator will not reuse an inode freed less than a minute
ago (longer while its inode-table block is still dirty): ``recently_deleted()`` in the
kernel's fs/ext4/ialloc.c. It looks at every such free inode, one buffer-cache lookup
each, from the start of the block group before it takes a truly free one, and every
file a server creates in that group pays for the walk in system CPU. Measured here with
a loop of ``open(O_CREAT|O_EXCL)``: 857 µs of system time per file right after 6,000
files were deleted (and synced), 43 µs 65 s later.

The SMTP benchmark's scratch directories all sit under one parent, so they share block
groups. Deleting a server's scratch tree (thousands of spooled messages) just before
the next server started, and Postfix's discards (it deletes every queue file it
delivers), were charged to whoever ran next: leafmail's CPU per message rose from round
to round (1,090, 1,700, 2,003 µs in the quiet run of the second round, system time in
its smtpd workers; ``perf`` showed ``recently_deleted`` and ``find_get_block_common``
on top in a late round and absent in the first). So the benchmark keeps every scratch
tree until it ends, and before a server starts it waits out the window after the last
run that deleted files (`Cooldown`). A server's own deletions during its own run are its
own cost, as they would be in production.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

WINDOW = 61.0  # seconds: the kernel's one minute after a synced deletion, and a margin


def journal_less_ext4(path: Path) -> bool:
    """True if `path` is on an ext4 file system mounted without a journal.

    The kernel publishes each ext4 mount under /sys/fs/ext4/DEVICE, and its
    ``journal_task`` reads ``<none>`` when there is no journal. Anything else (another
    file system, a journal, a /sys that cannot be read) needs no waiting.
    """
    dev = os.stat(path).st_dev
    try:
        device = Path(f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}").resolve().name
        task = Path(f"/sys/fs/ext4/{device}/journal_task").read_text().strip()
    except OSError:
        return False
    return task == "<none>"


class Cooldown:
    """Waits, before a server starts, until deletions by earlier runs no longer cost it.

    `deleted` records that files were just deleted; `wait` syncs (so the kernel's
    shorter window applies) and sleeps out what is left of `window` since then. On a
    file system that does not need it, `window` is 0 and nothing waits.
    """

    def __init__(
        self,
        window: float,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.window = window
        self.clock = clock
        self.sleep = sleep
        self._since: float | None = None
        self.waited = 0.0  # seconds slept in all, for the report

    @classmethod
    def for_path(cls, path: Path) -> Cooldown:
        """The cooldown `path`'s file system needs (none unless ext4 without a journal)."""
        return cls(WINDOW if journal_less_ext4(path) else 0.0)

    def deleted(self) -> None:
        """Files were deleted now: the next `wait` lets the window pass."""
        self._since = self.clock()

    def wait(self) -> None:
        """Sync, then sleep until `window` seconds have passed since the last deletion."""
        if self._since is None or self.window <= 0:
            return
        os.sync()
        left = self._since + self.window - self.clock()
        if left > 0:
            self.sleep(left)
            self.waited += left
        self._since = None
