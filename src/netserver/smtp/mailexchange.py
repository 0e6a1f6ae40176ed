"""One mail transaction in the client role, sans I/O: MAIL, RCPT..., DATA, the message.

`MailExchange` decides what to send next from the replies so far; it never touches a
socket, so its rules are tested as tables of replies. With PIPELINING (RFC 2920) it
sends MAIL, every RCPT and DATA as one group and reads their replies as they come,
then the message: two round trips whatever the number of recipients, as Postfix's
client does. Without it each command waits for the one before to succeed (RFC 5321
3.3): no RCPT after a refused MAIL, no DATA when no recipient was accepted.

In a pipelined group DATA has gone before the server judged the recipients. When it
answers 354 although no recipient was accepted (RFC 2920 3.1 lets a server do that),
the message is not sent: the exchange sends the lone final "." instead, so the server
ends the empty DATA and the connection stays usable (RFC 2920 3.1 describes exactly
this). A 250/251 to RCPT counts as accepted only when MAIL got its 250.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Final, NamedTuple

from .client import Answered, Awaited, message_bytes
from .core import LocalProtocolError

__all__ = ["ExchangeStep", "MailCommands", "MailExchange"]

_DATA_LINE: Final = b"DATA\r\n"
_EMPTY_MESSAGE: Final = b".\r\n"
_RCPT_OK: Final = frozenset({250, 251})

Send = tuple[Awaited, bytes]
# Bound once: Enum attribute access is slow on CPython 3.11 (see netserver.smtp.client).
_MAIL, _RCPT, _DATA, _MESSAGE = Awaited.MAIL, Awaited.RCPT, Awaited.DATA, Awaited.MESSAGE


@dataclass(frozen=True, slots=True)
class MailCommands:
    """The command lines of one transaction (each ending in CRLF) and its message."""

    mail: bytes
    rcpts: tuple[bytes, ...]
    message: bytes  # the content as stored; framed for DATA when it is sent
    pipelining: bool  # the server offered PIPELINING


class ExchangeStep(NamedTuple):
    """What one reply did: the reply, the recipient it judged, and what goes next."""

    answered: Answered
    position: int | None  # for a reply to RCPT: the index of that RCPT in `rcpts`
    send: tuple[Send, ...]  # to write now (nothing: wait for more replies, or done)


@dataclass(slots=True)
class MailExchange:
    """The transaction's state: what was sent, what is still to be answered."""

    commands: MailCommands
    mail_ok: bool = False
    accepted: list[int] = field(default_factory=list)  # positions of accepted RCPTs
    finished: bool = False
    delivered: bool = False  # the message got 250: the transaction ended cleanly
    _expect: deque[tuple[Awaited, int | None]] = field(default_factory=deque)

    def start(self) -> tuple[Send, ...]:
        """The first group: MAIL (and with pipelining every RCPT and DATA)."""
        if self._expect or self.finished:
            raise LocalProtocolError("the transaction has started already")
        c = self.commands
        if not c.pipelining:
            return self._queue((_MAIL, c.mail, None))
        rcpts = [(_RCPT, line, i) for i, line in enumerate(c.rcpts)]
        return self._queue((_MAIL, c.mail, None), *rcpts, (_DATA, _DATA_LINE, None))

    def receive(self, answered: Answered) -> ExchangeStep:
        """Take the next reply; LocalProtocolError if it answers something else."""
        if not self._expect:
            raise LocalProtocolError("no reply is awaited by the transaction")
        awaited, position = self._expect.popleft()
        if answered.awaited is not awaited:
            raise LocalProtocolError(f"{answered.awaited.value} answered, {awaited.value} awaited")
        code = answered.reply.code
        if awaited is _MAIL:
            send = self._mail(code)
        elif awaited is _RCPT:
            assert position is not None  # queued with one
            send = self._rcpt(position, code)
        elif awaited is _DATA:
            send = self._data(code)
        else:
            self.finished = True
            self.delivered = code == 250 and bool(self.accepted)
            send = ()
        return ExchangeStep(answered, position, send)

    @property
    def needs_reset(self) -> bool:
        """True when the transaction ended without its message taken (RSET before reuse)."""
        return self.finished and not self.delivered

    def _mail(self, code: int) -> tuple[Send, ...]:
        self.mail_ok = code == 250
        if self.commands.pipelining:
            return ()
        if not self.mail_ok or not self.commands.rcpts:
            self.finished = True
            return ()
        return self._queue((_RCPT, self.commands.rcpts[0], 0))

    def _rcpt(self, position: int, code: int) -> tuple[Send, ...]:
        if self.mail_ok and code in _RCPT_OK:
            self.accepted.append(position)
        if self.commands.pipelining:
            return ()
        following = position + 1
        if following < len(self.commands.rcpts):
            return self._queue((_RCPT, self.commands.rcpts[following], following))
        if not self.accepted:
            self.finished = True
            return ()
        return self._queue((_DATA, _DATA_LINE, None))

    def _data(self, code: int) -> tuple[Send, ...]:
        if code != 354:
            self.finished = True
            return ()
        content = message_bytes(self.commands.message) if self.accepted else _EMPTY_MESSAGE
        return self._queue((_MESSAGE, content, None))

    def _queue(self, *sends: tuple[Awaited, bytes, int | None]) -> tuple[Send, ...]:
        out = []
        expect = self._expect
        for awaited, line, position in sends:  # a loop, not two comprehensions: hot path
            expect.append((awaited, position))
            out.append((awaited, line))
        return tuple(out)
