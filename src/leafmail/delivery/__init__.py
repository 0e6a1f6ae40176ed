"""Delivery agents: what they return and the one contract they share.

An agent takes a message and the recipients still open, and answers one `Result` per
recipient: delivered, deferred (try again later) or failed (bounce). When it cannot reach
its next hop at all (connection refused, TLS or AUTH failure) it raises `LinkDown`
instead, so the queue runner can stop trying other messages until the link is back,
rather than count a failure against each of them.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol

from ..envelope import Envelope
from ..status import RcptState

# ASCII digits only (RFC 3463's status-code): `\d` would take other scripts' digits too,
# which a DSN's Status field cannot carry.
_ENHANCED = re.compile(r"\A([245])\.([0-9]{1,3})\.([0-9]{1,3})(?:\s+|\Z)")


class Handoff(StrEnum):
    """Who reports a delivered recipient's success, if the sender asked (RFC 3461 5.2).

    FINAL: delivered here (a mailbox, a file, a command), so we report "delivered".
    RELAYED: passed to a next hop that does not speak DSN, so we report "relayed".
    PASSED: passed to a next hop that speaks DSN, with NOTIFY and ORCPT: it reports.
    """

    FINAL = "final"
    RELAYED = "relayed"
    PASSED = "passed"


class Outcome(StrEnum):
    DELIVERED = "delivered"
    DEFERRED = "deferred"
    FAILED = "failed"

    @property
    def state(self) -> RcptState:
        return RcptState(self.value)


@dataclass(frozen=True)
class Result:
    """One recipient's result: outcome, SMTP code, enhanced status (RFC 3463) and text."""

    outcome: Outcome
    code: int
    status: str
    text: str
    remote: str = ""
    handoff: Handoff = Handoff.FINAL
    # The reply `remote` sent, as it came (one line, `from_reply`); "" when code and text
    # are ours about it (a broken connection, a missing extension). A DSN's
    # Diagnostic-Code is of type "smtp" only for the former, and then it is that reply
    # itself, without the enhanced code we chose when the reply had none (RFC 3464 2.3.6).
    reply: str = ""

    @classmethod
    def from_reply(cls, code: int, message: str, remote: str = "") -> Result:
        """Classify a server reply; the enhanced code comes from the text when present."""
        outcome = (
            Outcome.DELIVERED
            if 200 <= code < 400
            else Outcome.FAILED
            if 500 <= code < 600
            else Outcome.DEFERRED
        )
        text = " ".join(message.split())
        match = _ENHANCED.match(text)
        if match and match.group(1) == str(code)[0]:
            status, text = f"{match[1]}.{match[2]}.{match[3]}", text[match.end() :]
        else:
            status = {Outcome.DELIVERED: "2.0.0", Outcome.FAILED: "5.0.0"}.get(outcome, "4.0.0")
        reply = f"{code} {' '.join(message.split())}".rstrip() if remote else ""
        return cls(outcome, code, status, text, remote, reply=reply)

    @classmethod
    def refused(cls, code: int, message: str, remote: str = "") -> Result:
        """A reply that did not do what the command needed (e.g. 252 to RCPT, 250 to DATA).

        Classifying it by its code alone would count a success code the client could
        not act on as delivered, and lose the recipient; it is deferred instead.
        """
        if code >= 400:
            return cls.from_reply(code, message, remote)
        text = f"unexpected reply {code} {' '.join(message.split())}"
        return cls.deferred("4.5.0", text, remote)

    @classmethod
    def deferred(cls, status: str, text: str, remote: str = "") -> Result:
        """A temporary failure that is ours, not a server's (timeout, lost connection)."""
        return cls(Outcome.DEFERRED, 451, status, text, remote)

    @classmethod
    def failed(cls, status: str, text: str, remote: str = "") -> Result:
        """A permanent failure that is ours (expired, next hop cannot take it)."""
        return cls(Outcome.FAILED, 554, status, text, remote)

    @property
    def line(self) -> str:
        """The reply as one line, e.g. "550 5.1.1 no such user"."""
        return f"{self.code} {self.status} {self.text}".rstrip()


class LinkDown(Exception):
    """The next hop could not be reached or would not talk to us; nothing was tried."""


class Expansions(Protocol):
    """Where an agent that expands aliases records what each target already got.

    A recipient that expands to several targets stays open while any of them defers;
    without a record, the retry would give the targets that succeeded a second copy.
    The queue hands one of these to every attempt (`leafmail.expansion`), backed by the
    message's status record, so each target gets the message once whatever happens to
    the others, across retries and crashes. Keys name a target (see
    `leafmail.delivery.local.target_key`).
    """

    def expanding(self, index: int, keys: Sequence[str]) -> None:
        """Recipient `index` expands to these targets in this attempt."""
        ...

    def result(self, index: int, key: str) -> Result | None:
        """The final result a target of recipient `index` already has, or None."""
        ...

    def record(self, index: int, key: str, result: Result) -> None:
        """A target's result in this attempt (kept with the attempt's status)."""
        ...

    async def forward(
        self, index: int, keys: Sequence[str], envelope: Envelope, data: bytes
    ) -> str:
        """Spool the copy for remote targets exactly once; its queue id (OSError: defer)."""
        ...

    async def settled(self, results: Mapping[int, Result]) -> None:
        """Some recipients have their results while others are still being tried (one
        domain or route of several is done): record the delivered ones now, so that a
        crash while the others take their time does not send them the message again."""
        ...


async def each_settled(
    parts: Sequence[Awaitable[dict[int, Result]]], record: Expansions | None
) -> dict[int, Result]:
    """Run the parts of one delivery at once (domains, routes, recipients) and merge
    their results; each part that ends while others still run hands its results to
    `record.settled`. The last one does not: the attempt's own record follows at once.

    Without this, what a part delivered is recorded only when the slowest part ends
    (a domain whose MX hangs in DATA: up to the delivery deadline, 15 minutes), and a
    crash in that time sends it again.
    """
    running = len(parts)

    async def one(part: Awaitable[dict[int, Result]]) -> dict[int, Result]:
        nonlocal running
        try:
            results = await part
        finally:
            running -= 1
        if running and record is not None:
            await record.settled(results)
        return results

    done = await asyncio.gather(*(one(part) for part in parts))
    return {index: result for part in done for index, result in part.items()}


class Agent(Protocol):
    """A delivery agent (smarthost, MX or local)."""

    async def deliver(
        self,
        envelope: Envelope,
        data: bytes,
        rcpts: Sequence[int],
        expansions: Expansions | None = None,
    ) -> dict[int, Result]:
        """Try envelope.recipients[i] for each i in `rcpts`; a Result for each of them.

        `expansions` matters only to agents that expand aliases (local delivery).
        """
        ...

    async def close(self) -> None:
        """Close idle connections."""
        ...


def all_results(rcpts: Sequence[int], result: Result) -> dict[int, Result]:
    """The same result for every recipient (a reply to MAIL or DATA, a lost connection)."""
    return dict.fromkeys(rcpts, result)


def domain_of(address: str) -> str:
    """The domain of a forward path ("" for a bare local part such as postmaster).

    Here, under every agent, because routing groups recipients by it and the MX agent
    looks it up: neither of them imports the other.
    """
    local, at, domain = address.rpartition("@")
    return domain.lower().rstrip(".") if at and local else ""
