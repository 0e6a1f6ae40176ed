"""The checks end to end: a real ``leafmail serve``, a real DNS server, real SMTP clients.

The server's relay_networks is 127.0.0.1 alone, so a client that binds 127.0.0.2 (or
.3) is an outsider that gets every check, while 127.0.0.1 stays trusted; its
``[dns]`` points at a `LoopbackDNS` that publishes SPF records, a DKIM key, reverse
DNS for 127.0.0.2 and a blocklist that lists 127.0.0.3.
"""

from __future__ import annotations

import base64
from collections.abc import Iterator
from pathlib import Path

import dkim
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from dnsserver import LoopbackDNS, Records, reverse_name
from leafmail_fixtures import (
    Leafmail,
    LeafmailFactory,
    RawSMTP,
    check_spooled,
    leafmail_servers,
    queued_id,
    smtp_client,
    smtplib_send,
    split_received,
)

from leafmail.checks.dkim import verify_dkim
from leafmail.config import DnsConfig
from leafmail.dns import make_sync_resolver

pytestmark = pytest.mark.timeout(60)

MESSAGE = (
    b"From: Alice <alice@example.org>\r\n"
    b"To: Bob <bob@mx.test>\r\n"
    b"Subject: hello\r\n"
    b"Date: Mon, 1 Jan 2024 10:00:00 +0000\r\n"
    b"Message-ID: <1@example.org>\r\n"
    b"\r\n"
    b"Hello Bob.\r\n"
)
UNDATED = b"From: bob@other.example.org\r\nTo: carol@mx.test\r\nSubject: x\r\n\r\nhi\r\n"
FORGED = b"Authentication-Results: mx.test;\r\n\tspf=pass smtp.mailfrom=alice@example.org\r\n"
FOREIGN = b"Authentication-Results: relay.example.net; dkim=pass header.d=example.org\r\n"


@pytest.fixture(scope="module")
def key() -> tuple[bytes, str]:
    return make_dkim_key()


def make_dkim_key() -> tuple[bytes, str]:
    """A DKIM signing key (PEM) and its TXT record."""
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = private.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    der = private.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    p = base64.b64encode(der).decode()
    strings = ["v=DKIM1; k=rsa; p=", *(p[i : i + 200] for i in range(0, len(p), 200))]
    return pem, " ".join(f'"{s}"' for s in strings)


@pytest.fixture
def dns(key: tuple[bytes, str]) -> Iterator[LoopbackDNS]:
    records: Records = {
        ("example.org", "TXT"): ['"v=spf1 ip4:127.0.0.2 -all"'],
        ("other.example.org", "TXT"): ['"v=spf1 -all"'],
        ("sel._domainkey.example.org", "TXT"): [key[1]],
        (reverse_name("127.0.0.2"), "PTR"): ["client.example.org"],
        ("client.example.org", "A"): ["127.0.0.2"],
        ("3.0.0.127.bl.test", "A"): ["127.0.0.2"],
    }
    with LoopbackDNS(records) as server:
        yield server


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[LeafmailFactory]:
    yield from leafmail_servers(tmp_path)


def config(dns: LoopbackDNS, mode: str) -> str:
    """Every check in `mode`; the DNSBL always rejects, so a listing is easy to see."""
    return (
        '[relay]\nrelay_networks = ["127.0.0.1/32"]\n'
        f'[dns]\nnameservers = ["127.0.0.1"]\nport = {dns.port}\ntimeout = 3\n'
        f'[checks]\nrfc5322 = "{mode}"\nreceived = "{mode}"\nspf = "{mode}"\n'
        f'dkim = "{mode}"\ndnsbl = "reject"\ndnsbl_zones = ["bl.test"]\n'
    )


def sign(message: bytes, pem: bytes) -> bytes:
    signature: bytes = dkim.sign(
        message, b"sel", b"example.org", pem, include_headers=[b"from", b"to", b"subject", b"date"]
    )
    return signature + message


def stored(server: Leafmail, qid: str, added: bytes) -> bytes:
    """The spooled message after the fields the checks `added` and our Received."""
    data = server.message(qid).data
    assert data.startswith(added), data[:400]
    _, rest = split_received(data[len(added) :])
    return rest


