"""Received-chain taint: HELO lies, a forged Received of ours, hop counts.

The reverse-DNS part needs a DNS server and lives in test_checks_dns.py; everything
here is pure: tables of HELO names and header sections, then the checks in tag,
reject and off modes, and trusted clients.
"""

from __future__ import annotations

import ipaddress

import pytest

from leafmail.checks import ACCEPT, CheckContext, Reject, Stage, Tag
from leafmail.checks.headers import parse_header
from leafmail.checks.received import (
    HOP_TAG_THRESHOLD,
    TAG_FIELD,
    chain_check,
    chain_problems,
    forged_received,
    helo_address,
    helo_check,
    helo_problems,
)
from leafmail.config import ChecksConfig, Config, RelayConfig
from leafmail.policy import policy_for
from netserver.admit.access import AccessPolicy

OURS = frozenset({"mx.test", "example.test", "mail.example.test"})
RELAY = AccessPolicy(allow=["127.0.0.1/32"])
BODY = b"From: a@example.org\r\nDate: Mon, 1 Jan 2024 10:00:00 +0000\r\n\r\nhi\r\n"


@pytest.mark.parametrize(
    ("helo", "client", "expected"),
    [
        ("client.example.org", "192.0.2.1", []),
        ("mx.test", "192.0.2.1", ["HELO mx.test claims to be us"]),
        ("MX.TEST.", "192.0.2.1", ["HELO MX.TEST. claims to be us"]),
        ("example.test", "192.0.2.1", ["HELO example.test claims to be us"]),
        ("mail.example.test", "192.0.2.1", ["HELO mail.example.test claims to be us"]),
        ("sub.example.test", "192.0.2.1", []),  # a name under ours is not ours
        ("[192.0.2.1]", "192.0.2.1", []),
        ("[192.0.2.9]", "192.0.2.1", ["HELO [192.0.2.9] is not the client's address"]),
        ("192.0.2.1", "192.0.2.1", []),  # unbracketed: bad syntax, but the truth
        ("192.0.2.9", "192.0.2.1", ["HELO 192.0.2.9 is not the client's address"]),
        ("[IPv6:2001:db8::1]", "2001:db8::1", []),
        ("[IPv6:2001:DB8:0::1]", "2001:db8::1", []),
        (
            "[IPv6:2001:db8::2]",
            "2001:db8::1",
            ["HELO [IPv6:2001:db8::2] is not the client's address"],
        ),
        ("[192.0.2.1]", "::ffff:192.0.2.1", []),  # a mapped client is its IPv4 address
        ("[not-an-address]", "192.0.2.1", ["HELO [not-an-address] is not the client's address"]),
        ("[192.0.2.1]", None, ["HELO [192.0.2.1] is not the client's address"]),
        ("", "192.0.2.1", []),
        (None, "192.0.2.1", []),
    ],
)
def test_helo_problems(helo: str | None, client: str | None, expected: list[str]) -> None:
    ip = ipaddress.ip_address(client) if client else None
    assert helo_problems(helo, ip, OURS) == expected


def test_helo_address_forms() -> None:
    assert helo_address("[192.0.2.1]") == ipaddress.ip_address("192.0.2.1")
    assert helo_address("[ipv6:::1]") == ipaddress.ip_address("::1")
    assert helo_address("host.example") is None
    assert helo_address("[host.example]") is None


DATE = b"Mon, 1 Jan 2024 10:00:00 +0000"
RECEIVED_MX = (
    b"Received: from a.example.org (a.example.org [192.0.2.1])\r\n"
    b"\tby mx.test with ESMTP id 1; " + DATE + b"\r\n"
)
RECEIVED_OTHER = b"Received: from b.example.org by relay.example.org; " + DATE + b"\r\n"


@pytest.mark.parametrize(
    ("header", "forged"),
    [
        (b"", False),
        (RECEIVED_OTHER, False),
        (RECEIVED_MX, True),
        (RECEIVED_MX.replace(b"by mx.test", b"by MX.Test."), True),
        (RECEIVED_MX.replace(b"\r\n\tby", b" by"), True),
        (RECEIVED_MX.replace(b"by mx.test", b"by mx.test.evil.example"), False),
        # Ours below a foreign hop: mail that went out through us and came back.
        (RECEIVED_OTHER + RECEIVED_MX, False),
        (RECEIVED_MX + RECEIVED_OTHER, True),
        (b"Received: from mx.test by relay.example.org; date\r\n", False),  # "from" us is fine
        (b"Received: (comment by mx.test) from x by relay.example.org; d\r\n", False),
        (b"Received: from x (HELO (by mx.test)) by relay.example.org; d\r\n", False),
        (b"Received: from x by relay.example.org; by mx.test\r\n", False),
    ],
)
def test_forged_received(header: bytes, forged: bool) -> None:
    assert forged_received(parse_header(header + BODY), "mx.test") is forged


def hops(count: int) -> bytes:
    return b"".join(
        b"Received: from h%d.example by h%d.example; d\r\n" % (i, i + 1) for i in range(count)
    )


