"""Echo: every line comes back, in each handler form (RFC 862 over TCP, line-wise)."""

from __future__ import annotations

import sys

from netserver import AsyncConnection, Connection


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
