"""Delivery status notifications (RFC 3464 / RFC 6533) as built by leafmail.delivery.bounce.

Every DSN is parsed back with Python's email package (policy=default), and the
delivery-status part is also read from the raw bytes, so both a real MIME parser and
the exact wire format are checked: structure, fields, CRLF-only line ends, the returned
original (whole or headers only), and that nothing a remote server says can add a field,
a part or a line.
"""

from __future__ import annotations

import email
import email.message
import email.policy
import email.utils
import re
import secrets
from collections.abc import Sequence
from dataclasses import replace

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from leafmail.delivery import Outcome, Result
from leafmail.delivery.bounce import (
    DOUBLE_BOUNCE_ENVID,
    FULL_MESSAGE_LIMIT,
    Action,
    Notice,
    build_dsn,
    is_double_bounce,
    notify_after_expansion,
    wants_dsn,
)
from leafmail.delivery.session import mail_options
from leafmail.envelope import ClientInfo, Envelope, Recipient

HOSTNAME = "mx.test"
QID = "0123456789ABCDEF01234567"
SENDER = "alice@example.test"
ARRIVAL = 1_700_000_000.0
NOW = ARRIVAL + 3600.0
REMOTE = "smarthost.test:587"
ORIGINAL = (
    b"From: Alice <alice@example.test>\r\n"
    b"To: Bob <bob@example.test>\r\n"
    b"Subject: the original\r\n"
    b"Message-ID: <orig-1@example.test>\r\n"
    b"\r\n"
    b"The body of the original.\r\n"
    b"Second line.\r\n"
)

# The only field names a DSN's status part may have (RFC 3464 2.2, 2.3, plus ours).
PER_MESSAGE = {"Reporting-MTA", "X-Leafmail-Queue-ID", "Original-Envelope-Id", "Arrival-Date"}
PER_RECIPIENT = {
    "Original-Recipient",
    "Final-Recipient",
    "Action",
    "Status",
    "Remote-MTA",
    "Diagnostic-Code",
    "Last-Attempt-Date",
    "Will-Retry-Until",
}


def envelope(
    *rcpts: Recipient,
    sender: str = SENDER,
    smtputf8: bool = False,
    ret: str | None = None,
    envid: str | None = None,
) -> Envelope:
    return Envelope(
        sender=sender,
        recipients=rcpts or (Recipient("bob@example.test"),),
        client=ClientInfo("192.0.2.1", 40000, "client.test", "ESMTP"),
        smtputf8=smtputf8,
        ret=ret,
        envid=envid,
    )


def failure(text: str = "5.1.1 no such user", code: int = 550, remote: str = REMOTE) -> Result:
    return Result.from_reply(code, text, remote)


def dsn(
    env: Envelope,
    results: Sequence[Result] | None = None,
    *,
    data: bytes = ORIGINAL,
    delayed: bool = False,
    retry_until: float | None = None,
) -> tuple[Envelope, bytes]:
    results = results or [failure() for _ in env.recipients]
    notices = [Notice(r, res) for r, res in zip(env.recipients, results, strict=True)]
    return build_dsn(
        hostname=HOSTNAME,
        qid=QID,
        envelope=env,
        data=data,
        notices=notices,
        arrival=ARRIVAL,
        now=NOW,
        delayed=delayed,
        retry_until=retry_until,
    )


def parse(blob: bytes) -> email.message.EmailMessage:
    msg = email.message_from_bytes(blob, policy=email.policy.default)
    assert isinstance(msg, email.message.EmailMessage)
    return msg


def parts(blob: bytes) -> list[email.message.EmailMessage]:
    msg = parse(blob)
    assert msg.get_content_type() == "multipart/report"
    found = list(msg.iter_parts())
    assert all(isinstance(p, email.message.EmailMessage) for p in found)
    return found  # type: ignore[return-value]


def raw_parts(blob: bytes) -> list[tuple[bytes, bytes]]:
    """(head, body) of each MIME part, cut at the boundary from the raw bytes."""
    boundary = parse(blob).get_boundary()
    assert boundary is not None
    delimiter = b"\r\n--" + boundary.encode()
    pieces = blob.split(delimiter)
    assert pieces[-1] == b"--\r\n", "the close delimiter ends the message"
    out = []
    for piece in pieces[1:-1]:
        assert piece.startswith(b"\r\n")
        head, sep, body = piece[2:].partition(b"\r\n\r\n")
        assert sep
        out.append((head, body))
    return out


def status_blocks(blob: bytes) -> list[list[tuple[str, str]]]:
    """The delivery-status part as blocks of (name, value), straight from the bytes."""
    _, body = raw_parts(blob)[1]
    assert body.endswith(b"\r\n")
    blocks = []
    for block in body[:-2].split(b"\r\n\r\n"):
        fields = []
        for line in block.decode("utf-8").split("\r\n"):
            match = re.fullmatch(r"([A-Za-z0-9-]+): (.*)", line)
            assert match, f"not a field line: {line!r}"
            fields.append((match[1], match[2]))
        blocks.append(fields)
    return blocks


