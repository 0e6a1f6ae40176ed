"""AsyncConnection's pipelined lines: a read that brought several lines is split once.

`readline` splits every whole line of such a read in one call and hands them out one by
one; every other read (`read`, `readexactly`, `read()` to EOF) must see the stream as if
nothing had been split (STARTTLS: tests/test_aio_drive.py). These tests mix the reads
over random chunkings of random streams, with and without `aio.drive` (event-loop mode's
way), on real socket pairs.
"""

from __future__ import annotations

import asyncio
import contextvars
import itertools
import socket
from collections.abc import Callable, Coroutine
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from loop_kinds import run_on

from netserver.aio import SPLIT_SPAN, AsyncConnection, drive
from netserver.stdio import LineTooLong

LOOPS = ["asyncio", "uvloop"]
Reader = Callable[[AsyncConnection], Coroutine[Any, Any, Any]]


def serve(
    loop_kind: str,
    reader: Reader,
    chunks: list[bytes],
    *,
    driven: bool = True,
    max_line: int = 1000,
    answer: int = 0,
) -> tuple[Any, bytes]:
    """Run `reader` on one end of a socket pair, send `chunks` one read each, then EOF.

    Each chunk is sent once the one before has come in, so the reader's reads see these
    chunks. `driven` runs the reader as event-loop mode does (`drive`), else as a plain
    task. Returns what the reader returned and the first `answer` bytes it wrote.
    """

    async def main() -> tuple[Any, bytes]:
        ours, theirs = socket.socketpair()
        theirs.setblocking(False)
        loop = asyncio.get_running_loop()
        conn = AsyncConnection(timeout=None, max_line=max_line)
        transport, _ = await loop.connect_accepted_socket(lambda: conn, ours)
        context = contextvars.copy_context()
        coro = drive(conn, reader(conn), context) if driven else reader(conn)
        task: asyncio.Task[Any] = loop.create_task(coro, context=context)
        try:
            sent = 0
            for chunk in chunks:
                await loop.sock_sendall(theirs, chunk)
                sent += len(chunk)
                for _ in range(10_000):  # until it came in (bounded turns)
                    if conn.bytes_in >= sent or task.done():
                        break
                    await asyncio.sleep(0)
            theirs.shutdown(socket.SHUT_WR)
            got = b""
            while len(got) < answer:
                more = await asyncio.wait_for(loop.sock_recv(theirs, answer - len(got)), 10)
                assert more, f"the answer ended after {got!r}"
                got += more
            return await asyncio.wait_for(task, 10), got
        finally:
            task.cancel()
            transport.close()
            theirs.close()

    return run_on(loop_kind, main)


# A line of the streams below: bytes with no LF (a lone CR among them now and then), then
# LF or CRLF. `bytes.splitlines` would also end a line at the lone CR.
LINE = st.builds(
    lambda body, cr: body.replace(b"\n", b"") + (b"\r\n" if cr else b"\n"),
    st.binary(max_size=10) | st.sampled_from([b"a\rb", b"\r", b"x\r\r"]),
    st.booleans(),
)
# What the reader does next: readline, read(n) or readexactly(n).
STEP = st.tuples(st.sampled_from(["line", "read", "exactly"]), st.integers(1, 12))


@settings(max_examples=60, deadline=None)
@given(
    lines=st.lists(LINE, max_size=14),
    tail=st.binary(max_size=5).map(lambda b: b.replace(b"\n", b"")),
    cuts=st.lists(st.integers(min_value=0, max_value=250), max_size=5),
    steps=st.lists(STEP, min_size=1, max_size=8),
    driven=st.booleans(),
)
def test_mixed_reads_over_split_lines_read_the_stream_in_order(
    lines: list[bytes],
    tail: bytes,
    cuts: list[int],
    steps: list[tuple[str, int]],
    driven: bool,
) -> None:
    """Whatever mix of reads follows a read of many lines, each gets what the stream holds next.

    readline gets exactly the next line (the rest at EOF), readexactly exactly the next n
    bytes, read(n) a non-empty start of what is left, at most n bytes.
    """
    stream = b"".join(lines) + tail
    bounds = sorted({0, len(stream), *(c for c in cuts if c < len(stream))})
    chunks = [stream[a:b] for a, b in itertools.pairwise(bounds)]

    async def reader(conn: AsyncConnection) -> bool:
        pos = 0
        for kind, n in itertools.cycle(steps):
            if pos == len(stream):
                assert await conn.readline() == b""
                assert await conn.read(5) == b""
                return True
            if kind == "line":
                end = stream.find(b"\n", pos) + 1 or len(stream)
                assert await conn.readline() == stream[pos:end]
                pos = end
            elif kind == "exactly" and pos + n <= len(stream):
                assert await conn.readexactly(n) == stream[pos : pos + n]
                pos += n
            else:
                got = await conn.read(n)
                assert 0 < len(got) <= n and got == stream[pos : pos + len(got)]
                pos += len(got)
        raise AssertionError("unreachable")

    assert serve("uvloop", reader, chunks, driven=driven) == (True, b"")


