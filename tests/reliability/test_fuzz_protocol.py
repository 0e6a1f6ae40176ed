"""Stateful fuzzing of the SMTP protocol object (netserver.smtp.ServerProtocol).

tests/test_smtp_fuzz.py throws byte soup and scripted sessions at the protocol.  This
goes further with a hypothesis `RuleBasedStateMachine` that keeps its own model of the
session, written from RFC 5321 4.1.4 / 3030 / 3207 / 4954 rather than from the code:

* every unit (command line, DATA body, BDAT command with its octets, SASL line) gets
  exactly one final reply, and every reply line is well-formed;
* a decision event only ever comes in a state where the RFCs allow that command (MAIL
  after HELO/EHLO outside a transaction, RCPT inside one, DATA/BDAT after a recipient,
  no STARTTLS inside a transaction or twice, no AUTH twice or inside a transaction);
* a message event comes only from CRLF.CRLF or BDAT LAST, with exactly the bytes that
  were sent (un-stuffed; BDAT chunks concatenated), the sender and the recipients the
  model accepted;
* a BDAT sent out of sequence is refused and its octets are skipped, never executed
  as commands (RFC 3030 2);
* STARTTLS forgets everything (RFC 3207 4.2); QUIT and 421 close for good.

Arbitrary ESMTP parameters and addresses are mixed into the commands, every unit is cut
at a random point, and decisions are accepted or refused at random.
"""

from __future__ import annotations

import re

import pytest
import soak
from fuzz_support import Tally, budget
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from netserver.smtp import (
    AuthRequest,
    Closed,
    DataStart,
    DecisionEvent,
    Event,
    Helo,
    MailFrom,
    MessageReady,
    RcptTo,
    Reply,
    ServerConfig,
    ServerProtocol,
    StartTLS,
    State,
)

CONFIG = ServerConfig(
    "mx.example",
    max_message_size=2000,
    max_recipients=3,
    max_errors=0,  # unlimited: error accounting is tested in tests/test_smtp_protocol.py
    tls_available=True,
    auth_enabled=True,
    auth_plaintext_allowed=True,
)
REPLY_LINE = re.compile(rb"([2-5][0-5][0-9])([ -])([^\r\n]*)\r\n")

PATHS = [
    "<a@b.example>", "<>", "<Postmaster>", '<"x y"@[192.0.2.1]>', "<ü@ü.example>",
    "<a@[IPv6:2001:db8::1]>", "<@r.example:a@b.example>", "a@b", "<a@>", "<a..b@c>",
]  # fmt: skip
MAIL_PARAMS = [
    "", "SIZE=10", "SIZE=99999", "SIZE=x", "BODY=8BITMIME", "BODY=BINARYMIME", "SMTPUTF8",
    "RET=HDRS", "ENVID=a+2Bb", "AUTH=<>", "FOO=1", "size=1 SIZE=2",
]  # fmt: skip
RCPT_PARAMS = [
    "", "NOTIFY=NEVER", "NOTIFY=SUCCESS,DELAY", "NOTIFY=NEVER,DELAY", "ORCPT=rfc822;a+40b",
    "ORCPT=utf-8;\\x{FC}", "BAR",
]  # fmt: skip
SIMPLE = [
    "EHLO c.example", "HELO c.example", "EHLO", "RSET", "NOOP", "NOOP x", "HELP", "VRFY a",
    "EXPN a", "DATA", "DATA x", "STARTTLS", "AUTH PLAIN", "AUTH LOGIN", "AUTH PLAIN AGEAYg==",
    "AUTH PLAIN =", "AUTH CRAM-MD5", "QUIT", "FOO", "", "rset", "ehlo c", "x" * 600,
]  # fmt: skip
SASL = ["*", "AGEAYg==", "YQ==", "Yg==", "not base64", "=", ""]
VERDICTS = ["accept"] * 5 + ["reject", "defer", "close"]


@st.composite
def command(draw: st.DrawFn) -> str:
    kind = draw(st.integers(0, 3))
    if kind == 0:
        return draw(st.sampled_from(SIMPLE))
    params = MAIL_PARAMS if kind == 1 else RCPT_PARAMS
    verb = "MAIL FROM:" if kind == 1 else "RCPT TO:"
    text = f"{verb}{draw(st.sampled_from(PATHS))} {draw(st.sampled_from(params))}".rstrip()
    return text.lower() if draw(st.integers(0, 9)) == 0 else text


def stuff(body: bytes) -> bytes:
    """Dot-stuff a CRLF-terminated body (RFC 5321 4.5.2)."""
    return b"".join(
        (b"." + line if line.startswith(b".") else line) + b"\r\n"
        for line in body.split(b"\r\n")[:-1]
    )


# Text lines: no CR, LF or NUL (NUL is refused since issue 13.14).
clean_lines = st.lists(
    st.binary(max_size=50).map(
        lambda b: b.replace(b"\r", b"").replace(b"\n", b"").replace(b"\0", b"")
    )
    | st.just(b"."),
    max_size=6,
).map(lambda lines: b"".join(line + b"\r\n" for line in lines))


