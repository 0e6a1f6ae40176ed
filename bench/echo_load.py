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

Sliced (``--slice T``, with ``--port``/``--server-pid`` given once per server): it
connects to every server at once, warms each up in turn, then measures them in short
turns of T seconds, one server at a time, cycling through them until each has had
`seconds`, and prints one JSON object per server, its turns added up. A server's
connections are idle while the others are measured (each turn starts from idle and
drains its requests before the next begins). Turns this short and this interleaved
share whatever the machine does (other processes, where the scheduler puts the client
and the server) evenly between the servers, where one window per server would give a
burst of other work to one server only; see `bench.echo_bench`.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
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
MAX_TARGETS = 16
MIN_SLICE = 0.05  # a turn shorter than its settling time would be mostly settling
# How long a turn runs before its window opens (from idle to every request in flight),
# and how long, and how often, the end of a turn waits for the requests in flight.
TURN_SETTLE = 0.05
DRAIN_TIMEOUT = 10.0
DRAIN_POLL = 0.002


class Tally:
    """Shared by all connections: requests answered, and whether to keep sending."""

    def __init__(self) -> None:
        self.answered = 0
        self.running = True
        self.errors = 0


class PingPong(asyncio.Protocol):
    """One client connection: counts echoed bytes, re-sends one request per answer.

    It starts sending at once unless `idle`, in which case `start` begins its requests.
    `outstanding` is how many requests have not come back yet.
    """

    def __init__(self, tally: Tally, depth: int, idle: bool = False) -> None:
        self.tally = tally
        self.depth = depth
        self.idle = idle
        self.pending = 0
        self.outstanding = 0
        self.transport: asyncio.Transport | None = None
        self.lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        if not self.idle:
            self.start()

    def start(self) -> None:
        """Put `depth` requests in flight."""
        assert self.transport is not None
        self.outstanding += self.depth
        self.transport.write(REQUEST * self.depth)

    def data_received(self, data: bytes) -> None:
        self.pending += len(data)
        done, self.pending = divmod(self.pending, len(REQUEST))
        if done:
            tally = self.tally
            tally.answered += done
            if tally.running and self.transport is not None:
                self.transport.write(REQUEST * done if done > 1 else REQUEST)
            else:
                self.outstanding -= done

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


async def run_sliced(
    targets: list[tuple[int, int | None]],
    conns: int,
    depth: int,
    warmup: float,
    seconds: float,
    turn: float,
) -> list[Measured]:
    """Every target measured in turns of `turn` seconds until each has had `seconds`.

    The order of the targets rotates from one cycle of turns to the next, so no server
    always follows the same one. Returns one `Measured` per target, its turns added up.
    """
    loop = asyncio.get_running_loop()
    tallies = [Tally() for _ in targets]
    groups: list[list[PingPong]] = []
    try:
        for (port, _pid), tally in zip(targets, tallies, strict=True):
            tally.running = False
            opened = await asyncio.wait_for(
                asyncio.gather(
                    *(
                        loop.create_connection(
                            functools.partial(PingPong, tally, depth, True), "127.0.0.1", port
                        )
                        for _ in range(conns)
                    )
                ),
                CONNECT_TIMEOUT,
            )
            groups.append([proto for _transport, proto in opened])
        for tally, group in zip(tallies, groups, strict=True):
            if warmup > 0:
                await _turn(tally, group, None, warmup, measure=False)
        turns: list[list[Measured]] = [[] for _ in targets]
        for k in range(max(1, round(seconds / turn))):
            for i in [(k + j) % len(targets) for j in range(len(targets))]:
                window = await _turn(tallies[i], groups[i], targets[i][1], turn)
                assert window is not None
                turns[i].append(window)
    finally:
        for tally in tallies:
            tally.running = False
        protocols = [proto for group in groups for proto in group]
        for proto in protocols:
            if proto.transport is not None:
                proto.transport.close()
        await asyncio.wait_for(asyncio.gather(*(p.lost for p in protocols)), CONNECT_TIMEOUT)
    return [_added(windows) for windows in turns]