def blocks_of(part: email.message.Message) -> list[email.message.Message]:
    """The email package's view of a message/delivery-status part: one Message a block."""
    payload = part.get_payload()
    assert isinstance(payload, list)
    blocks = [b for b in payload if isinstance(b, email.message.Message)]
    assert len(blocks) == len(payload)
    return blocks


def field(block: list[tuple[str, str]], name: str) -> str:
    values = [v for n, v in block if n == name]
    assert len(values) == 1, f"{name}: {values}"
    return values[0]


def bare_newlines(blob: bytes) -> list[int]:
    """Offsets of LF not after CR and of CR not before LF."""
    return [m.start() for m in re.finditer(rb"(?<!\r)\n|\r(?!\n)", blob)]


# --- structure -----------------------------------------------------------------------


def test_failure_dsn_structure_and_fields() -> None:
    env = envelope(
        Recipient("bob@example.test", ("FAILURE",), "rfc822;bob@example.test"),
        Recipient("carol@example.test"),
        envid="QQ314159",
    )
    dsn_env, blob = dsn(env, [failure(), Result.failed("5.3.4", "message too big")])

    msg = parse(blob)
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "delivery-status"
    assert msg["From"] == f"Mail Delivery System <MAILER-DAEMON@{HOSTNAME}>"
    assert msg["To"].addresses[0].addr_spec == SENDER
    assert f"\r\nTo: <{SENDER}>\r\n".encode() in blob
    assert msg["Subject"] == "Undelivered Mail Returned to Sender"
    assert msg["Auto-Submitted"] == "auto-replied"
    assert msg["MIME-Version"] == "1.0"
    assert msg["Message-ID"].endswith(f"@{HOSTNAME}>")
    assert email.utils.parsedate_to_datetime(msg["Date"]).timestamp() == NOW
    assert msg.defects == []

    text, status, original = parts(blob)
    assert text.get_content_type() == "text/plain"
    assert text.get_content_charset() == "utf-8"
    explanation = text.get_content()
    assert "<bob@example.test>: 550 5.1.1 no such user" in explanation
    assert "<carol@example.test>: 554 5.3.4 message too big" in explanation
    assert status.get_content_type() == "message/delivery-status"
    assert original.get_content_type() == "message/rfc822"

    # The email package splits message/delivery-status into its blocks.
    per_message, bob, carol = blocks_of(status)
    assert per_message["Reporting-MTA"] == f"dns; {HOSTNAME}"
    assert per_message["X-Leafmail-Queue-ID"] == QID
    assert per_message["Original-Envelope-Id"] == "QQ314159"
    assert email.utils.parsedate_to_datetime(per_message["Arrival-Date"]).timestamp() == ARRIVAL
    assert bob["Original-Recipient"] == "rfc822;bob@example.test"
    assert bob["Final-Recipient"] == "rfc822; bob@example.test"
    assert bob["Action"] == "failed"
    assert bob["Status"] == "5.1.1"
    assert bob["Remote-MTA"] == "dns; smarthost.test"  # the host, not host:port
    assert bob["Diagnostic-Code"] == "smtp; 550 5.1.1 no such user"
    assert email.utils.parsedate_to_datetime(bob["Last-Attempt-Date"]).timestamp() == NOW
    assert bob["Will-Retry-Until"] is None
    # A failure of our own (no remote) has no Remote-MTA and no smtp diagnostic type.
    assert carol["Original-Recipient"] is None
    assert carol["Final-Recipient"] == "rfc822; carol@example.test"
    assert carol["Status"] == "5.3.4"
    assert carol["Remote-MTA"] is None
    assert carol["Diagnostic-Code"] == "X-Leafmail; 554 5.3.4 message too big"

    # The original comes back whole.
    [inner] = blocks_of(original)
    assert inner["Subject"] == "the original"
    assert inner["Message-ID"] == "<orig-1@example.test>"
    _, original_body = raw_parts(blob)[2]
    assert original_body == ORIGINAL

    # And the DSN itself goes from <> to the original sender.
    assert dsn_env.sender == ""
    assert [r.address for r in dsn_env.recipients] == [SENDER]
    assert dsn_env.recipients[0].notify == ()
    assert dsn_env.body == "7BIT"
    assert dsn_env.smtputf8 is False
    assert dsn_env.client.protocol == "local"
    assert (dsn_env.ret, dsn_env.envid) == (None, None)


