"""Connection limits: how many at once, per source, how fast, and for how long idle.

The settings every layer reads: the limits gate (`netserver.admit.limits`) counts
connections against them, TLS termination and the modes apply the timeouts and the
longest line.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from dataclasses import dataclass

from .endpoint import Endpoint
from .stdio import DEFAULT_MAX_LINE


@dataclass(frozen=True)
class Limits:
    """Server limits; 0 or None means unlimited."""

    max_conns: int = 1024
    max_per_source: int = 0
    rate_per_source: float = 0.0
    rate_burst: int = 0
    # xinetd's ``cps = N WAIT``: more than N new connections within one second, from
    # anyone, refuses every new one for WAIT seconds (a brake on floods and loops).
    service_rate: float = 0.0
    service_pause: float = 0.0
    timeout: float | None = 300.0
    max_line: int = DEFAULT_MAX_LINE
    grace: float = 10.0
    # Clients the per-source caps do not apply to (say, a mail server's own networks,
    # whose one address may stand for many users); the global cap still does.
    exempt: Callable[[Endpoint], bool] | None = None
    # IPv6 clients are counted per network of this length: one host usually has a whole
    # /64 to pick addresses from (Postfix's anvil groups them likewise, by /84).
    ipv6_source_prefix: int = 128
    # The longest wait before processes that keep dying young (async workers, exec
    # spawners) are started again: the wait doubles with each such death up to this, so
    # a handler that crashes at start is not forked in a loop (Postfix's master waits
    # service_throttle_time, 60 s). None: the mode's own, 30 s for workers, 5 s for
    # spawners (a service with no spawner refuses its clients meanwhile).
    restart_max: float | None = None


def restart_wait(limits: Limits, young_deaths: int, first: float, longest: float) -> float:
    """How long to wait before starting again processes of which `young_deaths` in a row
    died young: none after the first, then `first` doubling with each further one, up to
    `limits.restart_max` (or the mode's own `longest`). The exponent is bounded: past
    2**1024 the product no longer fits a float, and the OverflowError left a pool that
    had crashed at start for hours without a restart for good."""
    if young_deaths <= 1:
        return 0.0
    wait: float = first * 2.0 ** min(young_deaths - 2, 64)
    return min(limits.restart_max or longest, wait)


def source_key(limits: Limits, peer: Endpoint) -> str:
    """Who a connection counts against: its address, or its IPv6 network."""
    prefix = limits.ipv6_source_prefix
    if peer.ip is None or peer.ip.version == 4 or prefix >= 128:
        return peer.host
    return str(ipaddress.ip_network((peer.ip, prefix), strict=False))
