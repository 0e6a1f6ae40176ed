"""Connection-rate load generator: K workers, each connecting, reading to EOF, closing.

This is the whole life of a connection to a fork-exec server: the server accepts, starts
the command, the command writes its line and exits, the client sees EOF. A connection
counts when it ended with exactly the expected bytes; anything else is an error, so a
server cannot look fast by dropping clients.

Raw uvloop protocols keep the client's share of the two CPUs small. It runs as its own
process and prints one JSON object.

    python -m bench.conn_load --port P --concurrency 8 --warmup 0.5 --seconds 3 --expect hi
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
from dataclasses import asdict

from .cpu import Measured, measured, snapshot
from .loops import loop_factory

CONN_TIMEOUT = 10.0
MAX_CONCURRENCY = 256
MAX_TOTAL = 100_000
MAX_SECONDS = 120.0


class ReadAll(asyncio.Protocol):
    """Collects what the server sends and resolves `done` with it once the server closes."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.done: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

    def data_received(self, data: bytes) -> None:
        self.data += data

    def eof_received(self) -> bool:
        return False  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            if exc is None:
                self.done.set_result(bytes(self.data))
            else:
                self.done.set_exception(exc)


class Counter:
    """Connections completed and failed, and the cap on how many to start."""

    def __init__(self, total: int) -> None:
        self.left = total
        self.ok = 0
        self.errors = 0
        self.running = True
        self.exhausted = asyncio.Event()


async def one_connection(port: int, expect: bytes) -> bool:
    """Connect, read until the server closes; True if exactly `expect` arrived."""
    loop = asyncio.get_running_loop()
    transport, proto = await loop.create_connection(ReadAll, "127.0.0.1", port)
    try:
        return await proto.done == expect
    finally:
        transport.close()  # a no-op once the server closed; frees it on a timeout


async def worker(port: int, expect: bytes, counter: Counter) -> None:
    """Run connections back to back until told to stop or the cap is reached."""
    while counter.running and counter.left > 0:
        counter.left -= 1
        try:
            good = await asyncio.wait_for(one_connection(port, expect), CONN_TIMEOUT)
        except (OSError, TimeoutError):
            good = False
        if good:
            counter.ok += 1
        else:
            counter.errors += 1
    counter.exhausted.set()


async def run(
    port: int,
    concurrency: int,
    expect: bytes,
    warmup: float,
    seconds: float,
    total: int,
    server_pid: int | None,
) -> Measured:
    """Warm up, then count completed connections for `seconds` (or until `total` ran)."""
    counter = Counter(total)
    workers = [asyncio.create_task(worker(port, expect, counter)) for _ in range(concurrency)]
    try:
        await asyncio.sleep(warmup)
        n0, e0, start = counter.ok, counter.errors, snapshot(server_pid)
        with contextlib.suppress(TimeoutError):  # the window ended before the cap
            await asyncio.wait_for(counter.exhausted.wait(), seconds)
        n1, e1, end = counter.ok, counter.errors, snapshot(server_pid)
    finally:
        counter.running = False
        await asyncio.wait_for(asyncio.gather(*workers), CONN_TIMEOUT * 2)
    return measured(n1 - n0, e1 - e0, start, end)


def main(argv: list[str] | None = None) -> None:
    """Parse arguments, run on uvloop, print the result as JSON."""
    p = argparse.ArgumentParser(prog="python -m bench.conn_load")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--expect", default="hi", help="the line the command writes (LF added)")
    p.add_argument("--warmup", type=float, default=0.5)
    p.add_argument("--seconds", type=float, default=3.0)
    p.add_argument("--total", type=int, default=20_000, help="most connections to make")
    p.add_argument("--server-pid", type=int)
    args = p.parse_args(argv)
    if not (0 < args.concurrency <= MAX_CONCURRENCY and 0 < args.total <= MAX_TOTAL):
        p.error(f"--concurrency must be 1..{MAX_CONCURRENCY} and --total 1..{MAX_TOTAL}")
    if not (0 <= args.warmup <= MAX_SECONDS and 0 < args.seconds <= MAX_SECONDS):
        p.error(f"--warmup and --seconds must be at most {MAX_SECONDS}")
    expect = args.expect.encode() + b"\n"
    with asyncio.Runner(loop_factory=loop_factory("uvloop")) as runner:
        result = runner.run(
            run(
                args.port,
                args.concurrency,
                expect,
                args.warmup,
                args.seconds,
                args.total,
                args.server_pid,
            )
        )
    json.dump(asdict(result), sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