def test_every_date_of_a_dsn_has_a_numeric_zone() -> None:
    """RFC 5322 3.3: a zone is "+hhmm"; "GMT" is obsolete syntax (4.3), which must not be
    generated. Postfix writes "+0000 (UTC)"."""
    _, blob = dsn(envelope(Recipient("bob@example.test")))
    dates = re.findall(rb"^(?:Date|Arrival-Date|Last-Attempt-Date): (.*)\r$", blob, re.M)
    assert len(dates) == 3
    for date in dates:
        assert re.fullmatch(
            rb"[A-Z][a-z]{2}, \d{2} [A-Z][a-z]{2} \d{4} \d\d:\d\d:\d\d \+0000", date
        ), date


def test_raw_status_part_matches_the_parsed_one() -> None:
    env = envelope(Recipient("bob@example.test"), Recipient("carol@example.test"))
    _, blob = dsn(env)
    blocks = status_blocks(blob)
    assert len(blocks) == 3
    assert {n for n, _ in blocks[0]} <= PER_MESSAGE
    for block in blocks[1:]:
        assert {n for n, _ in block} <= PER_RECIPIENT
        assert field(block, "Action") == "failed"
    assert [field(b, "Final-Recipient") for b in blocks[1:]] == [
        "rfc822; bob@example.test",
        "rfc822; carol@example.test",
    ]
    head, _ = raw_parts(blob)[1]
    assert head == b"Content-Type: message/delivery-status\r\nContent-Transfer-Encoding: 7bit"


def test_delay_dsn() -> None:
    env = envelope(Recipient("slow@example.test"))
    until = ARRIVAL + 5 * 86400
    deferred = Result.from_reply(451, "4.2.1 mailbox busy", REMOTE)
    _, blob = dsn(env, [deferred], delayed=True, retry_until=until)
    msg = parse(blob)
    assert msg["Subject"] == "Delayed Mail (still being retried)"
    text, status, _ = parts(blob)
    assert "not yet been delivered" in text.get_content()
    rcpt = blocks_of(status)[1]
    assert rcpt["Action"] == "delayed"
    assert rcpt["Status"] == "4.2.1"
    assert rcpt["Diagnostic-Code"] == "smtp; 451 4.2.1 mailbox busy"
    assert email.utils.parsedate_to_datetime(rcpt["Will-Retry-Until"]).timestamp() == until


def test_delay_dsn_without_retry_until_has_no_such_field() -> None:
    deferred = Result.from_reply(451, "4.2.1 busy", REMOTE)
    _, blob = dsn(envelope(), [deferred], delayed=True)
    assert all(n != "Will-Retry-Until" for b in status_blocks(blob) for n, _ in b)


def test_ret_hdrs_returns_only_the_header_section() -> None:
    _, blob = dsn(envelope(ret="HDRS"))
    _, _, original = parts(blob)
    assert original.get_content_type() == "text/rfc822-headers"
    _, body = raw_parts(blob)[2]
    assert body == ORIGINAL[: ORIGINAL.index(b"\r\n\r\n") + 2]
    assert b"The body of the original" not in blob


def test_ret_full_returns_everything() -> None:
    _, blob = dsn(envelope(ret="FULL"))
    assert raw_parts(blob)[2][1] == ORIGINAL


