"""Property tests: ServerProtocol driven by hypothesis.

* Arbitrary bytes, cut anywhere, with random decisions: nothing raises, every output
  line is a well-formed reply line, and the state invariants hold throughout.
* A scripted client that sends one unit at a time (a command line, a DATA body, a
  BDAT command with its octets, a SASL response) gets exactly one reply per unit.
* Any body survives DATA (dot-stuffed) and BDAT (cut into chunks) byte for byte.
"""

from __future__ import annotations

import re

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from netserver.smtp import (
    Closed,
    DecisionEvent,
    Event,
    MessageReady,
    RcptTo,
    Reply,
    ServerConfig,
    ServerProtocol,
    StartTLS,
    State,
)
from netserver.smtp.readers import BareNewline
from netserver.smtp.states import TRANSITIONS

FUZZ = settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
CONFIG = ServerConfig(
    "mx.example",
    max_message_size=300,
    max_recipients=2,
    max_errors=8,
    tls_available=True,
    auth_enabled=True,
    auth_plaintext_allowed=True,
)
REPLY_LINE = re.compile(rb"([2-5][0-5][0-9])([ -])([^\r\n]*)\r\n")

TOKENS = [
    b"EHLO c.example\r\n",
    b"HELO c.example\r\n",
    b"MAIL FROM:<a@b.example>\r\n",
    b"MAIL FROM:<> SIZE=100 BODY=8BITMIME\r\n",
    b"MAIL FROM:<\xc3\xbc@b.example> SMTPUTF8\r\n",
    b"RCPT TO:<c@d.example>\r\n",
    b"RCPT TO:<Postmaster> NOTIFY=NEVER\r\n",
    b"RCPT TO:<e@[192.0.2.1]> ORCPT=rfc822;e+40x\r\n",
    b"DATA\r\n",
    b"BDAT 3\r\n",
    b"BDAT 0 LAST\r\n",
    b"BDAT 2 LAST\r\n",
    b"RSET\r\n",
    b"NOOP\r\n",
    b"QUIT\r\n",
    b"STARTTLS\r\n",
    b"AUTH PLAIN\r\n",
    b"AUTH LOGIN\r\n",
    b"AUTH PLAIN AGEAYg==\r\n",
    b"AGEAYg==\r\n",
    b"*\r\n",
    b".\r\n",
    b"..\r\n",
    b"\r\n",
    b"\r",
    b"\n",
    b".",
    b"\x00",
    b"x" * 600,
]

# Whole flows, so that random input reaches the deep states and not only errors.
FLOWS = [
    b"EHLO c\r\nMAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nDATA\r\nhello\r\n..x\r\n.\r\n",
    b"EHLO c\r\nMAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nBDAT 3\r\nabcBDAT 2 LAST\r\nde",
    b"MAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nRCPT TO:<e@f>\r\nRCPT TO:<g@h>\r\n",
    b"EHLO c\r\nAUTH LOGIN\r\nYQ==\r\nYg==\r\n",
    b"EHLO c\r\nSTARTTLS\r\nEHLO c\r\n",
    b"EHLO c\r\nMAIL FROM:<a@b> X" + b"Y" * 600 + b"\r\n",
]
token_stream = st.lists(
    st.sampled_from(FLOWS) | st.sampled_from(TOKENS) | st.binary(max_size=40), max_size=30
)


def reply_lines(out: bytes) -> int:
    """Check that ``out`` is a sequence of well-formed replies; return how many."""
    position = 0
    finals = 0
    continued: bytes | None = None
    while position < len(out):
        match = REPLY_LINE.match(out, position)
        assert match is not None, out[position:]
        assert match.end() - position <= 512, "reply line over 512 octets (RFC 5321 4.5.3.1.5)"
        code, separator = match.group(1), match.group(2)
        assert continued is None or continued == code, "multi-line reply changed its code"
        continued = code if separator == b"-" else None
        finals += separator == b" "
        position = match.end()
    assert continued is None, "multi-line reply without its last line"
    return finals


