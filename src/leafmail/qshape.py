"""`leafmail qshape`: the queue by destination domain and age, as Postfix's qshape(1).

Rows are recipient domains (or, with `by_sender`, sender domains), columns are age
buckets that double in length: with a bucket time of 5 minutes and 10 buckets they end
at 5, 10, 20, ... 1280 minutes, and the last holds everything older. ``T`` is the row's
total and the first row, ``TOTAL``, sums each column. Like qshape, the recipient view
counts recipients still to be delivered (a message to three people at one domain counts
three there), and the sender view counts messages; the null sender is shown as
``MAILER-DAEMON``. The age is the time since arrival.

The messages are read one at a time (`listing.iter_queue`); what is kept is one row per
domain, so memory grows with the number of domains, never with the queue.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TextIO

from .listing import CORRUPT, JUNK, QueueEntry, Writer
from .printable import printable
from .status import RcptState

NULL_SENDER_NAME = "MAILER-DAEMON"
NO_DOMAIN = "(no domain)"
FINAL_STATES = (RcptState.DELIVERED, RcptState.FAILED)


@dataclass
class Shape:
    """Counts per domain and age bucket; `limits` are the buckets' upper ends (minutes)."""

    limits: tuple[float, ...]
    rows: dict[str, list[int]] = field(default_factory=dict)

    @classmethod
    def buckets(cls, minutes: float, count: int) -> Shape:
        """`count` buckets, the first `minutes` long, each twice the one before."""
        return cls(tuple(minutes * 2**i for i in range(count - 1)))

    def add(self, domain: str, age_seconds: float, n: int = 1) -> None:
        row = self.rows.setdefault(domain, [0] * (len(self.limits) + 1))
        minutes = age_seconds / 60
        column = next((i for i, end in enumerate(self.limits) if minutes < end), len(self.limits))
        row[column] += n

    def ordered(self) -> list[tuple[str, list[int]]]:
        """TOTAL first, then domains by their total (largest first), then by name."""
        rows = sorted(self.rows.items(), key=lambda item: (-sum(item[1]), item[0]))
        total = [sum(column) for column in zip(*self.rows.values(), strict=True)]
        return [("TOTAL", total or [0] * (len(self.limits) + 1)), *rows]

    def headings(self) -> list[str]:
        ends = [f"{end:g}" for end in self.limits]
        return ["T", *ends, f"{ends[-1]}+" if ends else "all"]


def row_name(address: str) -> str:
    """The row an address is counted in: its domain as written (trailing dot kept, as
    qshape shows it), MAILER-DAEMON for the null sender, "(no domain)" for a bare local
    part. Not `delivery.domain_of`, which gives the routing domain ("" for those)."""
    if not address:
        return NULL_SENDER_NAME
    return address.rpartition("@")[2].lower() if "@" in address else NO_DOMAIN


def shape(
    entries: Iterable[QueueEntry],
    *,
    minutes: float = 5.0,
    count: int = 10,
    by_sender: bool = False,
    now: float | None = None,
) -> Shape:
    """Tally the entries (junk and corrupt files have no domain and are left out)."""
    now = time.time() if now is None else now
    result = Shape.buckets(minutes, count)
    for entry in entries:
        if entry.state in (JUNK, CORRUPT):
            continue
        age = now - entry.arrival
        if by_sender:
            result.add(row_name(entry.sender), age)
            continue
        for rcpt in entry.recipients:
            if rcpt["state"] not in FINAL_STATES:
                result.add(row_name(rcpt["address"]), age)
    return result


def write_text(result: Shape, out: Writer) -> None:
    """A table like qshape's: the domain, the total, then one column per bucket."""
    rows = [(printable(name), [str(sum(row)), *map(str, row)]) for name, row in result.ordered()]
    heads = result.headings()
    width = max(len(name) for name, _ in rows)
    widths = [max(len(h), *(len(cells[i]) for _, cells in rows)) for i, h in enumerate(heads)]
    out.write(" " * width + _cells(heads, widths) + "\n")
    for name, cells in rows:
        out.write(f"{name:>{width}}" + _cells(cells, widths) + "\n")


def _cells(values: list[str], widths: list[int]) -> str:
    return "".join(f" {value:>{w}}" for value, w in zip(values, widths, strict=True))


def write_json(result: Shape, out: TextIO) -> None:
    """{"buckets": [upper ends in minutes, null for the last], "domains": {name: counts}}."""
    rows = result.ordered()
    data = {
        "buckets": [*result.limits, None],
        "total": sum(rows[0][1]),
        "domains": {name: {"total": sum(row), "counts": row} for name, row in rows[1:]},
        "columns": rows[0][1],
    }
    out.write(json.dumps(data) + "\n")
