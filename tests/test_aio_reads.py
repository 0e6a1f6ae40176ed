"""AsyncConnection's reads on a real socket pair: what the fast paths must not lose.

A waiting read is answered from ``data_received`` (a read that is exactly one line, or
at most the chunk asked for, goes over without a copy); these check that bytes are
never lost or reordered on the way, including when the waiting read was cancelled.
"""

from __future__ import annotations

import asyncio
import itertools
import socket
from collections.abc import Awaitable, Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from loop_kinds import run_on

from netserver.aio import AsyncConnection

Body = Callable[[AsyncConnection, socket.socket], Awaitable[None]]


def run(body: Body, loop_kind: str) -> None:
    """Run `body` with a connection on one end of a socket pair and a plain socket on the other."""

    async def main() -> None:
        ours, theirs = socket.socketpair()
        theirs.setblocking(False)
        conn = AsyncConnection(timeout=None)
        transport, _ = await asyncio.get_running_loop().connect_accepted_socket(lambda: conn, ours)
        try:
            await asyncio.wait_for(body(conn, theirs), 10)
        finally:
            transport.close()
            theirs.close()

    run_on(loop_kind, main)


async def waiting(task: asyncio.Task[bytes]) -> None:
    """Let `task` run until it waits for bytes."""
    for _ in range(5):
        await asyncio.sleep(0)
    assert not task.done()


LOOPS = ["asyncio", "uvloop"]


async def arrived(conn: AsyncConnection, total: int) -> None:
    """Let the loop run until `total` bytes have come in (a bounded number of turns)."""
    for _ in range(10_000):
        if conn.bytes_in >= total:
            return
        await asyncio.sleep(0)
    raise AssertionError(f"{conn.bytes_in} of {total} bytes arrived")


@pytest.mark.parametrize("loop_kind", LOOPS)
@pytest.mark.parametrize(("kind", "sent"), [("readline", b"hello\n"), ("read", b"chunk")])
def test_a_cancelled_read_loses_no_bytes(loop_kind: str, kind: str, sent: bytes) -> None:
    """The bytes that arrive for a read cancelled meanwhile wait for the next read."""

    async def body(conn: AsyncConnection, peer: socket.socket) -> None:
        def read() -> Awaitable[bytes]:
            return conn.readline() if kind == "readline" else conn.read(100)

        first = asyncio.ensure_future(read())
        await waiting(first)
        first.cancel()
        peer.send(sent)
        await arrived(conn, len(sent))  # they come in while no read waits
        assert await read() == sent

    run(body, loop_kind)


@pytest.mark.parametrize("loop_kind", LOOPS)
def test_reads_split_and_join_the_stream_in_order(loop_kind: str) -> None:
    async def body(conn: AsyncConnection, peer: socket.socket) -> None:
        waiter = asyncio.ensure_future(conn.read(3))
        await waiting(waiter)
        peer.send(b"abcdef")  # more than the waiting read wants
        assert await waiter == b"abc"
        assert await conn.read(10) == b"def"
        line = asyncio.ensure_future(conn.readline())
        await waiting(line)
        peer.send(b"one ")  # half a line: the read goes on waiting
        await waiting(line)
        peer.send(b"line\ntwo\nthr")
        assert await line == b"one line\n"
        assert await conn.readline() == b"two\n"
        peer.send(b"ee\n")
        assert await conn.readline() == b"three\n"
        peer.shutdown(socket.SHUT_WR)
        assert await conn.readline() == b""

    run(body, loop_kind)


@pytest.mark.parametrize("loop_kind", LOOPS)
def test_a_line_split_after_a_partly_read_chunk_comes_whole(loop_kind: str) -> None:
    """Lines are sliced out of the read that brought them; the rest of a read joins the next.

    Each send is waited for, so the reads see exactly these chunks: a chunk partly read
    by lines, then by `read` and `readexactly`, then the rest of a line in the next one.
    """

    async def body(conn: AsyncConnection, peer: socket.socket) -> None:
        sent = 0

        async def send(data: bytes) -> None:
            nonlocal sent
            peer.send(data)
            sent += len(data)
            await arrived(conn, sent)

        await send(b"a\nbb")
        assert await conn.readline() == b"a\n"
        await send(b"b\ncc")  # "bb" left of the first chunk joins this one
        assert await conn.readline() == b"bbb\n"
        assert await conn.read(1) == b"c"
        await send(b"\nabcdef")
        assert await conn.readline() == b"c\n"
        assert await conn.read(2) == b"ab"
        assert await conn.readexactly(3) == b"cde"
        await send(b"g\nx\ny")
        assert await conn.readline() == b"fg\n"
        peer.shutdown(socket.SHUT_WR)
        assert await conn.readline() == b"x\n"
        assert await conn.readline() == b"y"
        assert await conn.readline() == b""

    run(body, loop_kind)


def one_line(data: bytes) -> bytes:
    """`data` as one line: its LFs dropped, one added at the end."""
    return data.replace(b"\n", b"") + b"\n"


@settings(max_examples=40, deadline=None)
@given(
    lines=st.lists(st.binary(max_size=12).map(one_line), max_size=12),
    cuts=st.lists(st.integers(min_value=0, max_value=200), max_size=8),
    sizes=st.lists(st.integers(min_value=1, max_value=9), min_size=1, max_size=4),
    by_line=st.booleans(),
)
def test_any_split_of_the_stream_reads_back_the_same(
    lines: list[bytes], cuts: list[int], sizes: list[int], by_line: bool
) -> None:
    """Whatever chunks the bytes arrive in, a reader gets the same lines (or bytes) in order."""
    stream = b"".join(lines)
    bounds = sorted({0, len(stream), *(c for c in cuts if c < len(stream))})
    chunks = [stream[a:b] for a, b in itertools.pairwise(bounds)]

    async def reader(conn: AsyncConnection) -> list[bytes]:
        got: list[bytes] = []
        turn = 0
        while True:
            if by_line:
                part = await conn.readline()
            else:
                part = await conn.read(sizes[turn % len(sizes)])
                turn += 1
            if not part:
                return got
            got.append(part)

    async def body(conn: AsyncConnection, peer: socket.socket) -> None:
        task = asyncio.ensure_future(reader(conn))
        sent = 0
        for chunk in chunks:
            peer.send(chunk)
            sent += len(chunk)
            await arrived(conn, sent)
        peer.shutdown(socket.SHUT_WR)
        got = await task
        assert b"".join(got) == stream
        if by_line:
            assert got == lines

    run(body, "uvloop")
