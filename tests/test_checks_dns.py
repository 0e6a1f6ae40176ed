"""The checks that ask the DNS: DNSBL/DNSWL, reverse DNS, SPF, DKIM, Authentication-Results.

Every lookup goes to a real authoritative server on loopback (`LoopbackDNS`), which
logs the questions it gets, so tests can say both what was asked and that nothing
was. The DKIM tests sign real messages with dkimpy and a key generated here, whose
public half the server publishes.
"""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import re
import socket
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import replace
from typing import TypeVar

import dkim
import dns.resolver
import nacl.signing
import pytest
import spf
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from dnsserver import LoopbackDNS, Records, reverse_name

from leafmail.checks import ACCEPT, Accept, CheckContext, Defer, Reject, Stage, Tag, Verdict
from leafmail.checks.auth import (
    auth_results_check,
    authserv_id_of,
    forged_results,
    results_field,
)
from leafmail.checks.dkim import verify_dkim
from leafmail.checks.dnsbl import dnsbl_check, dnswl_check, query_name
from leafmail.checks.headers import drop_fields
from leafmail.checks.lookup import lookup
from leafmail.checks.received import rdns_check
from leafmail.checks.spf import hvalue, pvalue, spf_check
from leafmail.config import AuthConfig, ChecksConfig, Config, DnsConfig, RelayConfig
from leafmail.dns import make_resolver, make_sync_resolver
from leafmail.policy import policy_for
from netserver.admit.access import AccessPolicy
from netserver.smtp.addresses import Mailbox

T = TypeVar("T")
RELAY = AccessPolicy(allow=["127.0.0.1/32"])
TIMEOUT = 2.0
# What a loaded machine may add to lookups bounded by a 0.5 s timeout (the tests that time
# a dead server; 1 s was once all the room): still short of dnspython's default 5 s lifetime.
LOADED = 2.5
LISTED = "192.0.2.66"
CLEAN = "192.0.2.10"
SPF_RECORD = '"v=spf1 ip4:192.0.2.0/25 ip6:2001:db8::/32 -all"'
MESSAGE = (
    b"From: Alice <alice@example.org>\r\n"
    b"To: Bob <bob@mx.test>\r\n"
    b"Subject: signed\r\n"
    b"Date: Mon, 1 Jan 2024 10:00:00 +0000\r\n"
    b"Message-ID: <1@example.org>\r\n"
    b"\r\n"
    b"Hello Bob.\r\n"
)


def run(work: Awaitable[T]) -> T:
    async def main() -> T:
        return await work

    return asyncio.run(main())


@pytest.fixture
def servers() -> Iterator[Callable[..., LoopbackDNS]]:
    """Start LoopbackDNS servers for a test; all stopped at teardown."""
    started: list[LoopbackDNS] = []

    def start(records: Records, servfail: Sequence[str] = ()) -> LoopbackDNS:
        server = LoopbackDNS(records, servfail=servfail).start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


def settings(server: LoopbackDNS | int, timeout: float = TIMEOUT) -> DnsConfig:
    port = server if isinstance(server, int) else server.port
    return DnsConfig(nameservers=("127.0.0.1",), port=port, timeout=timeout)


def client(ip: str, **facts: object) -> CheckContext:
    return CheckContext(ipaddress.ip_address(ip), **facts)  # type: ignore[arg-type]


def alice(ip: str = CLEAN, **facts: object) -> CheckContext:
    return client(ip, helo="client.example.org", sender=Mailbox("alice", "example.org"), **facts)


