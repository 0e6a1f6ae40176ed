"""The names of where a queued message is and of the ways it can leave: one module.

A queue state is the spool directory that holds the message (Postfix's queue
directories: the runner takes from `QUEUE`, retries wait in `DEFERRED`, `HOLD` is
left alone until released, `CORRUPT` keeps what failed its self-check). A route is
the agent a recipient goes to; a delivery mode is what `[delivery] mode` says the
daemon does with mail that has no route of its own.

They are `StrEnum`s so that each value is the very string already on disk, in the
config file, in `leafmail queue --json` and in the log lines: a member is a `str`,
formats as its value and compares equal to the string read back, so naming them here
changed no byte that leafmail writes or accepts.
"""

from __future__ import annotations

from enum import StrEnum


class QueueState(StrEnum):
    """A spool directory a committed message lives in (the order is the listing's)."""

    QUEUE = "queue"  # ready: the runner takes it on its next pass
    DEFERRED = "deferred"  # some recipients open; waits for its next attempt time
    HOLD = "hold"  # not delivered until `leafmail release` (or a forwarded copy's commit)
    CORRUPT = "corrupt"  # failed its self-check; kept for a person to look at

    @property
    def shown(self) -> str:
        """What the queue tools call it, as Postfix's mailq does: active, deferred,
        held, corrupt (and what `--state` accepts)."""
        return _SHOWN[self]


_SHOWN = {
    QueueState.QUEUE: "active",
    QueueState.DEFERRED: "deferred",
    QueueState.HOLD: "held",
    QueueState.CORRUPT: "corrupt",
}


class Route(StrEnum):
    """The delivery agent a recipient's domain is routed to (``[routes]`` values)."""

    SMARTHOST = "smarthost"
    MX = "mx"
    LOCAL = "local"


class DeliveryMode(StrEnum):
    """``[delivery] mode``: where mail with no route of its own goes.

    OFFLINE spools only (the dial-up set-up): that mail waits for `leafmail flush`,
    which sends it to the smarthost.
    """

    OFFLINE = "offline"
    SMARTHOST = "smarthost"
    MX = "mx"

    @property
    def route(self) -> Route:
        """The route its mail takes once it goes (OFFLINE's goes to the smarthost)."""
        return Route.SMARTHOST if self is DeliveryMode.OFFLINE else Route(self.value)
