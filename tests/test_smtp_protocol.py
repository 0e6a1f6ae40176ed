"""ServerProtocol as tables of bytes in and bytes out.

`converse` plays a client against a fresh protocol object: it feeds the input (in
the given pieces), answers every decision through a small policy function (accept
by default) and returns everything the server queued after its greeting.
"""

from __future__ import annotations

import base64
from collections.abc import Callable, Sequence
from dataclasses import FrozenInstanceError, dataclass, field
from typing import Any

import pytest

from netserver.smtp import (
    AcceptedRecipient,
    AuthRequest,
    BareNewline,
    Closed,
    DataStart,
    DecisionEvent,
    Event,
    Helo,
    LocalProtocolError,
    Mailbox,
    MailFrom,
    MailParameters,
    MessageReady,
    Notify,
    RcptParameters,
    RcptTo,
    Reply,
    ServerConfig,
    ServerProtocol,
    Session,
    StartTLS,
    State,
    Transaction,
    received_protocol,
    replies,
)
from netserver.smtp.states import ALLOWED, TRANSITIONS, Step, Verb

HOST = "mx.example"
CONFIG = ServerConfig(HOST, max_message_size=2000, max_recipients=3, max_errors=10)
AUTH_CONFIG = ServerConfig(HOST, auth_enabled=True, auth_plaintext_allowed=True)
TLS_CONFIG = ServerConfig(HOST, tls_available=True, auth_enabled=True)

Policy = Callable[[DecisionEvent], Reply | None]


def accept_all(event: DecisionEvent) -> Reply | None:
    return None


@dataclass
class Conversation:
    """What a scripted client saw: the bytes after the greeting, and the events."""

    output: bytes
    events: list[Event] = field(default_factory=list)
    protocol: ServerProtocol | None = None

    @property
    def messages(self) -> list[MessageReady]:
        return [e for e in self.events if isinstance(e, MessageReady)]


def drive(protocol: ServerProtocol, events: list[Event], policy: Policy, seen: list[Event]) -> None:
    """Answer decisions until the protocol needs more input."""
    while True:
        seen.extend(events)
        if not events or not isinstance(events[-1], DecisionEvent):
            return
        verdict = policy(events[-1])
        if verdict is not None and verdict.code >= 400:
            protocol.reject(verdict)
        else:
            protocol.accept(verdict)
        events = protocol.resume()


def converse(
    data: bytes | Sequence[bytes],
    config: ServerConfig = CONFIG,
    policy: Policy = accept_all,
    *,
    tls_on_starttls: bool = False,
) -> Conversation:
    protocol = ServerProtocol(config)
    protocol.data_to_send()  # the greeting
    seen: list[Event] = []
    for chunk in [data] if isinstance(data, bytes) else data:
        drive(protocol, protocol.receive_data(chunk), policy, seen)
        if tls_on_starttls and protocol.state is State.TLS:
            protocol.tls_started()
    return Conversation(protocol.data_to_send(), seen, protocol)


def crlf(*lines: str) -> bytes:
    return "".join(line + "\r\n" for line in lines).encode("utf-8")


EHLO = "EHLO c.example"
EHLO_OUT = (
    "250-mx.example greets c.example",
    "250-SIZE 2000",
    "250-8BITMIME",
    "250-PIPELINING",
    "250-ENHANCEDSTATUSCODES",
    "250-SMTPUTF8",
    "250-CHUNKING",
    "250 DSN",
)
MAIL = "MAIL FROM:<s@example.org>"
RCPT = "RCPT TO:<r@example.net>"
MAIL_OK = "250 2.1.0 Sender OK"
RCPT_OK = "250 2.1.5 Recipient OK"
GO_AHEAD = "354 End data with <CR><LF>.<CR><LF>"
ACCEPTED = "250 2.0.0 OK message accepted"
SEQ = "503 5.5.1 "
SYNTAX = "501 5.5.4 "


def ehlo_out(*extra: str) -> tuple[str, ...]:
    lines = [*EHLO_OUT[:-1], EHLO_OUT[-1].replace("250 ", "250-"), *extra]
    lines[-1] = lines[-1].replace("250-", "250 ", 1)
    return tuple(lines)


# --- the greeting ------------------------------------------------------------------


def test_greeting() -> None:
    protocol = ServerProtocol(CONFIG)
    assert protocol.data_to_send() == b"220 mx.example ESMTP ready\r\n"
    assert protocol.state is State.CONNECTED
    assert protocol.data_to_send() == b""


def test_refusing_greeting_accepts_only_quit() -> None:
    protocol = ServerProtocol(CONFIG, Reply(554, "5.7.1", "no service for you"))
    assert protocol.data_to_send() == b"554 no service for you\r\n"
    protocol.receive_data(crlf(EHLO, "NOOP", "QUIT"))
    assert protocol.data_to_send() == crlf(
        "503 Service refused; only QUIT is accepted",
        SEQ + "Service refused; only QUIT is accepted",
        "221 2.0.0 mx.example closing connection",
    )
    assert protocol.closed


def test_closing_greeting() -> None:
    protocol = ServerProtocol(CONFIG, replies.shutting_down(HOST))
    assert protocol.data_to_send().startswith(b"421 mx.example service shutting down")
    assert protocol.closed
    assert protocol.receive_data(b"EHLO x\r\n") == [Closed(replies.shutting_down(HOST).plain())]
    assert protocol.receive_data(b"EHLO x\r\n") == []
    assert protocol.data_to_send() == b""


def test_greeting_code_is_checked() -> None:
    with pytest.raises(ValueError, match="greeting"):
        ServerProtocol(CONFIG, replies.OK)


# --- one table of whole conversations ----------------------------------------------