def check_invariants(protocol: ServerProtocol) -> None:
    state = protocol.state
    envelope = protocol.envelope
    assert state in {s for s, _ in TRANSITIONS} | set(TRANSITIONS.values())
    if state in (State.RCPT, State.DATA, State.BDAT, State.CHUNKS):
        assert envelope is not None
        assert 1 <= len(envelope.recipients) <= CONFIG.max_recipients
    elif state is State.MAIL:
        assert envelope is not None
        assert envelope.recipients == ()
    else:
        assert envelope is None
    assert protocol.errors <= CONFIG.max_errors + 1
    if protocol.closed:
        assert protocol.pending is None
    pending = protocol.pending
    if isinstance(pending, RcptTo):
        assert state in (State.MAIL, State.RCPT)
    if isinstance(pending, MessageReady):
        assert pending.envelope.recipients
        assert state in (State.DATA, State.BDAT)


VERDICTS = ["accept"] * 6 + ["reject", "defer", "close"]


def decide(protocol: ServerProtocol, events: list[Event], data: st.DataObject) -> list[Event]:
    """Answer decisions randomly until the protocol wants input; return all events."""
    seen = list(events)
    while events and isinstance(events[-1], DecisionEvent):
        check_invariants(protocol)
        verdict = data.draw(st.sampled_from(VERDICTS))
        if verdict == "accept":
            protocol.accept()
        elif verdict == "reject":
            protocol.reject(Reply(550, "5.7.1", "rejected"))
        elif verdict == "defer":
            protocol.reject(Reply(451, "4.3.0", "later"))
        else:
            protocol.reject(Reply(421, "4.3.2", "bye"))
        events = protocol.resume()
        seen.extend(events)
    if protocol.state is State.TLS and data.draw(st.booleans()):
        protocol.tls_started()
    return seen


@FUZZ
@given(tokens=token_stream, data=st.data())
def test_arbitrary_input(tokens: list[bytes], data: st.DataObject) -> None:
    protocol = ServerProtocol(CONFIG)
    out = protocol.data_to_send()
    stream = b"".join(tokens)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=8)))
    pieces = [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True)]
    for piece in pieces:
        events = decide(protocol, protocol.receive_data(piece), data)
        check_invariants(protocol)
        for event in events:
            if isinstance(event, MessageReady):
                assert event.envelope.recipients
                assert len(event.data) <= CONFIG.max_message_size
        out += protocol.data_to_send()
        reply_lines(out)
        if protocol.closed:
            assert any(isinstance(e, Closed) for e in events) or not events


# --- one reply per unit -----------------------------------------------------------

COMMANDS = [
    "EHLO c.example",
    "HELO c.example",
    "EHLO",
    "MAIL FROM:<a@b.example>",
    "MAIL FROM:<>",
    "MAIL FROM:<a@b.example> SIZE=99999",
    "MAIL FROM:<a@b.example> FOO=1",
    "MAIL FROM:<ü@b.example>",
    "MAIL FROM:<ü@b.example> SMTPUTF8",
    "MAIL FROM:a@b",
    "RCPT TO:<c@d.example>",
    "RCPT TO:<c@d.example> NOTIFY=SUCCESS,DELAY",
    "RCPT TO:<c@d.example> NOTIFY=NEVER,DELAY",
    "RCPT TO:<ü@d.example>",
    "RCPT TO:<Postmaster>",
    "DATA",
    "DATA x",
    "RSET",
    "NOOP",
    "HELP",
    "VRFY x",
    "EXPN x",
    "FOO",
    "STARTTLS",
    "AUTH PLAIN",
    "AUTH LOGIN",
    "AUTH PLAIN AGEAYg==",
    "AUTH XOAUTH2",
    "QUIT",
    "",
    "x" * 600,
]
SASL_RESPONSES = ["*", "AGEAYg==", "YQ==", "not base64", "=", ""]


@st.composite
def bdat_unit(draw: st.DrawFn) -> bytes:
    payload = draw(st.binary(max_size=200))
    last = draw(st.booleans())
    return b"BDAT %d%s\r\n" % (len(payload), b" LAST" if last else b"") + payload


@st.composite
def data_body(draw: st.DrawFn) -> bytes:
    """A DATA body with its terminator: mostly valid, sometimes with bare LFs."""
    lines = draw(st.lists(st.binary(max_size=60).map(lambda b: b.replace(b"\r", b"")), max_size=8))
    body = b"".join(line.replace(b"\n", b"") + b"\r\n" for line in lines)
    if draw(st.booleans()):
        body = body.replace(b"a", b"\n")  # may or may not introduce a bare LF
    return stuff(body) + b".\r\n"


