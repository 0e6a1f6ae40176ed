"""`leafmail.trace`: the Received fields leafmail writes (RFC 5321 4.4), both kinds.

The SMTP one and the local-submission one end the same way (one `for <rcpt>` only for
a single recipient, then the date), written by one helper; text that is not leafmail's
own is reduced to printable characters so that it can neither fold nor add a field.
"""

from __future__ import annotations

import ast
import email
import email.policy
import re
from pathlib import Path

from leafmail import trace
from leafmail.checks.rfc5322 import problems
from leafmail.sendmail.headers import break_long_line
from leafmail.trace import MAX_LINE, header_section, local_received_header, received_header

WHEN = 1_798_761_600  # Wed, 01 Jan 2027 00:00:00 +0000
QID = "0123456789ABCDEF01234567"


def fields(blob: bytes) -> list[tuple[str, str]]:
    message = email.message_from_bytes(blob + b"\r\n", policy=email.policy.compat32)
    return [(name, str(value)) for name, value in message.items()]


def test_a_local_submission_for_one_recipient_names_it() -> None:
    blob = local_received_header(
        hostname="leaf.test",
        uid=1000,
        qid=QID,
        recipients=["bob@dst.test"],
        protocol=None,
        timestamp=WHEN,
    )
    assert blob == (
        b"Received: by leaf.test (leafmail, from userid 1000)\r\n"
        b"\tid 0123456789ABCDEF01234567\r\n"
        b"\tfor <bob@dst.test>; Fri, 01 Jan 2027 00:00:00 +0000\r\n"
    )


def test_a_local_submission_for_several_names_none_and_says_its_protocol() -> None:
    blob = local_received_header(
        hostname="leaf.test",
        uid=0,
        qid=QID,
        recipients=["a@x.test", "b@x.test"],
        protocol="ESMTP",
        timestamp=WHEN,
    )
    assert blob == (
        b"Received: by leaf.test (leafmail, from userid 0)\r\n"
        b"\twith ESMTP id 0123456789ABCDEF01234567;\r\n"
        b"\tFri, 01 Jan 2027 00:00:00 +0000\r\n"
    )


def test_no_kind_of_received_field_lets_a_recipient_add_a_field() -> None:
    hostile = "bob@dst.test>\r\nX-Injected: yes\r\n\r\nbody<"
    local = local_received_header(
        hostname="leaf.test",
        uid=1000,
        qid=QID,
        recipients=[hostile],
        protocol=None,
        timestamp=WHEN,
    )
    smtp = received_header(
        helo="client.test",
        client_ip="192.0.2.1",
        hostname="leaf.test",
        protocol="ESMTP",
        qid=QID,
        recipients=[hostile],
        timestamp=WHEN,
    )
    for blob in (local, smtp):
        assert header_section(blob + b"\r\n") == blob
        assert [name for name, _ in fields(blob)] == ["Received"], blob


def test_smtputf8_is_needed_for_the_header_section_only() -> None:
    """Delivery asks for SMTPUTF8 when the header section is not ASCII (RFC 6531): the
    same header section as everywhere else, so a message with no header fields (it
    starts with its empty line) whose body opens with UTF-8 does not."""
    from leafmail.delivery.session import needs_smtputf8
    from leafmail.envelope import Envelope, Recipient

    envelope = Envelope(sender="a@src.test", recipients=(Recipient("b@dst.test"),))
    headerless = b"\r\ncaf\xc3\xa9 first paragraph\r\n\r\nsecond\r\n"
    assert header_section(headerless) == b""
    assert not needs_smtputf8(envelope, headerless)
    assert needs_smtputf8(envelope, b"Subject: caf\xc3\xa9\r\n\r\nbody\r\n")
    assert not needs_smtputf8(envelope, b"Subject: plain\r\n\r\ncaf\xc3\xa9\r\n")


def test_the_rfc5322_line_limit_is_defined_here_only() -> None:
    """The check and sendmail's line breaking share one 998 (two copies could drift):
    sendmail's broken lines are exactly what the check lets pass."""
    src = Path(__file__).resolve().parent.parent / "src" / "leafmail"
    defining = sorted(
        str(path.relative_to(src))
        for path in src.rglob("*.py")
        for node in ast.parse(path.read_text(encoding="utf-8")).body
        if isinstance(node, ast.Assign)
        and any(isinstance(t, ast.Name) and t.id == "MAX_LINE" for t in node.targets)
    )
    assert defining == ["trace.py"]
    head = b"From: a@example.test\r\nDate: Mon, 1 Jan 2024 00:00:00 +0000\r\n\r\n"
    parts = break_long_line(b"x" * (3 * MAX_LINE))
    assert [len(p) for p in parts] == [MAX_LINE] * 3
    assert problems(head + b"\r\n".join(parts) + b"\r\n") == []
    assert problems(head + b"x" * (MAX_LINE + 1) + b"\r\n") == [
        f"line longer than {MAX_LINE} octets"
    ]


def test_the_unsafe_classes_are_the_complement_of_the_graphic_characters() -> None:
    """The patterns name the few characters they remove (cheap to compile at every start
    of a leafmail command); over every code point they match exactly the complement of
    graphic ASCII and U+00A0 onwards (the space kept or not), as their first form did."""
    every = "".join(map(chr, range(0x110000)))
    graphic = re.compile(r"[^\x21-\x7e\u00a0-\U0010ffff]")
    assert trace._UNSAFE.findall(every) == graphic.findall(every)
    with_space = re.compile(r"[^\x20-\x7e\u00a0-\U0010ffff]")
    assert trace._UNSAFE_KEEP_SPACE.findall(every) == with_space.findall(every)
    helo = re.compile(r'[^\x21-\x7e\u00a0-\U0010ffff]|[()<>;"\\@]')
    assert trace._UNSAFE_HELO.findall(every) == helo.findall(every)
