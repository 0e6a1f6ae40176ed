"""A bounded memo: answers already computed, kept for keys a client chooses.

A server asks the same small questions (what is this address as text, is this client
allowed) of the same few clients over and over, so remembering answers saves CPU on the
hot path. The keys come from the network, though, so the table must stay bounded
whoever connects: when it is full it is emptied and starts again, which costs a few
recomputations and never more memory than `limit` entries.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

K = TypeVar("K")
V = TypeVar("V")


class BoundedMemo(Generic[K, V]):
    """`memo(key)` is `make(key)`, computed once per key while it stays remembered.

    The last key asked is also kept, and a question about that very object is answered
    without hashing it: the keys of the hot paths are addresses (`ipaddress` objects,
    themselves remembered by text, so one client's is one object), whose `__hash__` is a
    Python call, and a session asks about its own client several times in a row.
    """

    __slots__ = ("_last", "_limit", "_make", "_table")

    def __init__(self, make: Callable[[K], V], limit: int) -> None:
        self._make = make
        self._limit = limit
        self._table: dict[K, V] = {}
        # (key, value) in one attribute, so a thread never sees one without the other
        self._last: tuple[K, V] | None = None

    def __call__(self, key: K) -> V:
        last = self._last
        if last is not None and last[0] is key:
            return last[1]
        value = self._table.get(key)
        if value is None:
            value = self._make(key)  # may raise: nothing is remembered then
            if len(self._table) >= self._limit:
                self._table.clear()
            self._table[key] = value
        self._last = (key, value)
        return value

    def __len__(self) -> int:
        return len(self._table)
