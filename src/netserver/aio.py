"""`AsyncConnection`: the connection handed to ``async def`` handlers in event-loop mode.

It is an asyncio Protocol with its own small buffer rather than a StreamReader/Writer
pair. A line (or chunk) already buffered is returned without creating a future; a read
that has to wait gets its bytes from ``data_received`` itself, so the handler's task
wakes once per line and never to find half of one. What a read brought is kept as the
bytes object it came in, and lines are sliced out of it where they lie (one copy per
line, none for a read that is one line); only a line split between reads is gathered in
a bytearray. Lines are bounded (`LineTooLong`),
reading pauses when the handler falls behind, and answers to pipelined requests go out
in one send. Endpoints, byte counts and the idle timeout are `LoopConnection`'s.
"""

from __future__ import annotations

import asyncio
import contextvars
import ssl
import types
import weakref
from collections.abc import Awaitable, Callable, Coroutine, Generator
from typing import Any, TypeVar

from .endpoint import Endpoint
from .loopconn import LoopConnection
from .stdio import DEFAULT_MAX_LINE, LineTooLong

READ_HIGH_WATER = 262144
# The most bytes of a read that `readline` splits into lines at once (`_split`): a bound
# on the objects a read of many short lines makes at once (at most 2,048 lines of one
# byte, about 90 KB), large enough that pipelined requests are split once per read.
SPLIT_SPAN = 2048
# What the pending read waits for (`AsyncConnection._want`): any change, a line, or (any
# `n` >= 0) a chunk of at most `n` bytes. One int, so that a chunk read stores one field.
_WAKE, _LINE = -2, -1
# What a direct step of the handler's coroutine left for `drive` (`_outcome`'s kind).
_SEND, _RETURN, _RAISE, _YIELD = 0, 1, 2, 3
T = TypeVar("T")


class _Park:
    """What a read parked by `drive` yields: only `drive` and `_step` ever see it."""

    __slots__ = ()


_PARK = _Park()

# What a task step calls to become, and stop being, the loop's current task (what
# `asyncio.current_task` returns): `_step` does as a task step does. Not public, but the
# same functions (C or Python) from 3.11 on, wherever asyncio keeps the current task.
_enter_task: Callable[[asyncio.AbstractEventLoop, asyncio.Task[Any]], None] = (
    asyncio.tasks._enter_task
)
_leave_task: Callable[[asyncio.AbstractEventLoop, asyncio.Task[Any]], None] = (
    asyncio.tasks._leave_task
)


def ready_future(loop: asyncio.AbstractEventLoop) -> asyncio.Future[None]:
    """A future of `loop` that is already done, shared by every connection on it.

    Awaiting a done future returns at once and changes nothing, so one serves every
    `AsyncConnection.drain` that has nothing to wait for.
    """
    done = _READY.get(loop)
    if done is None:
        done = _READY[loop] = loop.create_future()
        done.set_result(None)
    return done


# Each loop's done future; forgotten with the loop.
_READY: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Future[None]] = (
    weakref.WeakKeyDictionary()
)


def _ended(error: BaseException) -> tuple[int, Any]:
    """What a step of the handler's coroutine that raised `error` leaves for `drive`."""
    if isinstance(error, StopIteration):
        return (_RETURN, error.value)
    return (_RAISE, error)


class ServerStopping(Exception):
    """Raised once into a read of a connection whose handler asked to hear of a stop.

    A handler sets ``conn.interrupt_on_stop = True`` when it can end a session politely
    (an SMTP server says 421); other handlers are left to finish within the grace time.
    """


