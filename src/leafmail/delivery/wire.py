"""The commands of one transaction, written and answered on aiosmtplib's connection.

aiosmtplib sends a command and waits for its reply, and cannot read replies that
arrive together, so a transaction costs it four round trips (MAIL, RCPT, DATA, the
message) and four writes, each with its wake-ups. Against a server that offers
PIPELINING (RFC 2920), Postfix's smtp client sends MAIL, every RCPT and DATA in one
write and reads their replies as they come, then sends the message: two round trips
and two writes, whatever the number of recipients. On a queue drain that halves the
system calls and event-loop turns spent per message.

`Wire` does that for one transaction at a time: it takes the transport from
aiosmtplib's protocol (asyncio's `set_protocol`) for the duration, parses replies
itself, and gives the transport back afterwards, so aiosmtplib carries on (RSET, QUIT,
the next transaction, or its own clean-up when the connection was lost meanwhile) as
if it had sent the commands itself. Replies are bounded as aiosmtplib bounds them, and
its exceptions are raised, so callers handle one set of errors.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections import deque
from collections.abc import Iterator
from typing import cast

import aiosmtplib

MAX_LINE = 8192  # bytes in one reply line (aiosmtplib's limit)
MAX_REPLY = MAX_LINE * 4  # bytes in one multi-line reply
_FORBIDDEN = re.compile(rb"[\x00-\x1f\x7f]")  # never inside a command's arguments
_BARE = re.compile(rb"\r\n|\n|\r(?!\n)")


def command(*args: bytes) -> bytes:
    """One command line; ValueError (as aiosmtplib raises it) for a control character."""
    for arg in args:
        if _FORBIDDEN.search(arg):
            raise ValueError("Command arg contains a prohibited control character")
    return b" ".join(args) + b"\r\n"


def data_block(message: bytes) -> bytes:
    """The message as DATA carries it: CRLF line ends, dot-stuffed, then ".".

    The spool holds CRLF text already, so the regular expression that fixes bare CR
    and LF runs only when a count shows one (the counts are C loops over the bytes).
    """
    crlf = message.count(b"\r\n")
    if message.count(b"\n") != crlf or message.count(b"\r") != crlf:
        message = _BARE.sub(b"\r\n", message)
    if not message.endswith(b"\r\n"):
        message += b"\r\n"
    message = message.replace(b"\n.", b"\n..")
    if message.startswith(b"."):
        message = b"." + message
    return message + b".\r\n"


class Wire(asyncio.Protocol):
    """The transport's protocol while a transaction runs: writes, and replies in order."""

    def __init__(self, transport: asyncio.WriteTransport, timeout: float | None) -> None:
        self.transport = transport
        self.timeout = timeout
        self.lost: tuple[Exception | None] | None = None  # connection_lost's argument
        self._buffer = bytearray()
        self._lines: list[bytes] = []  # of the reply being read
        self._size = 0
        self._replies: deque[aiosmtplib.SMTPResponse] = deque()
        self._error: aiosmtplib.SMTPException | None = None
        self._waiter: asyncio.Future[None] | None = None

    def write(self, data: bytes) -> None:
        if self._error is not None:
            raise self._error
        self.transport.write(data)

    async def reply(self) -> aiosmtplib.SMTPResponse:
        """The next reply, in the order the commands were sent."""
        while not self._replies:
            if self._error is not None:
                raise self._error
            loop = asyncio.get_running_loop()
            self._waiter = waiter = loop.create_future()
            # A timer handle, cheaper than an asyncio.timeout() per reply.
            timer = None if self.timeout is None else loop.call_later(self.timeout, _late, waiter)
            try:
                await waiter
            finally:
                self._waiter = None
                if timer is not None:
                    timer.cancel()
        return self._replies.popleft()

    # -- asyncio.Protocol ---------------------------------------------------------------
    def data_received(self, data: bytes) -> None:
        if self._error is not None:
            return
        self._buffer += data
        try:
            self._parse()
        except aiosmtplib.SMTPResponseException as exc:
            self._fail(exc)
        self._wake()

    def eof_received(self) -> bool:
        self._fail(aiosmtplib.SMTPServerDisconnected("Unexpected EOF received"))
        return False  # the transport closes itself

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = (exc,)
        self._fail(aiosmtplib.SMTPServerDisconnected("Connection lost"))

    # -- replies ------------------------------------------------------------------------
    def _parse(self) -> None:
        buffer = self._buffer
        start = 0
        while (end := buffer.find(b"\n", start)) >= 0:
            line = bytes(buffer[start : end + 1])
            start = end + 1
            self._line(line)
        del buffer[:start]
        if len(buffer) > MAX_LINE:
            raise _malformed("Response too long")

    def _line(self, line: bytes) -> None:
        code = line[:3]
        if len(line) > MAX_LINE or not code.isdigit():
            raise _malformed(f"Malformed SMTP response line: {line[:80]!r}")
        self._lines.append(line[4:].strip(b" \t\r\n"))
        self._size += len(line)
        if self._size > MAX_REPLY:
            raise _malformed("Response too long")
        if line[3:4] == b"-":
            return
        text = b"\n".join(self._lines).decode("utf-8", "surrogateescape")
        self._replies.append(aiosmtplib.SMTPResponse(int(code), text))
        self._lines, self._size = [], 0

    def _fail(self, exc: aiosmtplib.SMTPException) -> None:
        if self._error is None:
            self._error = exc
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)


def _late(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_exception(
            aiosmtplib.SMTPReadTimeoutError("Timed out waiting for server response")
        )


def _malformed(text: str) -> aiosmtplib.SMTPResponseException:
    return aiosmtplib.SMTPResponseException(-1, text)


@contextlib.contextmanager
def taken_over(smtp: aiosmtplib.SMTP) -> Iterator[Wire]:
    """The connection's transport, read and written by a `Wire` within the block."""
    protocol = smtp.protocol
    transport = protocol.transport if protocol is not None else None
    if protocol is None or transport is None or transport.is_closing():
        raise aiosmtplib.SMTPServerDisconnected("Connection lost")
    wire = Wire(cast(asyncio.WriteTransport, transport), smtp.timeout)
    transport.set_protocol(wire)
    try:
        yield wire
    finally:
        transport.set_protocol(protocol)
        if wire.lost is not None:  # aiosmtplib learns of it as if it had been reading
            protocol.connection_lost(wire.lost[0])