def test_outsider_mail_carries_the_results(
    servers: LeafmailFactory, dns: LoopbackDNS, key: tuple[bytes, str]
) -> None:
    server = servers(config(dns, "tag"))
    signed = sign(MESSAGE, key[0])
    with smtp_client(server, source="127.0.0.2") as client:
        first = smtplib_send(
            client, "alice@example.org", ["bob@mx.test"], FORGED + FOREIGN + signed
        )
        second = smtplib_send(client, "bob@other.example.org", ["carol@mx.test"], UNDATED)
    results = (
        b"Authentication-Results: mx.test;\r\n"
        b"\tspf=pass smtp.mailfrom=alice@example.org;\r\n"
        b"\tdkim=pass header.d=example.org header.s=sel\r\n"
    )
    # The forged field is gone, the foreign one and the signed message are untouched.
    assert stored(server, first, results) == FOREIGN + signed
    # Each transaction has its own results; the second one breaks RFC 5322 too.
    tags = (
        b"X-Leafmail-RFC5322: fail (no Date field)\r\n"
        b"Authentication-Results: mx.test;\r\n"
        b"\tspf=fail smtp.mailfrom=bob@other.example.org;\r\n"
        b"\tdkim=none\r\n"
    )
    assert stored(server, second, tags) == UNDATED
    asked = {name for name, _ in dns.queries}
    assert asked == {
        "2.0.0.127.bl.test",
        "2.0.0.127.in-addr.arpa",
        "client.example.org",
        "example.org",
        "other.example.org",
        "sel._domainkey.example.org",
    }
    # What we stored still verifies: the signed part was not rewritten.
    resolver = make_sync_resolver(DnsConfig(nameservers=("127.0.0.1",), port=dns.port))
    assert verify_dkim(server.message(first).data, resolver, 3.0) == [
        "dkim=pass header.d=example.org header.s=sel"
    ]


def test_a_listed_client_is_refused_at_mail(servers: LeafmailFactory, dns: LoopbackDNS) -> None:
    server = servers(config(dns, "tag"))
    with RawSMTP(server.address(), source="127.0.0.3") as client:
        client.greeting()
        client.ehlo()
        reply = client.command("MAIL FROM:<alice@example.org>")
        assert (reply.code, reply.enhanced) == (550, "5.7.1")
        assert reply.text == "5.7.1 Service unavailable; client [127.0.0.3] blocked using bl.test"
        assert client.command("QUIT").code == 221
    assert server.queue_ids() == []


def test_tainted_helo_is_tagged(servers: LeafmailFactory, dns: LoopbackDNS) -> None:
    server = servers(config(dns, "tag"))
    with RawSMTP(server.address(), source="127.0.0.2") as client:
        client.greeting()
        client.ehlo("mx.test")
        assert client.command("MAIL FROM:<alice@example.org>").code == 250
        assert client.command("RCPT TO:<bob@mx.test>").code == 250
        assert client.command("DATA").code == 354
        qid = queued_id(client.command(MESSAGE + b".").text)
    data = server.message(qid).data
    assert data.startswith(b"X-Leafmail-Received: tainted (HELO mx.test claims to be us)\r\n")


def refusal(server: Leafmail, sender: str, message: bytes, helo: str = "client.test") -> str:
    """Send one message from 127.0.0.2; the first refusal, as "code enhanced"."""
    with RawSMTP(server.address(), source="127.0.0.2") as client:
        client.greeting()
        client.ehlo(helo)
        for command in (f"MAIL FROM:<{sender}>", "RCPT TO:<bob@mx.test>", "DATA"):
            reply = client.command(command)
            if reply.code >= 400:
                return f"{reply.code} {reply.enhanced}"
        reply = client.command(message + b".")
        return f"{reply.code} {reply.enhanced}"


def test_reject_mode_refuses_at_the_right_stage(
    servers: LeafmailFactory, dns: LoopbackDNS, key: tuple[bytes, str]
) -> None:
    server = servers(config(dns, "reject"))
    signed = sign(MESSAGE, key[0])
    assert refusal(server, "bob@other.example.org", signed) == "550 5.7.23"  # SPF, at MAIL
    assert refusal(server, "alice@example.org", signed, helo="mx.test") == "550 5.7.1"  # HELO
    tampered = signed.replace(b"Hello Bob.", b"Hello Eve.")
    assert refusal(server, "alice@example.org", tampered) == "550 5.7.20"  # DKIM
    undated = signed.replace(b"Date:", b"X-Date:")
    assert refusal(server, "alice@example.org", undated) == "550 5.6.0"  # RFC 5322
    assert refusal(server, "alice@example.org", signed).startswith("250 2.0.0")
    assert len(server.queue_ids()) == 1


def test_trusted_clients_need_no_dns(servers: LeafmailFactory, dns: LoopbackDNS) -> None:
    """From relay_networks, even a message every check would refuse is stored as sent."""
    server = servers(config(dns, "reject"))
    message = FORGED + UNDATED
    with smtp_client(server) as client:
        client.ehlo("mx.test")
        qid = smtplib_send(client, "bob@other.example.org", ["carol@mx.test"], message)
    check_spooled(
        server.message(qid),
        message,
        qid=qid,
        sender="bob@other.example.org",
        recipients=["carol@mx.test"],
        helo="mx.test",
    )
    assert dns.queries == []


def test_checks_off_ask_nothing(servers: LeafmailFactory, dns: LoopbackDNS) -> None:
    text = config(dns, "off").replace('dnsbl = "reject"', 'dnsbl = "off"')
    server = servers(text)
    with smtp_client(server, source="127.0.0.2") as client:
        qid = smtplib_send(client, "bob@other.example.org", ["carol@mx.test"], FORGED + UNDATED)
    check_spooled(
        server.message(qid),
        FORGED + UNDATED,
        qid=qid,
        sender="bob@other.example.org",
        recipients=["carol@mx.test"],
        ip="127.0.0.2",
    )
    assert dns.queries == []
