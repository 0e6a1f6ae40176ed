"""CPU per message of a queue runner pass: `QueueRunner` with a `SmarthostAgent` into ``smtp-sink``.

`wire_cpu` measures the delivery client alone; this adds what the runner does around it
for each queued message (`due`, the lock, loading the spool file, `message.attempt`, the
record and the removal), for A/B decisions on queue.py, message.py and the delivery
package. The spool is filled beforehand (``fill``, not measured), copied fresh for each
run, and one pass delivers all of it (``run``); ``smtp-sink`` (another process, not
counted) takes the messages.

For figures that load does not move, count instructions at two sizes and take the
difference (start-up, imports and the connections' set-up cancel out)::

    python -m bench.runner_cpu fill DIR200 --messages 200
    python -m bench.runner_cpu fill DIR1200 --messages 1200
    cp -a DIR200 RUN200; valgrind --tool=callgrind python -m bench.runner_cpu run RUN200
    cp -a DIR1200 RUN1200; valgrind --tool=callgrind python -m bench.runner_cpu run RUN1200
    # (total(1200) - total(200)) / 1000 = instructions per message

``scan DIR`` times `due()` and `next_wakeup()` on a filled spool (``fill --deferred``
leaves each message deferred a day with a status record, as a pass would), the two calls
the daemon makes per pass: their cost per queued message should not grow with the queue.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import time
from pathlib import Path

from leafmail.delivery.smarthost import SmarthostAgent, SmarthostSettings
from leafmail.envelope import ClientInfo, Envelope, Recipient
from leafmail.queue import QueueRunner
from leafmail.retry import RetryPolicy
from leafmail.spool import Spool, encode, new_id
from leafmail.states import QueueState
from leafmail.status import MessageStatus, RcptState, RcptStatus

from .loops import loop_factory
from .relay_bench import Sink
from .wire_cpu import message

ENVELOPE = Envelope(
    "a@src.test",
    (Recipient("b@example.test"),),
    ClientInfo("127.0.0.1", 40000, "src.test"),
)


def fill(root: Path, messages: int, size: int, deferred: bool) -> None:
    """`messages` new messages in queue/ (or deferred a day, with their status records)."""
    spool = Spool(root)
    data = message(size)
    state = QueueState.DEFERRED if deferred else QueueState.QUEUE
    for _ in range(messages):
        qid = new_id()
        os.close(spool.write_tmp(qid, encode(ENVELOPE, data)))
        if deferred:
            now = time.time()
            status = MessageStatus(
                arrival=now,
                recipients=(RcptStatus(RcptState.DEFERRED, 1, "451 4.3.2 try later"),),
                next_attempt=now + 86400,
                last_attempt=now,
                attempts=1,
                last_error="451 4.3.2 try later",
            )
            (root / "status" / qid).write_bytes(status.to_bytes())
        os.rename(root / "tmp" / qid, spool.path(state, qid))


async def one_pass(root: Path, port: int, concurrency: int) -> int:
    """One runner pass over the spool at `root`; the number of messages delivered."""
    settings = SmarthostSettings(host="127.0.0.1", port=port, helo="bench.test", tls="none")
    runner = QueueRunner(
        Spool(root, create=False),
        SmarthostAgent(settings),
        RetryPolicy(),
        hostname="bench.test",
        concurrency=concurrency,
    )
    summary = await runner.run_once()
    if runner.spool.reaper is not None:
        await runner.spool.reaper.settle()
    return summary.counts["delivered"]


def run(root: Path, concurrency: int) -> None:
    """Deliver everything at `root` in one pass; fail unless every message went."""
    queued = len(Spool(root, create=False).ids(QueueState.QUEUE))
    with tempfile.TemporaryDirectory(prefix="runner-cpu-") as scratch:
        sink = Sink(Path(scratch))
        try:
            with asyncio.Runner(loop_factory=loop_factory("uvloop")) as loop:
                delivered = loop.run(one_pass(root, sink.port, concurrency))
        finally:
            sink.close()
    if delivered != queued:
        raise SystemExit(f"{delivered} of {queued} delivered")
    print(f"{delivered} delivered")


def scan(root: Path, rounds: int, only: str | None) -> None:
    """Time `due()` and `next_wakeup()` (or `only` one), best of `rounds`, per queued message."""
    spool = Spool(root, create=False)
    runner = QueueRunner(spool, None, RetryPolicy(), hostname="bench.test")
    count = len(spool.ids(QueueState.QUEUE)) + len(spool.ids(QueueState.DEFERRED))
    now = time.time()
    for name, call in (("due", runner.due), ("next_wakeup", runner.next_wakeup)):
        if only not in (None, name):
            continue
        best = float("inf")
        for _ in range(rounds):
            start = time.perf_counter()
            call(now)
            best = min(best, time.perf_counter() - start)
        print(f"{name}: {best * 1e3:.1f} ms for {count} messages, {best / count * 1e6:.2f} µs each")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.runner_cpu")
    sub = p.add_subparsers(dest="what", required=True)
    f = sub.add_parser("fill", help="make a spool of new (or deferred) messages")
    f.add_argument("root", type=Path)
    f.add_argument("--messages", type=int, default=1000)
    f.add_argument("--size", type=int, default=1024)
    f.add_argument("--deferred", action="store_true")
    r = sub.add_parser("run", help="one runner pass that delivers the spool to smtp-sink")
    r.add_argument("root", type=Path)
    r.add_argument("--concurrency", type=int, default=20)
    s = sub.add_parser("scan", help="time due() and next_wakeup()")
    s.add_argument("root", type=Path)
    s.add_argument("--rounds", type=int, default=5)
    s.add_argument("--only", choices=("due", "next_wakeup"))
    args = p.parse_args(argv)
    if args.what == "fill":
        fill(args.root, args.messages, args.size, args.deferred)
    elif args.what == "run":
        run(args.root, args.concurrency)
    else:
        scan(args.root, args.rounds, args.only)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
