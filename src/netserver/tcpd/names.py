"""Host names the way tcpd sees them: one name, or "unknown", or "paranoid".

tcpd takes the name the reverse lookup gives, then looks that name up forward: the
name counts only if the forward answer's canonical name is the same name (or
"localhost") and lists the address.  A failed reverse lookup gives "unknown"; a name
that fails the forward check -- or that looks like an address, a trick played with PTR
records -- gives "paranoid", which the PARANOID pattern matches.

`ResolverNames` gives these verdicts from any `netserver.resolver.Resolver` (the C
library's, or a named DNS server's with an explicit timeout); the server awaits them under
a deadline. `FixedHostNames` answers from a
table (``netserver check`` and tests).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from typing import Protocol

from ..endpoint import IPAddress
from ..resolver import Forward, Resolver, SystemResolver, canonical_names, normalize_ip
from .match import PARANOID, UNKNOWN

__all__ = ["FixedHostNames", "HostNames", "ResolverNames", "looks_numeric", "verified_name"]


class HostNames(Protocol):
    """Reverse lookups with forward confirmation, and forward lookups."""

    async def hostname(self, ip: IPAddress) -> str:
        """The confirmed name of *ip*, "unknown" or "paranoid"; never raises."""
        ...

    async def addresses(self, name: str) -> list[IPAddress]:
        """The addresses of *name* (for ``netserver check DAEMON HOSTNAME``); [] if none."""
        ...


def looks_numeric(name: str) -> bool:
    """True if a PTR answer is really an address (``1.1.1.10.in-addr.arpa PTR 10.1.1.1``)."""
    try:
        ipaddress.ip_address(name.rstrip("."))
    except ValueError:
        return False
    return True


def verified_name(
    ptr_name: str | None, canonical: str | None, addresses: list[IPAddress], ip: IPAddress
) -> str:
    """tcpd's verdict on a reverse answer given the forward answer for it.

    *ptr_name* None means the reverse lookup failed; *canonical* None means the forward
    lookup failed.  Names that are not plain letter-digit-hyphen host names cannot be
    confirmed honestly and count as "paranoid": they never reach a pattern or a shell.
    """
    if ptr_name is None:
        return UNKNOWN
    clean = canonical_names([ptr_name])
    if looks_numeric(ptr_name) or not clean or canonical is None:
        return PARANOID
    name = next(iter(clean))
    if canonical.lower().rstrip(".") != name and name != "localhost":
        return PARANOID
    return name if normalize_ip(ip) in {normalize_ip(a) for a in addresses} else PARANOID


class ResolverNames:
    """tcpd's view of any `Resolver`: the first PTR name, then its forward lookup, as
    tcpd's sock_hostname does (`SystemResolver` by default)."""

    def __init__(self, resolver: Resolver | None = None) -> None:
        self.resolver: Resolver = resolver or SystemResolver()

    async def hostname(self, ip: IPAddress) -> str:
        address = normalize_ip(ip)
        found = await self.resolver.reverse(address)
        if not found:
            return verified_name(None, None, [], address)
        answer = await self.resolver.forward(found[0], address.version) or Forward()
        return verified_name(found[0], answer.canonical, list(answer.addresses), address)

    async def addresses(self, name: str) -> list[IPAddress]:
        answer = await self.resolver.forward(name) or Forward()
        return list(answer.addresses)


class FixedHostNames:
    """Names from a table: ip -> name ("unknown" when absent), name -> addresses."""

    def __init__(
        self,
        names: Mapping[str, str] | None = None,
        addresses: Mapping[str, list[str]] | None = None,
    ) -> None:
        self._names = {normalize_ip(ip): name for ip, name in (names or {}).items()}
        self._addresses = {
            name.lower(): [normalize_ip(a) for a in found]
            for name, found in (addresses or {}).items()
        }

    async def hostname(self, ip: IPAddress) -> str:
        return self._names.get(normalize_ip(ip), UNKNOWN)

    async def addresses(self, name: str) -> list[IPAddress]:
        return list(self._addresses.get(name.lower().rstrip("."), []))
