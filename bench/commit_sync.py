"""A commit of one message: fdatasync(file) + fsync(dir) against syncfs(2), side by side.

Issue 12: for one session the wait is the commit, so the faster barrier for a batch of
one should be used. Each loop creates a 1,500-byte file in tmp/, makes it durable, renames
it into q/ and makes the rename durable, as `leafmail.spool` does; "fsync" uses
fdatasync of the file and fsync of the directory, "syncfs" flushes the file system both
times. Rounds alternate so drift of a shared disk spreads over both.

    python -m bench.commit_sync DIR [--messages 300] [--rounds 3]
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import os
import time
from collections.abc import Callable

_LIBC = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_SYNCFS: Callable[[int], int] = _LIBC.syncfs
DATA = b"x" * 1500


def run(directory: str, kind: str, count: int) -> float:
    """Messages per second committed with `kind` ("fsync" or "syncfs")."""
    tmp, queue = os.path.join(directory, "tmp"), os.path.join(directory, "q")
    os.makedirs(tmp, exist_ok=True)
    os.makedirs(queue, exist_ok=True)
    dir_fd = os.open(queue, os.O_RDONLY | os.O_DIRECTORY)
    start = time.perf_counter()
    for n in range(count):
        path = os.path.join(tmp, f"{kind}{n}")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.write(fd, DATA)
        barrier(kind, fd, file=True)
        os.close(fd)
        os.rename(path, os.path.join(queue, f"{kind}{n}"))
        barrier(kind, dir_fd, file=False)
    elapsed = time.perf_counter() - start
    os.close(dir_fd)
    for name in os.listdir(queue):
        os.unlink(os.path.join(queue, name))
    return count / elapsed


def barrier(kind: str, fd: int, *, file: bool) -> None:
    """Make what `fd` holds durable the `kind` way."""
    if kind == "syncfs":
        _SYNCFS(fd)
    elif file:
        os.fdatasync(fd)
    else:
        os.fsync(fd)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.commit_sync", description=__doc__)
    parser.add_argument("directory", help="a scratch directory on the spool's file system")
    parser.add_argument("--messages", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    for number in range(1, args.rounds + 1):
        rates = {kind: run(args.directory, kind, args.messages) for kind in ("fsync", "syncfs")}
        print(f"round {number}: " + ", ".join(f"{k} {v:.0f} msg/s" for k, v in rates.items()))


if __name__ == "__main__":
    main()
