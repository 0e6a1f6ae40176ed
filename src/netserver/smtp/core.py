"""The machinery of one SMTP session, under the dialogue that `protocol` adds.

`ProtocolCore` holds what every command and every decision works through: the state and
its only way of changing (`_step`, through `states.TRANSITIONS`), the reader chosen by
state, the buffered input, the replies queued for the client, the error count and its
limit, and the decision the session waits for. It knows no SMTP command: those, with
what accepting or refusing each decision does, are `protocol.ServerProtocol`, which
adds no state of its own. Every slot of a session is declared here, because the size of
an idle session is the size of this object (thousands may be open at once).
"""

from __future__ import annotations

from typing import Final

from . import replies, sasl
from .config import ServerConfig
from .events import Closed, DataStart, DecisionEvent, Event, Helo, Session, Transaction
from .readers import (
    COMMAND_LINE_LIMIT,
    EXTENDED_LINE_LIMITS,
    ChunkEnd,
    ChunkReader,
    CommandLine,
    CommandReader,
    DataReader,
    LineError,
    MessageEnd,
    MessageSink,
)
from .replies import Reply
from .states import TRANSITIONS, State, Step

__all__ = ["LocalProtocolError", "ProtocolCore"]


class LocalProtocolError(Exception):
    """The I/O layer used the protocol wrongly (e.g. accept() with nothing pending)."""


_NEW_SESSION: Final = Session()
_TLS_SESSION: Final = Session(tls=True)

_Item = CommandLine | LineError | MessageEnd | ChunkEnd

_S = State
# States whose input is not command lines: message data is timed by a data rate, and
# nothing is read during the TLS handshake or after the end.
_NOT_LINES: Final = frozenset({_S.DATA, _S.BDAT, _S.TLS, _S.CLOSED})


