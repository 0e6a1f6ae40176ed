"""A commit of one message: the barriers a batch of one can take, side by side.

Issue 12: for one session the wait is the commit, so the faster barrier for a batch of
one should be used. Each loop creates a 1,500-byte file in tmp/, renames it into q/ and
makes its data and its name durable, as `leafmail.spool` does, one way per kind:

- "fsync": fdatasync(file), rename, fsync(q/) (the commit before the one-syncfs change);
- "syncfs": syncfs, rename, syncfs; "mixed": fdatasync(file), rename, syncfs;
- "renamed": rename, then one syncfs (a complete barrier only where
  `leafmail.spool.syncfs_is_a_barrier` says so: not on ext4 without a journal);
- "complete": rename, syncfs, fsync(q/) (the commit where syncfs alone is no barrier);
- "refsync": rename, fdatasync(file), fsync(q/);
- "parent": rename, fsync(file) (ext4 without a journal writes the new entry's
  directory block with the file: see `leafmail.spool.Spool.sync_renamed`).

Rounds alternate, and the kinds run in turn within a round, so drift of a shared disk
spreads over all of them. Each kind also prints the disk's flush requests per message
(field 16 of /sys/block/DEV/stat, for the disk under DIR), which is what a barrier costs
on a disk with a write-back cache, and the median wait of one commit.

With ``--committer`` it compares the hand-overs instead: one coroutine commits messages
one at a time through leafmail's `GroupCommitter`, through its sync thread ("thread":
the loop places the file, the thread makes it durable and wakes the loop) and on the
loop itself, as the only session open in an smtpd worker does ("loop": ``sessions``
says one is open; no thread at all). It prints the median wait per
commit and, per commit, the disk's flushes, the spool's barrier calls (`Spool.syncs`),
the process's CPU time and voluntary context switches (each one a thread or the loop
going to sleep and being woken), which a busy machine disturbs far less than the wait.
(main's `Spool.syncs` counted one a barrier, whatever it made.)

    python -m bench.commit_sync DIR [--messages 300] [--rounds 3] [--kinds a,b] [--committer]
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
KINDS = ("fsync", "syncfs", "mixed", "renamed", "complete", "refsync", "parent")


def run(directory: str, kind: str, count: int) -> tuple[float, float | None, float]:
    """Messages per second committed with `kind` (one of KINDS), the disk's flush
    requests per message meanwhile (anything else writing to that disk adds to them),
    and the median wait of one commit in µs."""
    tmp, queue = os.path.join(directory, "tmp"), os.path.join(directory, "q")
    os.makedirs(tmp, exist_ok=True)
    os.makedirs(queue, exist_ok=True)
    dir_fd = os.open(queue, os.O_RDONLY | os.O_DIRECTORY)
    flushed = disk_flushes(directory)
    waits: list[float] = []
    start = time.perf_counter()
    for n in range(count):
        began = time.perf_counter()
        path = os.path.join(tmp, f"{kind}{n}")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.write(fd, DATA)
        commit_one(kind, fd, dir_fd, path, os.path.join(queue, f"{kind}{n}"))
        os.close(fd)
        waits.append(time.perf_counter() - began)
    elapsed = time.perf_counter() - start
    after = disk_flushes(directory)
    os.close(dir_fd)
    for name in os.listdir(queue):
        os.unlink(os.path.join(queue, name))
    per = None if flushed is None or after is None else (after - flushed) / count
    return count / elapsed, per, statistics.median(waits) * 1e6


def commit_one(kind: str, fd: int, dir_fd: int, path: str, target: str) -> None:
    """Rename the written file `fd` from `path` to `target` in the directory `dir_fd`
    and make both durable the `kind` way."""
    if kind in ("fsync", "syncfs", "mixed"):
        barrier(kind, fd, file=True)
        os.rename(path, target)
        barrier(kind, dir_fd, file=False)
        return
    os.rename(path, target)
    if kind == "parent":
        os.fsync(fd)
        return
    if kind == "refsync":
        os.fdatasync(fd)
    else:
        _SYNCFS(fd)
    if kind != "renamed":
        os.fsync(dir_fd)


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
    os.makedirs(directory, exist_ok=True)
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
    flushed = disk_flushes(directory)
    try:
        asyncio.run(one_by_one())
    finally:
        committer.close()
    after = resource.getrusage(resource.RUSAGE_SELF)
    flushes = disk_flushes(directory)
    per = "" if flushed is None or flushes is None else f", {(flushes - flushed) / count:.2f}"
    user = (after.ru_utime - before.ru_utime) / count * 1e6
    system = (after.ru_stime - before.ru_stime) / count * 1e6
    switches = (after.ru_nvcsw - before.ru_nvcsw) / count
    return (
        f"{path}: wait p50 {statistics.median(waits) * 1e6:,.0f} µs,"
        f" CPU user {user:,.0f} sys {system:,.0f} µs, {switches:.1f} voluntary switches{per}"
        f" flushes, {spool.syncs / count:.2f} barrier calls"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.commit_sync", description=__doc__)
    parser.add_argument("directory", help="a scratch directory on the spool's file system")
    parser.add_argument("--messages", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--kinds", default=",".join(KINDS), help=f"comma-separated, of {', '.join(KINDS)}"
    )
    parser.add_argument("--committer", action="store_true", help="the committer's paths")
    args = parser.parse_args(argv)
    kinds = args.kinds.split(",")
    if not set(kinds) <= set(KINDS):
        parser.error(f"--kinds: not a kind: {', '.join(sorted(set(kinds) - set(KINDS)))}")
    for number in range(1, args.rounds + 1):
        if args.committer:
            for path in PATHS:
                print(f"round {number} {committer_run(args.directory, path, args.messages)}")
            continue
        order = kinds if number % 2 else kinds[::-1]
        rates = {kind: run(args.directory, kind, args.messages) for kind in order}
        print(f"round {number}: " + ", ".join(_shown(k, *v) for k, v in rates.items()))


def _shown(kind: str, rate: float, per: float | None, wait: float) -> str:
    flushed = "" if per is None else f", {per:.2f} flushes/msg"
    return f"{kind} {rate:.0f} msg/s (p50 {wait:.0f} µs{flushed})"


if __name__ == "__main__":
    main()