CONVERSATIONS = [
    pytest.param(crlf("HELO c.example"), crlf("250 mx.example greets c.example"), id="helo"),
    pytest.param(crlf(EHLO), crlf(*EHLO_OUT), id="ehlo"),
    pytest.param(
        crlf("ehlo [192.0.2.1]  "),
        crlf(*EHLO_OUT).replace(b"c.example", b"[192.0.2.1]"),
        id="ehlo-literal",
    ),
    # Replies to HELO/EHLO carry no enhanced code (RFC 2034 3).
    pytest.param(crlf("EHLO"), crlf("501 Syntax: EHLO hostname"), id="ehlo-no-arg"),
    pytest.param(crlf("HELO a b"), crlf("501 Syntax: HELO hostname"), id="helo-two-args"),
    pytest.param(crlf(MAIL), crlf(SEQ + "Send HELO or EHLO first"), id="mail-before-helo"),
    pytest.param(
        crlf("RCPT TO:<a@b>"), crlf(SEQ + "Send HELO or EHLO first"), id="rcpt-before-helo"
    ),
    pytest.param(
        crlf("NOOP", "RSET", "HELP"),
        crlf(
            "250 2.0.0 OK",
            "250 2.0.0 Reset OK",
            *(
                # Neither STARTTLS nor AUTH: this server offers neither.
                "214-2.0.0 Commands: HELO EHLO MAIL RCPT DATA BDAT RSET NOOP QUIT VRFY HELP",
                "214 2.0.0 See RFC 5321 for their use",
            ),
        ),
        id="any-time-commands",
    ),
    pytest.param(crlf("NOOP anything at all"), crlf("250 2.0.0 OK"), id="noop-with-text"),
    pytest.param(
        crlf("VRFY postmaster", "VRFY"),
        crlf(
            "252 2.5.0 Cannot VRFY user, but will accept message and attempt delivery",
            SYNTAX + "Syntax: VRFY address",
        ),
        id="vrfy",
    ),
    pytest.param(crlf("EXPN staff"), crlf("502 5.5.1 EXPN not available"), id="expn"),
    pytest.param(
        crlf("FOO bar", "MAILFROM:<a@b>"),
        crlf("500 5.5.2 Command not recognized", "500 5.5.2 Command not recognized"),
        id="unknown",
    ),
    pytest.param(crlf("RSET x"), crlf(SYNTAX + "Syntax: RSET"), id="rset-arg"),
    pytest.param(crlf("QUIT now"), crlf(SYNTAX + "Syntax: QUIT"), id="quit-arg"),
    pytest.param(crlf("quit", "NOOP"), crlf("221 2.0.0 mx.example closing connection"), id="quit"),
    pytest.param(
        crlf(EHLO, MAIL, RCPT, "DATA", "Subject: hi", "", "body", ".", "QUIT"),
        crlf(
            *EHLO_OUT,
            MAIL_OK,
            RCPT_OK,
            GO_AHEAD,
            ACCEPTED,
            "221 2.0.0 mx.example closing connection",
        ),
        id="pipelined-transaction",
    ),
    pytest.param(
        crlf("HELO c.example", MAIL, RCPT, "DATA", "x", "."),
        crlf("250 mx.example greets c.example", MAIL_OK, RCPT_OK, GO_AHEAD, ACCEPTED),
        id="helo-transaction",
    ),
    pytest.param(
        crlf(EHLO, MAIL, MAIL),
        crlf(*EHLO_OUT, MAIL_OK, SEQ + "MAIL not allowed during a mail transaction"),
        id="nested-mail",
    ),
    pytest.param(
        crlf(EHLO, RCPT),
        crlf(*EHLO_OUT, SEQ + "Send MAIL first; RCPT is out of sequence"),
        id="rcpt-without-mail",
    ),
    pytest.param(
        crlf(EHLO, "DATA"),
        crlf(*EHLO_OUT, SEQ + "Send MAIL first; DATA is out of sequence"),
        id="data-without-mail",
    ),
    pytest.param(
        crlf(EHLO, MAIL, "DATA"),
        crlf(*EHLO_OUT, MAIL_OK, "554 5.5.1 No valid recipients"),
        id="data-without-rcpt",
    ),
    pytest.param(
        crlf(EHLO, MAIL, RCPT, "DATA now"),
        crlf(*EHLO_OUT, MAIL_OK, RCPT_OK, SYNTAX + "Syntax: DATA"),
        id="data-arg",
    ),
    pytest.param(
        crlf(EHLO, MAIL, RCPT, "RSET", RCPT),
        crlf(
            *EHLO_OUT,
            MAIL_OK,
            RCPT_OK,
            "250 2.0.0 Reset OK",
            SEQ + "Send MAIL first; RCPT is out of sequence",
        ),
        id="rset-ends-transaction",
    ),
    pytest.param(
        crlf(EHLO, MAIL, RCPT, EHLO, RCPT),
        crlf(
            *EHLO_OUT, MAIL_OK, RCPT_OK, *EHLO_OUT, SEQ + "Send MAIL first; RCPT is out of sequence"
        ),
        id="ehlo-resets-transaction",
    ),
    # MAIL syntax and parameters
    pytest.param(
        crlf(EHLO, "MAIL TO:<a@b>", "MAIL FROM:a@b", "MAIL FROM:<a@b"),
        crlf(
            *EHLO_OUT,
            SYNTAX + "Syntax: MAIL FROM:<address>",
            SYNTAX + "Syntax: address must be enclosed in <>",
            SYNTAX + "Syntax: missing >",
        ),
        id="mail-syntax",
    ),
    pytest.param(
        crlf(EHLO, "MAIL FROM: <s@example.org>"),
        crlf(*EHLO_OUT, MAIL_OK),
        id="mail-space-after-colon",
    ),
    pytest.param(crlf(EHLO, "mail from:<>"), crlf(*EHLO_OUT, MAIL_OK), id="null-sender"),
    pytest.param(
        crlf(EHLO, "MAIL FROM:<a b@example.org>"),
        crlf(
            *EHLO_OUT,
            "501 5.1.7 Bad sender address syntax: character ' ' not allowed in local part",
        ),
        id="mail-bad-address",
    ),
    pytest.param(
        crlf(EHLO, MAIL + " SIZE=2000 BODY=8BITMIME RET=HDRS ENVID=x+2By"),
        crlf(*EHLO_OUT, MAIL_OK),
        id="mail-params",
    ),
    pytest.param(
        crlf(EHLO, MAIL + " SIZE=2001"),
        crlf(*EHLO_OUT, "552 5.3.4 Message size exceeds fixed maximum message size"),
        id="mail-size-too-big",
    ),
    pytest.param(
        crlf(EHLO, MAIL + " SIZE=big"),
        crlf(*EHLO_OUT, SYNTAX + "SIZE requires a number"),
        id="mail-size-syntax",
    ),
    pytest.param(
        crlf(EHLO, MAIL + " BODY=BINARYMIME"),
        crlf(*EHLO_OUT, SYNTAX + "Unsupported BODY value"),
        id="mail-binarymime",
    ),
    pytest.param(
        crlf(EHLO, MAIL + " FOO=1"),
        crlf(*EHLO_OUT, "555 5.5.4 Unsupported parameter FOO"),
        id="mail-unknown-param",
    ),
    pytest.param(
        crlf(EHLO, MAIL + " X" + "Y" * 600),  # found writing fuzz/smtp_server.py
        crlf(*EHLO_OUT, "555 5.5.4 Unsupported parameter X" + "Y" * 39 + "..."),
        id="mail-unknown-long-param-not-echoed-whole",
    ),
    pytest.param(
        crlf(EHLO, MAIL + " \u00e9t\u00e9=1"),
        crlf(*EHLO_OUT, SYNTAX + "Bad parameter syntax: '\\xe9t\\xe9=1'"),
        id="mail-param-syntax-echoed-in-ascii",
    ),
    pytest.param(
        crlf(EHLO, MAIL + " AUTH=<>"),
        crlf(*EHLO_OUT, "555 5.5.4 Unsupported parameter AUTH"),
        id="mail-auth-param-not-offered",
    ),
    pytest.param(
        crlf(EHLO, MAIL + " RET=FULL RET=HDRS"),
        crlf(*EHLO_OUT, SYNTAX + "Duplicate parameter"),
        id="mail-duplicate-param",
    ),
    pytest.param(
        crlf(EHLO, MAIL + " ENVID=" + "x" * 101),
        crlf(*EHLO_OUT, SYNTAX + "ENVID longer than 100 characters"),
        id="mail-envid-too-long",
    ),
    pytest.param(
        crlf(EHLO, MAIL + " ENVID=a+0Db"),
        crlf(*EHLO_OUT, SYNTAX + "ENVID must be printable ASCII"),
        id="mail-envid-control",
    ),
    pytest.param(
        crlf("HELO c.example", MAIL + " BODY=8BITMIME"),
        crlf("250 mx.example greets c.example", "555 5.5.4 Parameters require EHLO"),
        id="params-need-ehlo",
    ),
    # SMTPUTF8
    pytest.param(
        crlf(EHLO, "MAIL FROM:<jürgen@example.org> SMTPUTF8", "RCPT TO:<用户@例子.广告>"),
        crlf(*EHLO_OUT, MAIL_OK, RCPT_OK),
        id="smtputf8",
    ),
    pytest.param(
        crlf(EHLO, "MAIL FROM:<jürgen@example.org>"),
        crlf(*EHLO_OUT, "553 5.6.7 Non-ASCII address requires the SMTPUTF8 parameter"),
        id="utf8-sender-without-smtputf8",
    ),
    pytest.param(
        crlf(EHLO, MAIL, "RCPT TO:<jürgen@example.org>"),
        crlf(*EHLO_OUT, MAIL_OK, "553 5.6.7 Non-ASCII address requires the SMTPUTF8 parameter"),
        id="utf8-recipient-without-smtputf8",
    ),
    pytest.param(
        crlf(EHLO, "MAIL FROM:<a@b> SMTPUTF8=yes"),
        crlf(*EHLO_OUT, SYNTAX + "SMTPUTF8 takes no value"),
        id="smtputf8-value",
    ),
    # RCPT
    pytest.param(
        crlf(EHLO, MAIL, "RCPT TO:<Postmaster>", "RCPT TO:<postmaster@mx.example>"),
        crlf(*EHLO_OUT, MAIL_OK, RCPT_OK, RCPT_OK),
        id="postmaster",
    ),
    pytest.param(
        crlf(
            EHLO, MAIL, "RCPT TO: <r@example.net> NOTIFY=SUCCESS,DELAY ORCPT=rfc822;r+40example.net"
        ),
        crlf(*EHLO_OUT, MAIL_OK, RCPT_OK),
        id="rcpt-dsn",
    ),
    pytest.param(
        crlf(
            EHLO,
            MAIL,
            RCPT + " NOTIFY=NEVER,DELAY",
            RCPT + " NOTIFY=ALWAYS",
            RCPT + " ORCPT=rfc822;a+",
        ),
        crlf(
            *EHLO_OUT,
            MAIL_OK,
            SYNTAX + "NOTIFY=NEVER cannot be combined",
            SYNTAX + "Bad NOTIFY value",
            SYNTAX + "Bad xtext in ORCPT",
        ),
        id="rcpt-dsn-errors",
    ),
    pytest.param(
        crlf(EHLO, MAIL, RCPT + " SIZE=1"),
        crlf(*EHLO_OUT, MAIL_OK, "555 5.5.4 Unsupported parameter SIZE"),
        id="rcpt-unknown-param",
    ),
    pytest.param(
        crlf(EHLO, MAIL, "RCPT FROM:<a@b>", "RCPT TO:<a@b.>"),
        crlf(
            *EHLO_OUT,
            MAIL_OK,
            SYNTAX + "Syntax: RCPT TO:<address>",
            "501 5.1.3 Bad recipient address syntax: empty domain label",
        ),
        id="rcpt-syntax",
    ),
    pytest.param(
        crlf(EHLO, MAIL, RCPT, RCPT, RCPT, RCPT, RCPT),
        crlf(
            *EHLO_OUT,
            MAIL_OK,
            RCPT_OK,
            RCPT_OK,
            RCPT_OK,
            "452 4.5.3 Too many recipients",
            "452 4.5.3 Too many recipients",
        ),
        id="max-recipients",
    ),
    # Command line rules
    pytest.param(b"NOOP" + b" " * 506 + b"\r\n", crlf("250 2.0.0 OK"), id="line-512"),
    pytest.param(
        b"NOOP" + b" " * 507 + b"\r\nNOOP\r\n",
        crlf("500 5.5.2 Line too long", "250 2.0.0 OK"),
        id="line-513",
    ),
    pytest.param(
        b"NOOP\nNOOP\r\n", crlf("500 5.5.2 Bare CR or LF in command line"), id="bare-lf-command"
    ),
    pytest.param(
        b"NOOP\rNOOP\r\n", crlf("500 5.5.2 Bare CR or LF in command line"), id="bare-cr-command"
    ),
    pytest.param(b"NOOP\n", b"", id="bare-lf-is-no-line-end"),
    pytest.param(
        b"NO\x00OP\r\nHELO a\x01\r\n",
        crlf(
            "501 5.5.2 Control character in command line",
            "501 5.5.2 Control character in command line",
        ),
        id="control-characters",
    ),
    pytest.param(
        b"NOOP \xff\r\n", crlf("500 5.5.2 Command line is not valid UTF-8"), id="bad-utf8"
    ),
    pytest.param(
        crlf(EHLO, MAIL + " ENVID=" + "x" * 100 + " RET=FULL SIZE=100 BODY=8BITMIME"),
        crlf(*EHLO_OUT, MAIL_OK),
        id="long-mail-line",
    ),
]


