"""The RFC 5322 compliance check: a table of messages and what is wrong with each.

`problems` is pure (bytes and MAIL parameters in, reasons out), so most of this file
is one table. Then the check itself: tag vs reject vs off, and trusted clients.
"""

from __future__ import annotations

import ipaddress

import pytest

from leafmail.checks import ACCEPT, CheckContext, Reject, Stage, Tag
from leafmail.checks.rfc5322 import TAG_FIELD, problems, rfc5322_check
from leafmail.config import ChecksConfig, Config, RelayConfig
from leafmail.policy import policy_for
from netserver.admit.access import AccessPolicy
from netserver.smtp.parameters import Body, MailParameters

GOOD_HEADER = (
    b"From: Alice <alice@example.test>\r\n"
    b"To: Bob <bob@example.test>\r\n"
    b"Subject: hello\r\n"
    b"Date: Mon, 1 Jan 2024 10:00:00 +0000\r\n"
    b"Message-ID: <1@example.test>\r\n"
)
GOOD = GOOD_HEADER + b"\r\nHello Bob.\r\n"
EIGHT_BIT = MailParameters(body=Body.EIGHTBITMIME)
SMTPUTF8 = MailParameters(smtputf8=True)


def without(name: bytes, message: bytes = GOOD) -> bytes:
    """`message` without its `name` field."""
    return b"".join(
        line for line in message.splitlines(keepends=True) if not line.startswith(name + b":")
    )


def with_field(line: bytes, message: bytes = GOOD) -> bytes:
    """`message` with one more header field on top."""
    return line + b"\r\n" + message


def with_body(body: bytes) -> bytes:
    return GOOD_HEADER + b"\r\n" + body


CASES: list[tuple[str, bytes, MailParameters | None, list[str]]] = [
    ("compliant", GOOD, None, []),
    ("no Date", without(b"Date"), None, ["no Date field"]),
    ("no From", without(b"From"), None, ["no From field"]),
    ("nothing at all", b"\r\nbody only\r\n", None, ["no From field", "no Date field"]),
    ("two From", with_field(b"From: mallory@example.test"), None, ["2 From fields"]),
    ("two Date", with_field(b"Date: Tue, 2 Jan 2024 10:00:00 +0000"), None, ["2 Date fields"]),
    ("two Subject", with_field(b"Subject: again"), None, ["2 Subject fields"]),
    ("two Message-ID", with_field(b"Message-ID: <2@x.test>"), None, ["2 Message-ID fields"]),
    ("two Received are fine", with_field(b"Received: a\r\nReceived: b"), None, []),
    (
        "From with a phrase and no brackets",
        with_field(b"From: Alice alice@example.test", without(b"From")),
        None,
        ["bad From syntax"],
    ),
    ("empty From", with_field(b"From:", without(b"From")), None, ["bad From syntax"]),
    (
        "a group is not a From",
        with_field(b"From: undisclosed-recipients:;", without(b"From")),
        None,
        ["bad From syntax"],
    ),
    (
        "a group is a fine To",
        with_field(b"To: undisclosed-recipients:;", without(b"To")),
        None,
        [],
    ),
    ("semicolon in Cc", with_field(b"Cc: a@example.test;b@example.test"), None, ["bad Cc syntax"]),
    (
        "unclosed angle in Reply-To",
        with_field(b"Reply-To: Alice <alice@example.test"),
        None,
        ["bad Reply-To syntax"],
    ),
    ("domainless Bcc", with_field(b"Bcc: bob"), None, ["bad Bcc syntax"]),
    (
        "two Sender mailboxes",
        with_field(b"Sender: a@example.test, b@example.test"),
        None,
        ["bad Sender syntax"],
    ),
    (
        "several From mailboxes need a Sender",
        with_field(b"From: a@example.test, b@example.test", without(b"From")),
        None,
        ["several From mailboxes without Sender"],
    ),
    (
        "several From mailboxes with a Sender",
        with_field(
            b"From: a@example.test, b@example.test\r\nSender: a@example.test", without(b"From")
        ),
        None,
        [],
    ),
    (
        "obsolete empty list element is read, not refused",
        with_field(b"To: a@example.test,,b@example.test", without(b"To")),
        None,
        [],
    ),
    (
        "folded address field",
        with_field(b"Cc: Carol\r\n <carol@example.test>,\r\n\tDan <dan@example.test>"),
        None,
        [],
    ),
    (
        "comments in addresses",
        with_field(b"Cc: carol@example.test (Carol)"),
        None,
        [],
    ),
    (
        "Date that is not a date",
        with_field(b"Date: yesterday", without(b"Date")),
        None,
        ["bad Date syntax"],
    ),
    (
        "mbox From_ line in the header",
        b"From alice@example.test Mon Jan  1 10:00:00 2024\r\n" + GOOD,
        None,
        ["malformed header line"],
    ),
    ("header line without colon", with_field(b"Subject hello"), None, ["malformed header line"]),
    ("998-octet line", with_body(b"x" * 998 + b"\r\n"), None, []),
    ("999-octet line", with_body(b"x" * 999 + b"\r\n"), None, ["line longer than 998 octets"]),
    ("999-octet last line", with_body(b"x" * 999), None, ["line longer than 998 octets"]),
    ("bare LF", with_body(b"one\ntwo\r\n"), None, ["bare CR or LF"]),
    ("bare CR", with_body(b"one\rtwo\r\n"), None, ["bare CR or LF"]),
    ("NUL", with_body(b"one\0two\r\n"), None, ["NUL octet"]),
    (
        "8-bit body without BODY=8BITMIME",
        with_body("caf\u00e9\r\n".encode()),
        None,
        ["8-bit data without BODY=8BITMIME"],
    ),
    ("8-bit body with BODY=8BITMIME", with_body("caf\u00e9\r\n".encode()), EIGHT_BIT, []),
    ("8-bit body with SMTPUTF8", with_body("caf\u00e9\r\n".encode()), SMTPUTF8, []),
    (
        "8-bit header needs SMTPUTF8 even with 8BITMIME",
        with_field("Subject: caf\u00e9".encode(), without(b"Subject")),
        EIGHT_BIT,
        ["8-bit header without SMTPUTF8"],
    ),
    (
        "UTF-8 address under SMTPUTF8",
        with_field("From: j\u00f6rg@ex\u00e4mple.test".encode(), without(b"From")),
        SMTPUTF8,
        [],
    ),
    (
        "UTF-8 address without SMTPUTF8",
        with_field("From: j\u00f6rg@ex\u00e4mple.test".encode(), without(b"From")),
        EIGHT_BIT,
        ["bad From syntax", "8-bit header without SMTPUTF8"],
    ),
    (
        "Latin-1 bytes in an address are not UTF-8",
        with_field(b"From: j\xf6rg@example.test", without(b"From")),
        SMTPUTF8,
        ["bad From syntax"],
    ),
    (
        "several problems at once",
        with_field(b"From: x@example.test", without(b"Date")) + b"y" * 1000 + b"\r\n",
        None,
        ["2 From fields", "no Date field", "line longer than 998 octets"],
    ),
]


