"""Host names the way tcpd sees them: one name, or "unknown", or "paranoid".

tcpd takes the name the reverse lookup gives, then looks that name up forward: the
name counts only if the forward answer's canonical name is the same name (or
"localhost") and lists the address.  A failed reverse lookup gives "unknown"; a name
that fails the forward check -- or that looks like an address, a trick played with PTR
records -- gives "paranoid", which the PARANOID pattern matches.

`SystemHostNames` asks the C library (``/etc/hosts``, nsswitch, resolv.conf); it can
block as long as the system resolver's own timeouts allow, so the server runs it in a
thread under a deadline.  `netserver.tcpd.dns.DnsHostNames` asks a named DNS server
with an explicit timeout.  `FixedHostNames` answers from a table (``netserver check``
and tests).
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Mapping
from typing import Protocol

from ..admit.access import canonical_names, normalize_ip
from ..endpoint import IPAddress
from .match import PARANOID, UNKNOWN

__all__ = ["FixedHostNames", "HostNames", "SystemHostNames", "looks_numeric", "verified_name"]


class HostNames(Protocol):
    """Reverse lookups with forward confirmation, and forward lookups."""

    def hostname(self, ip: IPAddress) -> str:
        """The confirmed name of *ip*, "unknown" or "paranoid"; never raises."""
        ...

    def addresses(self, name: str) -> list[IPAddress]:
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


class SystemHostNames:
    """getnameinfo, then getaddrinfo with AI_CANONNAME, as tcpd's sock_hostname does."""

    def hostname(self, ip: IPAddress) -> str:
        address = normalize_ip(ip)
        try:
            ptr_name, _ = socket.getnameinfo((str(address), 0), socket.NI_NAMEREQD)
        except (OSError, UnicodeError):
            return UNKNOWN
        canonical, found = self._forward(ptr_name, address.version)
        return verified_name(ptr_name, canonical, found, address)

    def addresses(self, name: str) -> list[IPAddress]:
        return self._forward(name, 0)[1]

    @staticmethod
    def _forward(name: str, version: int) -> tuple[str | None, list[IPAddress]]:
        family = {4: socket.AF_INET, 6: socket.AF_INET6}.get(version, socket.AF_UNSPEC)
        try:
            infos = socket.getaddrinfo(
                name, None, family, socket.SOCK_STREAM, 0, socket.AI_CANONNAME
            )
        except (OSError, UnicodeError):
            return None, []
        canonical = infos[0][3] if infos else None
        found: list[IPAddress] = []
        for info in infos:
            address = normalize_ip(str(info[4][0]))
            if address not in found:
                found.append(address)
        return canonical or None, found


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

    def hostname(self, ip: IPAddress) -> str:
        return self._names.get(normalize_ip(ip), UNKNOWN)

    def addresses(self, name: str) -> list[IPAddress]:
        return list(self._addresses.get(name.lower().rstrip("."), []))