def test_large_original_is_returned_as_headers_only() -> None:
    big = ORIGINAL + (b"x" * 998 + b"\r\n") * (FULL_MESSAGE_LIMIT // 1000 + 1)
    assert len(big) > FULL_MESSAGE_LIMIT
    _, blob = dsn(envelope(ret="FULL"), data=big)
    assert parts(blob)[2].get_content_type() == "text/rfc822-headers"
    assert len(blob) < 10_000


def test_original_without_a_body_is_returned_whole_with_hdrs() -> None:
    headers_only = b"Subject: no body\r\nFrom: a@example.test\r\n"
    _, blob = dsn(envelope(ret="HDRS"), data=headers_only)
    assert raw_parts(blob)[2][1] == headers_only


@pytest.mark.parametrize("smtputf8", [False, True])
def test_an_original_with_no_header_section_returns_no_body_lines(smtputf8: bool) -> None:
    """A message that starts with its empty line has no header fields (RFC 5322 2.1):
    a blank line further down its body is no header section's end."""
    no_headers = b"\r\nfirst paragraph of the body\r\n\r\nthe second, private\r\n"
    _, blob = dsn(envelope(ret="HDRS", smtputf8=smtputf8), data=no_headers)
    assert raw_parts(blob)[2][1] == b"\r\n"
    assert b"first paragraph" not in blob and b"private" not in blob


def test_smtputf8_dsn_uses_the_global_types() -> None:
    env = envelope(Recipient("jösé@example.test"), sender="ålice@example.test", smtputf8=True)
    data = "Subject: Grüße\r\nFrom: ålice@example.test\r\n\r\nHallo\r\n".encode()
    dsn_env, blob = dsn(env, data=data)
    _, status, original = parts(blob)
    assert status.get_content_type() == "message/global-delivery-status"
    assert original.get_content_type() == "message/global"
    assert "\r\nTo: <ålice@example.test>\r\n".encode() in blob
    blocks = status_blocks(blob)
    assert field(blocks[1], "Final-Recipient") == "utf-8; jösé@example.test"
    assert raw_parts(blob)[2][1] == data
    assert dsn_env.smtputf8 is True
    assert dsn_env.body == "8BITMIME"
    assert [r.address for r in dsn_env.recipients] == ["ålice@example.test"]
    head, _ = raw_parts(blob)[1]
    assert b"Content-Transfer-Encoding: 8bit" in head


def test_smtputf8_dsn_with_hdrs_uses_global_headers() -> None:
    env = envelope(Recipient("jösé@example.test"), smtputf8=True, ret="HDRS")
    _, blob = dsn(env)
    assert parts(blob)[2].get_content_type() == "message/global-headers"


def test_8bit_original_is_returned_as_7bit_headers_only() -> None:
    """Issue 13.3: the bounce of an 8-bit original must pass where 8-bit cannot."""
    data = "Subject: x\r\n\r\ncaf\u00e9\r\n".encode()
    for ret in (None, "FULL"):
        dsn_env, blob = dsn(envelope(ret=ret), data=data)
        head, body = raw_parts(blob)[2]
        assert b"Content-Type: text/rfc822-headers" in head
        assert body == b"Subject: x\r\n"
        assert blob.isascii()
        assert dsn_env.body == "7BIT"


def test_8bit_headers_are_returned_quoted_printable() -> None:
    data = "Subject: caf\u00e9\r\nFrom: a@example.test\r\n\r\nbody\r\n".encode()
    _, blob = dsn(envelope(), data=data)
    assert blob.isascii()
    original = parts(blob)[2]
    assert original.get_content_type() == "text/rfc822-headers"
    assert original["Content-Transfer-Encoding"] == "quoted-printable"
    decoded = original.get_payload(decode=True)
    assert isinstance(decoded, bytes)
    assert decoded.replace(b"\r\n", b"\n") == data[: data.index(b"\r\n\r\n") + 2].replace(
        b"\r\n", b"\n"
    )


def test_non_ascii_reply_keeps_a_plain_dsn_7bit() -> None:
    _, blob = dsn(envelope(), [failure("5.1.1 unbekannter Empf\u00e4nger")])
    assert blob.isascii()


# --- wire format and hostile input ---------------------------------------------------


def test_crlf_line_endings_only() -> None:
    env = envelope(Recipient("bob@example.test"), Recipient("carol@example.test"), envid="x")
    for ret in (None, "HDRS"):
        for delayed in (False, True):
            _, blob = dsn(replace(env, ret=ret), delayed=delayed, retry_until=NOW + 60)
            assert bare_newlines(blob) == []
            assert blob.endswith(b"--\r\n")
            assert max(len(line) for line in blob.split(b"\r\n")) <= 998


@pytest.mark.parametrize(
    "text",
    [
        "5.1.1 bad\r\nX-Injected: yes",
        "5.1.1 bad\nAction: delivered",
        "5.1.1 bad\rStatus: 2.0.0",
        "5.1.1 bad\r\n\r\nFinal-Recipient: rfc822; evil@example.test",
        "5.1.1 bad\x00\x0b\x0c\x1b[31m\x7f\u2028\u2029\x85end",
    ],
)
def test_hostile_reply_text_cannot_inject_fields(text: str) -> None:
    """A reply that somehow kept its line breaks (built directly, as expire() does)."""
    env = envelope(Recipient("bob@example.test"))
    for result in (
        Result(Outcome.FAILED, 550, "5.1.1", text, REMOTE),
        Result.from_reply(550, text, REMOTE),
        Result(Outcome.FAILED, 550, "5.1.1", "fine", REMOTE + "\r\nX-Injected: remote"),
    ):
        _, blob = dsn(env, [result])
        assert bare_newlines(blob) == []
        blocks = status_blocks(blob)
        assert len(blocks) == 2
        names = [n for n, _ in blocks[1]]
        assert set(names) <= PER_RECIPIENT
        assert names.count("Diagnostic-Code") == 1
        assert names.count("Action") == 1 and field(blocks[1], "Action") == "failed"
        assert field(blocks[1], "Final-Recipient") == "rfc822; bob@example.test"
        assert b"X-Injected:" not in blob.replace(b" X-Injected:", b"")
        assert len(parts(blob)) == 3
        explanation = raw_parts(blob)[0][1].decode()
        assert all(
            line.startswith("<bob@example.test>: ")
            for line in explanation.split("\r\n")
            if "bad" in line or "fine" in line
        )


def test_hostile_envid_and_orcpt_cannot_inject_fields() -> None:
    env = envelope(
        Recipient("bob@example.test", (), "rfc822;bob@example.test\r\nAction: delivered"),
        envid="id\r\nReporting-MTA: dns; evil.test",
    )
    _, blob = dsn(env)
    blocks = status_blocks(blob)
    assert [n for n, _ in blocks[0]].count("Reporting-MTA") == 1
    assert field(blocks[0], "Reporting-MTA") == f"dns; {HOSTNAME}"
    assert field(blocks[1], "Action") == "failed"
    assert bare_newlines(blob) == []


@pytest.mark.parametrize(
    ("smtputf8", "want"),
    [
        (False, "utf-8;j\\x{FC}rg\\x{2B}x\\x{2028}y\\x{20}z@example.test"),  # xtext
        (True, "utf-8;j\u00fcrg\\x{2B}x\\x{2028}y\\x{20}z@example.test"),  # unitext
    ],
)
def test_a_utf8_orcpt_is_written_with_rfc6533_escapes(smtputf8: bool, want: str) -> None:
    r"""U+2028 is no line break and no space either: it goes in as \x{2028}."""
    orcpt = "utf-8;j\u00fcrg+x\u2028y z@example.test"
    env = envelope(Recipient("bob@example.test", (), orcpt), smtputf8=smtputf8)
    _, blob = dsn(env)
    assert field(status_blocks(blob)[1], "Original-Recipient") == want


def test_boundary_never_occurs_in_the_original(monkeypatch: pytest.MonkeyPatch) -> None:
    """When the random boundary happens to be in the original, another one is drawn."""
    first, second = "a" * 24, "b" * 24
    draws = iter([first, second])
    monkeypatch.setattr(secrets, "token_hex", lambda n: next(draws))
    data = ORIGINAL + f"--=_leafmail_{first}\r\nsmuggled part\r\n".encode()
    _, blob = dsn(envelope(), data=data)
    assert parse(blob).get_boundary() == f"=_leafmail_{second}"
    assert len(parts(blob)) == 3
    assert raw_parts(blob)[2][1] == data


def test_boundary_is_fresh_each_time() -> None:
    boundaries = {parse(dsn(envelope())[1]).get_boundary() for _ in range(5)}
    assert len(boundaries) == 5


def test_non_ascii_reply_keeps_a_plain_dsn_status_part_ascii() -> None:
    env = envelope(Recipient("bob@example.test"))
    _, blob = dsn(env, [failure("5.1.1 usu\u00e1rio desconhecido")])
    head, body = raw_parts(blob)[1]
    assert b"Content-Transfer-Encoding: 7bit" in head
    assert body.isascii()


@pytest.mark.parametrize("utf8", [False, True])
def test_long_non_ascii_reply_keeps_lines_under_998_octets(utf8: bool) -> None:
    env = envelope(Recipient("bob@example.test"), smtputf8=utf8)
    _, blob = dsn(env, [failure("5.1.1 " + "\u6f22" * 900)])
    assert max(len(line) for line in blob.split(b"\r\n")) <= 998


def test_long_ascii_reply_keeps_lines_under_998_octets() -> None:
    env = envelope(Recipient("bob@example.test"))
    _, blob = dsn(env, [failure("5.1.1 " + "word " * 1000)])
    assert max(len(line) for line in blob.split(b"\r\n")) <= 998
    assert len(status_blocks(blob)) == 2


# --- the property: any reply text gives a well-formed DSN ----------------------------

reply_texts = st.one_of(
    st.text(max_size=1200),
    st.text(alphabet=st.sampled_from("ab \r\n\t:-;.5\x00\x85"), max_size=300),
    # What aiosmtplib makes of arbitrary reply bytes.
    st.binary(max_size=600).map(lambda b: b.decode("utf-8", "surrogateescape")),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    replies=st.lists(
        st.tuples(st.integers(400, 599), reply_texts, st.booleans()), min_size=1, max_size=4
    ),
    utf8=st.booleans(),
    delayed=st.booleans(),
)
def test_any_reply_text_gives_a_parseable_dsn(
    replies: list[tuple[int, str, bool]], utf8: bool, delayed: bool
) -> None:
    rcpts = tuple(Recipient(f"r{i}@example.test") for i in range(len(replies)))
    env = envelope(*rcpts, smtputf8=utf8)
    results = [
        Result.from_reply(code, text, REMOTE)
        if parsed
        else Result(Outcome.FAILED, code, "5.0.0", text, REMOTE)
        for code, text, parsed in replies
    ]
    _, blob = dsn(env, results, delayed=delayed, retry_until=NOW + 60 if delayed else None)

    assert bare_newlines(blob) == []
    msg = parse(blob)
    assert msg.get_content_type() == "multipart/report"
    assert len(list(msg.iter_parts())) == 3
    blocks = status_blocks(blob)
    assert len(blocks) == 1 + len(rcpts)
    assert {n for n, _ in blocks[0]} <= PER_MESSAGE
    for rcpt, block in zip(rcpts, blocks[1:], strict=True):
        names = [n for n, _ in block]
        assert set(names) <= PER_RECIPIENT
        assert names.count("Diagnostic-Code") == 1
        assert field(block, "Final-Recipient") == f"rfc822; {rcpt.address}"
        assert field(block, "Action") == ("delayed" if delayed else "failed")
    if not utf8:
        parsed_blocks = blocks_of(parts(blob)[1])
        assert len(parsed_blocks) == 1 + len(rcpts)
        assert all(len(b.get_all("Diagnostic-Code", [])) == 1 for b in parsed_blocks[1:])


# --- who gets a DSN ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sender", "notify", "failure_dsn", "delay_dsn"),
    [
        ("", (), False, False),  # never a DSN to the null sender (RFC 5321 4.5.5)
        ("", ("FAILURE", "DELAY"), False, False),
        (SENDER, (), True, True),  # default: failures and delays
        (SENDER, ("NEVER",), False, False),
        (SENDER, ("SUCCESS",), False, False),
        (SENDER, ("FAILURE",), True, False),
        (SENDER, ("DELAY",), False, True),
        (SENDER, ("DELAY", "FAILURE"), True, True),
        (SENDER, ("FAILURE", "SUCCESS"), True, False),
        (SENDER, ("DELAY", "FAILURE", "SUCCESS"), True, True),
    ],
)
def test_wants_dsn(
    sender: str, notify: tuple[str, ...], failure_dsn: bool, delay_dsn: bool
) -> None:
    rcpt = Recipient("bob@example.test", notify)
    assert wants_dsn(sender, rcpt, "FAILURE") is failure_dsn
    assert wants_dsn(sender, rcpt, "DELAY") is delay_dsn


