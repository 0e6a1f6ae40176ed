"""A sans-I/O ESMTP client engine: commands out as bytes, replies in as events.

`ClientProtocol` is the client-role counterpart of `ServerProtocol`: it does no I/O,
holds no socket and no clock. The I/O layer writes what `send` returns and hands every
received chunk to `receive_data`, which returns one `Answered` event per complete
reply, paired with the command it answers (replies come in the order the commands
went, RFC 2920 3.1). It keeps what the server said about itself (`extensions`, from
the reply to EHLO) and refuses to be driven wrongly (`LocalProtocolError`):

* Pipelining (RFC 2920 3.1): a command goes while earlier ones are unanswered only if
  the server offered PIPELINING, and never after one that must end a group (EHLO,
  HELO, DATA, the message, NOOP, QUIT, STARTTLS, AUTH, whose answer changes what comes
  next). `GROUP_ENDS` is that table.
* States (`TRANSITIONS`): no command before the greeting; after the 220 to STARTTLS
  nothing but the handshake (`tls_started`); nothing after QUIT's reply or a 421.

Bytes the server sends after its 220 to STARTTLS and before the handshake are refused
(`BadReply`): read as if they came over TLS they would let a man in the middle inject
replies into the protected session (the client side of CVE-2011-0411). Knowledge from
before TLS is forgotten when it starts (RFC 3207 4.2).

`message_bytes` frames a message for DATA (dot-stuffing, RFC 5321 4.5.2).
"""

from __future__ import annotations

import re
from collections import deque
from enum import Enum
from typing import Final, NamedTuple

from .core import LocalProtocolError
from .replies import Reply
from .replyreader import BadReply, ReplyReader

__all__ = [
    "GROUP_ENDS",
    "TRANSITIONS",
    "Answered",
    "Awaited",
    "ClientProtocol",
    "ClientState",
    "ClientStep",
    "message_bytes",
    "parse_extensions",
]


class Awaited(Enum):
    """What a reply answers: a command, or the greeting and the message, which are not."""

    GREETING = "greeting"
    EHLO = "EHLO"
    HELO = "HELO"
    MAIL = "MAIL"
    RCPT = "RCPT"
    DATA = "DATA"
    MESSAGE = "message"  # the content after 354, ended by CRLF.CRLF
    BDAT = "BDAT"
    RSET = "RSET"
    NOOP = "NOOP"
    QUIT = "QUIT"
    STARTTLS = "STARTTLS"
    AUTH = "AUTH"  # AUTH itself, or one answer to a 334 challenge


class ClientState(Enum):
    GREETING = "greeting"  # connected; the 220 (or a refusal) has not come yet
    COMMANDS = "commands"  # commands may be sent
    TLS = "tls"  # STARTTLS was answered 220: the handshake is the I/O layer's move
    CLOSED = "closed"  # QUIT answered, or 421: the server is going away


class ClientStep(Enum):
    GREETED = "greeted"  # the greeting arrived (the I/O layer judges its code)
    STARTTLS = "starttls"  # 220 to STARTTLS
    TLS_UP = "tls up"  # the handshake is done
    CLOSE = "close"  # 221 to QUIT, or any 421


_C = ClientState
TRANSITIONS: Final[dict[tuple[ClientState, ClientStep], ClientState]] = {
    (_C.GREETING, ClientStep.GREETED): _C.COMMANDS,
    (_C.COMMANDS, ClientStep.STARTTLS): _C.TLS,
    (_C.TLS, ClientStep.TLS_UP): _C.COMMANDS,
    **{(state, ClientStep.CLOSE): _C.CLOSED for state in ClientState},
}

# RFC 2920 3.1: these may only end a group; the client waits for their reply.
GROUP_ENDS: Final = frozenset(
    {
        Awaited.GREETING,
        Awaited.EHLO,
        Awaited.HELO,
        Awaited.DATA,
        Awaited.MESSAGE,
        Awaited.NOOP,
        Awaited.QUIT,
        Awaited.STARTTLS,
        Awaited.AUTH,
    }
)

# Members bound once for the per-reply paths: on CPython 3.11 `Awaited.MAIL` goes through
# EnumType's attribute hook and hashing a member calls Enum.__hash__ in Python, each
# several times the cost of a plain lookup; `_value_` strings hash in C.
_GROUP_END_VALUES: Final = frozenset(awaited._value_ for awaited in GROUP_ENDS)
_GREETING, _EHLO, _QUIT, _STARTTLS = Awaited.GREETING, Awaited.EHLO, Awaited.QUIT, Awaited.STARTTLS
_MESSAGE = Awaited.MESSAGE
_COMMANDS, _TLS = ClientState.COMMANDS, ClientState.TLS
_EARLY: Final = "data after the reply to STARTTLS, before the TLS handshake"

_KEYWORD: Final = re.compile(r"([A-Za-z0-9][A-Za-z0-9-]*)(?:[ =](.*))?\Z")
_BARE: Final = re.compile(rb"\r\n|\n|\r(?!\n)")
_ONE_LINE: Final = re.compile(rb"[^\r\n]+\r\n")  # a command: one line, CRLF only at its end