@pytest.mark.parametrize(("data", "expected"), CONVERSATIONS)
def test_conversation(data: bytes, expected: bytes) -> None:
    assert converse(data).output == expected


@pytest.mark.parametrize(("data", "expected"), CONVERSATIONS)
def test_conversation_byte_by_byte(data: bytes, expected: bytes) -> None:
    """Pipelined or not, one byte at a time or all at once: the same replies."""
    assert converse([bytes([b]) for b in data]).output == expected


def test_bare_newline_replaced_in_commands_by_config() -> None:
    config = ServerConfig(HOST, bare_newline=BareNewline.REPLACE)
    assert converse(b"NOOP\nx\r\nRSET\rx\r\n", config).output == crlf(
        "250 2.0.0 OK", SYNTAX + "Syntax: RSET"
    )


# --- DATA ---------------------------------------------------------------------------

START = crlf(EHLO, MAIL, RCPT, "DATA")
START_OUT = crlf(*EHLO_OUT, MAIL_OK, RCPT_OK, GO_AHEAD)

DATA_CASES = [
    # (body on the wire, message delivered or None, reply after the terminator)
    (b".\r\n", b"", ACCEPTED),
    (b"Subject: x\r\n\r\nhello\r\n.\r\n", b"Subject: x\r\n\r\nhello\r\n", ACCEPTED),
    (b"..\r\n..x\r\n.x\r\n.\r\n", b".\r\n.x\r\nx\r\n", ACCEPTED),
    (b"a\r\n.\r\nNOOP\r\n", b"a\r\n", ACCEPTED + "\r\n250 2.0.0 OK"),
    (b"x" * 998 + b"\r\n.\r\n", b"x" * 998 + b"\r\n", ACCEPTED),
    (b"x" * 999 + b"\r\n.\r\n", None, "554 5.6.0 Message contains a line longer than 1000 octets"),
    (b"a\nb\r\n.\r\n", None, "554 5.6.0 Message contains bare CR or LF"),
    (b"a\rb\r\n.\r\n", None, "554 5.6.0 Message contains bare CR or LF"),
    # LF.LF, CR.CR and friends end nothing; what follows is still message data.
    (b"a\n.\nMAIL FROM:<evil@x>\r\n.\r\n", None, "554 5.6.0 Message contains bare CR or LF"),
    (b"a\r.\rQUIT\r\n.\r\n", None, "554 5.6.0 Message contains bare CR or LF"),
    (b"a\n.\r\nRSET\r\n.\r\n", None, "554 5.6.0 Message contains bare CR or LF"),
    (b"a\r\n.\nRSET\r\n.\r\n", None, "554 5.6.0 Message contains bare CR or LF"),
    (b"a\r\n\x00.\r\nRSET\r\n.\r\n", None, "554 5.6.0 Message contains a NUL octet"),
    (
        (b"y" * 78 + b"\r\n") * 30 + b".\r\n",
        None,
        "552 5.3.4 Message size exceeds fixed maximum message size",
    ),
]


@pytest.mark.parametrize(("wire", "message", "reply"), DATA_CASES)
def test_data(wire: bytes, message: bytes | None, reply: str) -> None:
    talk = converse(START + wire)
    assert talk.output == START_OUT + crlf(reply)
    assert [m.data for m in talk.messages] == ([] if message is None else [message])
    assert talk.protocol is not None
    assert talk.protocol.state is State.READY
    assert talk.protocol.envelope is None


