"""Limits held across worker processes that accept on one listener: a shared table.

When the workers of a pool accept their connections themselves (modes.direct), no
single process sees every connection, so the counts live in memory all of them share:
a memfd mapped before the workers are forked. Every admission is made under one lock, a
POSIX record lock on that memfd (`lockf`): it is held by a process, so the kernel drops
it when its holder dies, even by SIGKILL in the middle of an update, and nobody waits
for a dead worker. A semaphore (multiprocessing's SemLock) would stay taken. Counting a
connection out takes no lock (see `release`).

Layout: a head (xinetd's rate window, the pause it started); three arrays with one
number per seat (a worker process): its connections, how many entries of its own area
it has used, and whether it watches the listener now. The connections counted in are the sum of the
first: one number per worker is the only count, so a worker killed in the middle of an
update cannot leave two that disagree. Then each seat's area of entries: a 16-byte
digest of the source a connection counts against, zero when free. A worker writes only
its own area, so the free list of its entries stays in the worker. The connections from
one source are found by counting that digest in every seat's used entries. When a
worker dies the supervisor clears its seat (`clear_seat`): its connections are counted
out at once.

The per-source token bucket (`rate_per_source`) is not kept here: a server with it
keeps the supervisor's accept path.
"""

from __future__ import annotations

import fcntl
import hashlib
import mmap
import os
import struct
import time
from collections.abc import Callable, Collection

from ..endpoint import Endpoint, IPAddress
from ..limits import Limits, source_key
from ..memo import BoundedMemo

__all__ = ["FULL", "SharedLimits"]

_HEAD = struct.Struct("=dqd")  # the rate window's start, its count, the pause's end
_NUMBER = struct.Struct("=q")
ENTRY = 16  # blake2b digest of the source a connection counts against
# A seat's area, in entries. Not the connection cap, which a reload may raise; pages
# are touched only as far as a worker has used its area.
ENTRIES = 65536
FULL = -1  # `admit`: the global cap is reached; try again when a connection ends
_FREE = bytes(ENTRY)  # a free entry
KEYS = 4096  # sources whose digest a worker remembers


def _digest(source: str) -> bytes:
    return hashlib.blake2b(source.encode(), digest_size=ENTRY).digest()


def _key_memo(limits: Limits) -> BoundedMemo[IPAddress, bytes]:
    """Each client address's source digest under `limits` (its IPv6 prefix)."""
    return BoundedMemo(lambda ip: _digest(source_key(limits, Endpoint(ip))), KEYS)


class _Seat:
    """Where one seat's numbers and area lie in the table: worked out once per worker,
    not twice per connection (its admit and its release)."""

    __slots__ = ("area", "open_at", "used_at")

    def __init__(self, table: SharedLimits, seat: int) -> None:
        self.open_at = table._open + seat * _NUMBER.size
        self.used_at = table._used_at + seat * _NUMBER.size
        self.area = table._entry(0, seat)


