"""A minimum data rate for DATA and BDAT, as Postfix's smtpd_min_data_rate.

The session timeout alone lets a client hold a session (and a slot of
max_sessions_per_source) for ever by sending one octet every few minutes. Once a
message's data has begun, its deadline is the start plus a `grace` period plus the
time `min_rate` octets a second would take for what arrived so far: every octet buys
1/min_rate seconds. A client past the deadline is cut with 421 4.4.2. The clock is
injected, so the arithmetic is tested without waiting.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from netserver.smtp.replies import Reply


def too_slow(hostname: str) -> Reply:
    return Reply(421, "4.4.2", f"{hostname} Data rate too low, closing connection")


@dataclass(slots=True)
class DataRate:
    """The deadline of the message data being read, if any."""

    min_rate: int
    grace: float
    clock: Callable[[], float] = time.monotonic
    _start: float | None = None
    _octets: int = 0

    def track(self, in_data: bool) -> None:
        """Start the clock when data begins; forget it when the message is over."""
        if not in_data:
            self._start = None
        elif self._start is None:
            self._start, self._octets = self.clock(), 0

    def add(self, octets: int) -> None:
        if self._start is not None:
            self._octets += octets

    def remaining(self) -> float | None:
        """Seconds left before the deadline; None when no data is being read."""
        if self._start is None or self.min_rate <= 0:
            return None
        deadline = self._start + self.grace + self._octets / self.min_rate
        return deadline - self.clock()