@pytest.mark.parametrize(
    ("sender", "notify", "success_dsn"),
    [
        ("", ("SUCCESS",), False),
        (SENDER, (), False),  # success only when asked for (RFC 3461 4.1)
        (SENDER, ("SUCCESS",), True),
        (SENDER, ("FAILURE", "SUCCESS"), True),
        (SENDER, ("NEVER",), False),
    ],
)
def test_wants_dsn_for_success(sender: str, notify: tuple[str, ...], success_dsn: bool) -> None:
    assert wants_dsn(sender, Recipient("bob@example.test", notify), "SUCCESS") is success_dsn


@pytest.mark.parametrize(
    ("notify", "after"),
    [
        ((), ()),
        (("SUCCESS",), ("NEVER",)),
        (("SUCCESS", "FAILURE"), ("FAILURE",)),
        (("DELAY", "FAILURE"), ("DELAY", "FAILURE")),
    ],
)
def test_notify_after_expansion_drops_success(
    notify: tuple[str, ...], after: tuple[str, ...]
) -> None:
    assert notify_after_expansion(notify) == after


# --- success reports (RFC 3461 / 3464) ------------------------------------------------


def test_success_report_fields_and_headers_only() -> None:
    rcpts = (
        Recipient("alice@example.test", ("SUCCESS",), "rfc822;a@orig.test"),
        Recipient("bob@example.test", ("SUCCESS",), "rfc822;b@orig.test"),
        Recipient("team@example.test", ("SUCCESS",), "rfc822;t@orig.test"),
    )
    env = envelope(*rcpts, envid="env-1")
    local = Result(Outcome.DELIVERED, 250, "2.0.0", "delivered to the maildir of alice")
    relayed = Result.from_reply(250, "2.0.0 accepted", REMOTE)
    actions = (Action.DELIVERED, Action.RELAYED, Action.EXPANDED)
    notices = [
        Notice(r, res, a) for r, res, a in zip(rcpts, (local, relayed, local), actions, strict=True)
    ]
    for ret, whole in ((None, False), ("HDRS", False), ("FULL", True)):
        _, blob = build_dsn(
            hostname=HOSTNAME,
            qid=QID,
            envelope=replace(env, ret=ret),
            data=ORIGINAL,
            notices=notices,
            arrival=ARRIVAL,
            now=NOW,
        )
        assert parse(blob)["Subject"] == "Successful Mail Delivery Report"
        blocks = status_blocks(blob)
        assert field(blocks[0], "Original-Envelope-Id") == "env-1"
        assert [field(b, "Action") for b in blocks[1:]] == ["delivered", "relayed", "expanded"]
        assert [field(b, "Original-Recipient") for b in blocks[1:]] == [
            "rfc822;a@orig.test",
            "rfc822;b@orig.test",
            "rfc822;t@orig.test",
        ]
        assert [field(b, "Status") for b in blocks[1:]] == ["2.0.0"] * 3
        assert field(blocks[2], "Remote-MTA") == "dns; smarthost.test"
        assert (b"The body of the original." in blob) is whole


