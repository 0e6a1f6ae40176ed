"""`aio.drive`: a coroutine handler resumed from ``data_received`` keeps a task's semantics.

Event-loop mode runs each coroutine handler through `drive`: while the handler waits on
a read of its own connection, ``data_received`` resumes it directly (no future, no
task wake-up through the loop). Everything a handler can see must stay as in a plain
task: ``current_task`` and ``asyncio.timeout``, cancellation, exceptions, context
variables, drain's back-pressure, close, and a read handed to another task. Each test
runs on a real socket pair, on both loops.
"""

from __future__ import annotations

import asyncio
import contextvars
import socket
import ssl
import struct
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

import pytest
import trustme
from loop_kinds import run_on

from netserver.aio import AsyncConnection, ServerStopping, drive
from netserver.stdio import LineTooLong

LOOPS = ["asyncio", "uvloop"]
VAR: contextvars.ContextVar[str] = contextvars.ContextVar("VAR", default="unset")
Handler = Callable[[AsyncConnection], Coroutine[Any, Any, Any]]
Body = Callable[[AsyncConnection, "asyncio.Task[Any]", socket.socket], Awaitable[None]]


def run(loop_kind: str, handler: Handler, body: Body) -> None:
    """Serve one end of a socket pair with `handler` under `drive`; `body` plays the client."""

    async def main() -> None:
        ours, theirs = socket.socketpair()
        theirs.setblocking(False)
        loop = asyncio.get_running_loop()
        conn = AsyncConnection(timeout=None)
        transport, _ = await loop.connect_accepted_socket(lambda: conn, ours)
        context = contextvars.copy_context()  # as event-loop mode makes it
        coro = drive(conn, handler(conn), context)
        task: asyncio.Task[Any] = loop.create_task(coro, context=context)
        try:
            await asyncio.wait_for(body(conn, task, theirs), 10)
        finally:
            task.cancel()
            transport.close()
            theirs.close()

    run_on(loop_kind, main)


async def recv(peer: socket.socket, n: int) -> bytes:
    """Exactly `n` bytes from the client socket."""
    loop = asyncio.get_running_loop()
    got = b""
    while len(got) < n:
        got += await loop.sock_recv(peer, n - len(got))
    return got


async def parked(conn: AsyncConnection) -> None:
    """Let the loop run until the handler waits, parked, on a read (bounded turns)."""
    for _ in range(100):
        if conn._hand is not None:
            return
        await asyncio.sleep(0)
    raise AssertionError("the handler never parked on a read")


@pytest.mark.parametrize("loop_kind", LOOPS)
def test_a_parked_read_resumes_the_handler_inside_data_received(loop_kind: str) -> None:
    """The direct path is taken: the handler has answered before data_received returns."""
    seen: list[bytes] = []

    async def handler(conn: AsyncConnection) -> None:
        while data := await conn.read(100):
            seen.append(data)

    async def body(conn: AsyncConnection, task: asyncio.Task[Any], peer: socket.socket) -> None:
        await parked(conn)
        loop = asyncio.get_running_loop()
        during: list[list[bytes]] = []

        def feed() -> None:  # a loop callback, as the transport's read is
            conn.data_received(b"abc")
            during.append(list(seen))

        loop.call_soon(feed)
        await asyncio.sleep(0)  # one turn: feed runs
        assert during == [[b"abc"]]

    run(loop_kind, handler, body)


