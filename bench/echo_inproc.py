"""Echo cost per request in one process, no kernel: netserver's handlers against a bare one.

The socket benchmark (`bench.echo_bench`) is dominated by loopback TCP (about 6 µs of
system time per request for any server) and, on a shared machine, by other work. This
one measures only the Python a request costs: each connection gets a fake transport
that counts what the server writes and, once all of a request batch has come back,
feeds the next batch to ``data_received`` through ``call_soon`` (as a read would be).
``--depth 1`` is ping-pong; a larger depth sends that many requests in one chunk.

    python -m bench.echo_inproc --requests 200000 --depth 1
    valgrind --tool=callgrind python -m bench.echo_inproc --requests 20000 --only coroutine

The netserver variants are the objects event-loop mode builds: ``coroutine`` is
``examples.echo:async_main`` on an `AsyncConnection` (default limits) run by `aio.drive`
in a task, as event-loop mode runs it,
``chunks`` the same with ``examples.echo:async_chunks`` (each read echoed whole),
``callback`` is ``examples.echo:Echo`` on a `CallbackConnection`. ``floor`` is the
cheapest coroutine-per-connection echo there can be (one future per read, nothing else),
the limit of the coroutine form whatever netserver does. ``bare_lines`` is the bare
protocol answering line by line (`bench.echo_server.LineEcho`), the like-with-like
baseline of ``coroutine``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextvars
import ipaddress
import time
from collections.abc import Callable, Coroutine
from typing import Any

from examples.echo import Echo as CallbackEcho
from examples.echo import async_chunks, async_main
from netserver.aio import AsyncConnection, drive
from netserver.callbacks import CallbackConnection
from netserver.endpoint import Endpoint
from netserver.limits import Limits

from .echo_server import Echo, LineEcho
from .loops import loop_factory

REQUEST = b"request\n"
CoroutineHandler = Callable[[AsyncConnection], Coroutine[object, object, None]]
PEER = Endpoint(ip=ipaddress.ip_address("127.0.0.1"), port=40000)
LOCAL = Endpoint(ip=ipaddress.ip_address("127.0.0.1"), port=7)


class FakeTransport(asyncio.Transport):
    """Stands in for a socket: counts answers and sends the next batch once one is complete."""

    def __init__(self, tally: Tally, depth: int) -> None:
        super().__init__()
        self.tally = tally
        self.depth = depth
        self.pending = 0
        self.protocol: asyncio.Protocol | None = None
        self.closing = False

    def start(self, protocol: asyncio.Protocol) -> None:
        """Attach `protocol` and send it the first batch."""
        self.protocol = protocol
        protocol.connection_made(self)
        self.tally.loop.call_soon(protocol.data_received, REQUEST * self.depth)

    def write(self, data: Any) -> None:
        self.pending += len(data)
        if self.pending < len(REQUEST) * self.depth:
            return
        self.pending = 0
        tally = self.tally
        tally.answered += self.depth
        if tally.answered < tally.target and self.protocol is not None:
            tally.loop.call_soon(self.protocol.data_received, REQUEST * self.depth)
        elif not tally.done.done():
            tally.done.set_result(None)

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    def abort(self) -> None:
        self.closing = True

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default


class Tally:
    """Requests answered over every connection, and the future set at the target."""

    def __init__(self, target: int) -> None:
        self.loop = asyncio.get_running_loop()
        self.target = target
        self.answered = 0
        self.done: asyncio.Future[None] = self.loop.create_future()


def bare(transport: FakeTransport) -> None:
    """The baseline: `bench.echo_server.Echo`."""
    transport.start(Echo())


def bare_lines(transport: FakeTransport) -> None:
    """The line-by-line baseline: `bench.echo_server.LineEcho`."""
    transport.start(LineEcho())


def coroutine(transport: FakeTransport) -> None:
    """netserver's coroutine form: AsyncConnection and examples.echo:async_main as a task."""
    _task(transport, async_main)


def chunks(transport: FakeTransport) -> None:
    """The coroutine form echoing chunks: examples.echo:async_chunks."""
    _task(transport, async_chunks)


def _task(transport: FakeTransport, handler: CoroutineHandler) -> None:
    limits = Limits()
    conn = AsyncConnection(max_line=limits.max_line, timeout=limits.timeout, peer=PEER, local=LOCAL)
    transport.start(conn)
    context = contextvars.copy_context()  # as event-loop mode runs a handler (`drive`)
    asyncio.get_running_loop().create_task(drive(conn, handler(conn), context), context=context)


def callback(transport: FakeTransport) -> None:
    """netserver's callback form: CallbackConnection and examples.echo:Echo."""
    limits = Limits()
    transport.start(
        CallbackConnection(CallbackEcho, timeout=limits.timeout, peer=PEER, local=LOCAL)
    )


class Wakeup(asyncio.Protocol):
    """The cheapest coroutine-per-connection echo: one future per read wakes a task."""

    def __init__(self) -> None:
        self.data = b""
        self.waiter: asyncio.Future[None] | None = None
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.data = data
        waiter = self.waiter
        if waiter is not None:
            self.waiter = None
            waiter.set_result(None)

    async def run(self) -> None:
        """Wait for a read, write it back; for ever (the runner cancels it)."""
        loop = asyncio.get_running_loop()
        while True:
            if not self.data:
                self.waiter = loop.create_future()
                await self.waiter
            data, self.data = self.data, b""
            assert self.transport is not None
            self.transport.write(data)


def floor(transport: FakeTransport) -> None:
    """The floor of any coroutine handler: `Wakeup` (no limits, timeouts or lines)."""
    proto = Wakeup()
    transport.start(proto)
    asyncio.get_running_loop().create_task(proto.run())


VARIANTS: dict[str, Callable[[FakeTransport], None]] = {
    "bare": bare,
    "bare_lines": bare_lines,
    "floor": floor,
    "coroutine": coroutine,
    "chunks": chunks,
    "callback": callback,
}


async def measure(variant: str, conns: int, depth: int, requests: int) -> float:
    """CPU seconds per request for `requests` over `conns` connections."""
    tally = Tally(requests)
    start = time.process_time()
    for _ in range(conns):
        VARIANTS[variant](FakeTransport(tally, depth))
    await tally.done
    return (time.process_time() - start) / tally.answered


def main(argv: list[str] | None = None) -> None:
    """Run each variant (or `--only` one) and print µs per request."""
    p = argparse.ArgumentParser(prog="python -m bench.echo_inproc")
    p.add_argument("--requests", type=int, default=200_000)
    p.add_argument("--conns", type=int, default=50)
    p.add_argument("--depth", type=int, default=1)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--only", choices=sorted(VARIANTS))
    p.add_argument("--loop", choices=("asyncio", "uvloop"), default="uvloop")
    args = p.parse_args(argv)
    names = [args.only] if args.only else list(VARIANTS)
    for name in names:
        best = min(
            _run(args.loop, name, args.conns, args.depth, args.requests) for _ in range(args.rounds)
        )
        print(f"{name:<10} depth {args.depth}: {best * 1e6:.3f} µs/request (best of {args.rounds})")


def _run(loop: str, name: str, conns: int, depth: int, requests: int) -> float:
    with asyncio.Runner(loop_factory=loop_factory(loop)) as runner:
        return runner.run(measure(name, conns, depth, requests))


if __name__ == "__main__":
    main()
