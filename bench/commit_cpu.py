"""Instructions per message of `GroupCommitter.commit`, the smtpd worker's commit path.

`smtp_service_cpu` leaves the commit out (its committer only encodes); this runs only
the commit: a real spool in DIR, one coroutine committing 1 KiB messages one at a time
as the only session of its loop (`sessions` says one, so each commit takes the loop's
own barrier, as a lone session does), or through the sync thread with ``--thread``.
Under callgrind, take the difference of two counts (start-up and imports cancel out)::

    valgrind --tool=callgrind python -m bench.commit_cpu DIR1 --messages 100
    valgrind --tool=callgrind python -m bench.commit_cpu DIR2 --messages 400
    # (total(400) - total(100)) / 300 = instructions per message

The disk's barriers are system calls, which callgrind does not count.
"""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path

from leafmail.spool import GroupCommitter, Spool

from .runner_cpu import ENVELOPE
from .wire_cpu import message


async def commit_all(root: Path, messages: int, thread: bool) -> None:
    """`messages` commits, one at a time, into a new spool at `root`."""
    committer = GroupCommitter(Spool(root), sessions=None if thread else (lambda: 1))
    data = message(1024)
    try:
        for _ in range(messages):
            await committer.commit(ENVELOPE, data)
    finally:
        committer.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.commit_cpu")
    p.add_argument("root", type=Path, help="a new directory on the file system to measure")
    p.add_argument("--messages", type=int, default=100)
    p.add_argument("--thread", action="store_true", help="commit through the sync thread")
    args = p.parse_args(argv)
    asyncio.run(commit_all(args.root, args.messages, args.thread))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
