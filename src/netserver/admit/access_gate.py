"""The allow/deny gate: `AccessPolicy` rules carried out on the accept path.

A policy of address rules is decided in `quick`, with no lookup. When a name could
change the outcome, `judge` asks the resolver for the client's forward-confirmed names
(bounded by `LOOKUP_TIMEOUT`: a lookup that does not finish gives no names), then
decides; the name it confirmed becomes the connection's TCPREMOTEHOST.
The rules are re-read on SIGHUP from the loader, keeping the old ones on an error.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Sequence

from ..accepted import Accepted
from ..connlog import ServerLog
from ..endpoint import Endpoint
from ..errors import NetserverError
from ..modes.base import Mode, ModeContext
from ..resolver import Resolver, SystemResolver, confirmed_names
from .access import AccessPolicy, confirmed_choice
from .gate import LOOKUP_TIMEOUT, PASS, Pass, Refusal, Ruling

__all__ = ["AccessGate", "AccessLoader"]

AccessLoader = Callable[[], AccessPolicy]


class AccessGate:
    """--allow/--deny/--access-file: refuse by address at once, by name after a lookup."""

    def __init__(
        self, rules: AccessPolicy | AccessLoader, resolver: Resolver | None = None
    ) -> None:
        self.load: AccessLoader = rules if callable(rules) else (lambda: rules)
        self.policy = self.load()
        self.resolver: Resolver = resolver or SystemResolver()

    def start(self, ctx: ModeContext, mode: Mode) -> Sequence[Mode]:
        return ()

    def reload(self, log: ServerLog) -> None:
        try:
            self.policy = self.load()
        except NetserverError as exc:
            log.error("reload failed, keeping the previous rules", error=str(exc))
            return
        log.info("access rules reloaded", rules=self.policy.describe())

    def quick(self, peer: Endpoint, local: Endpoint) -> Pass | Refusal | None:
        decision = self.policy.quick(peer.ip)
        if decision is None:  # a name could change it: `judge` looks the names up
            return None
        return PASS if decision.allowed else Refusal(decision.reason)

    async def judge(self, conn: Accepted) -> Ruling:
        """Look the client's names up, then decide with them."""
        policy = self.policy
        ip = conn.record.peer.ip
        if ip is None:
            return PASS
        names: frozenset[str] | None = None
        with contextlib.suppress(TimeoutError):
            names = await asyncio.wait_for(confirmed_names(self.resolver, ip), LOOKUP_TIMEOUT)
        names = names or frozenset()  # none confirmed, or DNS could not tell
        decision = policy.decide(ip, names)
        conn.record.remote_host = confirmed_choice(names)
        return PASS if decision.allowed else Refusal(decision.reason)
