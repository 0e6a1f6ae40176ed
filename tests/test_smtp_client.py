"""Tables for the client-role engine: netserver.smtp.replyreader, .client, .mailexchange.

Bytes in, replies and bytes out, no socket: the reply syntax and its bounds, pairing
replies with commands, the pipelining and STARTTLS rules, and which command a
transaction sends after which reply. The property tests for the reply reader are in
tests/test_smtp_client_fuzz.py; the engine on a real connection in
tests/test_delivery_wire.py.
"""

from __future__ import annotations

import pytest

from netserver.smtp.client import (
    Answered,
    Awaited,
    ClientProtocol,
    ClientState,
    message_bytes,
    parse_extensions,
)
from netserver.smtp.core import LocalProtocolError
from netserver.smtp.mailexchange import MailCommands, MailExchange
from netserver.smtp.replies import Reply
from netserver.smtp.replyreader import MAX_LINE, MAX_REPLY_LINES, BadReply, ReplyReader

# --- replies ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("wire", "expected"),
    [
        (b"250 OK\r\n", Reply(250, None, "OK")),
        (b"250 2.1.0 Sender OK\r\n", Reply(250, "2.1.0", "Sender OK")),
        (b"250\r\n", Reply(250, None, "")),
        (b"250 \r\n", Reply(250, None, "")),
        (b"550 5.1.1\r\n", Reply(550, "5.1.1", "")),
        # the enhanced code must have the reply's class (RFC 3463), else it is text
        (b"250 5.0.0 odd\r\n", Reply(250, None, "5.0.0 odd")),
        # 3xx carries none (RFC 2034): 354's text stays whole
        (b"354 2.0.0 go on\r\n", Reply(354, None, "2.0.0 go on")),
        (b"250 2.0.0x not a code\r\n", Reply(250, None, "2.0.0x not a code")),
        (
            b"250-2.6.0 queued\r\n250 2.6.0 as X1\r\n",
            Reply(250, "2.6.0", ("queued", "as X1")),
        ),
        (
            b"250-mx.test greets you\r\n250-PIPELINING\r\n250 SIZE 1000\r\n",
            Reply(250, None, ("mx.test greets you", "PIPELINING", "SIZE 1000")),
        ),
        (b"250 bare LF ends a line too\n", Reply(250, None, "bare LF ends a line too")),
        # control characters kept as sent (recorded exactly, escaped where printed)
        (
            b"550 tab\tand \x01control\x7f\r\n",
            Reply(550, None, "tab\tand \x01control\x7f", received=True),
        ),
        (b"550 \xff not utf-8\r\n", Reply(550, None, "\ufffd not utf-8")),
        (b"421 4.3.2 going away\r\n", Reply(421, "4.3.2", "going away")),
    ],
)
def test_reply_table(wire: bytes, expected: Reply) -> None:
    assert ReplyReader().feed(wire) == [expected]


@pytest.mark.parametrize(
    "wire",
    [
        b"25O OK\r\n",  # not three digits
        b"2500 OK\r\n",  # nor a separator after them
        b"250+OK\r\n",
        b"600 OK\r\n",  # no such class
        b"199 OK\r\n",
        b"270 OK\r\n",  # second digit above 5 (RFC 5321 4.2)
        b"\r\n",  # an empty line
        b"250-first\r\n550 second\r\n",  # a code change inside a reply (RFC 5321 4.2.1)
        b"250 " + b"x" * MAX_LINE + b"\r\n",  # one line too long
        b"250 " + b"x" * (MAX_LINE + 10),  # one line too long, not even ended
        b"250-x\r\n" * (MAX_REPLY_LINES + 1),  # too many lines
        b"250-" + b"x" * 8000 + b"\r\n" * 5,  # too many octets
    ],
)
def test_bad_replies_are_refused_and_the_reader_stays_broken(wire: bytes) -> None:
    reader = ReplyReader()
    with pytest.raises(BadReply):
        for start in range(0, len(wire), 4096):
            reader.feed(wire[start : start + 4096])
        reader.feed(b"\r\n")
    with pytest.raises(BadReply):
        reader.feed(b"250 OK\r\n")