async def _turn(
    tally: Tally,
    group: list[PingPong],
    server_pid: int | None,
    seconds: float,
    *,
    measure: bool = True,
) -> Measured | None:
    """One server's turn: start its requests, let them settle, measure `seconds` (a
    warm-up, not `measure`, returns None), then stop and wait until every request in
    flight has come back, so the next turn starts with nothing of this one left."""
    tally.running = True
    for proto in group:
        proto.start()
    window = None
    await asyncio.sleep(TURN_SETTLE)
    if measure:
        # (The echo servers are single-threaded and start no processes: `run_time` holds.)
        n0, e0, start = tally.answered, tally.errors, snapshot(server_pid, precise=True)
        await asyncio.sleep(seconds)
        n1, e1, end = tally.answered, tally.errors, snapshot(server_pid, precise=True)
        window = measured(n1 - n0, e1 - e0, start, end)
    else:
        await asyncio.sleep(seconds)
    tally.running = False
    for _ in range(int(DRAIN_TIMEOUT / DRAIN_POLL)):
        if all(proto.outstanding <= 0 or proto.transport is None for proto in group):
            break
        await asyncio.sleep(DRAIN_POLL)
    else:
        raise RuntimeError(f"requests still unanswered {DRAIN_TIMEOUT:g} s after a turn")
    return window


def _added(windows: list[Measured]) -> Measured:
    """The turns of one server as one measurement: every count and time added up."""
    servers = [w.server_cpu for w in windows]
    return Measured(
        sum(w.ops for w in windows),
        sum(w.errors for w in windows),
        sum(w.elapsed for w in windows),
        sum(w.client_cpu for w in windows),
        None if None in servers else sum(s for s in servers if s is not None),
        sum(w.machine_busy for w in windows),
        sum(w.steal for w in windows),
    )


def main(argv: list[str] | None = None) -> None:
    """Parse arguments, run on uvloop, print the result as JSON."""
    p = argparse.ArgumentParser(prog="python -m bench.echo_load")
    p.add_argument("--port", type=int, action="append", required=True, help="once per server")
    p.add_argument("--conns", type=int, default=50, help="connections per server")
    p.add_argument("--depth", type=int, default=1)
    p.add_argument("--warmup", type=float, default=1.0, help="per server")
    p.add_argument("--seconds", type=float, default=5.0, help="measured, per server")
    p.add_argument(
        "--slice",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="measure the servers in turns this long (default 0: one server, one window)",
    )
    p.add_argument("--server-pid", type=int, action="append", help="once per --port")
    args = p.parse_args(argv)
    ports: list[int] = args.port
    pids: list[int | None] = args.server_pid or [None] * len(ports)
    if not (0 < args.conns <= MAX_CONNS and 0 < args.depth <= 1000):
        p.error(f"--conns must be 1..{MAX_CONNS} and --depth 1..1000")
    if not (0 <= args.warmup <= MAX_SECONDS and 0 < args.seconds <= MAX_SECONDS):
        p.error(f"--warmup and --seconds must be at most {MAX_SECONDS}")
    if len(pids) != len(ports) or (len(ports) > 1 and not args.slice):
        p.error("give --server-pid once per --port, and --slice with more than one --port")
    if not (args.slice == 0 or MIN_SLICE <= args.slice <= args.seconds):
        p.error(f"--slice must be 0, or {MIN_SLICE:g} to --seconds")
    if len(ports) > MAX_TARGETS:
        p.error(f"at most {MAX_TARGETS} servers")
    with asyncio.Runner(loop_factory=loop_factory("uvloop")) as runner:
        if args.slice:
            targets = list(zip(ports, pids, strict=True))
            results = runner.run(
                run_sliced(targets, args.conns, args.depth, args.warmup, args.seconds, args.slice)
            )
            json.dump({"servers": [asdict(r) for r in results]}, sys.stdout)
        else:
            result = runner.run(
                run(ports[0], args.conns, args.depth, args.warmup, args.seconds, pids[0])
            )
            json.dump(asdict(result), sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
