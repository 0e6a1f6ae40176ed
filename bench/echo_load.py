"""Echo load generator: N connections, each keeping `depth` short requests in flight.

With ``depth=1`` this is ping-pong: send ``request\\n``, wait for all of it to come back,
send again. With a larger depth each connection keeps that many requests outstanding,
topping up one for each answer, so the server sees several lines per read and the
client's per-request cost shrinks relative to the server's.

It is written as raw uvloop protocols (no streams, no task per request) so that it costs
as little as Python allows and the same for every server. It runs as its own process
and prints one JSON object (`bench.cpu.Measured`): requests answered in the measuring
window, its length, and the CPU the client, the server and the whole machine used in it.
A request counts when its bytes have come back; `bench.clients.probe_echo` checks
beforehand that they come back unchanged.

    python -m bench.echo_load --port P --conns 50 --depth 1 --warmup 1 --seconds 5
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from dataclasses import asdict
from typing import cast

from .cpu import Measured, measured, snapshot
from .loops import loop_factory

REQUEST = b"request\n"
CONNECT_TIMEOUT = 10.0
MAX_CONNS = 1000
MAX_SECONDS = 120.0


class Tally:
    """Shared by all connections: requests answered, and whether to keep sending."""

    def __init__(self) -> None:
        self.answered = 0
        self.running = True
        self.errors = 0


class PingPong(asyncio.Protocol):
    """One client connection: counts echoed bytes, re-sends one request per answer."""

    def __init__(self, tally: Tally, depth: int) -> None:
        self.tally = tally
        self.depth = depth
        self.pending = 0
        self.transport: asyncio.Transport | None = None
        self.lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self.transport.write(REQUEST * self.depth)

    def data_received(self, data: bytes) -> None:
        self.pending += len(data)
        done, self.pending = divmod(self.pending, len(REQUEST))
        if done:
            tally = self.tally
            tally.answered += done
            if tally.running and self.transport is not None:
                self.transport.write(REQUEST * done if done > 1 else REQUEST)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.tally.running:
            self.tally.errors += 1
        if not self.lost.done():
            self.lost.set_result(None)


async def run(
    port: int, conns: int, depth: int, warmup: float, seconds: float, server_pid: int | None
) -> Measured:
    """Connect, warm up, measure for `seconds`, close everything."""
    loop = asyncio.get_running_loop()
    tally = Tally()
    opened = await asyncio.wait_for(
        asyncio.gather(
            *(
                loop.create_connection(lambda: PingPong(tally, depth), "127.0.0.1", port)
                for _ in range(conns)
            )
        ),
        CONNECT_TIMEOUT,
    )
    protocols = [proto for _transport, proto in opened]
    try:
        await asyncio.sleep(warmup)
        n0, e0, start = tally.answered, tally.errors, snapshot(server_pid)
        await asyncio.sleep(seconds)
        n1, e1, end = tally.answered, tally.errors, snapshot(server_pid)
    finally:
        tally.running = False
        for proto in protocols:
            if proto.transport is not None:
                proto.transport.close()
        await asyncio.wait_for(asyncio.gather(*(p.lost for p in protocols)), CONNECT_TIMEOUT)
    return measured(n1 - n0, e1 - e0, start, end)


def main(argv: list[str] | None = None) -> None:
    """Parse arguments, run on uvloop, print the result as JSON."""
    p = argparse.ArgumentParser(prog="python -m bench.echo_load")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--conns", type=int, default=50)
    p.add_argument("--depth", type=int, default=1)
    p.add_argument("--warmup", type=float, default=1.0)
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--server-pid", type=int)
    args = p.parse_args(argv)
    if not (0 < args.conns <= MAX_CONNS and 0 < args.depth <= 1000):
        p.error(f"--conns must be 1..{MAX_CONNS} and --depth 1..1000")
    if not (0 <= args.warmup <= MAX_SECONDS and 0 < args.seconds <= MAX_SECONDS):
        p.error(f"--warmup and --seconds must be at most {MAX_SECONDS}")
    with asyncio.Runner(loop_factory=loop_factory("uvloop")) as runner:
        result = runner.run(
            run(args.port, args.conns, args.depth, args.warmup, args.seconds, args.server_pid)
        )
    json.dump(asdict(result), sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
