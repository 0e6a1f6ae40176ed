"""The baseline: the cheapest possible asyncio echo server, to measure netserver against.

``data_received`` hands the bytes straight back to ``transport.write``: no line
splitting, no coroutine, no task, no timers. Whatever netserver's event-loop mode costs
beyond this is the price of its handler API, limits and logging.

Run as its own process: ``python -m bench.echo_server --loop uvloop --ready-fd N``.
It listens on 127.0.0.1 port 0, writes ``READY 127.0.0.1:PORT`` to fd N (the same line
as ``netserver serve --ready-fd``) and serves until SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
from collections.abc import Callable
from typing import cast

from .loops import loop_factory


class Echo(asyncio.Protocol):
    """Writes back every chunk as it arrives."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)


async def serve(ready_fd: int) -> None:
    """Listen on 127.0.0.1:0, announce the port on `ready_fd`, serve until a signal."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    server = await loop.create_server(Echo, "127.0.0.1", 0, backlog=1024)
    port = server.sockets[0].getsockname()[1]
    os.write(ready_fd, f"READY 127.0.0.1:{port}\n".encode())
    os.close(ready_fd)
    async with server:
        await stop.wait()


def main(argv: list[str] | None = None) -> None:
    """Parse ``--loop`` and ``--ready-fd`` and serve."""
    parser = argparse.ArgumentParser(prog="python -m bench.echo_server")
    parser.add_argument("--loop", choices=("asyncio", "uvloop"), required=True)
    parser.add_argument("--ready-fd", type=int, required=True)
    args = parser.parse_args(argv)
    factory: Callable[[], asyncio.AbstractEventLoop] = loop_factory(args.loop)
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(serve(args.ready_fd))


if __name__ == "__main__":
    main()