class ProtocolCore:
    """One session's state, buffers, queued replies, error count and pending decision."""

    # Slots keep an idle session small: thousands of them may be open at once.
    __slots__ = (
        "_buffer",
        "_chunk",
        "_commands",
        "_data",
        "_envelope",
        "_errors",
        "_events",
        "_junk",
        "_mechanism",
        "_out",
        "_overshoot",
        "_pending",
        "_reads",
        "_refused",
        "_sasl_lines",
        "_session",
        "_sink",
        "_state",
        "config",
    )

    def __init__(
        self, config: ServerConfig, greeting: Reply | None = None, *, tls: bool = False
    ) -> None:
        """Queue the greeting: 220 by default, or a 554 refusal or a 421 (RFC 5321 3.1).

        ``tls=True`` for a connection that is encrypted from the start (implicit TLS,
        RFC 8314): the session counts as TLS and STARTTLS is not offered.
        """
        self.config = config
        self._state = _S.CONNECTED
        self._session = _TLS_SESSION if tls else _NEW_SESSION
        self._envelope: Transaction | None = None
        self._pending: DecisionEvent | None = None
        # Both empty most of the time, so neither is a container then: an idle session
        # should cost as little as possible (no list made per session and per batch).
        self._events: list[Event] | None = None
        self._buffer = bytearray()
        self._out: list[bytes] | None = None  # the replies queued
        self._errors = 0
        self._junk = 0
        self._reads = 0
        self._refused = 0  # recipients refused with 5xx (max_refused_recipients)
        self._overshoot = 0  # RCPTs past max_recipients in this transaction
        self._commands = CommandReader(
            config.bare_newline, COMMAND_LINE_LIMIT, EXTENDED_LINE_LIMITS
        )
        self._sasl_lines: CommandReader | None = None
        self._mechanism: sasl.Mechanism | None = None
        self._data: DataReader | None = None
        self._chunk: ChunkReader | None = None
        self._sink: MessageSink | None = None
        self._greet(greeting or replies.greeting(config.hostname))

    def _greet(self, greeting: Reply) -> None:
        greeting = greeting.plain()
        if greeting.code == 220:
            self._send(greeting)
        elif greeting.code == 554:
            self._send(greeting)
            self._state = _S.REFUSED
        elif greeting.code == 421:
            self._close(greeting)
        else:
            raise ValueError("the greeting must be 220, 554 or 421")

    # --- public API --------------------------------------------------------------

    @property
    def state(self) -> State:
        return self._state

    @property
    def session(self) -> Session:
        return self._session

    @property
    def envelope(self) -> Transaction | None:
        """The transaction under way, None outside one."""
        return self._envelope

    @property
    def pending(self) -> DecisionEvent | None:
        """The decision the protocol waits for, if any."""
        return self._pending

    @property
    def closed(self) -> bool:
        return self._state is _S.CLOSED

    @property
    def errors(self) -> int:
        """Client errors counted so far."""
        return self._errors

    @property
    def reads(self) -> int:
        """How many lines, messages and chunks have been read: a change says a line ended."""
        return self._reads

    @property
    def mid_line(self) -> bool:
        """Whether the client is part-way through a command or AUTH line (or through an
        over-long line being dropped) and the next move is its own.

        This is what a per-line deadline times (Postfix's smtpd_per_record_deadline): the
        idle timeout alone lets a client hold a session for ever with one octet every few
        minutes. False in DATA and BDAT and while a refused chunk is skipped (`skipping`),
        whose pace a minimum data rate judges, and while a decision is pending (the wait
        is then the server's). Every whole line has been taken from the buffer by then,
        so what is left is the start of one.
        """
        if not self._buffer and self._sasl_lines is None and not self._commands.discarding:
            return False  # between lines, not in AUTH: nearly always, so this comes first
        state = self._state
        if self._pending is not None or state in _NOT_LINES or self._commands.skipping:
            return False
        if self._buffer:
            return True
        reader = self._sasl_lines if state is _S.AUTH else self._commands
        return reader is not None and reader.discarding

    @property
    def skipping(self) -> bool:
        """Whether the octets of a refused BDAT chunk are being read and dropped: message
        data in all but name, so a minimum data rate should time them as it times DATA."""
        return self._commands.skipping > 0

    @property
    def read_timeout(self) -> float:
        """How long the I/O layer should wait for the client's next bytes now."""
        if self._state in (_S.DATA, _S.BDAT):
            return self.config.data_timeout
        return self.config.command_timeout

    def data_to_send(self) -> bytes:
        """Everything queued for the client since the last call."""
        out, self._out = self._out, None
        if out is None:
            return b""
        return out[0] if len(out) == 1 else b"".join(out)

    def close(self, reply: Reply) -> None:
        """End the session from the server's side, e.g. ``replies.timed_out(host)``."""
        if self._state is not _S.CLOSED:
            self._pending = None
            self._close(reply)

    # --- plumbing ----------------------------------------------------------------

    def _step(self, step: Step) -> None:
        """Change state through `TRANSITIONS`; a missing entry is a bug here."""
        try:
            self._state = TRANSITIONS[(self._state, step)]
        except KeyError:
            raise LocalProtocolError(f"no transition {step} from {self._state}") from None

    def _send(self, reply: Reply) -> None:
        if self._out is None:
            self._out = [reply.to_bytes()]
        else:
            self._out.append(reply.to_bytes())

    def _emit(self, event: Event) -> None:
        """Queue an event for the caller (`ServerProtocol.resume` hands them over)."""
        if self._events is None:
            self._events = [event]
        else:
            self._events.append(event)

    def _fail(self, reply: Reply) -> None:
        """Send an error caused by the client, or 421 once there were too many."""
        self._errors += 1
        limit = self.config.max_errors
        if limit and self._errors > limit:
            closing = replies.too_many_errors(self.config.hostname)
            self._close(closing if reply.enhanced else closing.plain())
        else:
            self._send(reply)

    def _close(self, reply: Reply) -> None:
        self._send(reply)
        self._step(Step.CLOSE)
        self._buffer.clear()
        self._envelope = None
        self._data = self._chunk = self._sink = None
        self._emit(Closed(reply))

    def _decide(self, event: DecisionEvent) -> None:
        self._pending = event
        self._emit(event)

    def _take_pending(self) -> DecisionEvent:
        event = self._pending
        if event is None:
            raise LocalProtocolError("no decision is pending")
        self._pending = None
        return event

    @staticmethod
    def _check_accept_reply(event: DecisionEvent, reply: Reply) -> None:
        if isinstance(event, Helo):
            raise LocalProtocolError("the HELO/EHLO reply is built by the protocol")
        wanted = 3 if isinstance(event, DataStart) else 2
        if reply.code // 100 != wanted:
            raise LocalProtocolError(f"accept() needs a {wanted}xx reply, not {reply.code}")

    def _read(self) -> _Item | None:
        """Run the reader that belongs to the current state."""
        reader: CommandReader | DataReader | ChunkReader | None
        match self._state:
            case _S.TLS | _S.CLOSED:
                return None
            case _S.DATA:
                reader = self._data
            case _S.BDAT:
                reader = self._chunk
            case _S.AUTH:
                reader = self._sasl_lines
            case _:
                reader = self._commands
        if reader is None:
            raise LocalProtocolError(f"no reader in state {self._state}")
        item = reader.read(self._buffer)
        if item is not None:
            self._reads += 1
        return item
