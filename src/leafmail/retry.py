"""The retry schedule (RFC 5321 4.5.4.1): when to try a deferred message again, and when to give up.

Intervals grow from `initial`, doubling after each attempt, to at most `maximum`; a
message still undelivered `lifetime` after it arrived expires and bounces with 4.4.7.
The next attempt is never scheduled past the expiry, so the bounce is on time. All the
inputs are stored in the spool (the message's status), so a restart keeps the schedule.
"""

from __future__ import annotations

from dataclasses import dataclass

from .config import DeliveryConfig


@dataclass(frozen=True)
class RetryPolicy:
    initial: float = 300.0
    maximum: float = 4 * 3600.0
    lifetime: float = 5 * 86400.0
    delay_warning: float = 0.0  # 0: no delay warnings

    @classmethod
    def from_config(cls, delivery: DeliveryConfig) -> RetryPolicy:
        return cls(
            delivery.retry_initial,
            delivery.retry_max,
            delivery.max_queue_lifetime,
            delivery.delay_warning,
        )

    def delay(self, attempts: int) -> float:
        """The wait after the `attempts`-th failed attempt (1-based)."""
        return min(self.initial * 2.0 ** max(attempts - 1, 0), self.maximum)

    def next_attempt(self, arrival: float, attempts: int, now: float) -> float:
        return min(now + self.delay(attempts), self.expires(arrival))

    def after_unrecorded(self, arrival: float, now: float) -> float:
        """When to try again after an attempt that could not be recorded (a full disk):
        after the first retry wait, capped by the expiry as any schedule is, unless the
        message has expired already (its bounce could not be spooled): a cap in the past
        would have it tried again at once, pass after pass, while the disk stays full."""
        if self.expired(arrival, now):
            return now + self.delay(1)
        return self.next_attempt(arrival, 1, now)

    def due(self, next_attempt: float, now: float) -> bool:
        """Whether a message scheduled for `next_attempt` may be tried at `now`.

        No schedule of this policy lies more than `maximum` ahead of the clock that made
        it, so one that does was made by a clock since set back (a fast clock corrected
        by NTP or by hand): it is due now, not once the clock has caught up again, which
        could be days with the mail waiting for nothing.
        """
        return next_attempt <= now or next_attempt - now > self.maximum

    def expires(self, arrival: float) -> float:
        return arrival + self.lifetime

    def expired(self, arrival: float, now: float) -> bool:
        return now >= self.expires(arrival)

    def warn_due(self, arrival: float, now: float) -> bool:
        return self.delay_warning > 0 and now - arrival >= self.delay_warning