def test_data_unended_keeps_reading() -> None:
    talk = converse(START + b"a\n.\nQUIT\n\r.\r")
    assert talk.output == START_OUT
    assert talk.protocol is not None
    assert talk.protocol.state is State.DATA
    assert talk.protocol.read_timeout == CONFIG.data_timeout


def test_data_replace_policy() -> None:
    config = ServerConfig(HOST, bare_newline=BareNewline.REPLACE)
    talk = converse(crlf(EHLO, MAIL, RCPT, "DATA") + b"a\nb\rc\r\n.\r\n", config)
    assert [m.data for m in talk.messages] == [b"a\r\nb\r\nc\r\n"]


def test_message_event_carries_envelope_and_session() -> None:
    talk = converse(
        crlf(
            EHLO,
            "MAIL FROM:<s@example.org> BODY=8BITMIME ENVID=abc RET=HDRS",
            "RCPT TO:<a@example.net> NOTIFY=NEVER",
            "RCPT TO:<b@example.net>",
            "DATA",
            "hi",
            ".",
        )
    )
    (message,) = talk.messages
    assert message.session == Session(helo="c.example", esmtp=True)
    assert message.envelope.sender == Mailbox("s", "example.org")
    assert message.envelope.params.envid == "abc"
    assert message.envelope.recipients == (
        AcceptedRecipient(
            Mailbox("a", "example.net"), RcptParameters(notify=frozenset({Notify.NEVER}))
        ),
        AcceptedRecipient(Mailbox("b", "example.net")),
    )
    assert received_protocol(message.session, message.envelope) == "ESMTP"
    assert "data" not in repr(message)


def test_large_message_in_small_pieces() -> None:
    config = ServerConfig(HOST, max_message_size=5_000_000)
    body = b"".join(
        b"line %07d ........................................\r\n" % i for i in range(60_000)
    )
    wire = START + body + b".\r\n"
    pieces = [wire[i : i + 4096] for i in range(0, len(wire), 4096)]
    talk = converse(pieces, config)
    assert [m.data for m in talk.messages] == [body]


def test_oversized_data_memory_stays_bounded() -> None:
    protocol = ServerProtocol(ServerConfig(HOST, max_message_size=10_000))
    protocol.data_to_send()
    seen: list[Event] = []
    drive(protocol, protocol.receive_data(START), accept_all, seen)
    chunk = (b"z" * 98 + b"\r\n") * 100
    for _ in range(1000):  # 10 MB
        assert protocol.receive_data(chunk) == []
        assert protocol._data is not None
        assert protocol._data._sink.buffered <= 10_000
        assert len(protocol._buffer) <= 1
    protocol.receive_data(b".\r\n")
    assert protocol.data_to_send().endswith(
        b"552 5.3.4 Message size exceeds fixed maximum message size\r\n"
    )


# --- BDAT ---------------------------------------------------------------------------

BDAT_START = crlf(EHLO, MAIL, RCPT)
BDAT_START_OUT = crlf(*EHLO_OUT, MAIL_OK, RCPT_OK)
TOO_BIG = "552 5.3.4 Message size exceeds fixed maximum message size"

BDAT_CASES = [
    # (input after MAIL/RCPT, messages delivered, replies)
    pytest.param(b"BDAT 5 LAST\r\nhello", [b"hello"], [ACCEPTED], id="one-chunk"),
    pytest.param(b"BDAT 0 LAST\r\n", [b""], [ACCEPTED], id="empty"),
    pytest.param(
        b"BDAT 3\r\nabcBDAT 5\r\n\r\n.\r\nBDAT 0 LAST\r\nQUIT\r\n",
        [b"abc\r\n.\r\n"],
        [
            "250 2.0.0 3 octets received",
            "250 2.0.0 5 octets received",
            ACCEPTED,
            "221 2.0.0 mx.example closing connection",
        ],
        id="chunks-raw-no-unstuffing",
    ),
    pytest.param(b"bdat 2 last\r\nok", [b"ok"], [ACCEPTED], id="lower-case"),
    pytest.param(
        b"BDAT 0\r\nBDAT 2 LAST\r\nab",
        [b"ab"],
        ["250 2.0.0 0 octets received", ACCEPTED],
        id="zero-chunk",
    ),
    pytest.param(
        b"BDAT 1500\r\n"
        + b"x" * 1500
        + b"BDAT 600 LAST\r\n"
        + b"y" * 600
        + b"BDAT 3 LAST\r\nabc"
        + b"RSET\r\n",
        [],
        [
            "250 2.0.0 1500 octets received",
            TOO_BIG,
            SEQ + "Send MAIL first; BDAT is out of sequence",
            "250 2.0.0 Reset OK",
        ],
        id="too-big-then-discard",
    ),
    pytest.param(
        b"BDAT 3\r\nabcDATA\r\nRSET\r\n",
        [],
        ["250 2.0.0 3 octets received", SEQ + "DATA not allowed during BDAT", "250 2.0.0 Reset OK"],
        id="no-data-after-bdat",
    ),
    pytest.param(
        b"BDAT 3\r\nabc" + crlf(MAIL, RCPT).decode().encode() + b"BDAT 1 LAST\r\nd",
        [b"abcd"],
        [
            "250 2.0.0 3 octets received",
            SEQ + "MAIL not allowed during BDAT",
            SEQ + "RCPT not allowed during BDAT",
            ACCEPTED,
        ],
        id="no-mail-during-bdat",
    ),
    pytest.param(
        b"BDAT x\r\nBDAT 4 NOW\r\nQUITBDAT 2 LAST\r\nhi",
        [b"hi"],
        [
            SYNTAX + "Syntax: BDAT chunk-size [LAST]",
            SYNTAX + "Syntax: BDAT chunk-size [LAST]",
            ACCEPTED,
        ],
        id="bdat-syntax-skips-chunk",
    ),
    pytest.param(
        b"BDAT 4 LAST\r\na\nb\r",
        [],
        ["554 5.6.0 Message contains bare CR or LF"],
        id="bdat-bare-lf",
    ),
    pytest.param(
        b"BDAT 5\r\nab\x00cdBDAT 1 LAST\r\neRSET\r\n",
        [],
        [
            "554 5.6.0 Message contains a NUL octet",
            SEQ + "Send MAIL first; BDAT is out of sequence",
            "250 2.0.0 Reset OK",
        ],
        id="bdat-nul",
    ),
    pytest.param(
        b"BDAT 2\r\nabNOOP\r\nBDAT 2 LAST\r\ncd",
        [b"abcd"],
        ["250 2.0.0 2 octets received", "250 2.0.0 OK", ACCEPTED],
        id="noop-between-chunks",
    ),
]


@pytest.mark.parametrize(("wire", "messages", "out"), BDAT_CASES)
def test_bdat(wire: bytes, messages: list[bytes], out: list[str]) -> None:
    talk = converse(BDAT_START + wire)
    assert talk.output == BDAT_START_OUT + crlf(*out)
    assert [m.data for m in talk.messages] == messages


@pytest.mark.parametrize(("wire", "messages", "out"), BDAT_CASES)
def test_bdat_byte_by_byte(wire: bytes, messages: list[bytes], out: list[str]) -> None:
    talk = converse([bytes([b]) for b in BDAT_START + wire])
    assert talk.output == BDAT_START_OUT + crlf(*out)
    assert [m.data for m in talk.messages] == messages


def test_bdat_out_of_sequence_skips_the_chunk() -> None:
    # The chunk says "RCPT ..." but is data: it must not run as a command.
    chunk = crlf(RCPT)
    talk = converse(crlf(EHLO, MAIL) + b"BDAT %d LAST\r\n" % len(chunk) + chunk + crlf("NOOP"))
    assert talk.output == crlf(*EHLO_OUT, MAIL_OK, "554 5.5.1 No valid recipients", "250 2.0.0 OK")
    assert not any(isinstance(e, RcptTo) for e in talk.events)


