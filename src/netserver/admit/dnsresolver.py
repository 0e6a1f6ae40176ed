"""`DnsResolver`: forward-confirmed client names from DNS servers named explicitly.

Kept apart from `netserver.admit.access` so that dnspython, a large import, is loaded only by
servers that configure a DNS server (``--dns-server``), not by every netserver process.
"""

from __future__ import annotations

from collections.abc import Sequence

import dns.exception
import dns.name
import dns.rdatatype
import dns.resolver
import dns.reversename
from dns.rdtypes.ANY.PTR import PTR
from dns.rdtypes.IN.A import A
from dns.rdtypes.IN.AAAA import AAAA

from ..endpoint import IPAddress
from ..errors import ConfigError
from .access import MAX_PTR_NAMES, canonical_names, normalize_ip


def explicit_resolver(
    nameservers: Sequence[str], port: int = 53, timeout: float = 2.0
) -> dns.resolver.Resolver:
    """A resolver that asks only these servers (no resolv.conf), every query bounded.

    ConfigError for a nameserver that is not an address.
    """
    resolver = dns.resolver.Resolver(configure=False)
    try:
        resolver.nameservers = list(nameservers)
    except ValueError as exc:
        raise ConfigError(f"bad nameserver list {list(nameservers)!r}: {exc}") from exc
    resolver.port = port
    # timeout bounds one try at one server; lifetime bounds a whole query.
    resolver.timeout = timeout
    resolver.lifetime = timeout
    return resolver


class DnsResolver:
    """Confirms names by querying the given DNS servers directly with dnspython.

    Unlike `SystemResolver` it has an explicit timeout and can be pointed at a
    test server; it ignores ``/etc/hosts`` and resolv.conf search domains.
    """

    def __init__(self, nameservers: Sequence[str], port: int = 53, timeout: float = 2.0) -> None:
        if not nameservers:
            raise ConfigError("DnsResolver needs at least one nameserver")
        self._resolver = explicit_resolver(nameservers, port, timeout)

    def confirmed_names(self, ip: IPAddress) -> frozenset[str]:
        address = normalize_ip(ip)
        candidates = sorted(self._ptr_names(address))[:MAX_PTR_NAMES]
        return frozenset(
            name for name in candidates if address in self._addresses_of(name, address)
        )

    def _ptr_names(self, address: IPAddress) -> frozenset[str]:
        try:
            answer = self._resolver.resolve(
                dns.reversename.from_address(str(address)), dns.rdatatype.PTR, search=False
            )
        except dns.exception.DNSException:
            return frozenset()
        targets = [rdata.target for rdata in answer if isinstance(rdata, PTR)]
        return canonical_names(target.to_text(omit_final_dot=True) for target in targets)

    def _addresses_of(self, name: str, like: IPAddress) -> set[IPAddress]:
        """A or AAAA records of *name*, matching the family of *like*."""
        rdtype = dns.rdatatype.A if like.version == 4 else dns.rdatatype.AAAA
        try:
            answer = self._resolver.resolve(dns.name.from_text(name), rdtype, search=False)
        except dns.exception.DNSException:
            return set()
        return {normalize_ip(rdata.address) for rdata in answer if isinstance(rdata, A | AAAA)}