class AsyncConnection(LoopConnection):
    """A client connection with async reads, buffered writes and both endpoints."""

    __slots__ = (
        "_buf",
        "_ctx",
        "_drain_now",
        "_drain_waiter",
        "_driving",
        "_eof",
        "_hand",
        "_lines",
        "_live_hand",
        "_lost_waiter",
        "_out",
        "_outcome",
        "_pos",
        "_reading_paused",
        "_scan",
        "_send",
        "_steady",
        "_task",
        "_waiter",
        "_want",
        "interrupt_on_stop",
        "max_line",
        "stop_requested",
    )

    def __init__(
        self,
        *,
        max_line: int = DEFAULT_MAX_LINE,
        timeout: float | None = None,
        peer: Endpoint | None = None,
        local: Endpoint | None = None,
    ) -> None:
        super().__init__(timeout=timeout, peer=peer, local=local)
        self.max_line = max_line
        # What `drain` returns at once: the loop's done future while there is nothing to
        # wait for (no pause from the transport, no error, few answers gathered), else None.
        self._drain_now: asyncio.Future[None] | None = ready_future(self._loop)
        # What has come and not been read: a read's own bytes, unread from `_pos` on,
        # or (once a line spans reads) a bytearray gathering it, unread from its start.
        # Empty (falsy) when all is read; `_pos` means something only for bytes.
        self._buf: bytes | bytearray = b""
        self._pos = 0
        # Whole lines already split off the front of the buffer for `readline`, last
        # first (`pop` takes the next): they come before `_buf` (`_unsplit`).
        self._lines: list[bytes] | None = None
        self._out: list[bytes] = []
        self._eof = False
        self._lost_waiter: asyncio.Future[None] | None = None
        self._waiter: asyncio.Future[Any] | None = None
        self._want = _WAKE
        self._scan = 0
        self._drain_waiter: asyncio.Future[None] | None = None
        self._reading_paused = False
        # Set while `drive` runs the handler's coroutine (see `drive`): the task and the
        # context it runs in, the future the task waits on while the coroutine waits on
        # a read of this connection, and what a direct step left for the task to do.
        # (Typed Any: None when no `drive` runs, read unchecked on the per-read path.)
        self._task: Any = None  # asyncio.Task
        self._ctx: Any = None  # contextvars.Context
        self._send: Any = None  # the coroutine's bound send
        self._hand: asyncio.Future[None] | None = None
        # The same future while it is not cancelled (`_Hand.cancel` clears it): what a
        # read parks on again after a direct resume, so no read tests `hand.done()`.
        self._live_hand: asyncio.Future[None] | None = None
        self._outcome: tuple[int, Any] | None = None
        self._driving = False
        # False once a stop is asked for or reading is paused: a read then goes through
        # `_arm` (a parked read only checks `_driving`, which `_step` sets from this).
        self._steady = True
        self.interrupt_on_stop = False
        self.stop_requested = False

    # -- Protocol callbacks -------------------------------------------------------------
    def data_received(self, data: bytes) -> None:
        size = len(data)
        self.bytes_in += size
        hand = self._hand
        if hand is not None and not self._buf:
            # `drive` parked the handler's read. If these bytes are exactly what it wants
            # (one line, or a chunk of at most the size asked for), they go straight into
            # the coroutine (`_step` with bytes, inlined below: the per-read path, kept to
            # as few bytecodes as it can be). A read of several lines: `_offer_lines`.
            want = self._want
            if want == -1:  # a line (`_LINE`, written as a constant here)
                end = data.find(b"\n") + 1
                if end != size or size > self.max_line:
                    if self._offer_lines(hand, data, end):
                        return
                    hand = None
            elif size > want:  # more than the chunk asked for (or `_WAKE`: any change)
                hand = None
            if hand is not None:  # (never done: a cancel clears `_hand`, see `_Hand`)
                self._hand = None
                loop = self._loop
                task = self._task
                try:
                    _enter_task(loop, task)
                except RuntimeError:  # called from a task: `_step` hands it over
                    self._step(hand, data, None)
                    return
                self._driving = self._steady
                try:
                    yielded = self._ctx.run(self._send, data)
                    if yielded is _PARK:  # it waits on this connection again, unless
                        self._hand = self._live_hand  # its task was cancelled meanwhile
                        return
                    self._outcome = (_YIELD, yielded)  # it waits for something else
                except BaseException as error:  # it ended or failed: `drive` goes on
                    self._outcome = _ended(error)
                finally:
                    self._driving = False
                    _leave_task(loop, task)
                if not hand.done():  # (done: it cancelled its own task meanwhile)
                    hand.set_result(None)
                return
        elif self._waiter is not None and not self._buf and self._offer(data, size):
            return
        buf = self._buf
        if not buf:
            # Kept as they came (never a caller's mutable buffer): reads slice them.
            self._buf = data if type(data) is bytes else bytes(data)
            self._pos = 0
        elif type(buf) is bytes:  # a line spans two reads: gather from here on
            grown = bytearray(memoryview(buf)[self._pos :])
            grown += data
            self._buf = grown
        else:
            buf += data
        if self._waiter is not None or self._hand is not None:
            self._wake()
        # Pause while the handler falls behind; not while a read waits for more (a long
        # line): that read resumes it anyway (`_arm`).
        if (
            len(self._buf) > READ_HIGH_WATER
            and self._waiter is None
            and self._hand is None
            and self.transport is not None
        ):
            self.transport.pause_reading()
            self._reading_paused = True
            self._steady = False

    def _offer(self, data: bytes, size: int) -> bool:
        """Give a read waiting on a future (not parked by `drive`) these bytes if they
        are what it wants, as they are; False if they go to the buffer instead."""
        want = self._want
        if want == _LINE:
            end = data.find(b"\n") + 1
            if not 0 < end == size <= self.max_line:
                return self._offer_lines(None, data, end)
        elif size > want:  # more than the chunk asked for (or `_WAKE`)
            return False
        return self._answer(data, None)

    def _offer_lines(self, hand: asyncio.Future[None] | None, data: bytes, end: int) -> bool:
        """Give a waiting line read the first line of a read that brought more: the
        rest is split for the next reads (`_step_lines`, `_split`). False if the read
        does not start with a whole line, or the waiting read was cancelled: all of it
        then goes to the buffer, unread."""
        if not (0 < end <= self.max_line and type(data) is bytes):
            return False
        if hand is not None and self._step_lines(hand, data):
            return True
        self._buf = data
        self._pos = 0
        if self._answer(self._split(data, 0, end), None):
            return True
        self._buf = b""  # nothing was read: the caller buffers the read whole
        self._lines = None
        return False

    def eof_received(self) -> bool | None:
        self._eof = True
        self._wake()
        return self.keep_open_after_eof()  # the handler may still answer

    def connection_lost(self, exc: Exception | None) -> None:
        if self._lost:  # already ended by `tls_failed`; the loop's own call comes late
            return
        super().connection_lost(exc)
        if exc is not None:
            self._drain_now = None  # `_drain` raises the error
        self._eof = True
        self._wake()
        waiter = self._drain_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        lost = self._lost_waiter
        if lost is not None and not lost.done():
            lost.set_result(None)

    def pause_writing(self) -> None:
        self._drain_waiter = self._loop.create_future()
        self._drain_now = None

    def resume_writing(self) -> None:
        waiter, self._drain_waiter = self._drain_waiter, None
        self._may_drain_now()
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _may_drain_now(self) -> None:
        """Let `drain` return at once again if nothing is left to wait for."""
        if self._drain_waiter is None and self._error is None and len(self._out) <= 64:
            self._drain_now = ready_future(self._loop)

    # -- internals ----------------------------------------------------------------------
    def _wake(self) -> None:
        """Complete the pending read if what it waits for is here (or EOF, or an error).

        A line read is answered here, from ``data_received``, with the line itself: the
        handler's task wakes once per line, never for a part of one.
        """
        waiter = self._waiter
        if waiter is not None and waiter.done():  # cancelled with its task: bytes stay
            self._waiter = None
            return
        if waiter is None and (self._hand is None or self._hand.done()):
            return
        want = self._want
        if want == _LINE:
            try:
                result: bytes | None = self._line()
            except LineTooLong as exc:
                self._answer(None, exc)
                return
            if result is None:
                return
        elif want >= 0:  # a chunk
            if not self._buf and not self._eof:
                return
            result = self._take(want)
        else:
            result = None
        self._answer(result, None)

    def _answer(self, result: bytes | None, exc: BaseException | None) -> bool:
        """Give the waiting read its bytes (or `exc`); False if it was cancelled meanwhile.

        A read parked by `drive` resumes the handler's coroutine here and now, in its
        task's context and as its task (`_step`); any other read completes its future.
        """
        hand = self._hand
        if hand is None:
            waiter = self._waiter
            if waiter is None or waiter.done():
                return False
            self._waiter = None
            if exc is None:
                waiter.set_result(result)
            else:
                waiter.set_exception(exc)
            return True
        if hand.done():  # its task was cancelled: `drive` throws that into the read
            return False
        self._hand = None
        self._step(hand, result, exc)
        return True

    def _step(self, hand: asyncio.Future[None], value: Any, exc: BaseException | None) -> None:
        """Resume the handler's coroutine with what its parked read gets, as its task.

        The coroutine runs in its task's context, and the task is the loop's current
        task meanwhile (what ``asyncio.current_task`` reads, set as a task step sets it).
        If it parks on a read of this connection again, its task goes on waiting on
        `hand`; anything else it did (finish, fail, wait for something else) is left in
        `_outcome` for `drive`, in the task, to carry on with. Called while a task runs
        (a stop asked from one), it leaves the step to its own task instead.
        """
        # Set by `drive` whenever `_hand` is (no assert: this is the per-read path).
        loop = self._loop
        task = self._task
        try:
            _enter_task(loop, task)
        except RuntimeError:  # another task runs (a stop asked from it): ours steps
            self._outcome = (_SEND, (value, exc))
            hand.set_result(None)
            return
        self._driving = self._steady
        try:
            if exc is None:
                yielded = self._ctx.run(self._send, value)
            else:  # (rare: a cancel, a stop, an over-long line)
                yielded = self._ctx.run(self._send.__self__.throw, exc)
        except BaseException as error:  # it ended, or failed: the task raises it (and logs it)
            self._outcome = _ended(error)
        else:
            if yielded is _PARK:  # it waits on this connection again: stay parked
                self._hand = self._live_hand  # (None if its task was cancelled meanwhile)
                return
            self._outcome = (_YIELD, yielded)
        finally:
            self._driving = False
            _leave_task(loop, task)
        if not hand.done():
            hand.set_result(None)

    def _step_lines(self, hand: asyncio.Future[None], data: bytes) -> bool:
        """Resume a parked line read with a read of several whole lines; False if not that.

        Pipelined requests, the common case of `_split` for a parked read: a read of at
        most `SPLIT_SPAN` bytes that ends with a line (none over `max_line`, no lone CR)
        is split in one call; the read gets the first line and `readline` pops the rest.
        The answers the handler writes meanwhile are gathered and sent in one transport
        write as soon as its coroutine stops (it parks again, waits for something else,
        ends or fails): before the loop waits, with no loop turn (`call_soon`) for it.
        """
        size = len(data)
        if data[-1] != 10 or size > SPLIT_SPAN or size > self.max_line or hand.done():
            return False
        lines = data.splitlines(True)
        if len(lines) != data.count(b"\n"):  # (`splitlines` ends a line at a lone CR too)
            return False
        lines.reverse()
        line = lines.pop()
        self._lines = lines
        out = self._out
        if not out:  # gather the answers (`write`)
            out.append(b"")
        self._hand = None
        self._step(hand, line, None)
        self._flush()
        return True

    def _line(self) -> bytes | None:
        """Take the next line from the buffer; None if it has not all come yet.

        The search resumes where the last one stopped (`_scan`), so a line arriving in
        many pieces is scanned once. At EOF the rest is the last line, b"" when empty.
        """
        buf = self._own()
        idx = buf.find(b"\n", self._scan)
        if 0 <= idx < self.max_line:
            return self._take(idx + 1)
        size = len(buf)
        if size >= self.max_line:
            raise LineTooLong(f"line longer than {self.max_line} bytes")
        if self._eof:
            return self._take(size)
        self._scan = size
        return None

    def request_stop(self) -> None:
        """The server is stopping: interrupt a waiting read if the handler asked for it."""
        self.stop_requested = True
        self._steady = self._driving = False
        if not self.interrupt_on_stop:
            return
        waiter, hand = self._waiter, self._hand
        if (waiter is not None and not waiter.done()) or (hand is not None and not hand.done()):
            self.interrupt_on_stop = False
            self._answer(None, ServerStopping())

    def _arm(self, want: int) -> None:
        """Get ready for a read to wait for `want`; it resumes reading if the buffer had
        paused it. ConnectionResetError after an error, ServerStopping when asked for."""
        if self._error is not None:
            raise ConnectionResetError(str(self._error))
        if self.stop_requested and self.interrupt_on_stop:
            self.interrupt_on_stop = False
            raise ServerStopping()
        if self._reading_paused and self.transport is not None:
            self._reading_paused = False
            self._steady = not self.stop_requested
            self.transport.resume_reading()
        self._want = want

    def _wait(self, want: int = _WAKE) -> asyncio.Future[Any]:
        """A future for `_wake` to complete (see `_arm`)."""
        self._arm(want)
        waiter: asyncio.Future[Any] = self._loop.create_future()
        self._waiter = waiter
        return waiter

    @types.coroutine
    def _parked(self, want: int) -> Generator[Any, Any, Any]:
        """A read that waits: parked with `drive` if it drives the awaiting coroutine.

        Decided when awaited, not when made: a read handed to another task (for
        ``create_task`` or ``wait_for``) runs there, outside `drive`, on a future.
        """
        if self._driving:
            self._arm(want)
            return (yield _PARK)
        waiter = self._wait(want)
        try:
            return (yield from waiter)
        except asyncio.CancelledError:
            self._unread_waiter(waiter)
            raise

    def _unread(self, value: Any, exc: BaseException | None) -> None:
        """Keep what a read was given but never got: its task was cancelled after the
        read was answered and before the task woke up, so the read raises the cancel
        (as a plain task's read does) and what it was given waits for the next read.

        The bytes go back in front of what is unread; a stop's notice is asked for
        again (`_arm` raises it into the next read that waits). An error found in the
        buffer (LineTooLong) left the buffer as it was: the next read finds it again.
        """
        if isinstance(exc, ServerStopping):
            self.interrupt_on_stop = True
        elif value:
            data = bytes(value)
            lines = self._lines
            if lines:  # split off after it: it comes first (`pop` takes the last)
                lines.append(data)
                return
            buf = self._buf
            rest = buf[self._pos :] if type(buf) is bytes else bytes(buf)
            self._buf = data + rest
            self._pos = 0

    def _unread_waiter(self, waiter: asyncio.Future[Any]) -> None:
        """`_unread` what `waiter` holds: its read's task was cancelled (see `_unread`)."""
        if not waiter.done():  # (a cancel thrown in while it waits: answer it no more)
            waiter.cancel()
        if waiter.cancelled():
            return
        exc = waiter.exception()  # (retrieved: a lost error is not logged as unheard)
        self._unread(None if exc is not None else waiter.result(), exc)

    def _own(self) -> bytes | bytearray:
        """The unread bytes from index 0 (what the buffer holds past `_pos`, moved)."""
        if self._lines:
            self._unsplit()
        buf = self._buf
        if self._pos and type(buf) is bytes and buf:
            buf = self._buf = bytearray(memoryview(buf)[self._pos :])
        return buf

    def _unsplit(self) -> None:
        """Put the lines split off for `readline` back in front of the buffer.

        For every read but `readline`, which are rare between lines (a switch to chunks
        or to a byte count): they then see one buffer, as if nothing had been split.
        """
        lines = self._lines
        assert lines
        lines.reverse()
        buf = self._buf
        lines.append(buf[self._pos :] if type(buf) is bytes else bytes(buf))
        self._buf = b"".join(lines)
        self._pos = 0
        self._lines = None

    def _split(self, buf: bytes, pos: int, end: int) -> bytes:
        """The line `buf[pos:end]`; the whole lines after it are split off for `readline`.

        Called when a read brought more than one line (pipelined requests): one C call
        splits those in the next `SPLIT_SPAN` bytes, so each later `readline` is a `pop`
        (the lines past the span are split when these are read). Only when every line
        ends with LF (``splitlines`` also ends one at a lone CR) and none is over
        `max_line`; otherwise the lines are left to be found one by one.
        """
        line = buf[pos:end]
        last = buf.rfind(b"\n", end, end + SPLIT_SPAN) + 1
        if last > end:
            lines = buf[end:last].splitlines(True)
            if len(lines) == buf.count(b"\n", end, last) and (
                last - end <= self.max_line or max(map(len, lines)) <= self.max_line
            ):
                lines.reverse()
                self._lines = lines
                end = last
                out = self._out
                if not out:  # their answers will be gathered (`write`) and sent at once
                    self._loop.call_soon(self._flush)
                    out.append(b"")
        if end == len(buf):
            self._buf = b""
        else:
            self._pos = end
        return line

    def _take(self, n: int) -> bytes:
        """The next `n` unread bytes (all of them if fewer), as bytes."""
        buf = self._buf
        if type(buf) is bytes:  # a slice of what came; the very object when it is all
            pos = self._pos
            end = pos + n
            if end >= len(buf):
                self._buf = b""
                return buf[pos:] if pos else buf
            self._pos = end
            return buf[pos:end]
        assert isinstance(buf, bytearray)
        if n >= len(buf):
            out = bytes(buf)
            buf.clear()
            return out
        out = bytes(buf[:n])
        del buf[:n]
        return out

    # -- handler API --------------------------------------------------------------------
    # A read the buffer cannot answer yet registers what it wants (`_want`) and awaits
    # a future that `data_received` (through `_wake`) completes with the bytes. read(n)
    # is a plain method returning that future, or a done one when the buffer answers.
    # read and readline are generator-based coroutines (`types.coroutine`): awaiting one
    # costs one generator, ``create_task(conn.readline())`` works, and a read parked by
    # `drive` yields `_PARK` from the read itself, with no inner awaitable.
    @types.coroutine
    def readline(self) -> Generator[Any, Any, bytes]:
        """One line with its LF; b"" at EOF; LineTooLong past `max_line` bytes."""
        if self._lines:  # split off already (`_split`)
            return self._lines.pop()
        if self._driving and not self._buf and not self._eof:
            # nothing here, and `drive` runs the caller: park (`_driving` is set only
            # while the connection is steady: no stop asked for, reading not paused)
            self._scan = 0
            self._want = _LINE
            return (yield _PARK)  # type: ignore[no-any-return]
        buf = self._buf
        if buf:  # buffered: `_line` and `_take`, inlined
            if type(buf) is bytes:
                pos = self._pos
                idx = buf.find(b"\n", pos)
                if 0 <= idx < pos + self.max_line:
                    idx += 1
                    if idx == len(buf):
                        self._buf = b""
                        return buf[pos:] if pos else buf
                    return self._split(buf, pos, idx)
            else:
                idx = buf.find(b"\n")
                if 0 <= idx < self.max_line:
                    return self._take(idx + 1)
        elif not self._eof and self._steady:
            # nothing here: wait for a line (`_arm`, `_parked`, `_wait` inlined; errors set
            # `_eof`; `_steady`: no stop asked for, reading not paused)
            self._scan = 0
            self._want = _LINE
            if self._driving:
                return (yield _PARK)  # type: ignore[no-any-return]
            waiter: asyncio.Future[bytes] = self._loop.create_future()
            self._waiter = waiter
            try:
                return (yield from waiter)
            except asyncio.CancelledError:
                self._unread_waiter(waiter)
                raise
        self._scan = 0
        if self._buf or self._eof:
            line = self._line()
            if line is not None:
                return line
        return (yield from self._parked(_LINE))  # type: ignore[no-any-return]

    @types.coroutine
    def read(self, n: int = -1) -> Generator[Any, Any, bytes]:
        """Up to `n` bytes as soon as any are there (all until EOF when `n` < 0).

        A generator-based coroutine (`types.coroutine`): awaiting it costs one generator
        and, when the bytes are there, nothing else.
        """
        if n < 0:
            return (yield from self._read_all())  # type: ignore[no-any-return]
        if self._lines:
            self._unsplit()
        if self._buf or self._eof:
            return self._take(n)
        # `_arm` and `_parked`, inlined; no error to check: one sets `_eof` (connection_lost);
        # `_driving` is False unless steady (no stop asked for, reading not paused)
        if self._driving:
            self._want = n
            return (yield _PARK)  # type: ignore[no-any-return]
        return (yield from self._parked(n))  # type: ignore[no-any-return]

    async def _read_all(self) -> bytes:
        while not self._eof:
            await self._parked(_WAKE)
        return self._take(len(self._own()))

    async def readexactly(self, n: int) -> bytes:
        """Exactly `n` bytes; asyncio.IncompleteReadError if EOF comes first."""
        while len(self._own()) < n:
            if self._eof:
                partial = self._take(len(self._buf))
                raise asyncio.IncompleteReadError(partial, n)
            await self._parked(_WAKE)
        return self._take(n)

    def write(self, data: bytes | bytearray | memoryview) -> None:
        """Queue bytes for the client (await `drain` to respect flow control).

        ConnectionResetError if the connection is closed; while answers to pipelined
        requests are being gathered, a close is noticed when they are sent (`_flush`
        drops them) and by the next read (EOF, or the error), not by each write.
        """
        out = self._out
        if out:  # answers are being gathered: this one joins them (as bytes: a caller's
            self.bytes_out += len(data)  # bytearray may change before they are sent)
            out.append(data if type(data) is bytes else bytes(data))
            if len(out) > 64:  # `drain` sends them (`_drain`)
                self._drain_now = None
            return
        transport = self.transport
        if transport is None or transport.is_closing():
            raise ConnectionResetError("connection closed")
        self.bytes_out += len(data)
        if not self._buf:  # (lines split off: `_split` started the gathering)
            transport.write(data)  # nothing more to answer yet: send now
            return
        # More input is already here (pipelined requests): answer them all with one send,
        # once the handler has answered what is buffered or waits for something else.
        self._loop.call_soon(self._flush)
        out.append(data if type(data) is bytes else bytes(data))

    def _flush(self) -> None:
        """Send the answers gathered by `write` in one transport write."""
        out = self._out
        if out and self.transport is not None and not self.transport.is_closing():
            data = out[0] if len(out) == 1 else b"".join(out)
            if data:  # (`_split` starts with b"": maybe nothing was written)
                self.transport.write(data)
        out.clear()
        if self._drain_now is None:
            self._may_drain_now()

    def drain(self) -> Awaitable[None]:
        """Wait while the kernel and transport buffers are full (``await conn.drain()``).

        Not a coroutine: when there is nothing to wait for (nearly always) it returns a
        future that is already done, which costs far less to await than a new coroutine.
        """
        return self._drain_now or self._drain()

    async def _drain(self) -> None:
        if len(self._out) > 64:
            self._flush()
            if self._lines:  # more lines split off: gather their answers too (`_split`)
                self._loop.call_soon(self._flush)
                self._out.append(b"")
        waiter = self._drain_waiter
        if waiter is not None:
            await waiter
        if self._error is not None:
            raise ConnectionResetError(str(self._error))

    async def send(self, data: bytes | bytearray | memoryview) -> None:
        """`write` then `drain`."""
        self.write(data)
        if self._drain_waiter is not None:
            await self.drain()

    async def start_tls(self, context: ssl.SSLContext, timeout: float = 60.0) -> None:
        """Become the TLS server on this connection (STARTTLS).

        Plaintext the client sent after the command that asked for TLS is discarded
        unread: it cannot be trusted to come from the party that will hold the session.
        """
        if self.transport is None or self.transport.is_closing():
            raise ConnectionResetError("connection closed")
        self._flush()  # the reply that agreed to TLS goes out in plaintext, first
        self._buf = b""
        self._lines = None
        await self.tls_handshake(context, timeout)

    async def close(self) -> None:
        """Send what is queued, close, and wait until the transport is gone."""
        self._flush()
        if self.transport is None or self._lost:
            return
        if not self.transport.is_closing():
            self.transport.close()
        if not self._lost:
            self._lost_waiter = self._loop.create_future()
            await self._lost_waiter


