"""The PROXY trust gate: a trusted balancer's connection starts with a PROXY header.

From a source listed in ``--proxy-from`` the header is required; `judge` reads it (off
the accept path, bounded in time) and from then on the connection is the client the
header names, for every later gate, the limits, the log and the handler. A trusted
source that sends no valid header in time is refused (and logged as itself). Anyone
else passes untouched: from them a header would let a client pick its own address.

The server asks this gate before all others, since it says who the client is.
"""

from __future__ import annotations

from collections.abc import Sequence

from ..accepted import Accepted
from ..connlog import ServerLog
from ..endpoint import Endpoint
from ..errors import ConfigError
from ..listen.proxy import PROXY_TIMEOUT, ProxyError, header_timeout, read_header
from ..listen.proxy import apply as proxy_endpoints
from ..modes.base import Mode, ModeContext
from .access import Rule, parse_rule
from .gate import PASS, Pass, Refusal, Ruling

__all__ = ["ProxyGate"]


class ProxyGate:
    """The sources allowed to send a PROXY header: addresses and networks, as --allow."""

    def __init__(self, specs: Sequence[str]) -> None:
        rules: list[Rule] = [parse_rule(spec) for spec in specs]
        for rule in rules:
            if rule.is_name_rule:
                raise ConfigError(f"--proxy-from {rule.spec!r}: give an address or network")
        self.rules = tuple(rules)
        self.timeout = PROXY_TIMEOUT

    def __bool__(self) -> bool:
        return bool(self.rules)

    def trusts(self, peer: Endpoint) -> bool:
        """True if `peer` must (and may) send a PROXY header."""
        ip = peer.ip
        return ip is not None and any(rule.matches(ip, frozenset()) for rule in self.rules)

    def start(self, ctx: ModeContext, mode: Mode) -> Sequence[Mode]:
        self.timeout = header_timeout(ctx.limits.timeout)
        return ()

    def reload(self, log: ServerLog) -> None:
        """The trusted sources are fixed at start-up."""

    def quick(self, peer: Endpoint, local: Endpoint) -> Pass | Refusal | None:
        return None if self.trusts(peer) else PASS

    async def judge(self, conn: Accepted) -> Ruling:
        """Take the header off the (non-blocking) socket; the record becomes its client."""
        record = conn.record
        try:
            info = await read_header(conn.sock, self.timeout)
        except (ProxyError, OSError) as exc:
            return Refusal(f"PROXY protocol: {exc}")
        record.peer, record.local = proxy_endpoints(info, record.peer, record.local)
        return PASS
