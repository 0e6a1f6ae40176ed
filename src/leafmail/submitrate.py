"""How often one local user may submit through the socket: a token bucket per uid.

The submission socket (leafmail.pickup) is open to every account on the machine, so
without a limit one user's runaway script (or a compromised web application running as
www-data) could fill the queue, and the disk, for everyone. Postfix bounds a remote
client the same way with anvil's ``smtpd_client_message_rate_limit`` per
``anvil_rate_time_unit``; here the unit is the uid the kernel names (SO_PEERCRED),
which the submitter cannot choose.

Each uid may submit `limit` messages in a burst, refilled at `limit` per `unit`
seconds: a steady `limit` per unit, never more. A submission past that is refused
with a temporary failure (sendmail exits 75 and says so; nothing is queued, nothing
claimed). Root and the daemon's own user are not counted: they can write the spool
without the socket anyway. The table is bounded: a uid whose bucket is full again
carries no state, and those are dropped whenever the table passes `MAX_TRACKED`.

The clock is injected, so tests move time instead of waiting for it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection

MAX_TRACKED = 4096  # uids with a partly spent bucket kept before full ones are dropped


class SubmitRate:
    """Per-uid token buckets; `take(uid)` spends one, or says why it cannot."""

    def __init__(
        self,
        limit: int,
        unit: float,
        exempt: Collection[int] = (),
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.limit = limit  # 0: no limit
        self.unit = unit
        self.exempt = frozenset(exempt)
        self.clock = clock
        self._buckets: dict[int, tuple[float, float]] = {}  # uid -> (tokens, as of when)

    @property
    def tracked(self) -> int:
        """How many uids the table holds a partly spent bucket for."""
        return len(self._buckets)

    def take(self, uid: int) -> str | None:
        """Spend one submission of `uid`'s: None, or the reason it is refused now."""
        if not self.limit or uid in self.exempt:
            return None
        now = self.clock()
        tokens = self._tokens(uid, now)
        if tokens < 1.0:
            self._buckets[uid] = (tokens, now)
            wait = (1.0 - tokens) * self.unit / self.limit
            return (
                f"uid {uid} submitted more than {self.limit} messages in {self.unit:g} s; "
                f"try again in {max(1, round(wait))} s"
            )
        self._buckets[uid] = (tokens - 1.0, now)
        if len(self._buckets) > MAX_TRACKED:
            self._forget_full(now)
        return None

    def _tokens(self, uid: int, now: float) -> float:
        held = self._buckets.get(uid)
        if held is None:
            return float(self.limit)
        tokens, since = held
        refill = max(0.0, now - since) * self.limit / self.unit
        return min(float(self.limit), tokens + refill)

    def _forget_full(self, now: float) -> None:
        """Drop the uids whose bucket has refilled: they would start full anyway."""
        full = [uid for uid in self._buckets if self._tokens(uid, now) >= self.limit]
        for uid in full:
            del self._buckets[uid]