class SharedLimits:
    """`max_conns`, `max_per_source` and the service rate, for processes of one pool.

    `limits` may be replaced (a reload): workers forked afterwards apply the new ones.
    """

    def __init__(
        self, limits: Limits, seats: int, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.limits = limits
        self.seats = max(1, seats)
        self.clock = clock
        self.entries = ENTRIES
        self._array = struct.Struct(f"={self.seats}q")  # a number per seat
        self._open = _HEAD.size  # where each array starts
        self._used_at = self._open + self._array.size
        self._accepting_at = self._used_at + self._array.size
        self._areas = self._accepting_at + self._array.size
        size = self._areas + self.seats * self.entries * ENTRY
        self.fd = os.memfd_create("netserver-limits", os.MFD_CLOEXEC)
        os.ftruncate(self.fd, size)
        self.mem = mmap.mmap(self.fd, size)  # MAP_SHARED: the forked workers see it
        _HEAD.pack_into(self.mem, 0, float("-inf"), 0, float("-inf"))
        self.seat = -1  # ours, in a worker (see `take_seat`)
        self._free: list[int] = []
        self._used = 0
        self._mine = _Seat(self, 0)
        self._keys_for, self._keys = limits, _key_memo(limits)  # and the limits it is for

    # -- in a worker ----------------------------------------------------------------------
    def take_seat(self, seat: int) -> None:
        """This process counts its connections in `seat` (cleared by the supervisor)."""
        self.seat = seat
        self._free = []
        self._used = 0
        self._mine = _Seat(self, seat)

    def accepting(self, yes: bool, seat: int = -1) -> None:
        """Say whether the worker in `seat` (ours by default) watches the listener now,
        or is about to: `busier` leaves clients only to those (one that does not would
        not take them). The supervisor says it when it forks one, so a client is left to
        a worker still starting, as its own accept path gives the least busy worker a
        connection whether it has started or not."""
        seat = self.seat if seat < 0 else seat
        _NUMBER.pack_into(self.mem, self._accepting_at + seat * _NUMBER.size, int(yes))

    def busier(self) -> bool:
        """A hint without the lock: another watching worker serves fewer connections,
        so the next client is left to it (the least busy worker takes each one)."""
        counts = self._array.unpack_from(self.mem, self._open)
        accepting = self._array.unpack_from(self.mem, self._accepting_at)
        mine = counts[self.seat]
        return any(
            yes and count < mine
            for seat, (count, yes) in enumerate(zip(counts, accepting, strict=True))
            if seat != self.seat
        )

    @property
    def full(self) -> bool:
        """A hint without the lock: the global cap looks reached."""
        cap = self.limits.max_conns
        return bool(cap) and self.total >= cap

    @property
    def total(self) -> int:
        """Connections counted in, by every worker."""
        return sum(self._array.unpack_from(self.mem, self._open))

    def admit(self, peer: Endpoint) -> int | str:
        """Count a connection from `peer` in: its entry, `FULL`, or why it is refused."""
        key = self._key(peer)
        fcntl.lockf(self.fd, fcntl.LOCK_EX)
        try:
            return self._admit(peer, key)
        finally:
            fcntl.lockf(self.fd, fcntl.LOCK_UN)

    def _key(self, peer: Endpoint) -> bytes:
        """The digest of the source `peer` counts against, remembered per address (a
        worker sees the same clients over and over) for the limits it was made with."""
        if peer.ip is None:
            return _digest(source_key(self.limits, peer))
        if self._keys_for is not self.limits:  # replaced (a reload): the prefix may differ
            self._keys_for, self._keys = self.limits, _key_memo(self.limits)
        return self._keys(peer.ip)

    def _admit(self, peer: Endpoint, key: bytes) -> int | str:
        limits = self.limits
        if limits.max_conns and self.total >= limits.max_conns:
            return FULL
        if limits.service_rate:
            why = self._over_rate()
            if why is not None:
                return why
        cap = limits.max_per_source
        if cap and self._count(key) >= cap and not (limits.exempt and limits.exempt(peer)):
            return f"more than {cap} connections from {source_key(limits, peer)}"
        mine, mem = self._mine, self.mem
        if self._free:
            entry = self._free.pop()
        elif self._used < self.entries:
            entry = self._used
            self._used += 1
            _NUMBER.pack_into(mem, mine.used_at, self._used)
        else:
            return f"more than {self.entries} connections in one worker"
        at = mine.area + entry * ENTRY
        mem[at : at + ENTRY] = key
        _NUMBER.pack_into(mem, mine.open_at, _NUMBER.unpack_from(mem, mine.open_at)[0] + 1)
        return entry

    def _add(self, seat: int, delta: int) -> int:
        """Change a seat's count of connections; the count before."""
        at = self._open + seat * _NUMBER.size
        count: int = _NUMBER.unpack_from(self.mem, at)[0]
        _NUMBER.pack_into(self.mem, at, count + delta)
        return count

    def _over_rate(self) -> str | None:
        """xinetd cps, as `Admission._service_over_rate`, with the window in the head."""
        start, count, paused = _HEAD.unpack_from(self.mem, 0)
        rate, pause = self.limits.service_rate, self.limits.service_pause
        now = self.clock()
        if now < paused:
            return f"service paused ({rate:g} connections/s exceeded)"
        if now - start >= 1.0:
            start, count = now, 0
        count += 1
        if count > rate:
            _HEAD.pack_into(self.mem, 0, float("-inf"), 0, now + pause)
            return f"more than {rate:g} connections/s: service paused for {pause:g}s"
        _HEAD.pack_into(self.mem, 0, start, count, paused)
        return None

    def _entry(self, entry: int, seat: int = -1) -> int:
        seat = self.seat if seat < 0 else seat
        return self._areas + (seat * self.entries + entry) * ENTRY

    def _count(self, key: bytes) -> int:
        """Connections from `key` in every seat.

        A count of the digest in each seat's used entries, in C: under `s100` from one
        source, finding the matches one by one up to a cap of 50 held the lock for
        tens of microseconds per connection. A match straddling two entries would need
        16 bytes across two digests to equal a third digest (a 128-bit coincidence),
        so every match is an entry.
        """
        found = 0
        for seat, used in enumerate(self._array.unpack_from(self.mem, self._used_at)):
            if used:
                start = self._entry(0, seat)
                found += self.mem[start : start + used * ENTRY].count(key)
        return found

    def release(self, entry: int, seat: int = -1) -> None:
        """Count out the connection counted in at `entry` of our seat, or (the
        supervisor, for a command a dead spawner left) of `seat`.

        Without the lock: a seat has one writer at a time (its worker, or once that is
        dead the supervisor), and the others only read it, under the lock in `admit`.
        A reader sees the release done or not yet; one that sees the entry cleared
        before the count goes down counts the source out a moment early, for a
        connection that has ended. The count is one aligned 8-byte store. That saves
        two fcntl calls per connection (bench/RESULTS.md, exec spawners)."""
        mem = self.mem
        if seat >= 0:
            at = self._entry(entry, seat)
            mem[at : at + ENTRY] = _FREE
            self._add(seat, -1)
            return
        mine = self._mine  # a connection of ours: the hot path, offsets known
        at = mine.area + entry * ENTRY
        mem[at : at + ENTRY] = _FREE
        _NUMBER.pack_into(mem, mine.open_at, _NUMBER.unpack_from(mem, mine.open_at)[0] - 1)
        self._free.append(entry)

    # -- in the supervisor ----------------------------------------------------------------
    def clear_seat(self, seat: int, keep: Collection[int] = ()) -> int:
        """A worker is gone: count its connections out, but for the entries in `keep`
        (a dead spawner's commands still running, released one by one as they end);
        how many were counted out."""
        used_at = self._used_at + seat * _NUMBER.size
        fcntl.lockf(self.fd, fcntl.LOCK_EX)
        try:
            used: int = _NUMBER.unpack_from(self.mem, used_at)[0]
            start = self._entry(0, seat)
            kept = {}
            for entry in keep:
                at = self._entry(entry, seat)
                kept[entry] = self.mem[at : at + ENTRY]
            self.mem[start : start + used * ENTRY] = bytes(used * ENTRY)
            for entry, key in kept.items():
                at = self._entry(entry, seat)
                self.mem[at : at + ENTRY] = key
            if not kept:
                _NUMBER.pack_into(self.mem, used_at, 0)
            _NUMBER.pack_into(self.mem, self._accepting_at + seat * _NUMBER.size, 0)
            left = self._add(seat, 0)
            _NUMBER.pack_into(self.mem, self._open + seat * _NUMBER.size, len(kept))
        finally:
            fcntl.lockf(self.fd, fcntl.LOCK_UN)
        return left - len(kept)

    def close(self) -> None:
        self.mem.close()
        os.close(self.fd)
