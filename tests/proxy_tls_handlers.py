"""Handlers the PROXY and TLS tests serve (imported by the server with tests/ on the path)."""

from __future__ import annotations

from netserver import AsyncConnection


async def async_peer(conn: AsyncConnection) -> None:
    """Report both endpoints as the server sees them (event-loop mode)."""
    conn.write(f"{conn.peer} {conn.local}\n".encode())
    await conn.drain()


async def async_peer_held(conn: AsyncConnection) -> None:
    """Report both endpoints, then hold the connection until the client closes it."""
    await async_peer(conn)
    while await conn.read(256):
        pass
