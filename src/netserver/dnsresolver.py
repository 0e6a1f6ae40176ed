"""`DnsResolver`: the `Resolver` protocol over dnspython's asynchronous resolver.

It asks DNS servers named explicitly: every query is bounded (``timeout`` per try and for
the whole query), it ignores ``/etc/hosts`` and resolv.conf search domains, and tests
point it at a loopback server.
leafmail wraps the resolver it configured from its ``[dns]`` table the same way
(``DnsResolver(client=...)``). Kept apart from `netserver.resolver` so that dnspython, a large
import, is loaded only by servers that configure a DNS server (``--dns-server``).
"""

from __future__ import annotations

from collections.abc import Sequence

import dns.asyncresolver
import dns.exception
import dns.name
import dns.rdatatype
import dns.resolver
import dns.reversename
from dns.rdtypes.ANY.PTR import PTR
from dns.rdtypes.IN.A import A
from dns.rdtypes.IN.AAAA import AAAA

from .endpoint import IPAddress
from .errors import ConfigError
from .resolver import Forward, normalize_ip

__all__ = ["DnsResolver", "explicit_resolver"]

_NONE = (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer)


def explicit_resolver(
    nameservers: Sequence[str], port: int = 53, timeout: float = 2.0
) -> dns.asyncresolver.Resolver:
    """A resolver that asks only these servers (no resolv.conf), every query bounded.

    ConfigError for a nameserver that is not an address.
    """
    resolver = dns.asyncresolver.Resolver(configure=False)
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
    """Reverse and forward lookups with dnspython (see `netserver.resolver.Resolver`)."""

    def __init__(
        self,
        nameservers: Sequence[str] = (),
        port: int = 53,
        timeout: float = 2.0,
        *,
        client: dns.asyncresolver.Resolver | None = None,
    ) -> None:
        """Ask `nameservers` (see `explicit_resolver`), or through `client`, a dnspython
        resolver configured elsewhere (leafmail's, from its ``[dns]`` table)."""
        if client is None and not nameservers:
            raise ConfigError("DnsResolver needs at least one nameserver")
        self._resolver = client or explicit_resolver(nameservers, port, timeout)

    async def reverse(self, ip: IPAddress) -> list[str] | None:
        query = dns.reversename.from_address(str(normalize_ip(ip)))
        try:
            answer = await self._resolver.resolve(query, dns.rdatatype.PTR, search=False)
        except _NONE:
            return []
        except dns.exception.DNSException:
            return None
        return [r.target.to_text(omit_final_dot=True) for r in answer if isinstance(r, PTR)]

    async def forward(self, name: str, version: int = 0) -> Forward | None:
        answers = [await self._family(name, v) for v in ((version,) if version else (4, 6))]
        if all(answer is None for answer in answers):
            return None
        found = [a for a in answers if a is not None]
        canonical = next((a.canonical for a in found if a.canonical), None)
        return Forward(canonical, tuple(ip for a in found for ip in a.addresses))

    async def _family(self, name: str, version: int) -> Forward | None:
        """A or AAAA records of *name*; an empty answer if none, None on a failure."""
        rdtype = dns.rdatatype.A if version == 4 else dns.rdatatype.AAAA
        try:
            answer = await self._resolver.resolve(dns.name.from_text(name), rdtype, search=False)
        except _NONE:
            return Forward()
        except (dns.exception.DNSException, ValueError):
            return None
        found = tuple(normalize_ip(r.address) for r in answer if isinstance(r, A | AAAA))
        return Forward(answer.canonical_name.to_text(omit_final_dot=True), found)
