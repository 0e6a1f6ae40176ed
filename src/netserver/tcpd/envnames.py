"""The host names a command's environment carries: TCPREMOTEHOST and TCPLOCALHOST.

tcpserver sets TCPREMOTEHOST from the client's PTR record (``-h``, its default; ``-p``
drops a name whose addresses do not include the client) and TCPLOCALHOST from ``-l
NAME`` or the local address's PTR record. netserver differs in two ways, both chosen for
safety: it looks names up only when asked (``lookup_names``, off by default, as
``tcpserver -H``: a lookup per connection costs DNS round trips and lets whoever runs
the client's reverse zone slow every connection down), and a looked-up name is always
forward-confirmed (as ``tcpserver -p``, and tcpd's PARANOID check): a PTR name whose A
or AAAA records do not list the address is no name at all, so a command that trusts
TCPREMOTEHOST cannot be told "trusted.example" by a forged reverse zone.

A name the access rules already confirmed (an allow/deny rule by name, a hosts.allow
pattern that needed the client's name) is used whether or not lookups are on, without
a second lookup. A variable whose name is not known is not set, as tcp-environ(5) says.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from ..connlog import ConnRecord
from ..endpoint import Endpoint, IPAddress
from .access import Request
from .match import HostInfo, hostname_known
from .names import HostNames

__all__ = ["ConnNames", "NameOptions", "confirmed_choice"]

LOOKUP_TIMEOUT = 5.0


@dataclass(frozen=True)
class NameOptions:
    """Which names commands get: ``lookup`` (tcpserver -h -p) and ``local_name`` (-l)."""

    lookup: bool = False
    local_name: str | None = None


def confirmed_choice(names: frozenset[str]) -> str | None:
    """One of the names an allow/deny rule confirmed (the first in order), or None."""
    return min(names) if names else None


def _known(host: HostInfo) -> str | None:
    """The name hosts.allow looked up for one end, if it is a confirmed name."""
    if host.resolved is not None and hostname_known(host.resolved):
        return host.resolved
    return None


class ConnNames:
    """Fills a connection record's names: from the access rules, then by lookup."""

    def __init__(
        self, options: NameOptions, names: HostNames, timeout: float = LOOKUP_TIMEOUT
    ) -> None:
        self.options = options
        self.names = names
        self.timeout = timeout

    def start(self, record: ConnRecord) -> None:
        """Names known before anything is looked up (``local_name``)."""
        if record.peer.ip is not None and self.options.local_name is not None:
            record.local_host = self.options.local_name

    def wanted(self, peer: Endpoint) -> bool:
        """Whether a connection from *peer* needs a lookup task before it is served."""
        return self.options.lookup and peer.ip is not None

    def take(self, record: ConnRecord, request: Request | None) -> None:
        """Names that hosts.allow rules looked up while deciding."""
        if request is None:
            return
        record.remote_host = record.remote_host or _known(request.client)
        record.local_host = record.local_host or _known(request.server)

    async def fill(self, record: ConnRecord) -> None:
        """Look up, concurrently and each within the timeout, the names still missing."""
        if not self.wanted(record.peer):
            return
        remote, local = await asyncio.gather(
            self._lookup(record.peer.ip if record.remote_host is None else None),
            self._lookup(record.local.ip if record.local_host is None else None),
        )
        record.remote_host = record.remote_host or remote
        record.local_host = record.local_host or local

    async def _lookup(self, ip: IPAddress | None) -> str | None:
        if ip is None:
            return None
        loop = asyncio.get_running_loop()
        try:
            name = await asyncio.wait_for(
                loop.run_in_executor(None, self.names.hostname, ip),
                self.timeout,
            )
        except TimeoutError:
            return None
        return name if hostname_known(name) else None