@pytest.mark.parametrize("loop_kind", LOOPS)
def test_a_parked_line_read_gets_one_whole_line_inside_data_received(loop_kind: str) -> None:
    """A read that is exactly one line goes straight to a parked readline, up to and
    including `max_line` bytes; one byte more is LineTooLong, not a line."""
    seen: list[bytes | str] = []

    async def handler(conn: AsyncConnection) -> None:
        conn.max_line = 8
        try:
            while line := await conn.readline():
                seen.append(line)
        except LineTooLong:
            seen.append("too long")

    async def body(conn: AsyncConnection, task: asyncio.Task[Any], peer: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        during: list[list[bytes | str]] = []

        def feed(data: bytes) -> None:  # a loop callback, as the transport's read is
            conn.data_received(data)
            during.append(list(seen))

        for data in (b"a\n", b"1234567\n", b"12345678\n"):
            await parked(conn)
            loop.call_soon(feed, data)
            await asyncio.sleep(0)  # one turn: feed runs
        assert during == [
            [b"a\n"],
            [b"a\n", b"1234567\n"],
            [b"a\n", b"1234567\n", "too long"],
        ]
        await asyncio.wait_for(task, 5)

    run(loop_kind, handler, body)


@pytest.mark.parametrize("loop_kind", LOOPS)
def test_answers_to_a_read_of_whole_lines_are_sent_inside_data_received(loop_kind: str) -> None:
    """A parked readline given a read of several whole lines (pipelined requests): the
    handler answers them all and the answers are sent, in one write, before
    data_received returns, not a loop turn later."""

    async def handler(conn: AsyncConnection) -> None:
        while line := await conn.readline():
            conn.write(line.upper())
            await conn.drain()

    async def body(conn: AsyncConnection, task: asyncio.Task[Any], peer: socket.socket) -> None:
        await parked(conn)
        loop = asyncio.get_running_loop()
        during: list[bytes] = []

        def feed() -> None:  # a loop callback, as the transport's read is
            conn.data_received(b"one\ntwo\nthree\n")
            try:
                during.append(peer.recv(100))
            except BlockingIOError:
                during.append(b"")

        loop.call_soon(feed)
        await asyncio.sleep(0)  # one turn: feed runs
        assert during == [b"ONE\nTWO\nTHREE\n"]

    run(loop_kind, handler, body)


@pytest.mark.parametrize("loop_kind", LOOPS)
@pytest.mark.parametrize("then", ["wait", "raise", "close"])
def test_answers_gathered_before_the_handler_stops_are_sent_in_order(
    loop_kind: str, then: str
) -> None:
    """Answers gathered for a read of whole lines go out when the handler stops, whatever
    stops it: waiting for something else (they go out while it waits), failing, or
    closing; what it answers after a wait follows them in order."""
    go = asyncio.Event()

    async def handler(conn: AsyncConnection) -> None:
        while line := await conn.readline():
            conn.write(line.upper())
            await conn.drain()
            if line == b"two\n":
                if then == "wait":
                    await go.wait()
                elif then == "raise":
                    raise LookupError("after two")
                else:
                    await conn.close()
                    return

    async def body(conn: AsyncConnection, task: asyncio.Task[Any], peer: socket.socket) -> None:
        await parked(conn)
        peer.send(b"one\ntwo\nthree\n")
        assert await recv(peer, 8) == b"ONE\nTWO\n"
        if then == "wait":
            assert not task.done()  # it waits on the event, its first answers sent
            go.set()
            assert await recv(peer, 6) == b"THREE\n"
        elif then == "raise":
            with pytest.raises(LookupError):
                await task
        else:
            await task
            assert await asyncio.get_running_loop().sock_recv(peer, 10) == b""

    run(loop_kind, handler, body)


@pytest.mark.parametrize("loop_kind", LOOPS)
def test_current_task_and_timeout_work_around_a_parked_read(loop_kind: str) -> None:
    """current_task is the driving task after a direct resume; asyncio.timeout fires on a
    parked read, the handler goes on, and the bytes that come later are read whole."""
    tasks: list[asyncio.Task[Any] | None] = []

    async def handler(conn: AsyncConnection) -> bytes:
        first = await conn.read(100)
        tasks.append(asyncio.current_task())
        try:
            async with asyncio.timeout(0.05):
                await conn.read(100)
        except TimeoutError:
            tasks.append(asyncio.current_task())
        conn.write(b"timed out\n")
        return first + await conn.read(100)

    async def body(conn: AsyncConnection, task: asyncio.Task[Any], peer: socket.socket) -> None:
        await parked(conn)
        peer.send(b"one")
        assert await recv(peer, 10) == b"timed out\n"
        peer.send(b"two")
        assert await task == b"onetwo"
        assert tasks == [task, task]
        assert task.cancelling() == 0

    run(loop_kind, handler, body)


@pytest.mark.parametrize("loop_kind", LOOPS)
def test_cancelling_the_task_raises_in_the_parked_read(loop_kind: str) -> None:
    """A cancel (server stop, idle end) raises CancelledError where the handler waits; its
    cleanup runs and the task ends cancelled."""
    cleaned: list[bool] = []

    async def handler(conn: AsyncConnection) -> None:
        try:
            while await conn.read(100):
                pass
        finally:
            cleaned.append(True)

    async def body(conn: AsyncConnection, task: asyncio.Task[Any], peer: socket.socket) -> None:
        await parked(conn)
        peer.send(b"x")  # one direct resume first
        while conn.bytes_in < 1:
            await asyncio.sleep(0)
        await parked(conn)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert cleaned == [True]
        assert task.cancelled()

    run(loop_kind, handler, body)


@pytest.mark.parametrize("loop_kind", LOOPS)
def test_an_exception_after_a_direct_resume_ends_the_task_with_it(loop_kind: str) -> None:
    """What the handler raises while resumed from data_received is the task's exception."""
    boom = ValueError("boom")

    async def handler(conn: AsyncConnection) -> None:
        await conn.read(100)
        raise boom

    async def body(conn: AsyncConnection, task: asyncio.Task[Any], peer: socket.socket) -> None:
        await parked(conn)
        peer.send(b"x")
        with pytest.raises(ValueError, match="boom"):
            await task
        assert task.exception() is boom

    run(loop_kind, handler, body)


@pytest.mark.parametrize("loop_kind", LOOPS)
def test_context_variables_are_the_tasks_own_across_direct_resumes(loop_kind: str) -> None:
    """A variable the handler set is still set after a direct resume, and the loop's
    callbacks (data_received's caller) do not see it."""
    values: list[str] = []
    outside: list[str] = []

    async def handler(conn: AsyncConnection) -> None:
        VAR.set("handler")
        await conn.read(100)
        values.append(VAR.get())
        VAR.set("again")
        await conn.read(100)
        values.append(VAR.get())

    async def body(conn: AsyncConnection, task: asyncio.Task[Any], peer: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        for chunk in (b"a", b"b"):
            await parked(conn)
            peer.send(chunk)
            loop.call_soon(lambda: outside.append(VAR.get()))
            while conn.bytes_in < (1 if chunk == b"a" else 2):
                await asyncio.sleep(0)
        await task
        assert values == ["handler", "again"]
        assert outside == ["unset", "unset"]
        assert VAR.get() == "unset"

    run(loop_kind, handler, body)


@pytest.mark.parametrize("loop_kind", LOOPS)
def test_drain_waits_for_the_client_after_a_direct_resume(loop_kind: str) -> None:
    """A write too big for the buffers makes drain wait (through the task) until the client
    reads; then the handler parks on its read again and every byte arrives in order."""
    big = bytes(range(256)) * 16384  # 4 MiB: more than the socket and transport hold
    drained: list[bool] = []

    async def handler(conn: AsyncConnection) -> None:
        while await conn.read(100):
            conn.write(big)
            waiting = conn.drain()
            drained.append(conn._drain_waiter is None)
            await waiting
            conn.write(b"end")

    async def body(conn: AsyncConnection, task: asyncio.Task[Any], peer: socket.socket) -> None:
        await parked(conn)
        peer.send(b"go")
        assert await recv(peer, len(big) + 3) == big + b"end"
        await parked(conn)
        assert drained == [False]  # it did have to wait

    run(loop_kind, handler, body)


@pytest.mark.parametrize("loop_kind", LOOPS)
def test_close_and_end_of_input_after_direct_resumes(loop_kind: str) -> None:
    """EOF reaches a parked read as b""; the handler's answer, its return value and its
    close all complete."""

    async def handler(conn: AsyncConnection) -> int:
        total = 0
        while data := await conn.read(100):
            total += len(data)
        conn.write(b"bye")
        await conn.close()
        return total

    async def body(conn: AsyncConnection, task: asyncio.Task[Any], peer: socket.socket) -> None:
        await parked(conn)
        peer.send(b"12345")
        peer.shutdown(socket.SHUT_WR)
        assert await task == 5
        assert await recv(peer, 3) == b"bye"
        assert conn.is_lost

    run(loop_kind, handler, body)


@pytest.mark.parametrize("loop_kind", LOOPS)
def test_a_read_handed_to_another_task_waits_there(loop_kind: str) -> None:
    """A read made by the handler but awaited by another task (create_task, wait_for) is
    not parked: it waits on a future there, and lines split across reads come whole."""

    async def handler(conn: AsyncConnection) -> list[bytes]:
        first = await asyncio.wait_for(conn.readline(), 5)
        second = await asyncio.get_running_loop().create_task(conn.read(100))
        return [first, second, await conn.readline()]

    async def body(conn: AsyncConnection, task: asyncio.Task[Any], peer: socket.socket) -> None:
        peer.send(b"hel")
        while conn.bytes_in < 3:
            await asyncio.sleep(0)
        peer.send(b"lo\n")
        while conn.bytes_in < 6:
            await asyncio.sleep(0)
        for _ in range(20):
            await asyncio.sleep(0)
        peer.send(b"chunk")
        while conn.bytes_in < 11:
            await asyncio.sleep(0)
        await parked(conn)
        peer.send(b"li")
        peer.send(b"ne\n")
        assert await task == [b"hello\n", b"chunk", b"line\n"]

    run(loop_kind, handler, body)


@pytest.mark.parametrize("loop_kind", LOOPS)
def test_a_stop_asked_from_another_task_interrupts_a_parked_read(loop_kind: str) -> None:
    """request_stop, called from a task (the server's stop), raises ServerStopping in the
    parked read of a handler that asked for it; the handler answers and ends."""

    async def handler(conn: AsyncConnection) -> str:
        conn.interrupt_on_stop = True
        try:
            await conn.readline()
        except ServerStopping:
            conn.write(b"421 stopping\r\n")
            return "stopped"
        return "read"

    async def body(conn: AsyncConnection, task: asyncio.Task[Any], peer: socket.socket) -> None:
        await parked(conn)
        conn.request_stop()  # from this task: the handler's own task takes the step
        assert await task == "stopped"
        assert await recv(peer, 14) == b"421 stopping\r\n"

    run(loop_kind, handler, body)


@pytest.mark.parametrize("loop_kind", LOOPS)
@pytest.mark.parametrize("after", [b"", b"INJECTED\nMORE\n"])
def test_start_tls_then_parked_reads_on_the_tls_transport(loop_kind: str, after: bytes) -> None:
    """A driven handler upgrades to TLS (the handshake waits through the task) and its
    next reads park and resume on the TLS transport's data. Plaintext lines that came
    with the command (`after`, split off with it as pipelined lines) are never read."""
    ca = trustme.CA()
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("localhost").configure_cert(server_ctx)
    client_ctx = ssl.create_default_context()
    ca.configure_trust(client_ctx)

    async def handler(conn: AsyncConnection) -> bytes:
        assert await conn.readline() == b"STARTTLS\n"
        conn.write(b"go\n")
        await conn.start_tls(server_ctx)
        line = await conn.readline()
        conn.write(line.upper())
        return line

    def client(peer: socket.socket) -> bytes:
        peer.setblocking(True)
        peer.settimeout(5)
        peer.sendall(b"STARTTLS\n" + after)  # one send, one read
        assert peer.recv(3) == b"go\n"
        with client_ctx.wrap_socket(peer, server_hostname="localhost") as tls:
            tls.sendall(b"secret\n")
            return tls.recv(100)

    async def body(conn: AsyncConnection, task: asyncio.Task[Any], peer: socket.socket) -> None:
        answer = await asyncio.to_thread(client, peer)
        assert answer == b"SECRET\n"
        assert await task == b"secret\n"

    run(loop_kind, handler, body)


@pytest.mark.parametrize("loop_kind", LOOPS)
@pytest.mark.parametrize("kind", ["line", "chunk"])
def test_a_stop_asked_while_the_handler_runs_interrupts_its_next_read(
    loop_kind: str, kind: str
) -> None:
    """A stop that comes while the handler runs (here: asked from inside a direct resume)
    raises ServerStopping in its next read at once, which does not park."""

    async def handler(conn: AsyncConnection) -> str:
        conn.interrupt_on_stop = True
        assert await conn.readline() == b"first\n"
        conn.request_stop()  # as the server's stop would, while the handler runs
        try:
            await (conn.readline() if kind == "line" else conn.read(100))
        except ServerStopping:
            return "stopped"
        return "read"

    async def body(conn: AsyncConnection, task: asyncio.Task[Any], peer: socket.socket) -> None:
        await parked(conn)
        peer.send(b"first\n")
        assert await asyncio.wait_for(task, 5) == "stopped"

    run(loop_kind, handler, body)


@pytest.mark.parametrize("loop_kind", LOOPS)
def test_a_handler_that_fell_behind_reads_on_directly_after_the_pause(loop_kind: str) -> None:
    """Past READ_HIGH_WATER unread bytes reading pauses; the handler's reads resume it, every
    byte comes in order, and its later reads are resumed from data_received again."""
    sent = bytes(range(256)) * 2048  # 512 KiB: past the high-water mark
    go = asyncio.Event()
    got = bytearray()

    async def handler(conn: AsyncConnection) -> bytes:
        await go.wait()  # fall behind
        while len(got) < len(sent):
            got.extend(await conn.read(65536))
        return await conn.read(100)

    async def body(conn: AsyncConnection, task: asyncio.Task[Any], peer: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        await loop.sock_sendall(peer, sent)
        for _ in range(1000):  # bounded: until the loop has read past the mark
            if conn._reading_paused:
                break
            await asyncio.sleep(0)
        assert conn._reading_paused
        go.set()
        for _ in range(10_000):  # bounded: until the handler has read it all
            if len(got) == len(sent):
                break
            await asyncio.sleep(0)
        assert bytes(got) == sent
        await parked(conn)  # it waits, parked, for more
        peer.send(b"more")
        assert await asyncio.wait_for(task, 5) == b"more"

    run(loop_kind, handler, body)


@pytest.mark.parametrize("loop_kind", LOOPS)
def test_drain_raises_once_the_connection_is_lost_by_an_error(loop_kind: str) -> None:
    """Once the client is gone and a write failed, drain raises ConnectionResetError (it
    no longer returns at once), and so does every later drain."""
    raised: list[str] = []

    async def handler(conn: AsyncConnection) -> None:
        await conn.readline()
        try:
            for _ in range(100_000):  # bounded: the client is gone, a write fails soon
                conn.write(b"x" * 65536)
                await conn.drain()
                await asyncio.sleep(0)
        except ConnectionResetError:
            raised.append("first")
        while not conn.is_lost:  # bounded by the task's own timeout in `run`
            await asyncio.sleep(0)
        assert conn.lost_error is not None
        with pytest.raises(ConnectionResetError):
            await conn.drain()
        raised.append("later")

    async def body(conn: AsyncConnection, task: asyncio.Task[Any], peer: socket.socket) -> None:
        await parked(conn)
        peer.send(b"go\n")
        peer.close()
        await asyncio.wait_for(task, 5)
        assert raised == ["first", "later"]

    run(loop_kind, handler, body)


@pytest.mark.parametrize("loop_kind", LOOPS)
@pytest.mark.parametrize("then", ["sleep", "return", "read"])
def test_a_handler_that_cancels_its_own_task_in_a_direct_resume_is_cancelled(
    loop_kind: str, then: str
) -> None:
    """A handler resumed from data_received that cancels its own task (which then waits on
    `drive`'s future, so that future is cancelled mid-step) is cancelled as a task would be:
    at its next await, or as it ends; data_received raises nothing."""
    reached: list[str] = []

    async def handler(conn: AsyncConnection) -> str:
        await conn.read(100)
        task = asyncio.current_task()
        assert task is not None
        task.cancel()
        reached.append("cancelled itself")
        if then == "sleep":
            await asyncio.sleep(0)
        elif then == "read":
            await conn.read(100)
        reached.append("went on")
        return "ended"

    async def body(conn: AsyncConnection, task: asyncio.Task[Any], peer: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        errors: list[dict[str, Any]] = []
        loop.set_exception_handler(lambda _loop, ctx: errors.append(ctx))
        await parked(conn)
        peer.send(b"go")
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(asyncio.shield(task), 5)
        assert task.cancelled()
        assert reached == ["cancelled itself"] + (["went on"] if then == "return" else [])
        assert errors == []

    run(loop_kind, handler, body)


@pytest.mark.parametrize("loop_kind", LOOPS)
def test_lines_that_come_after_a_cancelled_line_read_are_read_once_in_order(
    loop_kind: str,
) -> None:
    """A line read cancelled before its bytes came (a timeout around it) leaves a read of
    several lines and a part of one whole for the next reads: none lost, none read twice."""
    cancelled = asyncio.Event()
    got: list[bytes] = []

    async def handler(conn: AsyncConnection) -> None:
        reader = asyncio.get_running_loop().create_task(conn.readline())
        await asyncio.sleep(0)  # the read waits in its own task
        reader.cancel()
        with pytest.raises(asyncio.CancelledError):
            await reader
        cancelled.set()
        while conn.bytes_in < 5:  # until the client's one send is here
            await asyncio.sleep(0.001)
        got.append(await conn.readline())
        got.append(await conn.readline())
        conn.write(b"more\n")
        got.append(await conn.readline())
        conn.write(b"done\n")
        await conn.drain()

    async def body(conn: AsyncConnection, task: asyncio.Task[Any], peer: socket.socket) -> None:
        await cancelled.wait()
        await asyncio.get_running_loop().sock_sendall(peer, b"x\ny\nz")
        assert await recv(peer, 5) == b"more\n"
        await asyncio.get_running_loop().sock_sendall(peer, b"\n")
        assert await recv(peer, 5) == b"done\n"

    run(loop_kind, handler, body)
    assert got == [b"x\n", b"y\n", b"z\n"]


@pytest.mark.parametrize("loop_kind", LOOPS)
def test_a_read_that_comes_after_the_task_was_cancelled_stays_for_the_next_read(
    loop_kind: str,
) -> None:
    """Bytes that arrive after the task was cancelled and before it woke up are not given
    to the cancelled read: the read raises the cancel, the bytes stay buffered."""
    got: list[bytes] = []

    async def handler(conn: AsyncConnection) -> None:
        try:
            got.append(await conn.readline())
        except asyncio.CancelledError:
            got.append(b"cancelled")
            got.append(await conn.readline())  # buffered: answered without waiting
            raise

    async def body(conn: AsyncConnection, task: asyncio.Task[Any], peer: socket.socket) -> None:
        await parked(conn)
        loop = asyncio.get_running_loop()
        # Both in one loop turn, as callbacks (not from a task), before the task wakes up.
        loop.call_soon(task.cancel)
        loop.call_soon(conn.data_received, b"late\n")
        with pytest.raises(asyncio.CancelledError):
            await task

    run(loop_kind, handler, body)
    assert got == [b"cancelled", b"late\n"]


@pytest.mark.parametrize("loop_kind", LOOPS)
@pytest.mark.parametrize("given", ["stop", "line", "lines"])
def test_a_cancel_after_a_read_was_answered_from_another_task_is_raised_in_it(
    loop_kind: str, given: str
) -> None:
    """A parked read answered from another task (a stop asked from it, or bytes handed
    over by it) is resumed by its own task; a cancel of that task which lands before it
    wakes is raised in the read, as in a plain task, and what the read was given (the
    stop's notice, the line) is not lost: the next read gets it."""
    got: list[object] = []

    async def handler(conn: AsyncConnection) -> None:
        conn.interrupt_on_stop = True
        try:
            got.append(await conn.readline())
        except ServerStopping:
            got.append("stopping")
        except asyncio.CancelledError:
            got.append("cancelled")
            try:
                got.append(await conn.readline())
                if given == "lines":
                    got.append(await conn.readline())
            except ServerStopping:
                got.append("stopping")
            raise

    async def body(conn: AsyncConnection, task: asyncio.Task[Any], peer: socket.socket) -> None:
        await parked(conn)
        if given == "stop":
            conn.request_stop()  # from this task: the handler's own task takes the step
        else:  # (as an in-process transport may, from a task)
            conn.data_received(b"late\n" if given == "line" else b"late\nmore\n")
        assert task.cancel()  # before the handler's task has woken up
        with pytest.raises(asyncio.CancelledError):
            await task

    run(loop_kind, handler, body)
    want: dict[str, list[object]] = {
        "stop": ["stopping"],
        "line": [b"late\n"],
        "lines": [b"late\n", b"more\n"],
    }
    assert got == ["cancelled", *want[given]]


@pytest.mark.parametrize("loop_kind", LOOPS)
@pytest.mark.parametrize("how", ["readline", "read", "lines"])
def test_a_cancel_after_a_read_on_a_future_was_answered_keeps_its_bytes(
    loop_kind: str, how: str
) -> None:
    """A read that waits on a future (here in a task of its own, not driven) and is
    answered with bytes in the same loop turn as its task is cancelled (a timeout that
    expires as they come) raises the cancel; the bytes stay for the next read."""
    reader: list[asyncio.Task[bytes]] = []
    got: list[bytes] = []

    async def handler(conn: AsyncConnection) -> None:
        loop = asyncio.get_running_loop()
        read = conn.read(100) if how == "read" else conn.readline()
        reader.append(loop.create_task(read))
        with pytest.raises(asyncio.CancelledError):
            await reader[0]
        got.append(await conn.readline())
        if how == "lines":
            got.append(await conn.readline())

    async def body(conn: AsyncConnection, task: asyncio.Task[Any], peer: socket.socket) -> None:
        for _ in range(100):  # until the read waits on its future
            if conn._waiter is not None:
                break
            await asyncio.sleep(0)
        loop = asyncio.get_running_loop()
        # Both in one loop turn, as callbacks, before the reader's task wakes up.
        loop.call_soon(conn.data_received, b"late\nmore\n" if how == "lines" else b"late\n")
        loop.call_soon(reader[0].cancel)
        await asyncio.sleep(0)
        await loop.sock_sendall(peer, b"next\n")
        await task

    run(loop_kind, handler, body)
    assert got == ([b"late\n", b"more\n"] if how == "lines" else [b"late\n"])


@pytest.mark.parametrize("loop_kind", LOOPS)
@pytest.mark.parametrize("then", ["return", "raise", "sleep"])
def test_a_cancel_after_a_direct_resume_and_before_the_task_wakes_is_not_lost(
    loop_kind: str, then: str
) -> None:
    """data_received resumes the handler, which then ends, fails or waits for something
    else; its task is cancelled before it wakes to carry that on. As for a task whose
    step did that just before the cancel: an end becomes the cancel (cancel() said True),
    a failure stays the failure, a wait raises the cancel in the handler's await."""
    reached: list[str] = []

    async def handler(conn: AsyncConnection) -> str:
        line = await conn.readline()
        reached.append(line.decode())
        if then == "raise":
            raise ValueError("failed")
        if then == "sleep":
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                reached.append("cancelled in sleep")
                raise
        return "ended"

    async def body(conn: AsyncConnection, task: asyncio.Task[Any], peer: socket.socket) -> None:
        await parked(conn)
        loop = asyncio.get_running_loop()
        cancelled: list[bool] = []
        # Both in one loop turn, as callbacks (data_received as the loop calls it).
        loop.call_soon(conn.data_received, b"go\n")
        loop.call_soon(lambda: cancelled.append(task.cancel()))
        with pytest.raises(ValueError if then == "raise" else asyncio.CancelledError):
            await task
        assert cancelled == [True]

    run(loop_kind, handler, body)
    assert reached == ["go\n"] + (["cancelled in sleep"] if then == "sleep" else [])


@pytest.mark.parametrize("loop_kind", LOOPS)
def test_a_reset_during_start_tls_ends_the_connection(loop_kind: str) -> None:
    """A client that resets the TCP connection in the middle of the handshake: the loop's
    TLS protocol does not pass connection_lost on while the handshake runs, so `close`
    (what event-loop mode awaits when the handler ends) waited for ever before; found
    with sslscan --starttls-smtp against leafmail, whose sessions stayed counted the same
    way. Before, the bounded `close` below timed out."""
    ca = trustme.CA()
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("localhost").configure_cert(server_ctx)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        with socket.create_server(("127.0.0.1", 0)) as listener:
            client = socket.create_connection(listener.getsockname())
            ours, _ = listener.accept()
        conn = AsyncConnection(timeout=None)
        transport, _ = await loop.connect_accepted_socket(lambda: conn, ours)
        try:
            handshake = loop.create_task(conn.start_tls(server_ctx))
            client.sendall(b"\x16\x03\x01\x00\xf4\x01")  # a ClientHello's first octets
            for _ in range(20):  # bounded turns: the TLS protocol takes the transport over
                await asyncio.sleep(0)
            client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            client.close()  # a reset
            with pytest.raises(OSError):  # ConnectionResetError (or an SSL error)
                await asyncio.wait_for(handshake, 15)
            await asyncio.wait_for(conn.close(), 15)
            assert conn.is_lost
        finally:
            transport.abort()
            client.close()

    run_on(loop_kind, main)
