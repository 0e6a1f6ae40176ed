"""The DNS resolver leafmail's delivery and checks share (MX, MTA-STS, SPF, DKIM, DNSBL).

One asynchronous dnspython resolver, built from the ``[dns]`` table: the system's
resolv.conf by default, or the nameservers and port given there (tests run their own
server on loopback). Every query is bounded by `timeout` as a whole, so a dead server
costs a deferral, not a hung queue.
"""

from __future__ import annotations

import dns.asyncresolver
import dns.resolver

from .config import DnsConfig


def make_resolver(settings: DnsConfig) -> dns.asyncresolver.Resolver:
    """An async resolver for these settings; ValueError for a bad nameserver list."""
    if settings.nameservers:
        resolver = dns.asyncresolver.Resolver(configure=False)
        resolver.nameservers = list(settings.nameservers)
        resolver.port = settings.port
    else:
        resolver = dns.asyncresolver.Resolver(configure=True)
    resolver.timeout = settings.timeout
    resolver.lifetime = settings.timeout
    resolver.cache = dns.resolver.Cache()
    return resolver
