"""The limits gate: how many connections at once, per source, and how fast.

`Admission` is the server's last gate (see gate.py): its `quick` counts a connection in
before it reaches any handler, and the server calls `release` when it ends. The global
cap is applied by pausing accept (excess clients wait in the listen backlog, as with
tcpserver -c), the per-source caps by refusing.
Time is injected so the rate tests need not sleep.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from ..accepted import Accepted
from ..connlog import ServerLog
from ..endpoint import Endpoint
from ..limits import Limits, source_key
from ..modes.base import Mode, ModeContext
from ..refusals import RefusalCause
from .gate import PASS, Pass, Refusal, Ruling


@dataclass
class _Bucket:
    tokens: float
    stamp: float


@dataclass
class Admission:
    """Per-source bookkeeping: open connections and a token bucket for new ones."""

    limits: Limits
    clock: Callable[[], float] = time.monotonic
    _open: dict[str, int] = field(default_factory=dict)
    _buckets: dict[str, _Bucket] = field(default_factory=dict)
    _next_prune: float = 0.0
    _window: tuple[float, int] = (float("-inf"), 0)
    _paused_until: float = float("-inf")
    total: int = 0

    # -- the Gate contract (see gate.py): the server asks this gate after all others --
    def start(self, ctx: ModeContext, mode: Mode) -> Sequence[Mode]:
        return ()

    def reload(self, log: ServerLog) -> None:
        """Limits are fixed at start-up."""

    def quick(self, peer: Endpoint, local: Endpoint) -> Pass | Refusal | None:
        """Count the connection in, or refuse it; never undecided."""
        why = self.admit(peer)
        return PASS if why is None else Refusal(why, RefusalCause.LIMIT)

    async def judge(self, conn: Accepted) -> Ruling:
        return PASS

    def admit(self, peer: Endpoint) -> str | None:
        """Count the connection in and return None, or return why it is refused."""
        key = self._source(peer)
        if self.limits.service_rate and (why := self._service_over_rate()):
            return why
        # The exemption is asked only when a cap would refuse: it is a lookup in an
        # access policy, too dear for every accept.
        why = self._over_source_limits(key)
        if why is not None and not (self.limits.exempt and self.limits.exempt(peer)):
            return why
        self._open[key] = self._open.get(key, 0) + 1
        self.total += 1
        return None

    def hold(self) -> None:
        """Count in a connection whose client is not known yet (a PROXY header a worker
        will read): the global cap counts it now, the per-source caps once `name`d."""
        self.total += 1

    def name(self, peer: Endpoint) -> str | None:
        """Account a held connection to `peer`; None, or why `peer` is over its caps
        (the connection then stays held until `release_held`)."""
        key = self._source(peer)
        why = self._over_source_limits(key)
        if why is not None and not (self.limits.exempt and self.limits.exempt(peer)):
            return why
        self._open[key] = self._open.get(key, 0) + 1
        return None

    def release_held(self) -> None:
        """Count out a held connection that was never named."""
        self.total -= 1

    def _source(self, peer: Endpoint) -> str:
        return source_key(self.limits, peer)

    def _over_source_limits(self, key: str) -> str | None:
        limits = self.limits
        if limits.max_per_source and self._open.get(key, 0) >= limits.max_per_source:
            return f"more than {limits.max_per_source} connections from {key}"
        if limits.rate_per_source and not self._take_token(key):
            return f"more than {limits.rate_per_source:g} connections/s from {key}"
        return None

    def release(self, peer: Endpoint) -> None:
        """Count a connection out."""
        key = self._source(peer)
        left = self._open.get(key, 0) - 1
        if left > 0:
            self._open[key] = left
        else:
            self._open.pop(key, None)
        self.total -= 1

    @property
    def full(self) -> bool:
        """True when the global cap is reached and accept should pause."""
        return bool(self.limits.max_conns) and self.total >= self.limits.max_conns

    def _service_over_rate(self) -> str | None:
        """xinetd cps: count this second's connections; past the rate, pause the service."""
        rate, pause = self.limits.service_rate, self.limits.service_pause
        now = self.clock()
        if now < self._paused_until:
            return f"service paused ({rate:g} connections/s exceeded)"
        start, count = self._window
        if now - start >= 1.0:
            start, count = now, 0
        self._window = (start, count + 1)
        if count + 1 > rate:
            self._paused_until = now + pause
            self._window = (float("-inf"), 0)
            return f"more than {rate:g} connections/s: service paused for {pause:g}s"
        return None

    def _take_token(self, key: str) -> bool:
        rate = self.limits.rate_per_source
        burst = float(self.limits.rate_burst or max(1, int(rate)))
        now = self.clock()
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = _Bucket(burst, now)
        bucket.tokens = min(burst, bucket.tokens + (now - bucket.stamp) * rate)
        bucket.stamp = now
        if len(self._buckets) > 65536 and now >= self._next_prune:
            self._forget_full(now, burst)
            # Every bucket refills within burst/rate seconds, so one scan per such period
            # forgets all idle sources while costing O(1) per admission on average.
            self._next_prune = now + burst / rate
        if bucket.tokens < 1.0:
            return False
        bucket.tokens -= 1.0
        return True

    def _forget_full(self, now: float, burst: float) -> None:
        """Drop buckets that have refilled, so many sources cannot grow memory."""
        rate = self.limits.rate_per_source
        stale = [k for k, b in self._buckets.items() if b.tokens + (now - b.stamp) * rate >= burst]
        for key in stale:
            del self._buckets[key]
