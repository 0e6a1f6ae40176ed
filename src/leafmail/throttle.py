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

The state is one table in shared memory (`SourceTable`), made by the parent before it
forks the smtpd workers, so a guesser whose connections the parent spreads over the
workers is counted once, as Postfix's anvil counts for all its smtpd processes. It is
bounded: a fixed number of slots; a source's failures count within a window of
`block_time` from its first one. A blocked client is logged once per blocked
connection; each failure is logged by the caller with the address and user name
(contrib/fail2ban reads those lines).
"""

from __future__ import annotations

import hashlib
import ipaddress
import mmap
import multiprocessing
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from netserver.admit.access import AccessPolicy
from netserver.endpoint import IPAddress, unmap
from netserver.smtp.replies import Reply

from .config import AuthConfig

SLOTS = 1 << 14  # sources tracked at once (32 bytes each: 512 KiB)
PROBES = 8  # slots a source may take, from its hash on
LOCK_WAIT = 0.05  # seconds an update waits for the table's lock (see SourceTable)
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


class SourceTable:
    """Per-source failure counts and blocks, shared by every process forked after it.

    A slot is (key digest, blocked until, failures, first failure), on an anonymous
    shared mapping; a lock made with it (a semaphore in shared memory) makes each
    update whole. This runs on the workers' event loops, and a worker killed inside an
    update would leave the lock taken for good, so an update waits at most LOCK_WAIT
    for it and then goes ahead unlocked (at worst one lost count), and a read takes no
    lock (a torn slot reads as another source's: unknown). A source takes the first of
    PROBES slots from its hash that holds it, else an idle one, else the one whose
    record is oldest: memory never grows, and an address flood can only make the table
    forget, never fill it.
    """

    _SLOT = struct.Struct("=8sdqd")

    def __init__(self, slots: int = SLOTS) -> None:
        self.slots = slots
        self._map = mmap.mmap(-1, slots * self._SLOT.size)
        self._lock = multiprocessing.Lock()

    def update(
        self, key: str, change: Callable[[float, int, float], tuple[float, int, float]]
    ) -> None:
        """Replace a source's (blocked until, failures, first failure) by `change` of it."""
        digest = hashlib.blake2b(key.encode(), digest_size=8).digest()
        held = self._lock.acquire(timeout=LOCK_WAIT)
        try:
            index = self._find(digest)
            _d, until, count, first = self._SLOT.unpack_from(self._map, index * self._SLOT.size)
            if _d != digest:
                until, count, first = 0.0, 0, 0.0
            self._SLOT.pack_into(
                self._map, index * self._SLOT.size, digest, *change(until, count, first)
            )
        finally:
            if held:
                self._lock.release()

    def read(self, key: str) -> tuple[float, int, float]:
        """A source's (blocked until, failures, first failure); zeros if unknown."""
        digest = hashlib.blake2b(key.encode(), digest_size=8).digest()
        index = self._find(digest)
        found, until, count, first = self._SLOT.unpack_from(self._map, index * self._SLOT.size)
        return (until, count, first) if found == digest else (0.0, 0, 0.0)

    def _find(self, digest: bytes) -> int:
        start = int.from_bytes(digest, "little") % self.slots
        candidates = [(start + i) % self.slots for i in range(PROBES)]
        records = [self._SLOT.unpack_from(self._map, i * self._SLOT.size) for i in candidates]
        for index, record in zip(candidates, records, strict=True):
            if record[0] == digest:
                return index
        # Else the slot whose latest event is oldest (an empty one is all zeros).
        return min(zip(candidates, records, strict=True), key=lambda c: max(c[1][1], c[1][3]))[0]


@dataclass
class AuthThrottle:
    """Failed logins per source, and the blocks they earned (state in a SourceTable)."""

    failure_delay: float = 1.0
    max_failures: int = 5
    block_time: float = 600.0
    clock: Callable[[], float] = time.monotonic  # CLOCK_MONOTONIC: one clock for all
    exempt: Callable[[IPAddress], bool] = lambda ip: False
    table: SourceTable = field(default_factory=SourceTable)

    def is_blocked(self, ip: IPAddress) -> bool:
        """True while `ip` serves a block."""
        if self.exempt(ip):
            return False
        until, _count, _first = self.table.read(source_key(ip))
        return self.clock() < until

    def failed(self, ip: IPAddress) -> float | None:
        """Record one failure; the delay before answering 535, or None: block now (421)."""
        if self.exempt(ip):
            return 0.0
        now = self.clock()
        seen: list[int] = []

        def count_one(until: float, count: int, first: float) -> tuple[float, int, float]:
            if count == 0 or now - first >= self.block_time:
                count, first = 0, now  # a new window
            count += 1
            if count >= self.max_failures:
                seen.append(count)
                return now + self.block_time, 0, 0.0
            seen.append(count)
            return until, count, first

        self.table.update(source_key(ip), count_one)
        if seen[0] >= self.max_failures:
            return None
        return min(self.failure_delay * (1 << (seen[0] - 1)), MAX_DELAY)


def auth_throttle(
    auth: AuthConfig, trusted: AccessPolicy, table: SourceTable | None = None
) -> AuthThrottle:
    """The throttle ``[auth]`` describes, counting in `table` (made by the parent before
    it forks the smtpd workers, so all of them count together), else a table of its own.
    Clients `trusted` (relay_networks) are exempt."""
    return AuthThrottle(
        failure_delay=auth.failure_delay,
        max_failures=auth.max_failures,
        block_time=auth.block_time,
        exempt=lambda ip: trusted.decide(ip).allowed,
        table=table or SourceTable(),
    )
