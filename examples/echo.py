"""Echo: every line comes back, in each handler form (RFC 862 over TCP, line-wise).

`Echo` is the callback form (event-loop mode): it sends each chunk back as it arrives,
which is RFC 862 exactly and the cheapest way netserver can serve it. `async_chunks` does
the same as a coroutine; `async_main` answers line by line.
"""

from __future__ import annotations

import sys

from netserver import AsyncConnection, Callbacks, Connection

CHUNK = 65536
"""The most `async_chunks` reads at once."""


def main() -> None:
    """Stdio form: read sys.stdin, write sys.stdout (fork, prefork, thread modes)."""
    for line in sys.stdin:
        sys.stdout.write(line)


def binary(conn: Connection) -> None:
    """Connection form: bytes back exactly as they came, CRLF and all."""
    while line := conn.rfile.readline():
        conn.write(line)


async def async_main(conn: AsyncConnection) -> None:
    """Async form, for event-loop mode."""
    while line := await conn.readline():
        conn.write(line)
        await conn.drain()


async def async_chunks(conn: AsyncConnection) -> None:
    """Async form, chunk by chunk: bytes back as they arrive, with no line splitting."""
    while data := await conn.read(CHUNK):
        conn.write(data)
        await conn.drain()


class Echo(Callbacks):
    """Callback form, for event-loop mode: bytes back as they arrive, in the same chunks."""

    def data_received(self, data: bytes) -> None:
        self.conn.write(data)