def final_replies(out: bytes) -> list[int]:
    """The codes of the complete replies in `out`, checking every line's form."""
    codes: list[int] = []
    position = 0
    continued: bytes | None = None
    while position < len(out):
        match = REPLY_LINE.match(out, position)
        assert match is not None, out[position:]
        assert continued in (None, match.group(1)), "multi-line reply changed its code"
        continued = match.group(1) if match.group(2) == b"-" else None
        if continued is None:
            codes.append(int(match.group(1)))
        position = match.end()
    assert continued is None, "multi-line reply without its last line"
    return codes


class Session(RuleBasedStateMachine):
    """One SMTP session: the protocol object and the model the RFCs give."""

    def __init__(self) -> None:
        super().__init__()
        self.protocol = ServerProtocol(CONFIG)
        assert final_replies(self.protocol.data_to_send()) == [220]
        self.helo = False  # HELO/EHLO accepted
        self.esmtp = False
        self.tls = False
        self.authed = False
        self.sender: object = None  # the accepted MailFrom, None outside a transaction
        self.rcpts: list[object] = []
        self.chunks: bytes | None = None  # BDAT bytes so far, None when not chunking
        self.closed = False
        TALLY.executions += 1

    # -- feeding --------------------------------------------------------------------------

    def feed(self, unit: bytes, cut: int, data: st.DataObject) -> tuple[list[Event], list[int]]:
        """Send one unit in two pieces, answer its decisions; return events and replies."""
        events: list[Event] = []
        for piece in (unit[:cut], unit[cut:]):
            events += self.decide(self.protocol.receive_data(piece), data)
        return events, final_replies(self.protocol.data_to_send())

    def decide(self, events: list[Event], data: st.DataObject) -> list[Event]:
        seen = list(events)
        while events and isinstance(events[-1], DecisionEvent):
            event = events[-1]
            self.check_allowed(event)
            verdict = data.draw(st.sampled_from(VERDICTS))
            if isinstance(event, Helo):
                verdict = "accept" if verdict == "reject" else verdict
            if verdict == "accept":
                self.accepted(event)
                self.protocol.accept()
            else:
                code = {"reject": 550, "defer": 451, "close": 421}[verdict]
                self.refused(event, code)
                self.protocol.reject(Reply(code, f"{code // 100}.7.0", "no"))
            events = self.protocol.resume()
            seen += events
        return seen

    # -- the model ------------------------------------------------------------------------

    def check_allowed(self, event: DecisionEvent) -> None:
        """A decision only where the RFCs allow the command that caused it."""
        in_transaction = self.sender is not None
        if isinstance(event, MailFrom):
            assert self.helo and not in_transaction
        elif isinstance(event, RcptTo):
            assert in_transaction and len(self.rcpts) < CONFIG.max_recipients
        elif isinstance(event, DataStart):
            assert self.rcpts and (self.chunks is None)
        elif isinstance(event, AuthRequest):
            assert self.esmtp and not self.authed and not in_transaction
        elif isinstance(event, MessageReady):
            assert self.rcpts
            assert len(event.envelope.recipients) == len(self.rcpts)
            assert event.envelope.sender == getattr(self.sender, "sender", object())

    def accepted(self, event: DecisionEvent) -> None:
        if isinstance(event, Helo):
            self.helo, self.esmtp = True, event.esmtp
            self.end_transaction()
        elif isinstance(event, MailFrom):
            self.sender = event
        elif isinstance(event, RcptTo):
            self.rcpts.append(event)
        elif isinstance(event, DataStart) and event.chunking:
            self.chunks = b""
        elif isinstance(event, MessageReady):
            self.end_transaction()
        elif isinstance(event, AuthRequest):
            self.authed = True

    def refused(self, event: DecisionEvent, code: int) -> None:
        if code == 421:
            self.closed = True
        if isinstance(event, DataStart | MessageReady):
            self.end_transaction()

    def end_transaction(self) -> None:
        self.sender, self.rcpts, self.chunks = None, [], None

    def after(self, events: list[Event]) -> None:
        if any(isinstance(e, Closed) for e in events):
            self.closed = True
            self.end_transaction()

    # -- rules ----------------------------------------------------------------------------

    @precondition(lambda self: self.protocol.state not in (State.DATA, State.AUTH, State.TLS))
    @rule(line=command(), cut=st.integers(0, 700), data=st.data())
    def send_command(self, line: str, cut: int, data: st.DataObject) -> None:
        self.command(line, cut, data)

    @precondition(lambda self: self.protocol.state not in (State.DATA, State.AUTH, State.TLS))
    @rule(cut=st.integers(0, 40), data=st.data())
    def send_next(self, cut: int, data: st.DataObject) -> None:
        """What a real client sends next, so that sessions reach DATA, BDAT and AUTH."""
        if not self.helo:
            line = "EHLO c.example"
        elif self.sender is None:
            line = data.draw(st.sampled_from(["MAIL FROM:<a@b.example>", "AUTH LOGIN"]))
        elif not self.rcpts or data.draw(st.booleans()):
            line = "RCPT TO:<c@d.example>"
        else:
            line = "DATA"
        self.command(line, cut, data)

    def command(self, line: str, cut: int, data: st.DataObject) -> None:
        unit = line.encode() + b"\r\n"
        was_closed = self.closed
        events, codes = self.feed(unit, cut, data)
        self.after(events)
        if was_closed:
            assert codes == [] and events == []
            return
        assert len(codes) == 1, (line, codes)
        verb = line.split(" ")[0].upper()
        if verb == "RSET" and line.upper() == "RSET":
            assert codes == [250]
            self.end_transaction()
        if verb == "QUIT" and line.upper() == "QUIT":
            assert codes == [221] and self.protocol.closed
        if any(isinstance(e, StartTLS) for e in events):
            assert self.esmtp and not self.tls and self.sender is None
            assert self.protocol.state is State.TLS
        if self.sender is not None and verb == "MAIL":
            assert codes[0] >= 400 or isinstance(events[-1], MailFrom)

    @precondition(lambda self: self.protocol.state is State.DATA)
    @rule(body=clean_lines, cut=st.integers(0, 400), data=st.data())
    def send_body(self, body: bytes, cut: int, data: st.DataObject) -> None:
        events, codes = self.feed(stuff(body) + b".\r\n", cut, data)
        self.after(events)
        ready = [e for e in events if isinstance(e, MessageReady)]
        assert len(ready) == 1 and ready[0].data == body
        assert len(codes) == 1
        assert self.protocol.state in (State.READY, State.CLOSED)

    @precondition(
        lambda self: self.protocol.state not in (State.DATA, State.AUTH, State.TLS, State.CLOSED)
    )
    @rule(payload=st.binary(max_size=120), last=st.booleans(), cut=st.integers(0, 200),
          data=st.data())  # fmt: skip
    def send_bdat(self, payload: bytes, last: bool, cut: int, data: st.DataObject) -> None:
        allowed = bool(self.rcpts)
        expected = (self.chunks or b"") + payload
        unit = b"BDAT %d%s\r\n" % (len(payload), b" LAST" if last else b"") + payload
        events, codes = self.feed(unit, cut, data)
        self.after(events)
        assert len(codes) == 1
        if not allowed:
            # refused (RFC 5321 3.3 allows 503 or 554 "no valid recipients"), octets skipped
            assert codes[0] in (503, 554) and not events
            return
        ready = [e for e in events if isinstance(e, MessageReady)]
        if self.closed or (self.chunks is None and codes[0] >= 400):
            return
        if last and not ready:
            assert codes[0] >= 500  # e.g. bare CR/LF in the message (refused whole)
            self.end_transaction()
        elif b"\0" in payload:
            assert codes[0] == 554 and not ready  # NUL: refused at this chunk (issue 13.14)
            self.end_transaction()
        elif last:
            assert ready[0].data == expected
        else:
            assert codes == [250] and not ready
            self.chunks = expected

    @precondition(lambda self: self.protocol.state is State.AUTH)
    @rule(line=st.sampled_from(SASL), cut=st.integers(0, 12), data=st.data())
    def send_sasl(self, line: str, cut: int, data: st.DataObject) -> None:
        events, codes = self.feed(line.encode() + b"\r\n", cut, data)
        self.after(events)
        assert len(codes) == 1

    @precondition(lambda self: self.protocol.state is State.TLS)
    @rule()
    def tls_up(self) -> None:
        self.protocol.tls_started()
        self.tls, self.helo, self.esmtp = True, False, False
        self.end_transaction()
        assert self.protocol.session.helo is None and self.protocol.session.tls

    # -- invariants -----------------------------------------------------------------------

    @invariant()
    def agrees_with_model(self) -> None:
        protocol = self.protocol
        assert protocol.pending is None
        assert protocol.closed == self.closed
        envelope = protocol.envelope
        if self.sender is None:
            assert envelope is None
        else:
            assert envelope is not None
            assert len(envelope.recipients) == len(self.rcpts) <= CONFIG.max_recipients
        if not self.closed and protocol.state is not State.TLS:
            assert (protocol.session.helo is not None) == self.helo


TALLY = Tally("protocol.stateful")


@pytest.mark.timeout(soak.scaled(60, 900))
def test_protocol_state_machine() -> None:
    """Run the machine; each session (a sequence of units) counts as one execution."""
    case = Session.TestCase
    case.settings = settings(budget(60, 2_000), stateful_step_count=soak.scaled(25, 60))
    with TALLY.recorded():
        try:
            case("runTest").runTest()
        except BaseException:
            TALLY.crashes += 1
            raise
