"""The baselines: the cheapest possible asyncio echo servers, to measure netserver against.

`Echo`'s ``data_received`` hands the bytes straight back to ``transport.write``: no line
splitting, no coroutine, no task, no timers. Whatever netserver's event-loop mode costs
beyond this is the price of its handler API, limits and logging. `LineEcho` (``--lines``)
is the same server answering line by line, as netserver's line handler does: it splits
what came into lines, answers each, and sends a read's answers in one write, keeping a
partial line for the next read (at most netserver's default line limit,
`DEFAULT_MAX_LINE`), so the line handler can be compared with bare work of the same kind.

Run as its own process: ``python -m bench.echo_server --loop uvloop [--lines] --ready-fd N``.
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

from netserver.stdio import DEFAULT_MAX_LINE

from .loops import loop_factory


class Echo(asyncio.Protocol):
    """Writes back every chunk as it arrives."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)


class LineEcho(asyncio.Protocol):
    """Answers line by line: each whole line becomes a `bytes` of its own, written back.

    The answers to the lines of one read go out in one ``transport.write``, as
    netserver's line handler sends them (uvloop writes at once on every call, so a
    write per line would cost a system call per line: 8 writes per read of 8 lines by
    ``strace -c``). A partial line waits for the next read; past `DEFAULT_MAX_LINE`
    bytes it closes the connection, as netserver's line limit does.
    """

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.rest = b""

    def data_received(self, data: bytes) -> None:
        if self.rest:
            data = self.rest + data
        elif data.find(b"\n") == len(data) - 1:  # exactly one line: the commonest read
            self.transport.write(data)
            return
        answers = []
        start = 0
        end = data.find(b"\n") + 1
        while end:
            answers.append(data[start:end])
            start = end
            end = data.find(b"\n", start) + 1
        if answers:
            self.transport.write(answers[0] if len(answers) == 1 else b"".join(answers))
        self.rest = data[start:] if start < len(data) else b""
        if len(self.rest) >= DEFAULT_MAX_LINE:
            self.transport.close()


async def serve(ready_fd: int, lines: bool = False) -> None:
    """Listen on 127.0.0.1:0, announce the port on `ready_fd`, serve until a signal."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    protocol: type[asyncio.Protocol] = LineEcho if lines else Echo
    server = await loop.create_server(protocol, "127.0.0.1", 0, backlog=1024)
    port = server.sockets[0].getsockname()[1]
    os.write(ready_fd, f"READY 127.0.0.1:{port}\n".encode())
    os.close(ready_fd)
    async with server:
        await stop.wait()


def main(argv: list[str] | None = None) -> None:
    """Parse ``--loop``, ``--lines`` and ``--ready-fd`` and serve."""
    parser = argparse.ArgumentParser(prog="python -m bench.echo_server")
    parser.add_argument("--loop", choices=("asyncio", "uvloop"), required=True)
    parser.add_argument("--lines", action="store_true", help="answer line by line (LineEcho)")
    parser.add_argument("--ready-fd", type=int, required=True)
    args = parser.parse_args(argv)
    factory: Callable[[], asyncio.AbstractEventLoop] = loop_factory(args.loop)
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(serve(args.ready_fd, args.lines))


if __name__ == "__main__":
    main()