def test_bdat_data_start_is_a_decision() -> None:
    def refuse_data(event: DecisionEvent) -> Reply | None:
        return Reply(554, "5.7.1", "no data today") if isinstance(event, DataStart) else None

    talk = converse(BDAT_START + b"BDAT 4 LAST\r\nNOOPRSET\r\n", policy=refuse_data)
    assert talk.output == BDAT_START_OUT + crlf("554 5.7.1 no data today", "250 2.0.0 Reset OK")
    assert [e for e in talk.events if isinstance(e, DataStart)] == [DataStart(chunking=True)]
    assert talk.protocol is not None
    assert talk.protocol.envelope is None


# --- pipelining and pending decisions ------------------------------------------------


def test_processing_stops_at_each_decision() -> None:
    protocol = ServerProtocol(CONFIG)
    protocol.data_to_send()
    events = protocol.receive_data(crlf(EHLO, MAIL, RCPT, "NOOP"))
    assert events == [Helo("c.example", esmtp=True)]
    assert protocol.pending == events[0]
    assert protocol.data_to_send() == b""  # nothing is answered ahead of the decision
    assert protocol.receive_data(crlf("NOOP")) == []  # only buffered
    protocol.accept()
    assert protocol.data_to_send() == crlf(*EHLO_OUT)
    (mail,) = protocol.resume()
    assert mail == MailFrom(Mailbox("s", "example.org"), MailParameters())
    protocol.reject(Reply(451, "4.7.1", "try later"))
    assert protocol.resume() == []  # RCPT without MAIL: 503; the NOOPs: 250
    assert protocol.data_to_send() == crlf(
        "451 4.7.1 try later",
        SEQ + "Send MAIL first; RCPT is out of sequence",
        "250 2.0.0 OK",
        "250 2.0.0 OK",
    )


def test_pipelined_rejections_keep_replies_in_order() -> None:
    def policy(event: DecisionEvent) -> Reply | None:
        if isinstance(event, RcptTo) and event.recipient.local == "nobody":
            return Reply(550, "5.1.1", "no such user")
        return None

    talk = converse(
        crlf(
            EHLO,
            MAIL,
            "RCPT TO:<nobody@x.example>",
            RCPT,
            "RCPT TO:<nobody@y.example>",
            "DATA",
            "x",
            ".",
        ),
        policy=policy,
    )
    assert talk.output == crlf(
        *EHLO_OUT,
        MAIL_OK,
        "550 5.1.1 no such user",
        RCPT_OK,
        "550 5.1.1 no such user",
        GO_AHEAD,
        ACCEPTED,
    )
    (message,) = talk.messages
    assert [r.mailbox.local for r in message.envelope.recipients] == ["r"]


def test_all_recipients_rejected_then_data() -> None:
    talk = converse(
        crlf(EHLO, MAIL, RCPT, "DATA"),
        policy=lambda e: Reply(550, "5.1.1", "no") if isinstance(e, RcptTo) else None,
    )
    assert talk.output == crlf(*EHLO_OUT, MAIL_OK, "550 5.1.1 no", "554 5.5.1 No valid recipients")


def test_message_commit_holds_back_pipelined_commands() -> None:
    protocol = ServerProtocol(CONFIG)
    protocol.data_to_send()
    seen: list[Event] = []
    drive(protocol, protocol.receive_data(crlf(EHLO, MAIL, RCPT, "DATA")), accept_all, seen)
    events = protocol.receive_data(crlf("body", ".", MAIL, RCPT, "QUIT"))
    assert isinstance(events[-1], MessageReady)
    assert protocol.data_to_send() == crlf(*EHLO_OUT, MAIL_OK, RCPT_OK, GO_AHEAD)
    protocol.accept(replies.queued("Q1"))  # e.g. after the spool's fsync
    events = protocol.resume()
    assert isinstance(events[-1], MailFrom)
    assert protocol.data_to_send() == crlf("250 2.0.0 OK queued as Q1")


@pytest.mark.parametrize(
    ("event_type", "reply", "after"),
    [
        (Helo, Reply(550, "5.7.1", "go away"), "550 go away"),
        (MailFrom, Reply(550, "5.7.1", "not you"), "550 5.7.1 not you"),
        (DataStart, Reply(554, "5.7.1", "no"), "554 5.7.1 no"),
        (MessageReady, Reply(451, "4.3.0", "spool trouble"), "451 4.3.0 spool trouble"),
    ],
)
def test_policy_rejections(event_type: type[DecisionEvent], reply: Reply, after: str) -> None:
    talk = converse(
        crlf(EHLO, MAIL, RCPT, "DATA", "x", ".", "NOOP"),
        policy=lambda e: reply if isinstance(e, event_type) else None,
    )
    assert crlf(after) in talk.output
    assert talk.output.endswith(crlf("250 2.0.0 OK"))


def test_reject_with_421_closes() -> None:
    talk = converse(
        crlf(EHLO, MAIL, "NOOP"),
        policy=lambda e: replies.shutting_down(HOST) if isinstance(e, MailFrom) else None,
    )
    assert talk.output == crlf(
        *EHLO_OUT, "421 4.3.2 mx.example service shutting down, closing connection"
    )
    assert isinstance(talk.events[-1], Closed)
    assert talk.protocol is not None
    assert talk.protocol.closed


def test_decision_api_misuse() -> None:
    protocol = ServerProtocol(CONFIG)
    with pytest.raises(LocalProtocolError):
        protocol.accept()
    with pytest.raises(LocalProtocolError):
        protocol.reject(Reply(550, "5.0.0", "x"))
    protocol.receive_data(crlf(EHLO))
    with pytest.raises(LocalProtocolError):
        protocol.accept(replies.OK)  # the EHLO reply is the protocol's
    protocol.receive_data(b"")
    assert isinstance(protocol.pending, Helo)
    protocol.accept()
    protocol.receive_data(crlf(MAIL))
    with pytest.raises(LocalProtocolError):
        protocol.accept(Reply(550, "5.0.0", "not an acceptance"))
    protocol.receive_data(b"")
    with pytest.raises(LocalProtocolError):
        protocol.reject(replies.OK)
    with pytest.raises(LocalProtocolError):
        protocol.tls_started()


# --- STARTTLS -----------------------------------------------------------------------


def test_starttls_discards_buffered_plaintext_and_resets() -> None:
    protocol = ServerProtocol(TLS_CONFIG)
    protocol.data_to_send()
    seen: list[Event] = []
    drive(protocol, protocol.receive_data(crlf(EHLO)), accept_all, seen)
    assert protocol.data_to_send().endswith(b"250 STARTTLS\r\n")  # no AUTH without TLS
    injected = crlf(MAIL, RCPT)
    events = protocol.receive_data(crlf("STARTTLS") + injected)
    assert events == [StartTLS(discarded=len(injected))]
    assert protocol.data_to_send() == crlf("220 2.0.0 Ready to start TLS")
    assert protocol.state is State.TLS
    assert protocol.receive_data(crlf("NOOP")) == []  # plaintext before the handshake
    protocol.tls_started()
    assert protocol.session == Session(tls=True)
    drive(protocol, protocol.receive_data(crlf(MAIL, EHLO)), accept_all, seen)
    out = protocol.data_to_send()
    assert out.startswith(crlf(SEQ + "Send HELO or EHLO first"))
    assert b"STARTTLS" not in out
    assert b"250 AUTH PLAIN LOGIN\r\n" in out  # offered now that TLS is up
    assert protocol.session == Session(helo="c.example", esmtp=True, tls=True)