# --- RFC 3464 grammar of the fields, as a mail program reads them ----------------------

# RFC 3464 2.1.2, 2.2, 2.3 (with RFC 3463's status-code): what each value must look like.
STATUS_CODE = re.compile(r"[245]\.[0-9]{1,3}\.[0-9]{1,3}")
TYPED = re.compile(r"([A-Za-z0-9-]+); ?(.+)")  # "type ; value" (dns, rfc822, smtp, X-...)
# A DNS name (RFC 1123), or, only for a host that has none, an address literal
# (RFC 5321 4.1.3: "[192.0.2.1]", "[IPv6:2001:db8::1]").
MTA_NAME = re.compile(
    r"(?:[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?\.)*[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
    r"|\[(?:[0-9]{1,3}(?:\.[0-9]{1,3}){3}|IPv6:[0-9A-Fa-f:.]+)\]"
)


def grammar_checked(blob: bytes) -> list[email.message.Message]:
    """The status part's blocks as the email package reads them, each field checked
    against RFC 3464's grammar; the per-recipient blocks are returned."""
    _, status, _ = parts(blob)
    per_message, *recipients = blocks_of(status)
    reporting = TYPED.fullmatch(per_message["Reporting-MTA"])
    assert reporting and reporting[1] == "dns" and MTA_NAME.fullmatch(reporting[2])
    for block in recipients:
        assert TYPED.fullmatch(block["Final-Recipient"])
        assert block["Action"] in {"failed", "delayed", "delivered", "relayed", "expanded"}
        assert STATUS_CODE.fullmatch(block["Status"]), block["Status"]
        diagnostic = TYPED.fullmatch(block["Diagnostic-Code"])
        assert diagnostic and diagnostic[1] in {"smtp", "X-Leafmail"}
        if block["Remote-MTA"] is not None:
            remote = TYPED.fullmatch(block["Remote-MTA"])
            assert remote and remote[1] == "dns" and MTA_NAME.fullmatch(remote[2]), remote
    return recipients


