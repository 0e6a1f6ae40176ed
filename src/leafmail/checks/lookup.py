"""DNS lookups for the checks: an answer, "nothing there", or "could not tell".

The checks must tell a definite no (NXDOMAIN, no records: the client is not listed,
has no PTR) from a temporary failure (timeout, SERVFAIL: try again later, and never
refuse mail because of our own DNS trouble). `lookup` returns the records, an empty
list, or None for the temporary case; every other DNS exception means None too.
"""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import Awaitable
from typing import TypeVar

import dns.asyncresolver
import dns.exception
import dns.name
import dns.resolver
import dns.reversename
from dns.rdata import Rdata
from dns.rdtypes.IN.A import A
from dns.rdtypes.IN.AAAA import AAAA

from netserver.endpoint import IPAddress, unmap

T = TypeVar("T")
# The dnspython client the record lookups use; the basics (PTR, then forward
# confirmation) go through netserver.resolver, which leafmail extends with these.
DnsClient = dns.asyncresolver.Resolver


async def lookup(resolver: DnsClient, name: str | dns.name.Name, rdtype: str) -> list[Rdata] | None:
    """The records of `name`, [] if there are none, None on a temporary failure."""
    try:
        answer = await resolver.resolve(name, rdtype, search=False)
    except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
        return []
    except dns.exception.DNSException:
        return None
    return list(answer)


async def within(seconds: float, work: Awaitable[T], on_timeout: T) -> T:
    """`work`'s result, or `on_timeout` when it takes longer than `seconds`."""
    try:
        async with asyncio.timeout(seconds):
            return await work
    except TimeoutError:
        return on_timeout


def reverse_octets(ip: IPAddress) -> str:
    """The reversed form used under DNSBL zones and in-addr.arpa/ip6.arpa.

    192.0.2.1 -> "1.2.0.192"; an IPv6 address -> its 32 nibbles, reversed.
    """
    name = dns.reversename.from_address(str(unmap(ip)))
    return name.to_text(omit_final_dot=True).rsplit(".", 2)[0]


def address_of(rdata: Rdata) -> IPAddress | None:
    """The address in an A or AAAA record."""
    if not isinstance(rdata, A | AAAA):
        return None
    try:
        return ipaddress.ip_address(rdata.address)
    except ValueError:
        return None
