"""AUTH failure throttling per client address: growing delays, then a temporary block.

Password guessing must cost the guesser time, and must stop. The policy (README,
"AUTH hardening"), per source address (an IPv6 client counts per /64, as the session
limits count it):

* every failed AUTH is answered only after a delay: `failure_delay` for the first
  failure within `block_time`, doubled for each one after it (1 s, 2 s, 4 s, 8 s ...);
* the `max_failures`-th failure within `block_time` is answered ``421 4.7.0`` and the
  connection closed, and the address is blocked for `block_time`: a new connection
  from it is greeted with 421 at once;
* `relay_networks` are exempt, as Postfix exempts mynetworks from anvil's limits.

The state lives in memory, per smtpd process, and is bounded: failures older than
`block_time` are forgotten, and at most `MAX_SOURCES` addresses are tracked.
A blocked client is logged once per blocked connection; each failure is logged by
the caller with the address and user name (contrib/fail2ban reads those lines).
"""

from __future__ import annotations

import ipaddress
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from netserver.endpoint import IPAddress, unmap
from netserver.smtp.replies import Reply

from .config import Config

MAX_SOURCES = 100_000
MAX_DELAY = 30.0  # seconds: never hold a session longer than this for one failure


def blocked_reply(hostname: str) -> Reply:
    return Reply(
        421, "4.7.0", f"{hostname} Too many failed logins from your address, try again later"
    )


def source_key(ip: IPAddress) -> str:
    """The unit that is counted: the address, or its /64 for IPv6."""
    ip = unmap(ip)
    if ip.version == 6:
        return str(ipaddress.ip_network(f"{ip}/64", strict=False))
    return str(ip)


@dataclass
class AuthThrottle:
    """Failed logins per source, and the blocks they earned."""

    failure_delay: float = 1.0
    max_failures: int = 5
    block_time: float = 600.0
    clock: Callable[[], float] = time.monotonic
    exempt: Callable[[IPAddress], bool] = lambda ip: False
    _failures: dict[str, list[float]] = field(default_factory=dict)
    _blocked: dict[str, float] = field(default_factory=dict)

    def is_blocked(self, ip: IPAddress) -> bool:
        """True while `ip` serves a block."""
        if self.exempt(ip):
            return False
        key = source_key(ip)
        until = self._blocked.get(key)
        if until is None:
            return False
        if self.clock() < until:
            return True
        del self._blocked[key]
        return False

    def failed(self, ip: IPAddress) -> float | None:
        """Record one failure; the delay before answering 535, or None: block now (421)."""
        if self.exempt(ip):
            return 0.0
        now = self.clock()
        key = source_key(ip)
        recent = [t for t in self._failures.get(key, ()) if now - t < self.block_time]
        recent.append(now)
        if len(recent) >= self.max_failures:
            self._failures.pop(key, None)
            self._blocked[key] = now + self.block_time
            self._prune(now)
            return None
        self._failures[key] = recent
        self._prune(now)
        return min(self.failure_delay * (1 << (len(recent) - 1)), MAX_DELAY)

    def _prune(self, now: float) -> None:
        """Keep memory bounded: forget stale entries, then the oldest ones."""
        if len(self._failures) + len(self._blocked) <= MAX_SOURCES:
            return
        for key in [k for k, until in self._blocked.items() if until <= now]:
            del self._blocked[key]
        for key in [k for k, times in self._failures.items() if now - times[-1] >= self.block_time]:
            del self._failures[key]
        while len(self._failures) > MAX_SOURCES // 2:
            del self._failures[next(iter(self._failures))]
        while len(self._blocked) > MAX_SOURCES // 2:
            del self._blocked[next(iter(self._blocked))]


def auth_throttle(config: Config) -> AuthThrottle:
    """The throttle ``[auth]`` describes; one per smtpd process, shared by its listeners."""
    auth, trusted = config.auth, config.relay_policy()
    return AuthThrottle(
        failure_delay=auth.failure_delay,
        max_failures=auth.max_failures,
        block_time=auth.block_time,
        exempt=lambda ip: trusted.decide(ip).allowed,
    )