def stuff(body: bytes) -> bytes:
    """Dot-stuff a CRLF-terminated body (RFC 5321 4.5.2)."""
    return b"".join(
        (b"." + line if line.startswith(b".") else line) + b"\r\n"
        for line in body.split(b"\r\n")[:-1]
    )


def lines(*commands: str) -> st.SearchStrategy[bytes]:
    return st.sampled_from([c.encode() + b"\r\n" for c in commands])


def likely_next(state: State) -> st.SearchStrategy[bytes]:
    """What a real client would send next, so that runs get deep into a session."""
    if state is State.CONNECTED:
        return lines("EHLO c.example", "HELO c.example")
    if state is State.READY:
        return lines("MAIL FROM:<a@b.example>", "AUTH PLAIN", "AUTH LOGIN", "STARTTLS", "RSET")
    if state is State.MAIL:
        return lines("RCPT TO:<c@d.example>", "RCPT TO:<Postmaster>", "RCPT TO:<x>")
    if state is State.RCPT:
        return lines("RCPT TO:<c@d.example>", "DATA", "RSET") | bdat_unit()
    return bdat_unit() | lines("RSET", "NOOP")


@FUZZ
@given(data=st.data())
def test_one_reply_per_unit(data: st.DataObject) -> None:
    protocol = ServerProtocol(CONFIG)
    assert reply_lines(protocol.data_to_send()) == 1
    for _ in range(data.draw(st.integers(1, 30))):
        if protocol.closed:
            break
        state = protocol.state
        if state is State.DATA:
            unit = data.draw(data_body())
        elif state is State.AUTH:
            unit = data.draw(st.sampled_from(SASL_RESPONSES)).encode() + b"\r\n"
        elif data.draw(st.integers(0, 3)):
            unit = data.draw(likely_next(state))
        else:
            unit = data.draw(st.sampled_from(COMMANDS)).encode() + b"\r\n"
        cut = data.draw(st.integers(0, len(unit)))
        events = decide(protocol, protocol.receive_data(unit[:cut]), data)
        events += decide(protocol, protocol.receive_data(unit[cut:]), data)
        check_invariants(protocol)
        assert reply_lines(protocol.data_to_send()) == 1, unit
        if any(isinstance(e, StartTLS) for e in events) and protocol.state is State.TLS:
            protocol.tls_started()
            assert protocol.session.helo is None


# --- bodies survive the trip --------------------------------------------------------

# Text bodies: no bare CR or LF, and no NUL (refused since issue 13.14).
bodies = st.lists(
    st.binary(max_size=120).map(
        lambda b: b.replace(b"\r", b"").replace(b"\n", b"").replace(b"\0", b"")
    ),
    max_size=20,
).map(lambda lines: b"".join(line + b"\r\n" for line in lines))


def deliver(wire: bytes, cuts: list[int]) -> list[bytes]:
    config = ServerConfig("mx.example", max_message_size=100_000)
    protocol = ServerProtocol(config)
    messages: list[bytes] = []
    points = sorted(set(cuts))
    for a, b in zip([0, *points], [*points, len(wire)], strict=True):
        events = protocol.receive_data(wire[a:b])
        while events and isinstance(events[-1], DecisionEvent):
            if isinstance(events[-1], MessageReady):
                messages.append(events[-1].data)
            protocol.accept()
            events = protocol.resume()
    out = protocol.data_to_send()
    assert reply_lines(out) == len(re.findall(rb"(?m)^\d{3} ", out))
    assert not re.search(rb"(?m)^[45]\d\d ", out), out
    return messages


PREFIX = b"EHLO c\r\nMAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\n"


@FUZZ
@given(body=bodies, cuts=st.lists(st.integers(0, 4000), max_size=10))
def test_data_round_trip(body: bytes, cuts: list[int]) -> None:
    wire = PREFIX + b"DATA\r\n" + stuff(body) + b".\r\nQUIT\r\n"
    assert deliver(wire, [c for c in cuts if c <= len(wire)]) == [body]


