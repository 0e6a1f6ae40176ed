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
from collections.abc import Sequence
from dataclasses import dataclass

from ..accepted import Accepted
from ..admit.gate import LOOKUP_TIMEOUT, PASS, Pass, Refusal, Ruling
from ..connlog import ConnRecord, ServerLog
from ..endpoint import Endpoint, IPAddress
from ..modes.base import Mode, ModeContext
from .match import hostname_known
from .names import HostNames, ResolverNames

__all__ = ["LocalNameGate", "NameOptions", "NamesGate"]


@dataclass(frozen=True)
class NameOptions:
    """Which names commands get: ``lookup`` (tcpserver -h -p) and ``local_name`` (-l)."""

    lookup: bool = False
    local_name: str | None = None


class _IpNameGate:
    """A gate that sets a name for every IP client, in the task that judges it."""

    def start(self, ctx: ModeContext, mode: Mode) -> Sequence[Mode]:
        return ()

    def reload(self, log: ServerLog) -> None:
        """Nothing to re-read."""

    def quick(self, peer: Endpoint, local: Endpoint) -> Pass | Refusal | None:
        """Undecided for an IP client: `judge` sets the name; a Unix client has none."""
        return PASS if peer.ip is None else None


class LocalNameGate(_IpNameGate):
    """TCPLOCALHOST from ``local_name``, without a lookup. Asked before the tcpd gate, so
    a command a hosts rule twisted gets it too."""

    def __init__(self, name: str) -> None:
        self.name = name

    async def judge(self, conn: Accepted) -> Ruling:
        conn.record.local_host = self.name
        return PASS


class NamesGate(_IpNameGate):
    """Looks up the names still missing before a command runs (names an access rule or
    a hosts rule confirmed, or ``local_name``, are kept): tcpserver -h -p."""

    def __init__(self, names: HostNames | None = None, timeout: float = LOOKUP_TIMEOUT) -> None:
        self.names = names or ResolverNames()
        self.timeout = timeout

    async def judge(self, conn: Accepted) -> Ruling:
        await self.fill(conn.record)
        return PASS

    async def fill(self, record: ConnRecord) -> None:
        """Look up, concurrently and each within the timeout, the names still missing."""
        if record.peer.ip is None:
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
        try:
            name = await asyncio.wait_for(self.names.hostname(ip), self.timeout)
        except TimeoutError:
            return None
        return name if hostname_known(name) else None