@pytest.mark.parametrize(
    ("remote", "want"),
    [
        ("mx1.example.net:25", "dns; mx1.example.net"),
        ("192.0.2.7:25", "dns; [192.0.2.7]"),
        ("[2001:db8::25]:587", "dns; [IPv6:2001:db8::25]"),
    ],
)
def test_remote_mta_is_the_name_or_an_address_literal(remote: str, want: str) -> None:
    """Remote-MTA is "dns; name" (RFC 3464 2.3.5): a next hop known only by its address
    (a smarthost given as an IP) is written as SMTP writes an address literal, never as
    a bare address that reads as a name (or, for IPv6, as no name at all)."""
    _, blob = dsn(envelope(), [failure(remote=remote)])
    (bob,) = grammar_checked(blob)
    assert bob["Remote-MTA"] == want


def test_a_status_is_ascii_digits_whatever_digits_the_reply_had() -> None:
    """RFC 3464 2.3.4 / RFC 3463: status-code is DIGIT "." 1*3DIGIT "." 1*3DIGIT, ASCII.
    A reply that starts with other Unicode digits (5.U+0661.U+0661) has no enhanced code: its
    class's default is the Status, and the reply stays whole in Diagnostic-Code."""
    _, blob = dsn(envelope(), [failure("5.\u0661.\u0661 no such user")])
    (bob,) = grammar_checked(blob)
    assert bob["Status"] == "5.0.0"
    assert raw_parts(blob)[1][1].isascii()


def test_diagnostic_code_smtp_only_for_the_remote_mtas_own_reply() -> None:
    """Diagnostic-Code's "smtp" type is the reply the remote MTA sent (RFC 3464 2.3.6);
    what we concluded ourselves about that MTA (it lacks 8BITMIME, the connection broke,
    the message expired) is ours, with our type, while Remote-MTA still names the MTA."""
    env = envelope(Recipient("bob@example.test"), Recipient("carol@example.test"))
    ours = Result.failed("5.6.3", f"{REMOTE} does not support 8BITMIME", REMOTE)
    _, blob = dsn(env, [failure(), ours])
    bob, carol = grammar_checked(blob)
    assert bob["Diagnostic-Code"] == "smtp; 550 5.1.1 no such user"
    assert carol["Diagnostic-Code"] == f"X-Leafmail; 554 5.6.3 {REMOTE} does not support 8BITMIME"
    assert bob["Remote-MTA"] == carol["Remote-MTA"] == "dns; smarthost.test"
    lost = Result.deferred("4.4.2", "connection to smarthost.test:587 lost", REMOTE)
    _, blob = dsn(envelope(), [lost], delayed=True)
    (bob,) = grammar_checked(blob)
    assert bob["Diagnostic-Code"].startswith("X-Leafmail; 451 4.4.2 ")