STARTTLS_CASES = [
    pytest.param(
        TLS_CONFIG, crlf("STARTTLS"), crlf(SEQ + "Send HELO or EHLO first"), id="before-ehlo"
    ),
    pytest.param(
        TLS_CONFIG,
        crlf("HELO c", "STARTTLS"),
        crlf("250 mx.example greets c", SEQ + "Send EHLO first"),
        id="after-helo",
    ),
    pytest.param(TLS_CONFIG, crlf(EHLO, "STARTTLS now"), None, id="argument"),
    pytest.param(
        CONFIG,
        crlf(EHLO, "STARTTLS"),
        crlf(*EHLO_OUT, "502 5.5.1 STARTTLS not available"),
        id="not-configured",
    ),
    pytest.param(TLS_CONFIG, crlf(EHLO, MAIL, "STARTTLS"), None, id="in-transaction"),
]


@pytest.mark.parametrize(("config", "data", "expected"), STARTTLS_CASES)
def test_starttls_refused(config: ServerConfig, data: bytes, expected: bytes | None) -> None:
    talk = converse(data, config)
    if expected is not None:
        assert talk.output == expected
    assert not any(isinstance(e, StartTLS) for e in talk.events)
    assert not talk.output.endswith(b"Ready to start TLS\r\n")


def test_starttls_twice() -> None:
    talk = converse(
        [crlf(EHLO, "STARTTLS"), crlf(EHLO, "STARTTLS")], TLS_CONFIG, tls_on_starttls=True
    )
    assert talk.output.endswith(crlf(SEQ + "TLS already active"))


# --- AUTH ---------------------------------------------------------------------------


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


PLAIN = b64(b"\0alice\0secret")
AUTH_OK = "235 2.7.0 Authentication successful"
CHALLENGE_1 = "334 VXNlcm5hbWU6"  # base64 of the LOGIN prompts
CHALLENGE_2 = "334 UGFzc3dvcmQ6"

AUTH_CASES = [
    pytest.param(
        ["AUTH PLAIN " + PLAIN], [AUTH_OK], ("PLAIN", "", "alice", "secret"), id="plain-initial"
    ),
    pytest.param(
        ["AUTH plain", PLAIN],
        ["334 ", AUTH_OK],
        ("PLAIN", "", "alice", "secret"),
        id="plain-challenge",
    ),
    pytest.param(
        ["AUTH PLAIN " + b64(b"boss\0alice\0s3cr\xc3\xa9t")],
        [AUTH_OK],
        ("PLAIN", "boss", "alice", "s3crét"),
        id="plain-authzid-utf8",
    ),
    pytest.param(
        ["AUTH LOGIN", b64(b"alice"), b64(b"secret")],
        [CHALLENGE_1, CHALLENGE_2, AUTH_OK],
        ("LOGIN", "", "alice", "secret"),
        id="login",
    ),
    pytest.param(
        ["AUTH LOGIN " + b64(b"alice"), b64(b"secret")],
        [CHALLENGE_2, AUTH_OK],
        ("LOGIN", "", "alice", "secret"),
        id="login-initial",
    ),
    pytest.param(
        ["AUTH PLAIN", "*", "NOOP"],
        ["334 ", "501 5.0.0 Authentication cancelled", "250 2.0.0 OK"],
        None,
        id="cancel-plain",
    ),
    pytest.param(
        ["AUTH LOGIN", b64(b"alice"), "*"],
        [CHALLENGE_1, CHALLENGE_2, "501 5.0.0 Authentication cancelled"],
        None,
        id="cancel-login",
    ),
    pytest.param(
        ["AUTH PLAIN not*base64"],
        ["501 5.5.2 Cannot decode response"],
        None,
        id="bad-base64-initial",
    ),
    pytest.param(
        ["AUTH PLAIN", "%%%"],
        ["334 ", "501 5.5.2 Cannot decode response"],
        None,
        id="bad-base64-response",
    ),
    pytest.param(
        ["AUTH PLAIN =", "NOOP"],
        [SYNTAX + "Malformed PLAIN response", "250 2.0.0 OK"],
        None,
        id="plain-empty",
    ),
    pytest.param(
        ["AUTH PLAIN " + b64(b"alice\0secret")],
        [SYNTAX + "Malformed PLAIN response"],
        None,
        id="plain-malformed",
    ),
    pytest.param(
        ["AUTH CRAM-MD5"],
        ["504 5.5.4 Unrecognized authentication mechanism"],
        None,
        id="unknown-mechanism",
    ),
    pytest.param(
        ["AUTH"], [SYNTAX + "Syntax: AUTH mechanism [initial-response]"], None, id="no-mechanism"
    ),
    pytest.param(
        ["AUTH PLAIN " + PLAIN, "AUTH PLAIN " + PLAIN],
        [AUTH_OK, SEQ + "Already authenticated"],
        ("PLAIN", "", "alice", "secret"),
        id="twice",
    ),
    pytest.param(
        [MAIL, "AUTH PLAIN " + PLAIN],
        [MAIL_OK, SEQ + "AUTH not allowed during a mail transaction"],
        None,
        id="in-transaction",
    ),
]


@pytest.mark.parametrize(("lines", "out", "credentials"), AUTH_CASES)
def test_auth(
    lines: list[str], out: list[str], credentials: tuple[str, str, str, str] | None
) -> None:
    talk = converse(crlf(EHLO, *lines), AUTH_CONFIG)
    assert talk.output.split(b"250 AUTH PLAIN LOGIN\r\n", 1)[1] == crlf(*out)
    requests = [e for e in talk.events if isinstance(e, AuthRequest)]
    if credentials is None:
        assert requests == []
    else:
        assert (
            requests[0].mechanism,
            requests[0].authzid,
            requests[0].username,
            requests[0].password,
        ) == credentials
        assert talk.protocol is not None
        assert talk.protocol.session.auth_user == credentials[2]
        assert "secret" not in repr(requests[0])


def test_auth_failure_counts_as_error() -> None:
    config = ServerConfig(HOST, auth_enabled=True, auth_plaintext_allowed=True, max_errors=2)
    talk = converse(
        crlf(EHLO, *["AUTH PLAIN " + PLAIN] * 3),
        config,
        policy=lambda e: replies.AUTH_FAILED if isinstance(e, AuthRequest) else None,
    )
    assert talk.output.split(b"250 AUTH PLAIN LOGIN\r\n", 1)[1] == crlf(
        "535 5.7.8 Authentication credentials invalid",
        "535 5.7.8 Authentication credentials invalid",
        "421 4.7.0 mx.example too many errors, closing connection",
    )
    assert talk.protocol is not None
    assert talk.protocol.session.auth_user is None


def test_auth_line_too_long() -> None:
    talk = converse(crlf(EHLO, "AUTH PLAIN") + b"A" * 13000 + b"\r\n" + crlf("NOOP"), AUTH_CONFIG)
    assert talk.output.endswith(
        crlf("334 ", "500 5.5.6 Authentication exchange line is too long", "250 2.0.0 OK")
    )


def test_auth_initial_response_may_exceed_512_octets() -> None:
    user = b"u" * 400
    talk = converse(crlf(EHLO, "AUTH PLAIN " + b64(b"\0" + user + b"\0" + b"p" * 400)), AUTH_CONFIG)
    assert talk.output.endswith(crlf(AUTH_OK))


