"""Property tests for the client-role engine, driven by hypothesis.

* Any replies, rendered as a server sends them and cut anywhere, read back equal.
* Any bytes, whole or cut anywhere, give the same replies or the same BadReply, and
  nothing else is ever raised; an unended line longer than the bound is always refused.
* Any pipelined or one-by-one transaction, whatever codes come back, ends; a recipient
  counts as accepted only after a 250 to MAIL and a 250/251 to its RCPT, and the message
  goes only when one was.
"""

from __future__ import annotations

import re

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from netserver.smtp.client import Answered, Awaited, message_bytes
from netserver.smtp.mailexchange import MailCommands, MailExchange
from netserver.smtp.replies import Reply
from netserver.smtp.replyreader import MAX_LINE, BadReply, ReplyReader

_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")  # what a reply line may not carry

FUZZ = settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
_LOOKS_ENHANCED = re.compile(r"[245]\.[0-9]{1,3}\.[0-9]{1,3}(?= |\Z)")

codes = st.integers(2, 5).flatmap(
    lambda c: st.builds(lambda d, u: c * 100 + d * 10 + u, st.integers(0, 5), st.integers(0, 9))
)
line_text = st.text(
    alphabet=st.characters(blacklist_categories=("Cc", "Cs", "Zl", "Zp")), max_size=60
).filter(lambda t: t == t.strip(" \t") and "\x85" not in t)


@st.composite
def replies(draw: st.DrawFn) -> Reply:
    code = draw(codes)
    enhanced = None
    if code // 100 != 3 and draw(st.booleans()):
        digits = draw(st.tuples(st.integers(0, 999), st.integers(0, 999)))
        enhanced = f"{code // 100}.{digits[0]}.{digits[1]}"
    lines = draw(st.lists(line_text, min_size=1, max_size=6))
    if enhanced is None and _LOOKS_ENHANCED.match(lines[0]):
        lines[0] = "x" + lines[0]
    return Reply(code, enhanced, lines[0] if len(lines) == 1 else tuple(lines))


def cut(data: bytes, points: list[int]) -> list[bytes]:
    marks = sorted({p % (len(data) + 1) for p in points})
    return [data[a:b] for a, b in zip([0, *marks], [*marks, len(data)], strict=True)]


def read_all(pieces: list[bytes]) -> list[Reply] | str:
    reader = ReplyReader()
    got: list[Reply] = []
    try:
        for piece in pieces:
            got += reader.feed(piece)
    except BadReply:
        return "bad"
    return got


@FUZZ
@given(st.lists(replies(), min_size=1, max_size=8), st.lists(st.integers(0, 10_000)))
def test_rendered_replies_read_back_equal(sent: list[Reply], points: list[int]) -> None:
    wire = b"".join(reply.to_bytes() for reply in sent)
    assert read_all(cut(wire, points)) == sent


@FUZZ
@given(
    st.lists(
        st.one_of(
            st.binary(max_size=40),
            st.sampled_from([b"\r\n", b"\n", b"250-", b"250 ", b"550 5.1.1 ", b"354 ", b"2.0.0"]),
        ),
        max_size=30,
    ),
    st.lists(st.integers(0, 10_000), max_size=10),
)
def test_any_bytes_read_the_same_however_cut(parts: list[bytes], points: list[int]) -> None:
    wire = b"".join(parts)
    whole = read_all([wire])
    assert read_all(cut(wire, points)) == whole
    if whole != "bad":
        for reply in whole:  # a reply read is marked so, and never sent on with a control
            assert isinstance(reply, Reply) and reply.received
            try:
                rendered = reply.to_bytes()
            except ValueError:
                assert any(_CONTROL.search(line) for line in reply.lines)
            else:
                assert rendered.endswith(b"\r\n") and rendered.count(b"\n") == len(reply.lines)


@FUZZ
@given(st.binary(min_size=1, max_size=64).filter(lambda b: b"\n" not in b), st.integers(1, 9))
def test_an_endless_line_is_refused(filler: bytes, step_kib: int) -> None:
    reader = ReplyReader()
    line = b"250 " + filler * (MAX_LINE // len(filler) + 1)
    step = step_kib * 1024
    try:
        for start in range(0, len(line), step):
            reader.feed(line[start : start + step])
    except BadReply:
        return
    raise AssertionError("a line longer than MAX_LINE was held")


@FUZZ
@given(
    st.booleans(),
    st.integers(0, 5),
    st.lists(st.sampled_from([250, 251, 252, 354, 421, 450, 452, 503, 550, 552, 554]), max_size=9),
)
def test_any_transaction_ends_and_sends_only_what_it_may(
    pipelining: bool, count: int, codes_back: list[int]
) -> None:
    rcpts = tuple(f"RCPT TO:<r{i}@d>\r\n".encode() for i in range(count))
    exchange = MailExchange(MailCommands(b"MAIL FROM:<a@b>\r\n", rcpts, b"body\r\n", pipelining))
    sent = list(exchange.start())
    awaiting = [awaited for awaited, _line in sent]
    answered = {}
    backs = iter(codes_back)
    while not exchange.finished:
        code = next(backs, 250 if awaiting[0] is not Awaited.DATA else 354)
        awaited = awaiting.pop(0)
        progress = exchange.receive(Answered(awaited, Reply(code, None, "x")))
        if progress.position is not None:
            answered[progress.position] = code
        if awaited is Awaited.MAIL:
            mail_code = code
        sent += progress.send
        awaiting += [a for a, _line in progress.send]
        assert len(sent) <= count + 3
    assert awaiting == []
    expect = [p for p, c in answered.items() if mail_code == 250 and c in (250, 251)]
    assert exchange.accepted == expect
    message = [line for awaited, line in sent if awaited is Awaited.MESSAGE]
    if exchange.accepted:
        assert message in ([], [message_bytes(b"body\r\n")])
    else:
        assert message in ([], [b".\r\n"])
        assert not exchange.delivered
    data_sent = Awaited.DATA in [a for a, _line in sent]
    assert data_sent == (pipelining or bool(exchange.accepted))
