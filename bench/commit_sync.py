"""A commit of one message: fdatasync(file) + fsync(dir) against syncfs(2), side by side.

Issue 12: for one session the wait is the commit, so the faster barrier for a batch of
one should be used. Each loop creates a 1,500-byte file in tmp/, makes it durable, renames
it into q/ and makes the rename durable, as `leafmail.spool` does; "fsync" uses
fdatasync of the file and fsync of the directory, "syncfs" flushes the file system both
times, "mixed" uses fdatasync for the file and syncfs for the rename, and "renamed"
renames the file into q/ first and then makes both durable with one syncfs (the lone
commit's order since the flush count below). Rounds alternate so drift of a shared disk
spreads over all four. Each kind also prints the disk's flush requests per message
(field 16 of /sys/block/DEV/stat, for the disk under DIR), which is what a barrier costs
on a disk with a write-back cache.

With ``--committer`` it compares the hand-overs instead: one coroutine commits messages
one at a time through leafmail's `GroupCommitter`, through its sync thread ("thread":
the loop places the file, the thread makes it durable and wakes the loop) and on the
loop itself, as the only session open in an smtpd worker does ("loop": ``sessions``
says one is open; no thread at all). It prints the median wait per
commit and, per commit, the process's CPU time and voluntary context switches (each one
a thread or the loop going to sleep and being woken), which a busy machine disturbs far
less than the wait.

    python -m bench.commit_sync DIR [--messages 300] [--rounds 3] [--committer]
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import ctypes.util
import os
import resource
import statistics
import tempfile
import time
from collections.abc import Callable

from leafmail.envelope import ClientInfo, Envelope, Recipient
from leafmail.spool import GroupCommitter, Spool

from .machine import disk_flushes

_LIBC = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_SYNCFS: Callable[[int], int] = _LIBC.syncfs
DATA = b"x" * 1500
KINDS = ("fsync", "syncfs", "mixed", "renamed")


def run(directory: str, kind: str, count: int) -> tuple[float, float | None]:
    """Messages per second committed with `kind` (one of KINDS), and the disk's flush
    requests per message meanwhile (anything else writing to that disk adds to them)."""
    tmp, queue = os.path.join(directory, "tmp"), os.path.join(directory, "q")
    os.makedirs(tmp, exist_ok=True)
    os.makedirs(queue, exist_ok=True)
    dir_fd = os.open(queue, os.O_RDONLY | os.O_DIRECTORY)
    flushed = disk_flushes(directory)
    start = time.perf_counter()
    for n in range(count):
        path = os.path.join(tmp, f"{kind}{n}")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.write(fd, DATA)
        if kind == "renamed":
            os.rename(path, os.path.join(queue, f"{kind}{n}"))
            _SYNCFS(fd)
            os.close(fd)
            continue
        barrier(kind, fd, file=True)
        os.close(fd)
        os.rename(path, os.path.join(queue, f"{kind}{n}"))
        barrier(kind, dir_fd, file=False)
    elapsed = time.perf_counter() - start
    after = disk_flushes(directory)
    os.close(dir_fd)
    for name in os.listdir(queue):
        os.unlink(os.path.join(queue, name))
    per = None if flushed is None or after is None else (after - flushed) / count
    return count / elapsed, per


def barrier(kind: str, fd: int, *, file: bool) -> None:
    """Make what `fd` holds durable the `kind` way."""
    if kind == "syncfs" or (kind == "mixed" and not file):
        _SYNCFS(fd)
    elif file:
        os.fdatasync(fd)
    else:
        os.fsync(fd)


ENVELOPE = Envelope(
    sender="a@src.test",
    recipients=(Recipient("b@example.test", (), None),),
    client=ClientInfo("127.0.0.1", 40000, "client.test", "ESMTP", None, None),
    received="2026-12-07T00:00:00Z",
    body="7BIT",
)


PATHS = ("thread", "loop")


def _one_session() -> int:
    return 1


def committer_run(directory: str, path: str, count: int) -> str:
    """Commit `count` messages one after the other through `path` (one of PATHS); the
    wait and the cost per commit."""
    spool = Spool(tempfile.mkdtemp(dir=directory))
    sessions = _one_session if path == "loop" else None
    committer = GroupCommitter(spool, sessions=sessions)
    waits: list[float] = []

    async def one_by_one() -> None:
        for _ in range(count):
            start = time.perf_counter()
            await committer.commit(ENVELOPE, DATA)
            waits.append(time.perf_counter() - start)

    before = resource.getrusage(resource.RUSAGE_SELF)
    try:
        asyncio.run(one_by_one())
    finally:
        committer.close()
    after = resource.getrusage(resource.RUSAGE_SELF)
    user = (after.ru_utime - before.ru_utime) / count * 1e6
    system = (after.ru_stime - before.ru_stime) / count * 1e6
    switches = (after.ru_nvcsw - before.ru_nvcsw) / count
    return (
        f"{path}: wait p50 {statistics.median(waits) * 1e6:,.0f} µs,"
        f" CPU user {user:,.0f} sys {system:,.0f} µs, {switches:.1f} voluntary switches"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.commit_sync", description=__doc__)
    parser.add_argument("directory", help="a scratch directory on the spool's file system")
    parser.add_argument("--messages", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--committer", action="store_true", help="the committer's paths")
    args = parser.parse_args(argv)
    for number in range(1, args.rounds + 1):
        if args.committer:
            for path in PATHS:
                print(f"round {number} {committer_run(args.directory, path, args.messages)}")
            continue
        rates = {kind: run(args.directory, kind, args.messages) for kind in KINDS}
        print(f"round {number}: " + ", ".join(_shown(k, *v) for k, v in rates.items()))


def _shown(kind: str, rate: float, per: float | None) -> str:
    flushed = "" if per is None else f" ({per:.2f} flushes/msg)"
    return f"{kind} {rate:.0f} msg/s{flushed}"


if __name__ == "__main__":
    main()