@pytest.mark.parametrize(
    ("config", "advertised", "reply"),
    [
        (ServerConfig(HOST), False, "502 5.5.1 AUTH not available"),
        (
            ServerConfig(HOST, auth_enabled=True),
            False,
            "538 5.7.11 Encryption required for requested authentication mechanism",
        ),
        (
            ServerConfig(HOST, auth_enabled=True, tls_available=True),
            False,
            "538 5.7.11 Encryption required for requested authentication mechanism",
        ),
        (AUTH_CONFIG, True, AUTH_OK),
    ],
)
def test_auth_only_when_offered(config: ServerConfig, advertised: bool, reply: str) -> None:
    talk = converse(crlf(EHLO, "AUTH PLAIN " + PLAIN), config)
    assert (b"AUTH PLAIN LOGIN" in talk.output) is advertised
    assert talk.output.endswith(crlf(reply))


def test_auth_needs_ehlo() -> None:
    talk = converse(crlf("HELO c", "AUTH PLAIN " + PLAIN), AUTH_CONFIG)
    assert talk.output.endswith(crlf(SEQ + "Send EHLO first"))


def test_mail_auth_parameter_when_auth_offered() -> None:
    talk = converse(crlf(EHLO, MAIL + " AUTH=<>"), AUTH_CONFIG)
    (mail,) = [e for e in talk.events if isinstance(e, MailFrom)]
    assert mail.params.auth == "<>"


# --- error limit, closing, timeouts ------------------------------------------------


def test_error_limit_closes_with_421() -> None:
    config = ServerConfig(HOST, max_errors=3)
    talk = converse(crlf("FOO", "BAR", "NOOP", "BAZ", "QUX", "NOOP"), config)
    assert talk.output == crlf(
        "500 5.5.2 Command not recognized",
        "500 5.5.2 Command not recognized",
        "250 2.0.0 OK",
        "500 5.5.2 Command not recognized",
        "421 4.7.0 mx.example too many errors, closing connection",
    )
    assert isinstance(talk.events[-1], Closed)


def test_junk_commands_past_their_limit_count_as_errors() -> None:
    config = ServerConfig(HOST, max_errors=2, max_junk_commands=3)
    talk = converse(crlf("NOOP", "RSET", "VRFY x", "NOOP", "RSET", "NOOP", "NOOP"), config)
    assert talk.output == crlf(
        "250 2.0.0 OK",
        "250 2.0.0 Reset OK",
        str(replies.VRFY_CANNOT),
        "250 2.0.0 OK",  # the 4th junk command: answered, and error 1
        "250 2.0.0 Reset OK",  # error 2
        "421 4.7.0 mx.example too many errors, closing connection",
    )
    assert isinstance(talk.events[-1], Closed)


def test_an_accepted_message_resets_the_junk_count() -> None:
    config = ServerConfig(HOST, max_errors=1, max_junk_commands=2)
    message = ("MAIL FROM:<a@b.example>", "RCPT TO:<c@d.example>", "DATA", "hi", ".")
    talk = converse(crlf(EHLO, "NOOP", "NOOP", *message, "NOOP", "NOOP", "NOOP"), config)
    assert talk.protocol is not None
    assert not talk.protocol.closed  # 2 free, a message, 2 free, then the 1 error allowed
    assert len(talk.messages) == 1
    talk = converse(crlf(EHLO, "NOOP", "NOOP", "NOOP", "NOOP"), config)
    assert talk.protocol is not None and talk.protocol.closed


def test_error_limit_on_ehlo_has_no_enhanced_code() -> None:
    talk = converse(crlf("EHLO", "EHLO"), ServerConfig(HOST, max_errors=1))
    assert talk.output == crlf(
        "501 Syntax: EHLO hostname", "421 mx.example too many errors, closing connection"
    )


def test_quit_closes_and_ignores_the_rest() -> None:
    talk = converse([crlf("QUIT", "NOOP"), crlf("NOOP")])
    assert talk.output == crlf("221 2.0.0 mx.example closing connection")
    assert talk.events == [Closed(replies.closing(HOST))]


def test_close_from_the_server_side() -> None:
    protocol = ServerProtocol(CONFIG)
    protocol.data_to_send()
    protocol.receive_data(crlf(EHLO))
    protocol.close(replies.timed_out(HOST))
    assert protocol.closed
    assert protocol.pending is None
    assert protocol.data_to_send() == crlf(
        "421 4.4.2 mx.example timeout exceeded, closing connection"
    )
    protocol.close(replies.timed_out(HOST))
    assert protocol.data_to_send() == b""


