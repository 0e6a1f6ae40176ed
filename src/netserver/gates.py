"""The standard gates, in their order, from the settings the CLI and `netserver run` take.

One place builds them, so ``netserver serve`` and a service of ``netserver run`` judge
a client the same way: the PROXY trust gate (who the client is), allow/deny rules,
``local_name``, hosts.allow/hosts.deny, then name lookups for a command's environment
(``local_name`` before tcpd, so a twisted command has it; lookups after, so a name a
rule confirmed is not looked up twice). A Python program may pass its own list to
`Server` instead.
"""

from __future__ import annotations

from collections.abc import Sequence

from .admit.access_gate import AccessGate, AccessLoader
from .admit.gate import Gate
from .admit.proxy import ProxyGate
from .errors import ConfigError
from .handlers import Command, Handler
from .resolver import Resolver
from .tcpd.access import HostsLoader, default_daemon_name
from .tcpd.envnames import LocalNameGate, NameOptions, NamesGate
from .tcpd.gate import HostsGate
from .tcpd.names import HostNames

__all__ = ["standard_gates"]


def standard_gates(
    handler: Handler,
    access: AccessLoader,
    *,
    resolver: Resolver | None = None,
    proxy_from: Sequence[str] = (),
    hosts: HostsLoader | None = None,
    daemon_name: str | None = None,
    host_names: HostNames | None = None,
    names: NameOptions | None = None,
) -> list[Gate]:
    """The gates for these settings; ConfigError for names asked of a Python handler."""
    gates: list[Gate] = []
    if proxy_from:
        gates.append(ProxyGate(proxy_from))
    gates.append(AccessGate(access, resolver))
    names = names or NameOptions()
    if names != NameOptions() and not isinstance(handler, Command):
        raise ConfigError("host name lookups and local names are for commands (TCPREMOTEHOST)")
    if names.local_name is not None:
        gates.append(LocalNameGate(names.local_name))
    if hosts is not None:
        daemon = daemon_name or default_daemon_name(handler)
        gates.append(HostsGate(hosts, daemon, host_names))
    if names.lookup:
        gates.append(NamesGate(host_names))
    return gates
