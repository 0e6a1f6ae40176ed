"""DNSBL and DNSWL: is the client's address listed in the configured DNS zones?

A zone lists 192.0.2.1 when ``1.2.0.192.<zone>`` has an A record in 127.0.0.0/8
(IPv6: the 32 reversed nibbles, RFC 5782). Answers in 127.255.255.0/24 are not
listings but error codes some lists return to refused queriers (Spamhaus: "open
resolver", "over the limit"), so they count as not listed.

The DNSWL check runs first and remembers the zone that lists the client in
`CheckContext.dnswl`; a whitelisted client is then not looked up in any DNSBL and is not
refused by SPF. A DNS failure or timeout is "not listed": a blocklist that cannot
be reached must never stop the mail. Zones are asked concurrently, and the whole
lookup is bounded by the resolver timeout. Both run at MAIL so that an authenticated
client (a user on a listed dial-up address) is known and exempt.
"""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import Sequence

from netserver.admit.access import AccessPolicy
from netserver.endpoint import IPAddress
from netserver.smtp.replies import Reply

from . import (
    ACCEPT,
    AsyncCheck,
    CheckContext,
    Verdict,
    ascii_line,
    header_field,
    is_trusted,
    tag_or_reject,
)
from .lookup import DnsClient, address_of, lookup, reverse_octets, within

TAG_FIELD = "X-Leafmail-DNSBL"
_LISTED = ipaddress.ip_network("127.0.0.0/8")
_ERROR_CODES = ipaddress.ip_network("127.255.255.0/24")


def query_name(ip: IPAddress, zone: str) -> str:
    """The name to look up: reversed octets (or nibbles) under `zone`."""
    return f"{reverse_octets(ip)}.{zone.strip().rstrip('.')}."


async def listed_in(resolver: DnsClient, ip: IPAddress, zone: str) -> bool:
    """True when `zone` lists `ip`; a failed lookup counts as not listed."""
    records = await lookup(resolver, query_name(ip, zone), "A")
    for rdata in records or ():
        address = address_of(rdata)
        if address is not None and address in _LISTED and address not in _ERROR_CODES:
            return True
    return False


async def first_listing(
    resolver: DnsClient, ip: IPAddress, zones: Sequence[str], timeout: float
) -> str | None:
    """The first zone, in configured order, that lists `ip`; None if none (in time)."""
    if not zones:
        return None

    async def all_zones() -> list[bool]:
        return list(await asyncio.gather(*(listed_in(resolver, ip, z) for z in zones)))

    hits = await within(timeout, all_zones(), [False] * len(zones))
    return next((zone for zone, hit in zip(zones, hits, strict=True) if hit), None)


def dnswl_check(
    zones: Sequence[str], resolver: DnsClient, timeout: float, relay_networks: AccessPolicy
) -> AsyncCheck:
    """The MAIL-stage DNSWL lookup; it only records `CheckContext.dnswl`, and always accepts."""

    async def check(session: CheckContext) -> Verdict:
        ip = session.client_ip
        if ip is None or "dnswl" in session.cache or is_trusted(session, relay_networks):
            return ACCEPT
        session.dnswl = await first_listing(resolver, ip, zones, timeout)
        session.cache["dnswl"] = ACCEPT
        return ACCEPT

    return check


def dnsbl_check(
    mode: str,
    zones: Sequence[str],
    resolver: DnsClient,
    timeout: float,
    relay_networks: AccessPolicy,
) -> AsyncCheck:
    """The MAIL-stage DNSBL check: 550 5.7.1 naming the zone, or a tag."""

    async def check(session: CheckContext) -> Verdict:
        ip = session.client_ip
        if ip is None or session.dnswl is not None or is_trusted(session, relay_networks):
            return ACCEPT
        if "dnsbl" not in session.cache:
            zone = await first_listing(resolver, ip, zones, timeout)
            session.cache["dnsbl"] = ACCEPT if zone is None else listed(mode, ip, zone)
        return session.cache["dnsbl"]

    return check


def listed(mode: str, ip: IPAddress, zone: str) -> Verdict:
    """The verdict for a client `zone` lists."""
    text = f"Service unavailable; client [{ip}] blocked using {zone}"
    reply = Reply(550, "5.7.1", ascii_line(text))
    return tag_or_reject(mode, header_field(TAG_FIELD, f"listed ({zone})"), reply)