@pytest.mark.parametrize(
    "kwargs",
    [
        {"hostname": ""},
        {"hostname": "a b"},
        {"hostname": "a\nb"},
        {"hostname": "h", "max_message_size": 0},
        {"hostname": "h", "max_recipients": 0},
        {"hostname": "h", "max_errors": -1},
        {"hostname": "h", "max_junk_commands": -1},
        {"hostname": "h", "max_refused_recipients": -1},
        {"hostname": "h", "max_recipient_overshoot": -1},
        {"hostname": "h", "command_timeout": 0},
    ],
)
def test_config_validation(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        ServerConfig(**kwargs)


def test_read_timeout_hint() -> None:
    config = ServerConfig(HOST, command_timeout=300.0, data_timeout=600.0)
    protocol = ServerProtocol(config)
    assert protocol.read_timeout == 300.0


def in_transaction(config: ServerConfig) -> ServerProtocol:
    proto = ServerProtocol(config)
    proto.receive_data(b"EHLO c\r\n")
    proto.accept()
    proto.receive_data(b"MAIL FROM:<a@b.example>\r\n")
    proto.accept()
    proto.data_to_send()
    return proto


def test_refused_recipients_past_their_limit_end_the_session() -> None:
    """A directory harvest: each 5xx to RCPT counts; past the limit the answer is 421."""
    proto = in_transaction(ServerConfig(HOST, max_refused_recipients=2))
    for expected in (b"550", b"550", b"421"):
        proto.receive_data(b"RCPT TO:<x@d.example>\r\n")
        proto.reject(Reply(550, "5.1.1", "No such user"))
        assert proto.data_to_send()[:3] == expected
    assert proto.closed and proto.errors == 0  # a count of their own, not max_errors


def test_recipients_past_the_overshoot_limit_count_as_errors() -> None:
    """452 past max_recipients is free up to max_recipient_overshoot in a transaction;
    each one after also counts as an error, so the session ends at max_errors."""
    config = ServerConfig(HOST, max_recipients=1, max_recipient_overshoot=2, max_errors=2)
    proto = in_transaction(config)
    got: list[bytes] = []
    for _ in range(6):
        proto.receive_data(b"RCPT TO:<x@d.example>\r\n")
        if proto.pending is not None:
            proto.accept()
        got.append(proto.data_to_send()[:3])
    assert got == [b"250", b"452", b"452", b"452", b"452", b"421"]
    assert proto.closed and proto.errors == 3


def test_the_overshoot_count_starts_again_with_each_transaction() -> None:
    config = ServerConfig(HOST, max_recipients=1, max_recipient_overshoot=2, max_errors=2)
    proto = in_transaction(config)
    for _ in range(3):  # one accepted, two free 452s, then a new transaction
        proto.receive_data(b"RCPT TO:<x@d.example>\r\n")
        if proto.pending is not None:
            proto.accept()
    proto.receive_data(b"RSET\r\nMAIL FROM:<a@b.example>\r\n")
    proto.accept()
    proto.data_to_send()
    for _ in range(3):
        proto.receive_data(b"RCPT TO:<x@d.example>\r\n")
        if proto.pending is not None:
            proto.accept()
    assert proto.errors == 0 and not proto.closed
    assert proto.data_to_send().count(b"452 ") == 2


def test_temporary_refusals_and_an_unlimited_engine_never_end_the_session() -> None:
    proto = in_transaction(ServerConfig(HOST, max_refused_recipients=1))
    for _ in range(3):
        proto.receive_data(b"RCPT TO:<x@d.example>\r\n")
        proto.reject(Reply(450, "4.7.1", "Try later"))  # the server's trouble
    proto = in_transaction(ServerConfig(HOST))  # 0: no limit, the engine's default
    for _ in range(50):
        proto.receive_data(b"RCPT TO:<x@d.example>\r\n")
        proto.reject(Reply(550, "5.1.1", "No such user"))
    assert not proto.closed


def test_mid_line_says_when_a_command_line_is_part_way_in() -> None:
    """What a per-line deadline times: a begun line, not the wait between lines."""
    proto = ServerProtocol(AUTH_CONFIG)
    assert not proto.mid_line and proto.reads == 0
    proto.receive_data(b"NO")
    assert proto.mid_line and proto.reads == 0
    proto.receive_data(b"OP\r\nNO")  # one line ended, the next began
    assert proto.mid_line and proto.reads == 1
    proto.receive_data(b"OP\r\n")
    assert not proto.mid_line and proto.reads == 2
    # An over-long line is dropped as it comes: nothing buffered, still part-way in.
    proto.receive_data(b"X" * 3000)
    assert proto.mid_line and proto.reads == 2
    proto.receive_data(b"\r\n")
    assert not proto.mid_line and proto.reads == 3
    assert proto.data_to_send().endswith(b"500 5.5.2 Line too long\r\n")


def test_mid_line_is_false_while_a_decision_is_pending_and_in_data() -> None:
    proto = ServerProtocol(AUTH_CONFIG)
    proto.receive_data(b"EHLO c\r\nMAIL FROM:<a@b.example>\r\nRC")
    assert proto.pending is not None and not proto.mid_line  # the wait is the server's
    proto.accept()
    proto.resume()
    proto.accept()
    assert proto.mid_line  # "RC" now waits for its client
    proto.receive_data(b"PT TO:<c@d.example>\r\n")
    proto.accept()
    proto.receive_data(b"DATA\r\n")
    proto.accept()
    proto.receive_data(b"Subject: part")
    assert proto.state is State.DATA and not proto.mid_line  # the data rate's business


def test_a_refused_chunk_being_skipped_is_data_not_a_line() -> None:
    proto = ServerProtocol(AUTH_CONFIG)
    proto.receive_data(b"BDAT 10 LAST\r\nabc")
    assert proto.data_to_send().endswith(b"503 5.5.1 Send HELO or EHLO first\r\n")
    assert proto.skipping and not proto.mid_line  # a data rate times these octets
    proto.receive_data(b"defghijNO")
    assert not proto.skipping and proto.mid_line  # the chunk is over: "NO" is a line


def test_mid_line_times_auth_lines_too() -> None:
    proto = ServerProtocol(AUTH_CONFIG)
    proto.receive_data(b"EHLO c\r\n")
    proto.accept()
    proto.receive_data(b"AUTH PLAIN\r\nAGFsaWNl")
    assert proto.state is State.AUTH and proto.mid_line


# --- tables and helpers --------------------------------------------------------------


def test_transition_table_covers_every_state() -> None:
    sources = {state for state, _ in TRANSITIONS}
    targets = set(TRANSITIONS.values())
    assert sources | targets == set(State)
    assert all((state, Step.CLOSE) in TRANSITIONS for state in State if state is not State.CLOSED)
    assert set(ALLOWED) == set(Verb)
    assert all(ALLOWED[verb] for verb in Verb)


def test_a_session_has_only_slots() -> None:
    """No per-instance dict: the engine is split over two classes (core.ProtocolCore
    holds the slots), and an idle session must stay as small as one object of slots."""
    protocol = ServerProtocol(CONFIG)
    assert not hasattr(protocol, "__dict__")
    with pytest.raises(AttributeError):
        protocol.extra = 1  # type: ignore[attr-defined]


def test_the_session_facts_an_idle_client_keeps_have_only_slots() -> None:
    """The `Session` made at EHLO lives as long as the connection: thousands of idle
    clients each keep one, so it is an object of slots too (issue 12's idle target)."""
    protocol = ServerProtocol(CONFIG)
    protocol.receive_data(b"EHLO client.test\r\n")
    assert isinstance(protocol.pending, Helo)
    protocol.accept()
    assert protocol.session.helo == "client.test" and protocol.session.esmtp
    assert not hasattr(protocol.session, "__dict__")
    with pytest.raises(FrozenInstanceError):
        protocol.session.helo = "other.test"  # type: ignore[misc]


@pytest.mark.parametrize(
    ("session", "smtputf8", "keyword"),
    [
        (Session(helo="x"), False, "SMTP"),
        (Session(helo="x", esmtp=True), False, "ESMTP"),
        (Session(helo="x", esmtp=True, tls=True), False, "ESMTPS"),
        (Session(helo="x", esmtp=True, auth_user="a"), False, "ESMTPA"),
        (Session(helo="x", esmtp=True, tls=True, auth_user="a"), False, "ESMTPSA"),
        (Session(helo="x", esmtp=True, tls=True, auth_user="a"), True, "UTF8SMTPSA"),
    ],
)
def test_received_protocol(session: Session, smtputf8: bool, keyword: str) -> None:
    envelope = Transaction(None, MailParameters(smtputf8=smtputf8))
    assert received_protocol(session, envelope) == keyword


@pytest.mark.parametrize(
    ("reply", "wire"),
    [
        (Reply(250, "2.0.0", "OK"), b"250 2.0.0 OK\r\n"),
        (Reply(220, None, "hi"), b"220 hi\r\n"),
        (Reply(250, None, ("a", "b", "c")), b"250-a\r\n250-b\r\n250 c\r\n"),
        (Reply(550, "5.1.1", ("a", "b")), b"550-5.1.1 a\r\n550 5.1.1 b\r\n"),
        (Reply(334, None, ""), b"334 \r\n"),
    ],
)
def test_reply_to_bytes(reply: Reply, wire: bytes) -> None:
    assert reply.to_bytes() == wire


@pytest.mark.parametrize(
    ("code", "enhanced", "text"),
    [
        (250, None, "a\r\n250 injected"),
        (250, None, "a\nb"),
        (250, None, "nul\x00"),
        (250, "5.0.0", "mismatch"),
        (354, "2.0.0", "3xx has none"),
        (250, "2.0", "short"),
        (600, None, "code"),
        (199, None, "code"),
        (250, None, ()),
    ],
)
def test_reply_guards(code: int, enhanced: str | None, text: str | tuple[str, ...]) -> None:
    with pytest.raises(ValueError):
        Reply(code, enhanced, text)


def test_the_ehlo_greeting_line_fits_512_octets_with_the_longest_names() -> None:
    """Our name may be a full 253-octet domain; a client's EHLO name of 255 octets was
    echoed after it, making a 522-octet line (RFC 5321 4.5.3.1.5 allows 512)."""
    ours = ".".join(["a" * 63, "b" * 63, "c" * 63, "d" * 61])
    theirs = ".".join(["e" * 63, "f" * 63, "g" * 63, "h" * 63])
    assert (len(ours), len(theirs)) == (253, 255)
    for command in ("EHLO", "HELO"):
        out = converse(crlf(f"{command} {theirs}"), ServerConfig(ours)).output
        assert out.startswith(
            f"250{'-' if command == 'EHLO' else ' '}{ours} greets you\r\n".encode()
        )
        assert max(len(line) + 2 for line in out.split(b"\r\n")) <= 512
    shorter = ".".join(["e" * 63, "f" * 63, "g" * 63, "h" * 53])  # 245: just fits
    out = converse(crlf(f"EHLO {shorter}"), ServerConfig(ours)).output
    assert out.startswith(f"250-{ours} greets {shorter}\r\n".encode())
    assert len(out.split(b"\r\n")[0]) + 2 == 512