@pytest.mark.parametrize(
    ("message", "expected"),
    [
        (BODY, []),
        (hops(HOP_TAG_THRESHOLD) + BODY, []),
        (hops(HOP_TAG_THRESHOLD + 1) + BODY, [f"{HOP_TAG_THRESHOLD + 1} hops"]),
        (RECEIVED_MX + BODY, ["Received field claims to be by mx.test"]),
        (
            RECEIVED_MX + hops(40) + BODY,
            ["Received field claims to be by mx.test", "41 hops"],
        ),
        # A Received in the body is not a hop.
        (BODY + RECEIVED_MX + hops(40), []),
    ],
)
def test_chain_problems(message: bytes, expected: list[str]) -> None:
    assert chain_problems(message, "mx.test") == expected


# --- the checks -------------------------------------------------------------------------


def session(
    ip: str = "192.0.2.1", *, helo: str | None = None, data: bytes = b"", user: str | None = None
) -> CheckContext:
    return CheckContext(ipaddress.ip_address(ip), helo=helo, data=data, user=user)


def test_helo_check_tags_in_tag_mode() -> None:
    check = helo_check("tag", "mx.test", ["example.test"], RELAY)
    verdict = check(session(helo="example.test"))
    assert verdict == Tag(
        (f"{TAG_FIELD}: tainted (HELO example.test claims to be us)\r\n".encode(),)
    )


def test_helo_check_refuses_in_reject_mode() -> None:
    check = helo_check("reject", "mx.test", ["example.test"], RELAY)
    verdict = check(session(helo="[192.0.2.99]"))
    assert isinstance(verdict, Reject)
    assert str(verdict.reply) == "550 5.7.1 Refused: HELO [192.0.2.99] is not the client's address"


def test_helo_text_from_the_client_is_made_safe() -> None:
    check = helo_check("tag", "mx.test", [], RELAY)
    verdict = check(session(helo="[\u00e9vil]\x7f"))
    assert isinstance(verdict, Tag)
    assert (
        verdict.fields[0]
        == f"{TAG_FIELD}: tainted (HELO [?vil]? is not the client's address)\r\n".encode()
    )


@pytest.mark.parametrize(("ip", "user"), [("127.0.0.1", None), ("192.0.2.1", "alice")])
def test_trusted_clients_may_call_themselves_anything(ip: str, user: str | None) -> None:
    check = helo_check("reject", "mx.test", [], RELAY)
    assert check(session(ip, helo="mx.test", user=user)) is ACCEPT
    chain = chain_check("reject", "mx.test", RELAY)
    assert chain(session(ip, data=RECEIVED_MX + hops(50) + BODY, user=user)) is ACCEPT


def test_forged_received_is_refused_in_reject_mode() -> None:
    verdict = chain_check("reject", "mx.test", RELAY)(session(data=RECEIVED_MX + BODY))
    assert isinstance(verdict, Reject)
    assert str(verdict.reply) == "550 5.7.1 Refused: Received field claims to be by mx.test"


def test_many_hops_are_only_tagged_even_in_reject_mode() -> None:
    verdict = chain_check("reject", "mx.test", RELAY)(session(data=hops(45) + BODY))
    assert verdict == Tag((f"{TAG_FIELD}: tainted (45 hops)\r\n".encode(),))


def test_the_tag_names_every_finding() -> None:
    verdict = chain_check("tag", "mx.test", RELAY)(session(data=RECEIVED_MX + hops(40) + BODY))
    assert verdict == Tag(
        (f"{TAG_FIELD}: tainted (Received field claims to be by mx.test; 41 hops)\r\n".encode(),)
    )


def config(received: str) -> Config:
    return Config(
        hostname="mx.test",
        relay=RelayConfig(local_domains=("example.test",), relay_networks=("127.0.0.1/32",)),
        checks=ChecksConfig(rfc5322="off", received=received, spf="off", dkim="off"),
    )


def test_off_installs_nothing() -> None:
    policy = policy_for(config("off"))
    assert policy.judge(Stage.MAIL, session(helo="mx.test")) is ACCEPT
    assert policy.judge(Stage.END_OF_DATA, session(data=RECEIVED_MX + BODY)) is ACCEPT
    assert not policy.async_stages


@pytest.mark.parametrize("mode", ["tag", "reject"])
def test_policy_runs_helo_at_mail_and_chain_at_end_of_data(mode: str) -> None:
    policy = policy_for(config(mode))
    kind = Reject if mode == "reject" else Tag
    assert isinstance(policy.judge(Stage.HELO, session(helo="example.test")), type(ACCEPT))
    assert isinstance(policy.judge(Stage.MAIL, session(helo="example.test")), kind)
    assert isinstance(policy.judge(Stage.END_OF_DATA, session(data=RECEIVED_MX + BODY)), kind)
    # Reverse DNS is the one part that needs the resolver.
    assert [len(v) for v in policy.async_stages.values()] == [1, 0]