def test_too_many_octets_in_one_reply() -> None:
    line = b"250-" + b"x" * 1000 + b"\r\n"
    with pytest.raises(BadReply, match="too long"):
        ReplyReader().feed(line * 40)  # 40 KB > MAX_REPLY in 40 lines


def test_replies_cut_anywhere_read_the_same() -> None:
    wire = b"220 mx ESMTP\r\n250-mx\r\n250-PIPELINING\r\n250 8BITMIME\r\n250 2.1.0 ok\r\n"
    whole = ReplyReader().feed(wire)
    assert len(whole) == 3
    for cut in range(1, len(wire)):
        reader = ReplyReader()
        assert reader.feed(wire[:cut]) + reader.feed(wire[cut:]) == whole
    reader = ReplyReader()
    assert [r for byte in wire for r in reader.feed(bytes([byte]))] == whole
    assert not reader.pending


def test_pending_tells_a_partial_reply() -> None:
    reader = ReplyReader()
    assert reader.feed(b"250-one\r\n250 tw") == []
    assert reader.pending
    assert reader.feed(b"o\r\n") == [Reply(250, None, ("one", "two"))]
    assert not reader.pending


# --- the connection engine --------------------------------------------------------------

EHLO_PIPELINING = b"250-mx.test\r\n250-PIPELINING\r\n250-AUTH=LOGIN\r\n250 AUTH PLAIN\r\n"


def greeted(ehlo: bytes = EHLO_PIPELINING) -> ClientProtocol:
    engine = ClientProtocol()
    [event] = engine.receive_data(b"220 mx.test ESMTP\r\n")
    assert event.awaited is Awaited.GREETING and engine.state is ClientState.COMMANDS
    assert engine.send(Awaited.EHLO, b"EHLO me\r\n") == b"EHLO me\r\n"
    [event] = engine.receive_data(ehlo)
    assert event.awaited is Awaited.EHLO
    return engine


def test_nothing_is_sent_before_the_greeting() -> None:
    with pytest.raises(LocalProtocolError):
        ClientProtocol().send(Awaited.EHLO, b"EHLO me\r\n")


def test_ehlo_reply_gives_the_extensions() -> None:
    engine = greeted()
    assert engine.supports("PIPELINING") and engine.supports("auth")
    assert engine.extensions == {"pipelining": "", "auth": "LOGIN PLAIN"}
    reply = Reply(250, None, ("mx", "SIZE 1000", "8BITMIME", "-bad", "X-ODD=1 2"))
    assert parse_extensions(reply) == {"size": "1000", "8bitmime": "", "x-odd": "1 2"}


def test_replies_pair_with_commands_in_order() -> None:
    engine = greeted()
    engine.send(Awaited.MAIL, b"MAIL FROM:<a@b>\r\n")
    engine.send(Awaited.RCPT, b"RCPT TO:<c@d>\r\n")
    engine.send(Awaited.DATA, b"DATA\r\n")
    assert engine.waiting == 3
    events = engine.receive_data(b"250 ok\r\n550 5.1.1 no\r\n354 go\r\n")
    assert [(e.awaited, e.reply.code) for e in events] == [
        (Awaited.MAIL, 250),
        (Awaited.RCPT, 550),
        (Awaited.DATA, 354),
    ]
    assert engine.waiting == 0


@pytest.mark.parametrize(
    "line", [b"RCPT TO:<a@b>", b"RCPT TO:<a@b>\r\nDATA\r\n", b"RSET\n", b"NO\rOP\r\n", b"\r\n"]
)
def test_a_command_is_exactly_one_crlf_line(line: bytes) -> None:
    """A second line hidden in a command would be an injected command."""
    with pytest.raises(LocalProtocolError, match="one command line"):
        greeted().send(Awaited.RCPT, line)


def test_without_pipelining_one_command_at_a_time() -> None:
    engine = greeted(b"250-mx.test\r\n250 8BITMIME\r\n")
    engine.send(Awaited.MAIL, b"MAIL FROM:<a@b>\r\n")
    with pytest.raises(LocalProtocolError, match="PIPELINING"):
        engine.send(Awaited.RCPT, b"RCPT TO:<c@d>\r\n")