@FUZZ
@given(
    body=st.binary(max_size=2000).map(
        lambda b: b.replace(b"\r", b"").replace(b"\n", b"\r\n").replace(b"\0", b"")
    ),
    sizes=st.lists(st.integers(0, 500), max_size=8),
    cuts=st.lists(st.integers(0, 4000), max_size=10),
)
def test_bdat_round_trip(body: bytes, sizes: list[int], cuts: list[int]) -> None:
    chunks = []
    rest = body
    for size in sizes:
        chunks.append(b"BDAT %d\r\n" % len(rest[:size]) + rest[:size])
        rest = rest[size:]
    chunks.append(b"BDAT %d LAST\r\n" % len(rest) + rest)
    wire = PREFIX + b"".join(chunks) + b"QUIT\r\n"
    assert deliver(wire, [c for c in cuts if c <= len(wire)]) == [body]


@FUZZ
@given(noise=st.binary(max_size=300))
def test_only_crlf_dot_crlf_ends_data(noise: bytes) -> None:
    """Input without CRLF.CRLF (and not starting ".CRLF") never ends a DATA body."""
    if b"\r\n.\r\n" in b"\r\n" + noise:
        return
    protocol = ServerProtocol(CONFIG)
    events = protocol.receive_data(PREFIX + b"DATA\r\n")
    while events and isinstance(events[-1], DecisionEvent):
        protocol.accept()
        events = protocol.resume()
    assert protocol.state is State.DATA
    assert protocol.receive_data(noise) == []
    assert protocol.state is State.DATA


# --- the reply does not depend on how the input was cut -----------------------------

# Pieces that make each DATA error (NUL, bare CR, bare LF, a long line, too many octets
# for SMALL's max_message_size) and the ordinary ones around them.
_PIECES = [b"a", b"\r\n", b"\0", b"\r", b"\n", b".", b"x" * 400, b"\r\n.", b"y" * 150]
SMALL = ServerConfig("mx.example", max_message_size=1500)
# Bare newlines made CRLF count towards the size as such, however the reads fall.
SMALL_REPLACING = ServerConfig(
    "mx.example", max_message_size=1500, bare_newline=BareNewline.REPLACE
)


def replies(wire: bytes, cuts: list[int], config: ServerConfig = SMALL) -> bytes:
    """Everything the server sends for `wire` arriving in pieces cut at `cuts`."""
    protocol = ServerProtocol(config)
    points = sorted({c for c in cuts if c <= len(wire)})
    for a, b in zip([0, *points], [*points, len(wire)], strict=True):
        events = protocol.receive_data(wire[a:b])
        while events and isinstance(events[-1], DecisionEvent):
            protocol.accept()
            events = protocol.resume()
    return protocol.data_to_send()


@FUZZ
@given(
    body=st.lists(st.sampled_from(_PIECES), max_size=40).map(b"".join),
    cuts=st.lists(st.integers(0, 5000), max_size=12),
    config=st.sampled_from([SMALL, SMALL_REPLACING]),
)
@example(body=b"\0\r", cuts=[len(PREFIX) + 7], config=SMALL)  # the NUL, then the bare CR
def test_a_data_reply_does_not_depend_on_packet_boundaries(
    body: bytes, cuts: list[int], config: ServerConfig
) -> None:
    """The same octets, in one piece or cut anywhere, get the same replies: a message
    with several faults (a NUL, a bare newline, a long line, too many octets) is
    answered for the same one however the network delivered it (it was the first one
    read: a NUL in one read and a bare LF in the next got "NUL", in one read "bare CR
    or LF")."""
    wire = PREFIX + b"DATA\r\n" + body + b"\r\n.\r\nQUIT\r\n"
    assert replies(wire, cuts, config) == replies(wire, [], config)


@FUZZ
@given(
    body=st.lists(st.sampled_from(_PIECES), max_size=40).map(b"".join),
    cuts=st.lists(st.integers(0, 5000), max_size=12),
)
@example(body=b"\0" + b"x" * 1600, cuts=[len(PREFIX) + 17])  # the NUL, then the size
def test_a_bdat_reply_does_not_depend_on_packet_boundaries(body: bytes, cuts: list[int]) -> None:
    wire = PREFIX + b"BDAT %d LAST\r\n" % len(body) + body + b"QUIT\r\n"
    assert replies(wire, cuts) == replies(wire, [])
