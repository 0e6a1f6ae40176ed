"""Idle timeouts of `AsyncConnection`: one sweep per loop, not one timer per connection.

A timer per connection cost each idle connection about 600 bytes (issue 12: 10,000 idle
SMTP sessions in 90 MB). The connections of a loop that share a timeout are checked by
one timer, which still ends a silent connection within 1.25 x timeout and leaves a
talking one alone. Real sockets on loopback, one event loop, no sleeping for readiness.
"""

from __future__ import annotations

import asyncio

from netserver.aio import AsyncConnection
from netserver.loopconn import _IdleSweep

# Long enough that a loaded machine's scheduling stalls (tens to hundreds of ms) stay
# small beside it; every bound below is a multiple of it.
TIMEOUT = 1.0
CLIENTS = 21  # 20 silent, 1 talking


async def _echo(conn: AsyncConnection) -> None:
    while line := await conn.readline():
        conn.write(line)
        await conn.drain()


async def _serve(conns: list[AsyncConnection], all_made: asyncio.Event) -> asyncio.Server:
    loop = asyncio.get_running_loop()
    tasks: set[asyncio.Task[None]] = set()

    def made() -> AsyncConnection:
        conn = AsyncConnection(timeout=TIMEOUT)
        conns.append(conn)
        # Served from the next turn of the loop, once the transport is attached.
        loop.call_soon(lambda: tasks.add(loop.create_task(_echo(conn))))
        if len(conns) == CLIENTS:
            loop.call_soon(all_made.set)
        return conn

    return await loop.create_server(made, "127.0.0.1", 0)


async def _scenario() -> None:
    conns: list[AsyncConnection] = []
    all_made = asyncio.Event()
    server = await _serve(conns, all_made)
    port = server.sockets[0].getsockname()[1]
    loop = asyncio.get_running_loop()
    connecting = loop.time()  # no silent connection was made (and went idle) before
    silent = [await asyncio.open_connection("127.0.0.1", port) for _ in range(20)]
    talker_r, talker_w = await asyncio.open_connection("127.0.0.1", port)
    async with asyncio.timeout(5):
        await all_made.wait()

    sweep = _IdleSweep.of(loop, TIMEOUT)
    assert sweep.conns == set(conns)  # every connection is in the loop's one sweep
    assert all(conn._idle is sweep for conn in conns)

    started = loop.time()  # every silent connection was made (went idle) before
    stalls = [0.0]  # how late the loop ran a timer: a stall no sweep can be blamed for

    async def watch() -> None:
        while True:
            due = loop.time() + TIMEOUT / 20
            await asyncio.sleep(TIMEOUT / 20)
            stalls[0] = max(stalls[0], loop.time() - due)

    watcher = loop.create_task(watch())

    async def talk() -> None:
        while loop.time() - started < 2.5 * TIMEOUT:
            talker_w.write(b"ping\n")
            assert await talker_r.readline() == b"ping\n"
            await asyncio.sleep(TIMEOUT / 4)

    async def closed(reader: asyncio.StreamReader) -> float:
        assert await reader.read() == b""
        return loop.time()

    ends = await asyncio.gather(talk(), *(closed(r) for r, _w in silent))
    watcher.cancel()
    for end in ends[1:]:  # within 1.25 x TIMEOUT, with room for a busy machine
        # Idle from some moment between `connecting` and `started` (setting up took
        # long on a loaded machine): not closed before TIMEOUT after the earliest, and
        # by 2 x TIMEOUT after the latest, plus the loop's own measured stalls.
        assert end is not None and end - connecting >= 0.8 * TIMEOUT
        assert end - started < 2.0 * TIMEOUT + stalls[0]
    assert sum(conn.timed_out for conn in conns) == 20
    assert not talker_w.is_closing()
    talker_w.close()
    async with asyncio.timeout(5):
        while sweep.conns:  # a connection that ends leaves the sweep
            await asyncio.sleep(0.01)
        while sweep.timer is not None:  # nothing left: the timer stops at its next tick
            await asyncio.sleep(0.01)
    for _r, w in silent:
        w.close()
    server.close()


def test_one_sweep_ends_silent_connections_and_spares_a_talking_one() -> None:
    asyncio.run(_scenario())