@pytest.fixture
def dead_port() -> Iterator[int]:
    """A UDP port on loopback where nobody ever answers: every query times out."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    yield sock.getsockname()[1]
    sock.close()


# --- DNSBL and DNSWL ---------------------------------------------------------------------


def test_query_names() -> None:
    assert query_name(ipaddress.ip_address("192.0.2.1"), "bl.test") == "1.2.0.192.bl.test."
    v6 = query_name(ipaddress.ip_address("2001:db8::1"), "bl.test.")
    assert v6 == "1." + "0." * 23 + "8.b.d.0.1.0.0.2.bl.test."  # 32 nibbles, reversed
    mapped = ipaddress.ip_address("::ffff:192.0.2.1")
    assert query_name(mapped, "bl.test") == "1.2.0.192.bl.test."


BL_RECORDS: Records = {
    ("66.2.0.192.bl.test", "A"): ["127.0.0.2"],
    ("66.2.0.192.second.test", "A"): ["127.0.0.4"],
    ("77.2.0.192.bl.test", "A"): ["127.255.255.254"],  # "query refused": an error code
    ("88.2.0.192.bl.test", "A"): ["192.0.2.1"],  # outside 127/8: not a listing
    ("99.2.0.192.wl.test", "A"): ["127.0.10.1"],
    (query_name(ipaddress.ip_address("2001:db8::66"), "bl.test"), "A"): ["127.0.0.2"],
}


def dnsbl(
    server: LoopbackDNS, mode: str, zones: Sequence[str] = ("bl.test",)
) -> Callable[[CheckContext], Awaitable[Verdict]]:
    return dnsbl_check(mode, zones, make_resolver(settings(server)), TIMEOUT, RELAY)


def test_listed_client_is_refused_naming_the_zone(servers: Callable[..., LoopbackDNS]) -> None:
    server = servers(BL_RECORDS)
    verdict = run(dnsbl(server, "reject")(client(LISTED)))
    assert isinstance(verdict, Reject)
    assert str(verdict.reply) == (
        "550 5.7.1 Service unavailable; client [192.0.2.66] blocked using bl.test"
    )
    assert server.queries == [("66.2.0.192.bl.test", "A")]


def test_listed_client_is_tagged_in_tag_mode(servers: Callable[..., LoopbackDNS]) -> None:
    verdict = run(dnsbl(servers(BL_RECORDS), "tag")(client(LISTED)))
    assert verdict == Tag((b"X-Leafmail-DNSBL: listed (bl.test)\r\n",))


def test_the_first_listing_zone_in_config_order_is_named(
    servers: Callable[..., LoopbackDNS],
) -> None:
    server = servers(BL_RECORDS)
    verdict = run(dnsbl(server, "reject", ("none.test", "second.test", "bl.test"))(client(LISTED)))
    assert isinstance(verdict, Reject)
    assert str(verdict.reply).endswith("blocked using second.test")
    assert len(server.queries) == 3  # all zones asked at once


@pytest.mark.parametrize(
    "ip",
    [CLEAN, "192.0.2.77", "192.0.2.88"],
    ids=["not listed", "error code answer", "answer outside 127/8"],
)
def test_not_listed(servers: Callable[..., LoopbackDNS], ip: str) -> None:
    assert run(dnsbl(servers(BL_RECORDS), "reject")(client(ip))) is ACCEPT


def test_ipv6_client_is_looked_up_by_nibbles(servers: Callable[..., LoopbackDNS]) -> None:
    verdict = run(dnsbl(servers(BL_RECORDS), "reject")(client("2001:db8::66")))
    assert isinstance(verdict, Reject)


def test_a_failing_blocklist_never_stops_mail(servers: Callable[..., LoopbackDNS]) -> None:
    server = servers(BL_RECORDS, servfail=["66.2.0.192.bl.test"])
    assert run(dnsbl(server, "reject")(client(LISTED))) is ACCEPT


def test_a_dead_blocklist_costs_at_most_the_timeout(dead_port: int) -> None:
    check = dnsbl_check("reject", ["bl.test"], make_resolver(settings(dead_port, 0.5)), 0.5, RELAY)
    started = time.monotonic()
    assert run(check(client(LISTED))) is ACCEPT
    assert time.monotonic() - started < 0.5 + LOADED


def test_one_lookup_per_connection(servers: Callable[..., LoopbackDNS]) -> None:
    server = servers(BL_RECORDS)
    check = dnsbl(server, "reject")
    facts = client(LISTED)

    async def two_transactions() -> tuple[Verdict, Verdict]:
        return await check(facts), await check(facts)

    first, second = run(two_transactions())
    assert first == second
    assert isinstance(first, Reject)
    assert len(server.queries) == 1


def test_whitelisted_client_skips_the_blocklists(servers: Callable[..., LoopbackDNS]) -> None:
    records = {**BL_RECORDS, ("66.2.0.192.wl.test", "A"): ["127.0.10.2"]}
    server = servers(records)
    resolver = make_resolver(settings(server))
    whitelist = dnswl_check(["wl.test"], resolver, TIMEOUT, RELAY)
    facts = client(LISTED)

    async def mail_stage() -> Verdict:
        assert await whitelist(facts) is ACCEPT
        return await dnsbl(server, "reject")(facts)

    assert run(mail_stage()) is ACCEPT
    assert facts.dnswl == "wl.test"
    assert server.queries == [("66.2.0.192.wl.test", "A")]  # no DNSBL lookup at all


@pytest.mark.parametrize(("ip", "user"), [("127.0.0.1", None), (LISTED, "alice")])
def test_trusted_clients_are_not_looked_up(
    servers: Callable[..., LoopbackDNS], ip: str, user: str | None
) -> None:
    server = servers(BL_RECORDS)
    assert run(dnsbl(server, "reject")(client(ip, user=user))) is ACCEPT
    whitelist = dnswl_check(["wl.test"], make_resolver(settings(server)), TIMEOUT, RELAY)
    assert run(whitelist(client(ip, user=user))) is ACCEPT
    assert server.queries == []


# --- reverse DNS -------------------------------------------------------------------------

RDNS_RECORDS: Records = {
    (reverse_name("192.0.2.10"), "PTR"): ["client.example.org"],
    ("client.example.org", "A"): ["192.0.2.10"],
    (reverse_name("192.0.2.20"), "PTR"): ["liar.example.org"],
    ("liar.example.org", "A"): ["192.0.2.21"],
    (reverse_name("192.0.2.30"), "PTR"): ["gone.example.org", "client30.example.org"],
    ("client30.example.org", "A"): ["192.0.2.31", "192.0.2.30"],
    (reverse_name("2001:db8::10"), "PTR"): ["v6.example.org"],
    ("v6.example.org", "AAAA"): ["2001:db8::10"],
    (reverse_name("192.0.2.50"), "PTR"): ["broken.example.org"],
}


def rdns(
    server: LoopbackDNS | int, mode: str, timeout: float = TIMEOUT
) -> Callable[[CheckContext], Awaitable[Verdict]]:
    return rdns_check(mode, make_resolver(settings(server, timeout)), timeout, RELAY)


@pytest.mark.parametrize("ip", ["192.0.2.10", "192.0.2.30", "2001:db8::10"])
def test_forward_confirmed_clients_pass(servers: Callable[..., LoopbackDNS], ip: str) -> None:
    assert run(rdns(servers(RDNS_RECORDS), "reject")(client(ip))) is ACCEPT


@pytest.mark.parametrize("ip", ["192.0.2.20", "192.0.2.40"], ids=["PTR points elsewhere", "no PTR"])
def test_unconfirmed_reverse_dns(servers: Callable[..., LoopbackDNS], ip: str) -> None:
    server = servers(RDNS_RECORDS)
    refused = run(rdns(server, "reject")(client(ip)))
    assert isinstance(refused, Reject)
    assert str(refused.reply) == f"550 5.7.25 Refused: reverse DNS of {ip} is not forward-confirmed"
    tagged = run(rdns(server, "tag")(client(ip)))
    reason = f"reverse DNS of {ip} is not forward-confirmed"
    assert tagged == Tag((f"X-Leafmail-Received: tainted ({reason})\r\n".encode(),))


def test_temporary_dns_failures_never_refuse(
    servers: Callable[..., LoopbackDNS], dead_port: int
) -> None:
    server = servers(RDNS_RECORDS, servfail=["broken.example.org", reverse_name("192.0.2.60")])
    assert run(rdns(server, "reject")(client("192.0.2.50"))) is ACCEPT  # SERVFAIL on the A
    assert run(rdns(server, "reject")(client("192.0.2.60"))) is ACCEPT  # SERVFAIL on the PTR
    started = time.monotonic()
    assert run(rdns(dead_port, "reject", 0.5)(client("192.0.2.20"))) is ACCEPT
    assert time.monotonic() - started < 0.5 + LOADED


# --- SPF ---------------------------------------------------------------------------------

SPF_RECORDS: Records = {
    ("example.org", "TXT"): [SPF_RECORD],
    ("soft.example.org", "TXT"): ['"v=spf1 ~all"'],
    ("mx.example.org", "TXT"): ['"v=spf1 mx include:inc.example.org -all"'],
    ("mx.example.org", "MX"): ["10 mail.example.org"],
    ("mail.example.org", "A"): ["192.0.2.200"],
    ("inc.example.org", "TXT"): ['"v=spf1 a:out.example.org -all"'],
    ("out.example.org", "A"): ["192.0.2.201"],
    ("client.example.org", "TXT"): ['"v=spf1 ip4:192.0.2.10 -all"'],
    ("nospf.example.org", "TXT"): ['"some other text"'],
}


def spf_for(
    server: LoopbackDNS | int, mode: str, timeout: float = TIMEOUT
) -> Callable[[CheckContext], Awaitable[Verdict]]:
    return spf_check(mode, make_sync_resolver(settings(server, timeout)), timeout, RELAY)


@pytest.mark.parametrize(
    ("ip", "domain", "result"),
    [
        ("192.0.2.10", "example.org", "pass"),
        ("2001:db8::5", "example.org", "pass"),
        ("198.51.100.1", "example.org", "fail"),
        ("198.51.100.1", "soft.example.org", "softfail"),
        ("192.0.2.200", "mx.example.org", "pass"),  # mx: MX then A, through our resolver
        ("192.0.2.201", "mx.example.org", "pass"),  # include: then a:
        ("192.0.2.202", "mx.example.org", "fail"),
        ("192.0.2.10", "nospf.example.org", "none"),
        ("192.0.2.10", "nothing.example.org", "none"),  # NXDOMAIN
    ],
)
def test_spf_results(
    servers: Callable[..., LoopbackDNS], ip: str, domain: str, result: str
) -> None:
    facts = client(ip, helo="client.example.org", sender=Mailbox("alice", domain))
    assert run(spf_for(servers(SPF_RECORDS), "tag")(facts)) is ACCEPT
    assert facts.auth_results == [f"spf={result} smtp.mailfrom=alice@{domain}"]


def test_spf_fail_is_refused_in_reject_mode(servers: Callable[..., LoopbackDNS]) -> None:
    verdict = run(spf_for(servers(SPF_RECORDS), "reject")(alice("198.51.100.1")))
    assert isinstance(verdict, Reject)
    assert str(verdict.reply) == "550 5.7.23 SPF validation failed"


@pytest.mark.parametrize("domain", ["soft.example.org", "nospf.example.org"])
def test_only_fail_is_refused(servers: Callable[..., LoopbackDNS], domain: str) -> None:
    facts = client("198.51.100.1", helo="x.example", sender=Mailbox("a", domain))
    assert run(spf_for(servers(SPF_RECORDS), "reject")(facts)) is ACCEPT


def test_spf_temperror_is_deferred_in_reject_mode(servers: Callable[..., LoopbackDNS]) -> None:
    server = servers(SPF_RECORDS, servfail=["example.org"])
    facts = alice()
    verdict = run(spf_for(server, "reject")(facts))
    assert isinstance(verdict, Defer)
    assert str(verdict.reply) == "451 4.7.24 SPF validation error, try again later"
    assert facts.auth_results == ["spf=temperror smtp.mailfrom=alice@example.org"]


def test_spf_on_a_dead_server_is_bounded(dead_port: int) -> None:
    facts = alice()
    started = time.monotonic()
    verdict = run(spf_for(dead_port, "reject", 0.5)(facts))
    assert time.monotonic() - started < 1.5 + LOADED
    assert isinstance(verdict, Defer)
    assert facts.auth_results == ["spf=temperror smtp.mailfrom=alice@example.org"]


def test_null_sender_is_checked_by_helo(servers: Callable[..., LoopbackDNS]) -> None:
    facts = client("192.0.2.10", helo="client.example.org", sender=None)
    assert run(spf_for(servers(SPF_RECORDS), "reject")(facts)) is ACCEPT
    assert facts.auth_results == ["spf=pass smtp.helo=client.example.org"]


def test_whitelisted_client_is_not_refused_for_spf(servers: Callable[..., LoopbackDNS]) -> None:
    facts = alice("198.51.100.1", dnswl="wl.test")
    assert run(spf_for(servers(SPF_RECORDS), "reject")(facts)) is ACCEPT
    assert facts.auth_results == ["spf=fail smtp.mailfrom=alice@example.org"]


def test_quoted_local_part_is_reported_by_domain(servers: Callable[..., LoopbackDNS]) -> None:
    facts = client("192.0.2.10", helo="h.example", sender=Mailbox('"a b"', "example.org"))
    run(spf_for(servers(SPF_RECORDS), "tag")(facts))
    assert facts.auth_results == ["spf=pass smtp.mailfrom=@example.org"]


def test_pyspf_keeps_its_own_lookup_outside_our_checks() -> None:
    """Only a check's worker thread is redirected; other pyspf users are not."""
    from leafmail.checks import spf as spf_checks

    assert spf.DNSLookup is spf_checks._spf_lookup
    assert spf_checks._thread.resolver is None