@pytest.mark.parametrize(
    ("message", "params", "expected"),
    [pytest.param(m, p, e, id=name) for name, m, p, e in CASES],
)
def test_problems(message: bytes, params: MailParameters | None, expected: list[str]) -> None:
    assert problems(message, params) == expected


# --- the check: tag, reject, off, trusted ---------------------------------------------

RELAY = AccessPolicy(allow=["127.0.0.1/32"])
OUTSIDER = ipaddress.ip_address("192.0.2.1")
INSIDER = ipaddress.ip_address("127.0.0.1")
BROKEN = without(b"Date")


def session(data: bytes, ip: str = "192.0.2.1", user: str | None = None) -> CheckContext:
    return CheckContext(ipaddress.ip_address(ip), user=user, data=data)


def test_tag_mode_adds_one_field_naming_every_reason() -> None:
    verdict = rfc5322_check("tag", RELAY)(session(with_field(b"From: x@example.test", BROKEN)))
    assert verdict == Tag((f"{TAG_FIELD}: fail (2 From fields; no Date field)\r\n".encode(),))


def test_reject_mode_refuses_with_550_5_6_0() -> None:
    verdict = rfc5322_check("reject", RELAY)(session(BROKEN))
    assert isinstance(verdict, Reject)
    assert (verdict.reply.code, verdict.reply.enhanced) == (550, "5.6.0")
    assert verdict.reply.text == "Message does not conform to RFC 5322: no Date field"


@pytest.mark.parametrize("mode", ["tag", "reject"])
def test_compliant_mail_is_accepted_untouched(mode: str) -> None:
    assert rfc5322_check(mode, RELAY)(session(GOOD)) is ACCEPT


@pytest.mark.parametrize(
    ("ip", "user"), [("127.0.0.1", None), ("192.0.2.1", "alice")], ids=["relay", "auth"]
)
def test_trusted_clients_are_not_judged(ip: str, user: str | None) -> None:
    assert rfc5322_check("reject", RELAY)(session(BROKEN, ip, user)) is ACCEPT


def test_reply_text_stays_printable_ascii() -> None:
    message = with_field("From: \u00e9\u00e9\u00e9 <<<".encode(), BROKEN)
    verdict = rfc5322_check("reject", RELAY)(session(message))
    assert isinstance(verdict, Reject)
    assert verdict.reply.to_bytes().isascii()


def config(**modes: str) -> Config:
    off = {"rfc5322": "off", "received": "off", "spf": "off", "dkim": "off", "dnsbl": "off"}
    return Config(
        hostname="mx.test",
        relay=RelayConfig(relay_networks=("127.0.0.1/32",)),
        checks=ChecksConfig(**{**off, **modes}),  # type: ignore[arg-type]
    )


@pytest.mark.parametrize(
    ("mode", "expected"), [("off", "accept"), ("tag", "tag"), ("reject", "reject")]
)
def test_policy_follows_the_config(mode: str, expected: str) -> None:
    policy = policy_for(config(rfc5322=mode))
    verdict = policy.judge(Stage.END_OF_DATA, session(BROKEN))
    kind = {Tag: "tag", Reject: "reject"}.get(type(verdict), "accept")
    assert kind == expected
    assert not policy.async_stages  # nothing here asks the DNS