@pytest.mark.parametrize("last", [Awaited.DATA, Awaited.EHLO, Awaited.NOOP, Awaited.STARTTLS])
def test_group_enders_wait_for_their_reply(last: Awaited) -> None:
    """RFC 2920 3.1: nothing follows DATA, EHLO, NOOP, STARTTLS ... in a group."""
    engine = greeted()
    engine.send(last, b"X\r\n")
    with pytest.raises(LocalProtocolError, match="answered first"):
        engine.send(Awaited.RSET, b"RSET\r\n")


def test_a_reply_nothing_asked_for_is_refused() -> None:
    engine = greeted()
    with pytest.raises(BadReply, match="nothing asked for"):
        engine.receive_data(b"250 surprise\r\n")


@pytest.mark.parametrize("text", [b"a\x01b", b"\x1b[31mred", b"a\rb"])
def test_a_reply_nothing_asked_for_with_control_characters_is_still_a_bad_reply(
    text: bytes,
) -> None:
    """Found by fuzz/smtp_client.py: the error message rendered the received reply,
    which refuses control characters, so a hostile next hop got a ValueError out of
    receive_data (out of the delivery's data_received) instead of a BadReply."""
    engine = greeted()
    with pytest.raises(BadReply, match="nothing asked for: 250 "):
        engine.receive_data(b"250 " + text + b"\r\n")


@pytest.mark.parametrize(
    "after", [b"250 injected\r\n", b"250-injected", b"\x16\x03\x01 not a reply yet"]
)
def test_bytes_after_the_starttls_reply_are_refused(after: bytes) -> None:
    """A man in the middle must not get replies read as if they came over TLS."""
    engine = greeted(b"250-mx.test\r\n250 STARTTLS\r\n")
    engine.send(Awaited.STARTTLS, b"STARTTLS\r\n")
    with pytest.raises(BadReply, match="STARTTLS"):
        engine.receive_data(b"220 go ahead\r\n" + after)


def test_starttls_then_handshake_forgets_the_extensions() -> None:
    engine = greeted(b"250-mx.test\r\n250-PIPELINING\r\n250 STARTTLS\r\n")
    engine.send(Awaited.STARTTLS, b"STARTTLS\r\n")
    [answered] = engine.receive_data(b"220 go ahead\r\n")
    assert answered.awaited is Awaited.STARTTLS and engine.state is ClientState.TLS
    with pytest.raises(LocalProtocolError):
        engine.send(Awaited.EHLO, b"EHLO me\r\n")  # the handshake comes first
    with pytest.raises(BadReply):
        engine.receive_data(b"250 early\r\n")
    engine = greeted(b"250-mx.test\r\n250-PIPELINING\r\n250 STARTTLS\r\n")
    engine.send(Awaited.STARTTLS, b"STARTTLS\r\n")
    engine.receive_data(b"220 go ahead\r\n")
    engine.tls_started()
    assert engine.state is ClientState.COMMANDS and engine.extensions == {}


def test_421_closes() -> None:
    engine = greeted()
    engine.send(Awaited.MAIL, b"MAIL FROM:<a@b>\r\n")
    engine.receive_data(b"421 4.3.2 going away\r\n")
    assert engine.state is ClientState.CLOSED
    with pytest.raises(LocalProtocolError):
        engine.send(Awaited.RSET, b"RSET\r\n")


# --- the message ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("message", "framed"),
    [
        (b"a\r\nb\r\n", b"a\r\nb\r\n.\r\n"),
        (b"a\r\nb", b"a\r\nb\r\n.\r\n"),
        (b".a\r\n.\r\n..b\r\n", b"..a\r\n..\r\n...b\r\n.\r\n"),
        (b"bare\nlf\rcr\r\n", b"bare\r\nlf\r\ncr\r\n.\r\n"),
        (b"\n.\n", b"\r\n..\r\n.\r\n"),
        (b"", b"\r\n.\r\n"),
    ],
)
def test_message_bytes(message: bytes, framed: bytes) -> None:
    assert message_bytes(message) == framed