# --- DKIM --------------------------------------------------------------------------------


def rsa_key() -> tuple[bytes, str]:
    """A fresh RSA key: the PEM to sign with, and the TXT record that publishes it."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    p = base64.b64encode(public).decode()
    # A TXT string holds at most 255 octets: split the key over several.
    strings = ["v=DKIM1; k=rsa; p=", *(p[i : i + 200] for i in range(0, len(p), 200))]
    return pem, " ".join(f'"{s}"' for s in strings)


@pytest.fixture(scope="module")
def dkim_key() -> tuple[bytes, str]:
    return rsa_key()


def sign(
    message: bytes, pem: bytes, selector: bytes = b"sel", domain: bytes = b"example.org"
) -> bytes:
    signature: bytes = dkim.sign(
        message, selector, domain, pem, include_headers=[b"from", b"to", b"subject", b"date"]
    )
    return signature + message


def dkim_records(key: tuple[bytes, str], rotated: str = "") -> Records:
    """SPF records plus DKIM keys: ours (sel), another (rotated), a broken one (bad)."""
    records = {
        **SPF_RECORDS,
        ("sel._domainkey.example.org", "TXT"): [key[1]],
        ("bad._domainkey.example.org", "TXT"): ['"v=DKIM1; k=rsa; p=not*base64"'],
    }
    if rotated:
        records[("rotated._domainkey.example.org", "TXT")] = [rotated]
    return records


@pytest.fixture(scope="module")
def rotated() -> str:
    """The record of a key other than the one `dkim_key` signs with."""
    return rsa_key()[1]


@pytest.fixture(scope="module")
def ed25519_key() -> tuple[bytes, str]:
    """An Ed25519 key (RFC 8463): the base64 seed dkimpy signs with, and its record."""
    key = nacl.signing.SigningKey.generate()
    public = base64.b64encode(bytes(key.verify_key)).decode()
    return base64.b64encode(bytes(key)), f'"v=DKIM1; k=ed25519; p={public}"'


def signed_as(case: str, pem: bytes) -> bytes:
    """MESSAGE signed (or not) in one of the ways `test_dkim_results` lists."""
    signed = sign(MESSAGE, pem)
    match case:
        case "good":
            return signed
        case "tampered body":
            return signed.replace(b"Hello Bob.", b"Hello Eve.")
        case "tampered header":
            return signed.replace(b"Subject: signed", b"Subject: changed")
        case "no signature":
            return MESSAGE
        case "tags missing":
            return re.sub(rb"bh=[^;]*;", b"", signed)
        case "not a tag list":
            return b"DKIM-Signature: this is not a tag list\r\n" + MESSAGE
        case "two, one good":
            return sign(MESSAGE, pem, selector=b"nokey")[: -len(MESSAGE)] + signed
    return sign(MESSAGE, pem, selector=case.encode())  # a selector of its own


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("good", ["dkim=pass header.d=example.org header.s=sel"]),
        ("tampered body", ["dkim=fail header.d=example.org header.s=sel"]),
        ("tampered header", ["dkim=fail header.d=example.org header.s=sel"]),
        ("rotated", ["dkim=fail header.d=example.org header.s=rotated"]),  # another key
        ("nokey", ["dkim=permerror header.d=example.org header.s=nokey"]),
        ("bad", ["dkim=permerror header.d=example.org header.s=bad"]),
        ("down", ["dkim=temperror header.d=example.org header.s=down"]),
        ("no signature", ["dkim=none"]),
        ("tags missing", ["dkim=permerror header.d=example.org header.s=sel"]),
        ("not a tag list", ["dkim=permerror"]),
        (
            "two, one good",
            [
                "dkim=permerror header.d=example.org header.s=nokey",
                "dkim=pass header.d=example.org header.s=sel",
            ],
        ),
    ],
)
def test_dkim_results(
    servers: Callable[..., LoopbackDNS],
    dkim_key: tuple[bytes, str],
    rotated: str,
    case: str,
    expected: list[str],
) -> None:
    records = dkim_records(dkim_key, rotated)
    server = servers(records, servfail=["down._domainkey.example.org"])
    resolver = make_sync_resolver(settings(server))
    assert verify_dkim(signed_as(case, dkim_key[0]), resolver, TIMEOUT) == expected


def test_ed25519_signatures_verify(
    servers: Callable[..., LoopbackDNS], ed25519_key: tuple[bytes, str]
) -> None:
    server = servers({("ed._domainkey.example.org", "TXT"): [ed25519_key[1]]})
    signature: bytes = dkim.sign(
        MESSAGE,
        b"ed",
        b"example.org",
        ed25519_key[0],
        signature_algorithm=b"ed25519-sha256",
        include_headers=[b"from", b"to", b"subject", b"date"],
    )
    resolver = make_sync_resolver(settings(server))
    assert verify_dkim(signature + MESSAGE, resolver, TIMEOUT) == [
        "dkim=pass header.d=example.org header.s=ed"
    ]


def results(server: LoopbackDNS, dkim_mode: str) -> Callable[[CheckContext], Awaitable[Verdict]]:
    return auth_results_check(
        "mx.test", dkim_mode, make_sync_resolver(settings(server)), TIMEOUT, RELAY
    )


def test_dkim_fail_is_only_tagged_in_tag_mode(
    servers: Callable[..., LoopbackDNS], dkim_key: tuple[bytes, str]
) -> None:
    tampered = sign(MESSAGE, dkim_key[0]).replace(b"Hello Bob.", b"Hello Eve.")
    verdict = run(results(servers(dkim_records(dkim_key)), "tag")(alice(data=tampered)))
    assert verdict == Tag(
        (b"Authentication-Results: mx.test;\r\n\tdkim=fail header.d=example.org header.s=sel\r\n",)
    )


@pytest.mark.parametrize(
    ("selector", "tamper", "expected"),
    [
        (b"sel", False, "accept"),
        (b"sel", True, "550 5.7.20 No passing DKIM signature found"),
        (b"rotated", False, "550 5.7.20 No passing DKIM signature found"),
        (b"nokey", False, "accept"),  # a signature nobody can check proves nothing
        (b"down", False, "451 4.4.3 DKIM key lookup failed, try again later"),
        (None, False, "accept"),  # unsigned mail is not refused
    ],
)
def test_dkim_reject_mode(
    servers: Callable[..., LoopbackDNS],
    dkim_key: tuple[bytes, str],
    rotated: str,
    selector: bytes | None,
    tamper: bool,
    expected: str,
) -> None:
    records = dkim_records(dkim_key, rotated)
    server = servers(records, servfail=["down._domainkey.example.org"])
    message = MESSAGE if selector is None else sign(MESSAGE, dkim_key[0], selector=selector)
    if tamper:
        message = message.replace(b"Hello Bob.", b"Hello Eve.")
    verdict = run(results(server, "reject")(alice(data=message)))
    if expected == "accept":
        assert isinstance(verdict, Accept)
    else:
        assert isinstance(verdict, Reject | Defer)
        assert str(verdict.reply) == expected


# --- Authentication-Results --------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "authserv_id"),
    [
        ("mx.test; spf=pass smtp.mailfrom=a@b", "mx.test"),
        ("MX.Test; none", "mx.test"),
        ("mx.test 1; dkim=pass", "mx.test"),
        ("(forged for you) mx.test; spf=pass", "mx.test"),
        ("(nested (comment)) mx.test.; spf=pass", "mx.test"),
        ('"mx.test"; spf=pass', "mx.test"),
        ("other.example; spf=pass smtp.mailfrom=mx.test", "other.example"),
        ("", ""),
    ],
)
def test_authserv_id_of(value: str, authserv_id: str) -> None:
    assert authserv_id_of(value) == authserv_id


@pytest.mark.parametrize(
    ("helo", "value"),
    [
        ("client.example.org", "client.example.org"),
        ("[192.0.2.1]", "[192.0.2.1]"),
        ("[IPv6:2001:db8::1]", "[IPv6:2001:db8::1]"),
        ('we;ird"one', '"we;ird\\"one"'),
        ("caf\u00e9", '"caf?"'),
    ],
)
def test_helo_identity_values(helo: str, value: str) -> None:
    assert hvalue(helo) == value


@pytest.mark.parametrize(
    ("local", "value"),
    [("alice", "alice@example.org"), ("a.b+c", "a.b+c@example.org"), ('"a b"', "@example.org")],
)
def test_mailfrom_values(local: str, value: str) -> None:
    assert pvalue(Mailbox(local, "example.org")) == value
    assert pvalue(Mailbox("j\u00f6rg", "b\u00fccher.example")) == "@xn--bcher-kva.example"


def test_results_field_format() -> None:
    assert results_field("mx.test", ["spf=pass smtp.mailfrom=a@b.example", "dkim=none"]) == (
        b"Authentication-Results: mx.test;\r\n\tspf=pass smtp.mailfrom=a@b.example;\r\n"
        b"\tdkim=none\r\n"
    )
    assert results_field("mx.test", []) == b"Authentication-Results: mx.test;\r\n\tnone\r\n"


FORGED = b"Authentication-Results: mx.test;\r\n\tspf=pass smtp.mailfrom=alice@example.org\r\n"
FORGED_TOO = b"Authentication-Results: (hi) MX.TEST 1; dkim=pass header.d=example.org\r\n"
FOREIGN = b"Authentication-Results: relay.example.org; spf=pass smtp.mailfrom=a@example.org\r\n"


def test_forged_results_are_dropped_and_foreign_ones_kept(
    servers: Callable[..., LoopbackDNS],
) -> None:
    message = FORGED + FOREIGN + FORGED_TOO + MESSAGE
    assert forged_results(message, "mx.test") == (FORGED, FORGED_TOO)
    server = servers(SPF_RECORDS)
    verdict = run(results(server, "tag")(alice(data=message, auth_results=["spf=pass x"])))
    assert isinstance(verdict, Tag)
    assert verdict.drop == (FORGED, FORGED_TOO)
    assert drop_fields(message, verdict.drop) == FOREIGN + MESSAGE
    assert verdict.fields == (
        b"Authentication-Results: mx.test;\r\n\tspf=pass x;\r\n\tdkim=none\r\n",
    )


def test_an_authentication_results_in_the_body_is_not_touched() -> None:
    message = MESSAGE + FORGED
    assert forged_results(message, "mx.test") == ()
    assert drop_fields(message, (FORGED,)) == message


# --- the whole policy: trusted clients, and the results of both stages together ---------


def all_on(server: LoopbackDNS | int, timeout: float = TIMEOUT) -> Config:
    return Config(
        hostname="mx.test",
        relay=RelayConfig(relay_networks=("127.0.0.1/32",)),
        auth=AuthConfig(senders=(("alice", ("@example.org",)),)),  # sender ownership
        dns=settings(server, timeout),
        checks=ChecksConfig(
            rfc5322="reject",
            received="reject",
            dnsbl="reject",
            spf="reject",
            dkim="reject",
            dnsbl_zones=("bl.test",),
            dnswl_zones=("wl.test",),
        ),
    )


async def transaction(config: Config, facts: CheckContext, data: bytes) -> tuple[Verdict, Verdict]:
    """Judge MAIL, then end of data, as ReceiveService does."""
    policy = policy_for(config)
    facts.start_transaction()
    mail = await policy.judge_async(Stage.MAIL, facts)
    if isinstance(mail, Tag):
        facts.tags[Stage.MAIL] = [mail]
    facts.data = data
    end = await policy.judge_async(Stage.END_OF_DATA, facts)
    if isinstance(end, Tag):
        facts.tags[Stage.END_OF_DATA] = [end]
    return mail, end


@pytest.mark.parametrize(("ip", "user"), [("127.0.0.1", None), (LISTED, "alice")])
def test_trusted_clients_need_no_dns_at_all(
    servers: Callable[..., LoopbackDNS], dkim_key: tuple[bytes, str], ip: str, user: str | None
) -> None:
    server = servers({**dkim_records(dkim_key), **BL_RECORDS})
    facts = client(ip, user=user, helo="mx.test", sender=Mailbox("alice", "example.org"))
    forged = FORGED + sign(MESSAGE, dkim_key[0]).replace(b"Date", b"X-Date")
    mail, end = run(transaction(all_on(server), facts, forged))
    assert (mail, end) == (ACCEPT, ACCEPT)
    assert facts.all_tags() is ACCEPT
    assert server.queries == []


def test_an_outsider_gets_one_results_field_for_both_stages(
    servers: Callable[..., LoopbackDNS], dkim_key: tuple[bytes, str]
) -> None:
    server = servers({**dkim_records(dkim_key), **RDNS_RECORDS})
    facts = alice()
    signed = FORGED + FOREIGN + sign(MESSAGE, dkim_key[0])
    mail, _ = run(transaction(all_on(server), facts, signed))
    assert mail is ACCEPT
    assert facts.all_tags() == Tag(
        (
            b"Authentication-Results: mx.test;\r\n"
            b"\tspf=pass smtp.mailfrom=alice@example.org;\r\n"
            b"\tdkim=pass header.d=example.org header.s=sel\r\n",
        ),
        (FORGED,),
    )
    asked = {name for name, _ in server.queries}
    assert {"10.2.0.192.wl.test", "10.2.0.192.bl.test", "example.org"} <= asked
    assert {reverse_name("192.0.2.10").rstrip("."), "sel._domainkey.example.org"} <= asked


def test_authserv_id_comes_from_the_config(servers: Callable[..., LoopbackDNS]) -> None:
    server = servers(SPF_RECORDS)
    base = all_on(server)
    config = replace(
        base,
        checks=replace(
            base.checks, authserv_id="auth.example", dkim="off", received="off", dnsbl="off"
        ),
    )
    facts = alice()
    run(transaction(config, facts, FORGED + MESSAGE))
    # The mx.test field is someone else's now, and stays.
    ours = (
        b"Authentication-Results: auth.example;\r\n\tspf=pass smtp.mailfrom=alice@example.org\r\n"
    )
    assert facts.all_tags() == Tag((ours,))


def test_every_check_is_bounded_by_the_dns_timeout(dead_port: int) -> None:
    facts = alice()
    started = time.monotonic()
    mail, _ = run(transaction(all_on(dead_port, 0.5), facts, MESSAGE))
    assert time.monotonic() - started < 6.0
    assert isinstance(mail, Defer)  # SPF could not be evaluated: try again later
    assert str(mail.reply).startswith("451 4.7.24")


def test_a_host_without_resolver_configuration_still_starts(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """No resolv.conf (a dial-up host offline): lookups fail as temporary errors."""

    def no_configuration(*args: object, **kwargs: object) -> None:
        raise dns.resolver.NoResolverConfiguration

    monkeypatch.setattr(dns.resolver.BaseResolver, "read_resolv_conf", no_configuration)
    settings = DnsConfig(timeout=0.5)
    assert run(lookup(make_resolver(settings), "example.org", "TXT")) is None
    with pytest.raises(dns.resolver.NoNameservers):
        make_sync_resolver(settings).resolve("example.org", "TXT")
    mail, _ = run(transaction(replace(all_on(0), dns=settings), alice(), MESSAGE))
    assert isinstance(mail, Defer)  # SPF in reject mode: try again once DNS is back
