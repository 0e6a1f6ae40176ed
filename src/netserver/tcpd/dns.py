"""`DnsHostNames`: tcpd-style host names from a DNS server named explicitly.

The same verdicts as `netserver.tcpd.names.SystemHostNames` (a name, "unknown",
"paranoid"), but with dnspython against ``--dns-server``, so every query has a deadline
and tests can point it at a loopback server.  Kept apart so that dnspython is imported
only by servers that ask for a DNS server.
"""

from __future__ import annotations

import dns.exception
import dns.name
import dns.rdatatype
import dns.resolver
import dns.reversename
from dns.rdtypes.ANY.PTR import PTR
from dns.rdtypes.IN.A import A
from dns.rdtypes.IN.AAAA import AAAA

from ..admit.access import normalize_ip
from ..admit.dnsresolver import explicit_resolver
from ..endpoint import IPAddress
from .names import verified_name

__all__ = ["DnsHostNames"]


class DnsHostNames:
    """Reverse lookup, then a forward lookup of the first PTR name, with a timeout."""

    def __init__(self, nameserver: str, port: int = 53, timeout: float = 2.0) -> None:
        self._resolver = explicit_resolver([nameserver], port, timeout)

    def hostname(self, ip: IPAddress) -> str:
        address = normalize_ip(ip)
        ptr_name = self._ptr(address)
        if ptr_name is None:
            return verified_name(None, None, [], address)
        canonical, found = self._forward(ptr_name, 4 if address.version == 4 else 6)
        return verified_name(ptr_name, canonical, found, address)

    def addresses(self, name: str) -> list[IPAddress]:
        found: list[IPAddress] = []
        for version in (4, 6):
            found.extend(self._forward(name, version)[1])
        return found

    def _ptr(self, address: IPAddress) -> str | None:
        """The first PTR target, as getnameinfo would give it; None if there is none."""
        try:
            answer = self._resolver.resolve(
                dns.reversename.from_address(str(address)), dns.rdatatype.PTR, search=False
            )
        except dns.exception.DNSException:
            return None
        for rdata in answer:
            if isinstance(rdata, PTR):
                return str(rdata.target.to_text(omit_final_dot=True))
        return None

    def _forward(self, name: str, version: int) -> tuple[str | None, list[IPAddress]]:
        """(canonical name, addresses) of *name* in one family; (None, []) on failure."""
        rdtype = dns.rdatatype.A if version == 4 else dns.rdatatype.AAAA
        try:
            answer = self._resolver.resolve(dns.name.from_text(name), rdtype, search=False)
        except (dns.exception.DNSException, ValueError):
            return None, []
        canonical = answer.canonical_name.to_text(omit_final_dot=True)
        found = [normalize_ip(r.address) for r in answer if isinstance(r, A | AAAA)]
        return canonical, found
