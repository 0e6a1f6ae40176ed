"""The one resolver protocol of the tree: reverse and forward lookups, and what is built
on them (forward-confirmed names for allow/deny rules and leafmail's reverse-DNS check;
tcpd's "unknown"/"paranoid" verdicts in `netserver.tcpd.names`).

A `Resolver` answers two questions and tells "there is none" apart from "DNS could not
tell" (a timeout, SERVFAIL), because a mail check must never refuse for our own DNS
trouble. Its calls are coroutines on the caller's event loop, bounded by the
resolver's own deadline (callers add theirs). Two implementations: `SystemResolver`
(the C library, in a thread: /etc/hosts, nsswitch, resolv.conf) here, and
`netserver.dnsresolver.DnsResolver` (dnspython's asynchronous resolver, servers named
explicitly or leafmail's configured one), kept apart so dnspython is loaded only when
asked for. leafmail extends the basics with its own record lookups
(MX, TXT, DNSBL) but confirms names with these.

Names that come back from DNS are cleaned the way rules are written (`canonical_name`):
a PTR record can hold anything its owner likes.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

from .endpoint import IPAddress

__all__ = [
    "MAX_PTR_NAMES",
    "Forward",
    "Resolver",
    "SystemResolver",
    "canonical_name",
    "canonical_names",
    "confirmed_names",
    "normalize_ip",
]

# One DNS label in letter-digit-hyphen form (RFC 952/1123), already lowercased.
_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
_MAX_NAME_LENGTH = 253

# A reverse zone is controlled by whoever owns the address, so it may list any number
# of names; confirming each costs a query, so only the first few are tried.
MAX_PTR_NAMES = 8


# --------------------------------------------------------------------------- addresses


def normalize_ip(value: str | IPAddress) -> IPAddress:
    """Return the address a rule should judge: IPv4-mapped IPv6 becomes IPv4.

    Strings may carry brackets (``[::1]``) and a zone id (``fe80::1%eth0``), both of
    which are dropped: rules are about addresses, and a zone only says which interface
    the address was seen on.  Raises ValueError for text that is not an address.
    """
    address = _parse_address_text(value) if isinstance(value, str) else value
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return address.ipv4_mapped
        if address.scope_id is not None:
            return ipaddress.IPv6Address(int(address))
    return address


def _parse_address_text(text: str) -> IPAddress:
    """Parse an address written the way servers and users write it (brackets, zone)."""
    inner = text.strip()
    if inner.startswith("[") and inner.endswith("]"):
        inner = inner[1:-1]
    inner = inner.split("%", 1)[0]
    try:
        return ipaddress.ip_address(inner)
    except ValueError:
        raise ValueError(f"not an IP address: {text!r}") from None


# --------------------------------------------------------------------------- names


def canonical_name(text: str) -> str | None:
    """Lowercase *text* and drop a trailing dot; None if it is not a usable host name.

    Used both for rules and for names that come back from DNS, because a PTR record
    can hold anything its owner likes, including text that looks like an IP address.
    A name whose last label is all digits is refused for that reason: no real
    top-level domain is numeric (RFC 3696 section 2).
    """
    name = text.lower()
    if name.endswith("."):
        name = name[:-1]
    if not name or len(name) > _MAX_NAME_LENGTH:
        return None
    labels = name.split(".")
    if not all(_LABEL.fullmatch(label) for label in labels):
        return None
    if labels[-1].isdigit():
        return None
    return name


def canonical_names(names: Iterable[str]) -> frozenset[str]:
    """Canonical forms of the usable names in *names*, dropping the rest."""
    result = (canonical_name(name) for name in names)
    return frozenset(name for name in result if name is not None)


# --------------------------------------------------------------------------- the protocol


@dataclass(frozen=True)
class Forward:
    """A forward answer: the canonical name (after CNAMEs) and the addresses."""

    canonical: str | None = None
    addresses: tuple[IPAddress, ...] = ()


class Resolver(Protocol):
    """Reverse and forward lookups on the running event loop; never raises for DNS.

    Each call is bounded by the resolver's own deadline; callers add theirs.
    """

    async def reverse(self, ip: IPAddress) -> list[str] | None:
        """The PTR names of *ip* in answer order (no final dot), [] if it has none,
        None if DNS could not tell."""
        ...

    async def forward(self, name: str, version: int = 0) -> Forward | None:
        """*name*'s canonical name and addresses of IP *version* (4, 6; 0 for both),
        an empty `Forward` if it has none, None if DNS could not tell."""
        ...


async def confirmed_names(
    resolver: Resolver, ip: IPAddress, limit: int = MAX_PTR_NAMES
) -> frozenset[str] | None:
    """The names of *ip* whose PTR and A/AAAA records agree: lowercase, no final dot.

    At most `limit` PTR names are tried (in sorted order). None when DNS could not
    tell and no name was confirmed; without the forward check anyone who controls the
    reverse zone of their own addresses could claim to be ``trusted.example.com``.
    """
    address = normalize_ip(ip)
    found = await resolver.reverse(address)
    if found is None:
        return None
    confirmed: set[str] = set()
    unsure = False
    for name in sorted(canonical_names(found))[:limit]:
        answer = await resolver.forward(name, address.version)
        if answer is None:
            unsure = True
        elif address in {normalize_ip(a) for a in answer.addresses}:
            confirmed.add(name)
    return None if unsure and not confirmed else frozenset(confirmed)


# --------------------------------------------------------------------------- the C library


class SystemResolver:
    """The C library's resolver: gethostbyaddr and getaddrinfo (``/etc/hosts``,
    nsswitch, resolv.conf), each call in a thread, since the C library blocks (as long
    as the system's own timeouts allow: use `DnsResolver` where a bounded wait matters).
    """

    # asyncio is imported in the calls, which run on a loop where it is loaded already:
    # the pure helpers above are imported by configuration code (leafmail's config,
    # through access rules) that should not load asyncio at each `leafmail sendmail`.
    async def reverse(self, ip: IPAddress) -> list[str] | None:
        import asyncio

        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(None, _reverse, str(normalize_ip(ip)))

    async def forward(self, name: str, version: int = 0) -> Forward | None:
        import asyncio

        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(None, _forward, name, version)


def _reverse(address: str) -> list[str] | None:
    try:
        primary, aliases, _ = socket.gethostbyaddr(address)
    except socket.herror as exc:
        return None if exc.errno == _TRY_AGAIN else []
    except socket.gaierror as exc:
        return None if exc.errno == socket.EAI_AGAIN else []
    except (OSError, UnicodeError):
        return []
    return [name.rstrip(".") for name in (primary, *aliases)]


def _forward(name: str, version: int) -> Forward | None:
    family = {4: socket.AF_INET, 6: socket.AF_INET6}.get(version, socket.AF_UNSPEC)
    try:
        infos = socket.getaddrinfo(name, None, family, socket.SOCK_STREAM, 0, socket.AI_CANONNAME)
    except socket.gaierror as exc:
        return None if exc.errno == socket.EAI_AGAIN else Forward()
    except (OSError, UnicodeError):
        return Forward()
    found: list[IPAddress] = []
    for info in infos:
        address = normalize_ip(str(info[4][0]))
        if address not in found:
            found.append(address)
    return Forward((infos[0][3] if infos else "") or None, tuple(found))


_TRY_AGAIN = 2  # h_errno TRY_AGAIN: a temporary failure of gethostbyaddr