class Answered(NamedTuple):
    """The event: `reply` answers `awaited` (a tuple: one is made per reply, cheaply)."""

    awaited: Awaited
    reply: Reply


def parse_extensions(reply: Reply) -> dict[str, str]:
    """The EHLO keywords (lower case) and their parameters, from the lines after the first.

    "AUTH=PLAIN LOGIN", an old form some servers still send beside "AUTH PLAIN LOGIN",
    reads as AUTH too; a line that is not a keyword is ignored (RFC 5321 4.1.1.1).
    """
    found: dict[str, str] = {}
    for line in reply.lines[1:]:
        match = _KEYWORD.match(line.strip())
        if match:
            keyword = match[1].lower()
            params = (match[2] or "").strip()
            found[keyword] = f"{found[keyword]} {params}".strip() if keyword in found else params
    return found


def message_bytes(message: bytes) -> bytes:
    """The message as DATA carries it: CRLF line ends, dot-stuffed, then the final ".".

    Spooled messages are CRLF text already, so the expression that turns bare CR and LF
    into CRLF runs only when a count shows one (the counts are C loops over the bytes).
    """
    crlf = message.count(b"\r\n")
    if message.count(b"\n") != crlf or message.count(b"\r") != crlf:
        message = _BARE.sub(b"\r\n", message)
    if not message.endswith(b"\r\n"):
        message += b"\r\n"
    message = message.replace(b"\r\n.", b"\r\n..")
    if message.startswith(b"."):
        message = b"." + message
    return message + b".\r\n"


class ClientProtocol:
    """One client connection's dialogue state; see the module docstring for the contract."""

    __slots__ = ("_pending", "_reader", "extensions", "state")

    def __init__(self) -> None:
        self.state = ClientState.GREETING
        self.extensions: dict[str, str] = {}  # from the last reply to EHLO
        self._reader = ReplyReader()
        self._pending: deque[Awaited] = deque([Awaited.GREETING])

    def supports(self, keyword: str) -> bool:
        """True when the last EHLO reply offered `keyword` (any case)."""
        return keyword.lower() in self.extensions

    @property
    def waiting(self) -> int:
        """Replies still owed by the server."""
        return len(self._pending)

    def send(self, awaited: Awaited, line: bytes) -> bytes:
        """The bytes to write for one command (or the message); LocalProtocolError if now
        is not the time (see the pipelining and state rules above)."""
        if self.state is not _COMMANDS or awaited is _GREETING:
            raise LocalProtocolError(f"cannot send {awaited.value} in state {self.state.value}")
        if awaited is not _MESSAGE and _ONE_LINE.fullmatch(line) is None:
            raise LocalProtocolError(f"not one command line: {line[:80]!r}")  # no injection
        if self._pending:
            if self._pending[-1]._value_ in _GROUP_END_VALUES:
                raise LocalProtocolError(f"{self._pending[-1].value} must be answered first")
            if not self.supports("pipelining"):
                raise LocalProtocolError("the server does not offer PIPELINING")
        self._pending.append(awaited)
        return line

    def receive_data(self, data: bytes) -> list[Answered]:
        """The replies `data` completes, each paired with what it answers.

        BadReply when the bytes break the reply syntax or its bounds, when a reply comes
        that nothing asked for, or when bytes come between STARTTLS's 220 and the
        handshake.
        """
        if data and self.state is _TLS:
            raise BadReply(_EARLY)
        events: list[Answered] = []
        pending = self._pending
        for reply in self._reader.feed(data):
            if self.state is _TLS:  # a reply after STARTTLS's 220, in the same read
                raise BadReply(_EARLY)
            if not pending:
                # Not str(reply): a received reply may hold control characters, which
                # its rendering refuses (ValueError), and this must stay a BadReply.
                said = " ".join(reply.lines)[:80]
                raise BadReply(f"a reply nothing asked for: {reply.code} {said!r}")
            event = Answered(pending.popleft(), reply)
            self._answered(event)
            events.append(event)
        if self.state is _TLS and self._reader.pending:
            raise BadReply(_EARLY)
        return events

    def tls_started(self) -> None:
        """The I/O layer finished the TLS handshake; what came before is forgotten."""
        self._step(ClientStep.TLS_UP)
        self.extensions = {}

    def _answered(self, event: Answered) -> None:
        awaited, reply = event.awaited, event.reply
        if reply.code == 421 or (awaited is _QUIT and reply.code // 100 == 2):
            self._step(ClientStep.CLOSE)
        elif awaited is _GREETING:
            self._step(ClientStep.GREETED)
        elif awaited is _EHLO and reply.code == 250:
            self.extensions = parse_extensions(reply)
        elif awaited is _STARTTLS and reply.code == 220:
            self._step(ClientStep.STARTTLS)

    def _step(self, step: ClientStep) -> None:
        following = TRANSITIONS.get((self.state, step))
        if following is None:
            raise LocalProtocolError(f"{step.value} is not possible in state {self.state.value}")
        self.state = following