# --- the transaction --------------------------------------------------------------------

MAIL = b"MAIL FROM:<a@b>\r\n"
RCPTS = (b"RCPT TO:<r0@d>\r\n", b"RCPT TO:<r1@d>\r\n", b"RCPT TO:<r2@d>\r\n")
BODY = b"Subject: x\r\n\r\n.dot\r\n"


def run(pipelining: bool, replies: list[int]) -> tuple[MailExchange, list[bytes]]:
    """Drive an exchange: `replies` are the codes the server gives, in order.

    Returns the exchange and the groups it wrote (each group one write)."""
    exchange = MailExchange(MailCommands(MAIL, RCPTS, BODY, pipelining))
    writes = [b"".join(line for _a, line in exchange.start())]
    codes = iter(replies)
    awaiting = _awaiting(exchange)
    while not exchange.finished:
        awaited = awaiting.pop(0)
        progress = exchange.receive(Answered(awaited, Reply(next(codes), None, "x")))
        if progress.send:
            writes.append(b"".join(line for _a, line in progress.send))
            awaiting.extend(a for a, _line in progress.send)
    assert next(codes, None) is None, "replies left over"
    return exchange, writes


def _awaiting(exchange: MailExchange) -> list[Awaited]:
    c = exchange.commands
    if c.pipelining:
        return [Awaited.MAIL, *[Awaited.RCPT] * len(c.rcpts), Awaited.DATA]
    return [Awaited.MAIL]


def test_pipelined_transaction_is_two_writes() -> None:
    exchange, writes = run(True, [250, 250, 251, 250, 354, 250])
    assert writes == [MAIL + b"".join(RCPTS) + b"DATA\r\n", message_bytes(BODY)]
    assert exchange.accepted == [0, 1, 2] and exchange.delivered and not exchange.needs_reset


def test_pipelined_refused_recipient_is_left_out() -> None:
    exchange, writes = run(True, [250, 550, 250, 452, 354, 250])
    assert exchange.accepted == [1] and exchange.delivered
    assert writes[1] == message_bytes(BODY)


def test_pipelined_refused_mail_accepts_no_recipient() -> None:
    """RCPT replies after a refused MAIL count for nothing; a 354 gets only the "."."""
    exchange, writes = run(True, [451, 250, 250, 250, 354, 503])
    assert not exchange.mail_ok and exchange.accepted == []
    assert writes[1] == b".\r\n"
    assert exchange.needs_reset


def test_pipelined_data_refused() -> None:
    exchange, writes = run(True, [250, 550, 550, 550, 554])
    assert writes == [MAIL + b"".join(RCPTS) + b"DATA\r\n"]
    assert exchange.needs_reset


def test_one_by_one_transaction() -> None:
    exchange, writes = run(False, [250, 250, 550, 250, 354, 250])
    assert writes == [MAIL, *RCPTS, b"DATA\r\n", message_bytes(BODY)]
    assert exchange.accepted == [0, 2] and exchange.delivered


def test_one_by_one_stops_at_a_refused_mail() -> None:
    exchange, writes = run(False, [550])
    assert writes == [MAIL] and exchange.needs_reset


def test_one_by_one_sends_no_data_without_a_recipient() -> None:
    exchange, writes = run(False, [250, 550, 550, 450])
    assert writes == [MAIL, *RCPTS] and exchange.needs_reset


def test_refused_message_needs_reset() -> None:
    exchange, _writes = run(False, [250, 250, 250, 250, 354, 552])
    assert exchange.finished and not exchange.delivered and exchange.needs_reset


def test_a_reply_to_the_wrong_command_is_a_driver_bug() -> None:
    exchange = MailExchange(MailCommands(MAIL, RCPTS, BODY, True))
    exchange.start()
    with pytest.raises(LocalProtocolError):
        exchange.receive(Answered(Awaited.RSET, Reply(250, None, "x")))
    with pytest.raises(LocalProtocolError):
        exchange.start()