def test_diagnostic_code_is_the_remote_reply_as_it_came() -> None:
    """A reply without an enhanced code gets one for Status (the class default, RFC
    3463), but Diagnostic-Code quotes what the remote MTA said, not our addition
    (RFC 3464 2.3.6: "the actual diagnostic code issued by the remote MTA"). OpenSMTPD
    answers an unknown recipient "550 Invalid recipient"."""
    plain = Result.from_reply(550, "Invalid   recipient", REMOTE)
    _, blob = dsn(envelope(), [plain])
    (bob,) = grammar_checked(blob)
    assert bob["Status"] == "5.0.0"
    assert bob["Diagnostic-Code"] == "smtp; 550 Invalid recipient"


def test_the_double_bounce_mark_is_not_sent_to_a_next_hop() -> None:
    """The ENVID that marks a report to the postmaster about a bounce is ours: it is kept
    in the spool (local forwarding keeps it) but not passed on in MAIL FROM, where a next
    hop would see an internal name. Mail from <> with an ENVID of its own keeps it."""
    env = envelope(sender="")
    marked, _ = build_dsn(
        hostname=HOSTNAME,
        qid=QID,
        envelope=env,
        data=ORIGINAL,
        notices=[Notice(env.recipients[0], failure())],
        arrival=ARRIVAL,
        now=NOW,
        to="postmaster@mx.test",
    )
    assert marked.envid == DOUBLE_BOUNCE_ENVID
    assert mail_options({"dsn": ""}, marked, ORIGINAL, utf8=False) == []
    own = envelope(sender="", envid="their-id")
    assert mail_options({"dsn": ""}, own, ORIGINAL, utf8=False) == ["ENVID=their-id"]


def test_the_double_bounce_mark_from_the_network_is_no_double_bounce() -> None:
    """A client's MAIL FROM:<> ENVID=leafmail-double-bounce is mail like any other from
    <>: its failures go to the postmaster, not dropped as an undeliverable report."""
    spoofed = envelope(sender="", envid=DOUBLE_BOUNCE_ENVID)
    assert spoofed.client.protocol == "ESMTP"
    assert not is_double_bounce(spoofed)
    local = replace(spoofed, client=ClientInfo(protocol="local", helo=HOSTNAME))
    assert is_double_bounce(local)


def test_original_envelope_id_is_the_decoded_envid() -> None:
    """RFC 3464 2.2.1: envelope-id = *text, case and spelling preserved; ENVID's xtext
    (RFC 3461 4.4) is only how SMTP carries it, decoded when it is received (ENVID=
    QQ+2B314 is the identifier "QQ+314"), so the field carries the identifier itself."""
    _, blob = dsn(envelope(envid="Qq+314 a=b"))
    _, status, _ = parts(blob)
    assert blocks_of(status)[0]["Original-Envelope-Id"] == "Qq+314 a=b"


@pytest.mark.parametrize(
    ("smtputf8", "report_type"),
    [(False, "delivery-status"), (True, "global-delivery-status")],
)
def test_report_type_names_the_status_parts_subtype(smtputf8: bool, report_type: str) -> None:
    """RFC 6522 3: report-type is the subtype of the second part, message/global-* too."""
    _, blob = dsn(envelope(smtputf8=smtputf8))
    assert parse(blob).get_param("report-type") == report_type
    assert parts(blob)[1].get_content_type() == f"message/{report_type}"


def test_a_utf8_recipient_in_a_plain_report_is_written_as_xtext() -> None:
    r"""A UTF-8 address in a message/delivery-status is utf-8-addr-xtext (RFC 6533 3): the
    part is 7-bit as it says, and a mail program reads the address back from the escapes."""
    env = envelope(Recipient("j\u00f6s\u00e9@example.test"))
    dsn_env, blob = dsn(env)
    head, body = raw_parts(blob)[1]
    assert b"Content-Type: message/delivery-status" in head and body.isascii()
    final = field(status_blocks(blob)[1], "Final-Recipient")
    assert final == "utf-8; j\\x{F6}s\\x{E9}@example.test"
    assert xtext_back(final.split("; ", 1)[1]) == "j\u00f6s\u00e9@example.test"
    assert blob.isascii() and dsn_env.body == "7BIT"


def xtext_back(text: str) -> str:
    r"""utf-8-addr-xtext decoded as a reader would: each ``\x{HEX}`` is one character."""
    return re.sub(r"\\x\{([0-9A-F]{2,6})\}", lambda m: chr(int(m.group(1), 16)), text)
