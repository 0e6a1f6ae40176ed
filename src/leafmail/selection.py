"""Which messages a queue tool acts on: states, sender, recipient or domain, and age.

The model is Postfix's ``postsuper``/``postqueue`` (``ALL``, a queue name) and exim's
``exiqgrep`` (``-f`` sender, ``-r`` recipient, ``-o``/``-y`` older or younger than).
Every filter given must match (AND); a filter given more than once matches any of its
values (OR). The age test needs only the queue id, which encodes the arrival time, so it
is applied before a file is read; sender and recipients need the envelope.

A recipient filter looks only at recipients still to be delivered: deleting "all mail to
@dead.example" must not take a message that waits only for other domains, and a
recipient already delivered is no reason to hold a message.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from netserver.errors import UsageError

from .spool import arrival_time
from .states import QueueState

# What the listing shows (and `--state` takes) -> the spool directory that holds it.
STATE_BY_SHOWN_NAME = {state.shown: state for state in QueueState}
NULL_SENDER = "<>"

_AGE = re.compile(r"\A(\d+(?:\.\d+)?)([smhdw]?)\Z")
_UNIT = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_age(text: str) -> float:
    """`90`, `90s`, `15m`, `2h`, `2d`, `1w` as seconds (UsageError otherwise)."""
    found = _AGE.match(text.strip().lower())
    if not found:
        raise UsageError(f"bad age {text!r}: use a number with s, m, h, d or w (e.g. 2d)")
    return float(found[1]) * _UNIT[found[2]]


def _address_pattern(text: str) -> str:
    """An address or @domain, lower-cased; `<>` or an empty word is the null sender."""
    word = text.strip().lower()
    if word in ("", NULL_SENDER):
        return NULL_SENDER
    if word.startswith("<") and word.endswith(">"):
        word = word[1:-1]
    if word.startswith("@") and len(word) == 1:
        raise UsageError(f"bad address {text!r}: give ADDR or @DOMAIN")
    return word


def address_matches(address: str, patterns: Sequence[str]) -> bool:
    """True if `address` is one of `patterns` (an address, `@domain`, or `<>`).

    Comparison ignores case, as Postfix's table lookups do; `@example.org` matches
    that domain only, not its subdomains.
    """
    address = address.lower()
    if not address:
        return NULL_SENDER in patterns
    domain = "@" + address.rpartition("@")[2] if "@" in address else ""
    return any(p == address or (p.startswith("@") and p == domain) for p in patterns)


@dataclass(frozen=True)
class Selection:
    """The filters of one command; the empty Selection selects every message."""

    states: tuple[QueueState, ...] = tuple(QueueState)
    senders: tuple[str, ...] = ()
    recipients: tuple[str, ...] = ()
    older_than: float | None = None
    younger_than: float | None = None

    @classmethod
    def build(
        cls,
        *,
        states: Iterable[str] | None,
        default_states: Sequence[QueueState],
        senders: Iterable[str] = (),
        recipients: Iterable[str] = (),
        older_than: str | None = None,
        younger_than: str | None = None,
    ) -> Selection:
        """From command-line words (state names as the listing shows them)."""
        chosen = tuple(STATE_BY_SHOWN_NAME[s] for s in states) if states else tuple(default_states)
        return cls(
            states=tuple(dict.fromkeys(chosen)),
            senders=tuple(_address_pattern(s) for s in senders),
            recipients=tuple(_address_pattern(r) for r in recipients),
            older_than=None if older_than is None else parse_age(older_than),
            younger_than=None if younger_than is None else parse_age(younger_than),
        )

    @property
    def by_envelope(self) -> bool:
        """True when matching needs the envelope (a sender or recipient filter)."""
        return bool(self.senders or self.recipients)

    @property
    def filtered(self) -> bool:
        """True when anything narrows the selection beyond its states."""
        return self.by_envelope or self.older_than is not None or self.younger_than is not None

    def age_matches(self, arrival: float, now: float) -> bool:
        age = now - arrival
        if self.older_than is not None and age <= self.older_than:
            return False
        return self.younger_than is None or age < self.younger_than

    def id_matches(self, qid: str, now: float) -> bool:
        """The test that needs no file: the age, from the id."""
        return self.age_matches(arrival_time(qid), now)

    def envelope_matches(self, sender: str, open_recipients: Iterable[str]) -> bool:
        """Sender and recipient filters; `open_recipients` are those still to deliver."""
        if self.senders and not address_matches(sender, self.senders):
            return False
        if not self.recipients:
            return True
        return any(address_matches(address, self.recipients) for address in open_recipients)