class _Hand(asyncio.Future[None]):
    """What `drive`'s task waits on while the handler's coroutine is parked on a read.

    Cancelling it (the task is cancelled: a timeout, a stop) also takes it off the
    connection at once, so that ``data_received`` never resumes a coroutine whose task
    was cancelled and yet tests nothing per read: the cancel is raised into the read by
    `drive` instead, and the bytes stay buffered for the next read.
    """

    __slots__ = ("_conn",)

    def __init__(self, conn: AsyncConnection, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(loop=loop)
        self._conn = conn

    def cancel(self, msg: Any | None = None) -> bool:
        conn = self._conn
        if conn._live_hand is self:
            conn._live_hand = None
        if conn._hand is self:
            conn._hand = None
        return super().cancel(msg)


@types.coroutine
def drive(
    conn: AsyncConnection, coro: Coroutine[Any, Any, T], context: contextvars.Context
) -> Generator[Any, Any, T]:
    """Run `coro` (a handler of `conn`) inside the current task, which runs in `context`.

    ``await drive(conn, handler(conn), context)`` is ``await handler(conn)``, with one
    difference in cost: while the coroutine waits on a read of `conn`, the read is
    parked instead of waiting on a future, and ``data_received`` resumes the coroutine
    itself (`AsyncConnection._step`), as the task and in its context, so a read costs
    no future and no wake-up of the task through the loop. The task meanwhile waits on
    one future (`hand`) that only what is not a read of `conn` completes: the coroutine
    waiting for anything else (a sleep, a lock, ``drain``), ending, or failing. This
    generator then carries on as a task would, yielding what the coroutine waits for
    to the task and passing back what the task gets (a result, an exception, a
    cancellation), so ``current_task``, ``asyncio.timeout``, cancellation, exceptions
    and context variables behave as in a plain task.

    A read decides to park by `_driving`, a flag of the connection set while its
    coroutine is being sent into, and only while the connection is steady (`_steady`:
    no stop asked for, reading not paused); otherwise a read waits on a future, which
    the task awaits as it would any other, and `_arm` deals with the stop or the pause.
    A task started eagerly from inside that coroutine
    (Python 3.12's ``eager_task_factory``, which event-loop mode does not set) would run
    a read of this connection inside the step and get `_PARK`: such a task must not read
    this connection on its first step.
    """
    loop = conn._loop
    conn._task = asyncio.current_task(loop)
    conn._ctx = context
    conn._send = coro.send
    value: Any = None
    exc: BaseException | None = None
    try:
        while True:
            conn._driving = conn._steady
            try:
                yielded = coro.send(value) if exc is None else coro.throw(exc)
            except StopIteration as stop:
                return stop.value  # type: ignore[no-any-return]
            finally:
                conn._driving = False
            value = exc = None
            while yielded is _PARK:  # waits on a read of conn: `_step` takes it from here
                hand = _Hand(conn, loop)
                conn._hand = conn._live_hand = hand
                try:
                    yield from hand
                except GeneratorExit:
                    raise
                except BaseException as error:  # the task was cancelled
                    exc = error
                conn._hand = conn._live_hand = None
                outcome, conn._outcome = conn._outcome, None
                if outcome is None:  # cancelled while parked: the read raises it
                    break
                kind, payload = outcome
                if kind == _SEND:  # resumed from inside a task: resume it here
                    if exc is None:
                        value, exc = payload
                    else:  # cancelled before it woke: the read raises that instead
                        conn._unread(*payload)
                elif kind == _RETURN:
                    if exc is not None:  # cancelled as it ended, as a task would be
                        raise exc
                    return payload  # type: ignore[no-any-return]
                elif kind == _RAISE:
                    raise payload
                else:  # it waits for something else: the task waits for it (below)
                    yielded = payload
                    if exc is None:
                        continue
                    if yielded is not None:
                        yielded.cancel()  # cancelled meanwhile: as a task cancels it
                break
            else:
                try:
                    value = yield yielded
                except GeneratorExit:
                    raise
                except BaseException as error:  # what the task threw in: pass it on
                    exc = error
    except GeneratorExit:
        coro.close()
        raise
    finally:
        conn._task = conn._ctx = conn._send = conn._hand = conn._live_hand = None
        conn._outcome = None
