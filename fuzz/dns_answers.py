"""Fuzz what leafmail and netserver do with a DNS answer, and with an MTA-STS policy.

A DNS answer in wire format (dnspython parses it, as the resolver would) is handed to
the code that reads each record type: MX ordering and the "before self" cut, DNSBL
address tests, the MTA-STS TXT id, PTR confirmation (`verified_name`). Or the input is
an MTA-STS reply: its HTTP head and its policy text, or a recipient's domain as delivery
makes it a DNS name. The first octet chooses. Checked: nothing raises but the
documented errors, and the cost stays bounded (slow inputs kept as ``slow-<sha256>``).
"""

from __future__ import annotations

import contextlib
import ipaddress
import random
import time

import atheris
import dns.exception
import dns.message
import dns.rdatatype
from common import keep_if_slow, run

with atheris.instrument_imports():
    from leafmail.checks.dnsbl import _ERROR_CODES, _LISTED
    from leafmail.checks.lookup import address_of
    from leafmail.delivery import mta_sts
    from leafmail.delivery.mx import MAX_MX_HOSTS, before_self, dns_name, order_hosts
    from netserver.tcpd.names import verified_name

SLOW = 0.1  # seconds for one input, instrumented
_CLIENT = ipaddress.ip_address("192.0.2.1")


def read_answer(wire: bytes) -> None:
    """Each record of the answer section through the code that reads its type."""
    try:
        message = dns.message.from_wire(wire)
    except (dns.exception.DNSException, ValueError, UnicodeError):
        return  # dnspython refuses it: the resolver counts that as a failed query
    for rrset in message.answer:
        if rrset.rdtype == dns.rdatatype.MX:
            mx = [(r.preference, r.exchange.to_text(omit_final_dot=True)) for r in rrset]
            hosts = order_hosts(mx, random.Random(0))  # noqa: S311 (an order, not a secret)
            assert len(hosts) <= MAX_MX_HOSTS
            before_self(hosts, "mx.example")
        elif rrset.rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA):
            for rdata in rrset:
                address = address_of(rdata)
                _ = address is not None and address in _LISTED and address not in _ERROR_CODES
        elif rrset.rdtype == dns.rdatatype.TXT:
            strings = [b"".join(r.strings).decode("ascii", "replace") for r in rrset]
            policy_id = mta_sts.parse_txt(strings)
            assert policy_id is None or policy_id.isalnum()
        elif rrset.rdtype == dns.rdatatype.PTR:
            for rdata in rrset:
                name = rdata.target.to_text(omit_final_dot=True)
                verified = verified_name(name, name, [_CLIENT], _CLIENT)
                assert verified.isascii() and " " not in verified, verified


def read_policy(head: bytes, text: str) -> None:
    """An MTA-STS reply: PolicyError is the only refusal."""
    with contextlib.suppress(mta_sts.PolicyError):
        mta_sts._check_head(head, "mta-sts.example")
    try:
        policy = mta_sts.parse_policy(text, "id1")
    except mta_sts.PolicyError:
        return
    policy.allows("mx1.example")


def one_input(data: bytes) -> None:
    if not data:
        return
    started = time.process_time()
    kind = data[0] % 3
    if kind == 0:
        read_answer(data[1:])
    elif kind == 1:
        head, _, body = data[1:].partition(b"\r\n\r\n")
        read_policy(head + b"\r\n\r\n", body.decode("utf-8", "replace"))
    else:  # a recipient's domain (the client's), as delivery turns it into a DNS name
        domain = data[1:].decode("utf-8", "replace")
        name = dns_name(domain)
        assert name is None or name.is_absolute()
        mta_sts.mx_matches(domain, "mx1.example")
    keep_if_slow(data, time.process_time() - started, SLOW)


if __name__ == "__main__":
    run(one_input)
