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
    """An async resolver for these settings; ValueError for a bad nameserver list.

    On a host with no resolver configured (a dial-up machine offline, a bare container)
    it is one that fails every query: lookups then see temporary errors and mail is
    deferred, instead of leafmail refusing to start.
    """
    try:
        resolver = dns.asyncresolver.Resolver(configure=not settings.nameservers)
    except dns.resolver.NoResolverConfiguration:
        resolver = dns.asyncresolver.Resolver(configure=False)
    _configure(resolver, settings)
    resolver.cache = dns.resolver.Cache()
    return resolver


def make_sync_resolver(settings: DnsConfig) -> dns.resolver.Resolver:
    """The same, blocking, for pyspf and dkimpy (in a check pool worker, or a thread)."""
    try:
        resolver = dns.resolver.Resolver(configure=not settings.nameservers)
    except dns.resolver.NoResolverConfiguration:
        resolver = dns.resolver.Resolver(configure=False)
    _configure(resolver, settings)
    resolver.cache = dns.resolver.LRUCache()
    return resolver


def _configure(resolver: dns.resolver.BaseResolver, settings: DnsConfig) -> None:
    if settings.nameservers:
        resolver.nameservers = list(settings.nameservers)
        resolver.port = settings.port
    resolver.timeout = settings.timeout
    resolver.lifetime = settings.timeout