@pytest.mark.parametrize("loop_kind", LOOPS)
@pytest.mark.parametrize("driven", [True, False])
def test_split_lines_then_the_rest_to_eof(loop_kind: str, driven: bool) -> None:
    """read() to EOF after one line of a read of three gets the other two and the rest."""

    async def reader(conn: AsyncConnection) -> tuple[bytes, bytes]:
        return await conn.readline(), await conn.read()

    got, _ = serve(loop_kind, reader, [b"one\ntwo\nthree\nfo", b"ur"], driven=driven)
    assert got == (b"one\n", b"two\nthree\nfour")


@pytest.mark.parametrize("loop_kind", LOOPS)
@pytest.mark.parametrize("driven", [True, False])
def test_a_long_line_among_pipelined_ones_fails_where_it_stands(
    loop_kind: str, driven: bool
) -> None:
    """The lines before a line over max_line are read; that line raises LineTooLong."""

    async def reader(conn: AsyncConnection) -> list[bytes | str]:
        got: list[bytes | str] = []
        for _ in range(4):
            try:
                got.append(await conn.readline())
            except LineTooLong:
                got.append("too long")
                break
        return got

    data = b"a\nbb\n" + b"x" * 20 + b"\nc\n"
    got, _ = serve(loop_kind, reader, [data], driven=driven, max_line=8)
    assert got == [b"a\n", b"bb\n", "too long"]


@pytest.mark.parametrize("loop_kind", LOOPS)
def test_answers_gathered_for_pipelined_lines_are_the_bytes_written(loop_kind: str) -> None:
    """A bytearray written while answers are gathered is sent as it was when written, and
    each answer counts in `bytes_out` when written, before the gathered send."""

    async def echo(conn: AsyncConnection) -> tuple[int, int]:
        scratch = bytearray()
        count = 0
        while line := await conn.readline():
            scratch[:] = line.upper()
            conn.write(scratch)  # changed again by the next line, before the send
            count += 1
            await conn.drain()
        return count, conn.bytes_out

    data = b"one\ntwo\nthree\n"
    got = serve(loop_kind, echo, [data], answer=len(data))
    assert got == ((3, len(data)), data.upper())


@pytest.mark.parametrize("loop_kind", LOOPS)
@pytest.mark.parametrize("driven", [True, False])
def test_a_read_of_more_lines_than_one_split_holds_reads_them_all(
    loop_kind: str, driven: bool
) -> None:
    """Lines past `SPLIT_SPAN` bytes of one read are split when the first are read; a
    read of bytes in the middle sees the stream in order."""
    lines = [b"%d\n" % i for i in range(3 * SPLIT_SPAN // 3)]
    data = b"".join(lines)
    assert len(data) > 2 * SPLIT_SPAN

    async def reader(conn: AsyncConnection) -> list[bytes]:
        got = [await conn.readline() for _ in range(len(lines) // 2)]
        got.append(await conn.readexactly(4))
        while line := await conn.readline():
            got.append(line)
        return got

    got, _ = serve(loop_kind, reader, [data], driven=driven)
    half = b"".join(lines[: len(lines) // 2])
    assert b"".join(got) == data
    assert got[: len(lines) // 2] == lines[: len(lines) // 2]
    assert got[len(lines) // 2] == data[len(half) : len(half) + 4]


def write_calls() -> int:
    """This process's write-family system calls so far (`syscw` of /proc/self/io)."""
    with open("/proc/self/io") as io:
        return next(int(line.split()[1]) for line in io if line.startswith("syscw:"))


def test_answers_to_many_pipelined_lines_go_out_in_few_sends() -> None:
    """Answers to a read of 200 lines go out gathered (a send per 64 answers), not one
    send per line once `drain` has sent the first 64. On uvloop only: its transport
    sends with `write`/`writev`, which `syscw` counts (asyncio's sends with `send`, as
    the client here does, which it does not)."""

    async def echo(conn: AsyncConnection) -> int:
        count = 0
        while line := await conn.readline():
            conn.write(line)
            count += 1
            await conn.drain()
        return count

    data = b"request\n" * 200
    before = write_calls()
    got = serve("uvloop", echo, [data], answer=len(data))
    assert got == (200, data)
    assert write_calls() - before < 40  # 5 measured; 138 when each answer after the 64th went alone
