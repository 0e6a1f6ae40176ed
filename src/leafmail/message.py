"""A spooled message brought back to life ("unfrozen") and sent: one delivery attempt.

The 1998 leafmail thawed a frozen object and called its send() method. Here
`unfreeze(spool, qid)` loads the message with its delivery status, and `send()` makes one
attempt through a delivery agent, records every recipient's result durably and returns
them. The queue runner uses the same `attempt()` for each message it works on.

Order of the durable steps, so that nothing is ever lost:

1. the agent delivers to the recipients still open (or they expire); an alias's
   targets are recorded as they go (`leafmail.expansion`), so a forwarded copy is
   made exactly once, and so are the recipients of a domain or route done while
   others still run (`leafmail.delivery.each_settled`: delivered ones that owe no
   report), so a crash while a slow one takes its time repeats none of them;
2. DSNs for the recipients that failed now (and success reports that were asked for)
   are committed to the spool, as new messages;
3. the status record is replaced (write, fsync, rename, fsync the directory);
4. only when every recipient has a final result is the message removed.

A crash before 3 means the attempt is made again: a recipient can get the message
twice, never zero times (at least once). A crash between 2 and 3 can repeat a bounce.

Mail from <> (a bounce) gets no bounce; when it fails, a report goes to the postmaster
instead (a "double bounce"), unless it was already going to the postmaster: then it is
dropped and the runner logs that loudly, as Postfix does, which ends any loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Any

from .config import format_duration
from .delivery import Agent, Handoff, LinkDown, Outcome, Result
from .delivery.bounce import Action, Notice, build_dsn, is_double_bounce, wants_dsn
from .envelope import Envelope, EnvelopeError
from .expansion import Marks, RecordedExpansions
from .retry import RetryPolicy
from .spool import CorruptMessage, RecordNotDurable, Spool, SpooledMessage, arrival_time
from .states import QueueState
from .status import MessageStatus, RcptState, RcptStatus

INLINE_LOAD_LIMIT = 256 * 1024  # bytes: reading and checking this much takes < 1 ms


class AttemptOutcome(StrEnum):
    """What one attempt left a message as."""

    DELIVERED = "delivered"  # every recipient delivered; removed
    BOUNCED = "bounced"  # all final, some failed; DSN queued; removed
    DEFERRED = "deferred"  # some recipients still open; scheduled again
    SKIPPED = "skipped"  # held, gone, locked by someone else, or not due yet
    WAITING = "waiting"  # not tried: the next hop was found unreachable in this pass
    CORRUPT = "corrupt"  # failed its self-check; moved to corrupt/


@dataclass(frozen=True)
class Attempt:
    """The result of one attempt: a verdict and the per-recipient results."""

    qid: str
    verdict: AttemptOutcome
    results: dict[int, Result]
    error: str = ""
    dsns: tuple[str, ...] = ()  # queue ids of the DSNs and forwarded copies it spooled
    link_down: bool = False  # the next hop could not be reached: stop trying others
    double_bounce: str = ""  # mail from <> failed: where the report about it went
    dropped_bounce: bool = False  # ... and that report itself failed: dropped (logged)


@dataclass
class Unrecorded:
    """What attempts learned but could not record (a full disk refused the status), kept
    by a queue runner in memory until a later attempt records it.

    Such an attempt counts as not made, yet a recipient the next hop accepted has the
    message: tried again as if nothing happened, it would get another copy at every pass
    for as long as the disk stays full. So its final results are carried into the next
    attempt of this process (`take`), which sends only to the others and records them
    all; and the message is not due again before `retry_at` (its old schedule, which
    says "now", would have the runner try it pass after pass with no pause). A crash
    loses this memory: then the retry repeats those deliveries once (at least once).

    The same holds for an alias recipient left open: the targets it already delivered
    (or failed for good) are marks (`leafmail.expansion`) that only the record keeps, so
    they are carried too (`marks`), or each pass gives those targets another copy.
    """

    limit: int = 10_000  # messages remembered; past it the oldest is forgotten (a copy more)
    # Ordered dicts: the oldest entry goes in O(1) (`_forget_oldest`).
    results: OrderedDict[str, dict[int, Result]] = field(default_factory=OrderedDict)
    marks: OrderedDict[str, dict[int, Marks]] = field(default_factory=OrderedDict)
    retry_at: OrderedDict[str, float] = field(default_factory=OrderedDict)

    def keep(
        self,
        qid: str,
        results: dict[int, Result],
        retry_at: float,
        marks: dict[int, Marks] | None = None,
    ) -> None:
        """An attempt of `qid` whose `results` (and alias `marks`) could not be recorded."""
        final = {i: r for i, r in results.items() if r.outcome is not Outcome.DEFERRED}
        self.results.pop(qid, None)
        if final:
            self.results[qid] = final
        self.keep_marks(qid, {i: m for i, m in (marks or {}).items() if i not in final})
        self.wait(qid, retry_at)

    def keep_marks(self, qid: str, marks: dict[int, Marks]) -> None:
        """The final marks of `marks` (targets delivered or failed for good), for `qid`."""
        kept = {i: {k: m for k, m in ms.items() if m.state.final} for i, ms in marks.items()}
        self.marks.pop(qid, None)
        if kept := {i: ms for i, ms in kept.items() if ms}:
            self.marks[qid] = kept
        _forget_oldest(self.marks, self.limit)

    def wait(self, qid: str, retry_at: float) -> None:
        """`qid` is not due again before `retry_at` (an attempt of it failed)."""
        self.retry_at.pop(qid, None)
        self.retry_at[qid] = retry_at
        _forget_oldest(self.results, self.limit)
        _forget_oldest(self.retry_at, self.limit)

    def take(self, qid: str, status: MessageStatus) -> dict[int, Result]:
        """The results to carry into this attempt: those of recipients still open."""
        carried = self.results.pop(qid, None)
        if not carried:  # (the common case: every attempt asks)
            return {}
        return {i: r for i, r in carried.items() if not status.recipients[i].state.final}

    def take_marks(self, qid: str, status: MessageStatus) -> dict[int, Marks]:
        """The alias marks to carry into this attempt: those of recipients still open."""
        carried = self.marks.pop(qid, None)
        if not carried:
            return {}
        return {i: m for i, m in carried.items() if not status.recipients[i].state.final}

    def recorded(self, qid: str) -> None:
        """An attempt of `qid` was recorded (or it is gone): nothing to remember."""
        self.results.pop(qid, None)
        self.marks.pop(qid, None)
        self.retry_at.pop(qid, None)


def _forget_oldest(memo: OrderedDict[str, Any], limit: int) -> None:
    """Drop the oldest entries of `memo` past `limit`. (With a plain dict, finding the
    first key scans past the slots of every key deleted before it, until the dict is
    rebuilt: at the limit each new entry cost a scan of up to `limit` slots, so a pass
    over a large queue on a full disk was quadratic.)"""
    while len(memo) > limit:
        memo.popitem(last=False)


class UnknownMessage(KeyError):
    """No message with that id is in the spool."""


@dataclass
class Message:
    """An unfrozen message: envelope, bytes and delivery status."""

    spool: Spool
    stored: SpooledMessage
    status: MessageStatus

    @property
    def qid(self) -> str:
        return self.stored.qid

    @property
    def envelope(self) -> Envelope:
        return self.stored.envelope

    @property
    def data(self) -> bytes:
        return self.stored.data

    def send(
        self,
        agent: Agent,
        *,
        policy: RetryPolicy | None = None,
        hostname: str = "localhost",
        now: float | None = None,
        postmaster: str | None = None,
    ) -> dict[str, Result]:
        """Deliver now (blocking); results by recipient address, recorded before returning.

        An undeliverable bounce is reported to `postmaster` (default postmaster@hostname).
        """

        async def run() -> Attempt:
            try:
                return await attempt(
                    self.spool,
                    self.qid,
                    agent,
                    policy or RetryPolicy(),
                    hostname=hostname,
                    now=time.time() if now is None else now,
                    force=True,
                    wait=True,
                    postmaster=f"postmaster@{hostname}" if postmaster is None else postmaster,
                )
            finally:
                await agent.close()

        done = asyncio.run(run())  # a LinkDown is a recorded 4.4.1 deferral here
        rcpts = self.envelope.recipients
        return {rcpts[i].address: result for i, result in done.results.items()}


def unfreeze(
    spool: Spool | str | os.PathLike[str], qid: str, state: QueueState | None = None
) -> Message:
    """Load message `qid` with its status; UnknownMessage or CorruptMessage if it cannot."""
    spool = spool if isinstance(spool, Spool) else Spool(spool, create=False)
    try:
        stored = spool.get(qid, state)
    except (KeyError, ValueError):
        raise UnknownMessage(qid) from None
    return Message(spool, stored, load_status(spool, stored))


def load_status(spool: Spool, stored: SpooledMessage) -> MessageStatus:
    """The stored status, or a fresh one; a damaged status restarts from fresh (logged by
    the caller via `last_error`), which can only repeat a delivery, never skip one."""
    blob = spool.read_status(stored.qid)
    fresh = MessageStatus.fresh(stored.envelope, arrival_time(stored.qid))
    if blob is None:
        return fresh
    try:
        return MessageStatus.from_bytes(blob, stored.envelope)
    except EnvelopeError as exc:
        return replace(fresh, last_error=f"status record was damaged ({exc}); starting over")


async def attempt(
    spool: Spool,
    qid: str,
    agent: Agent | None,
    policy: RetryPolicy,
    *,
    hostname: str,
    now: float,
    force: bool = False,
    wait: bool = False,
    postmaster: str = "",
    unrecorded: Unrecorded | None = None,
) -> Attempt:
    """One delivery attempt for `qid` under its lock; `agent=None` only expires.

    Without `force`, a deferred message whose next attempt is still ahead is skipped.
    LinkDown from the agent is recorded as a deferral of this message (4.4.1) and
    reported with `link_down`, so the runner can stop trying others. `postmaster`
    gets the report about mail from <> that failed ("": dropped, and logged).
    `unrecorded` (the runner's) carries the results of an earlier attempt that could
    not be recorded into this one, and keeps this one's if its record fails too.
    """
    with spool.locked(qid, wait=wait) as state:
        if state is None or state == QueueState.HOLD:
            return Attempt(qid, AttemptOutcome.SKIPPED, {})
        try:
            message = await _load(spool, qid, state)
        except UnknownMessage:
            return Attempt(qid, AttemptOutcome.SKIPPED, {})
        except CorruptMessage as exc:  # Spool.get moved it to corrupt/
            return Attempt(qid, AttemptOutcome.CORRUPT, {}, str(exc))
        status = message.status
        if not force and state == QueueState.DEFERRED and not policy.due(status.next_attempt, now):
            return Attempt(qid, AttemptOutcome.SKIPPED, {})
        expansions = RecordedExpansions(spool, qid, status, message.envelope)
        await expansions.recover()  # copies a crash left in hold/ go out now
        carried: dict[int, Result] = {}
        if unrecorded is not None:
            carried = unrecorded.take(qid, status)
            expansions.carry(unrecorded.take_marks(qid, status))
        open_rcpts = [i for i in status.open if i not in carried] if carried else status.open
        if open_rcpts and agent is None and not policy.expired(status.arrival, now):
            if unrecorded is not None:  # still to be recorded
                if carried:
                    unrecorded.results[qid] = carried
                unrecorded.keep_marks(qid, expansions.marks)
            return Attempt(qid, AttemptOutcome.SKIPPED, {}, dsns=tuple(expansions.released))
        results: dict[int, Result] = {}
        try:
            results, link_error = await _results(
                agent, message, open_rcpts, policy, now, expansions
            )
            # A recipient recorded delivered while others ran (`settled`) has the message,
            # whatever the end of the delivery said of it (a local service that died
            # before its answer defers all it was asked): the record keeps that fact.
            results = {**carried, **results, **expansions.early}
            done = await record(
                message,
                state,
                results,
                policy,
                hostname=hostname,
                now=now,
                expansions=expansions,
                postmaster=postmaster,
            )
        except Exception:
            if unrecorded is not None:
                retry_at = policy.after_unrecorded(status.arrival, now)
                unrecorded.keep(qid, {**carried, **results}, retry_at, expansions.marks)
            raise
        if link_error is not None:
            return replace(done, link_down=True, error=str(link_error))
        return done


async def _results(
    agent: Agent | None,
    message: Message,
    open_rcpts: list[int],
    policy: RetryPolicy,
    now: float,
    expansions: RecordedExpansions,
) -> tuple[dict[int, Result], LinkDown | None]:
    """This attempt's results for the open recipients (expired, or from the agent), and
    the LinkDown that deferred them all, if one did. `agent` is None only for expiry."""
    if not open_rcpts:
        return {}, None  # all final already (a crash before the removal): just remove
    if policy.expired(message.status.arrival, now) or agent is None:
        return expire(open_rcpts, message.status, policy), None
    try:
        return await agent.deliver(message.envelope, message.data, open_rcpts, expansions), None
    except LinkDown as exc:
        return dict.fromkeys(open_rcpts, Result.deferred("4.4.1", str(exc))), exc


async def _load(spool: Spool, qid: str, state: QueueState) -> Message:
    """Unfreeze on the loop when small (a thread hop costs more), in a thread when large."""
    if spool.size(qid, state) <= INLINE_LOAD_LIMIT:
        return unfreeze(spool, qid, state)
    return await asyncio.to_thread(unfreeze, spool, qid, state)


def expire(
    open_rcpts: Sequence[int], status: MessageStatus, policy: RetryPolicy
) -> dict[int, Result]:
    """Fail every open recipient with 4.4.7, quoting the last error it had."""
    lifetime = format_duration(policy.lifetime)
    results = {}
    for i in open_rcpts:
        last = status.recipients[i].reply or status.last_error or "no attempt succeeded"
        text = f"message expired after {lifetime} in the queue; last error: {last}"
        results[i] = Result(Outcome.FAILED, 451, "4.4.7", text, status.recipients[i].remote)
    return results


DsnMessage = tuple[Envelope, bytes]  # a DSN to commit: its envelope and bytes


async def record(
    message: Message,
    state: QueueState,
    results: dict[int, Result],
    policy: RetryPolicy,
    *,
    hostname: str,
    now: float,
    expansions: RecordedExpansions | None = None,
    postmaster: str = "",
) -> Attempt:
    """Apply `results` to the status and make it durable (see the module doc for the order)."""
    before = message.status if expansions is None else expansions.merged(message.status)
    status = apply_results(before, results, policy, now)
    if expansions is not None:
        status = expansions.merged(status)  # a recipient now final drops its marks
    sizes = {} if expansions is None else expansions.sizes
    failed = [
        Notice(message.envelope.recipients[i], r)
        for i, r in results.items()
        if r.outcome is Outcome.FAILED
    ]
    dsns = reports(message, results, failed, sizes, hostname=hostname, now=now)
    bounce_to, dropped = "", False
    if message.envelope.sender == "" and failed:
        bounce_to, dropped = double_bounce_target(message.envelope, failed, postmaster)
        if bounce_to:
            dsns.append(dsn_for(message, failed, hostname=hostname, now=now, to=bounce_to))
    if not status.done and not status.warned and policy.warn_due(status.arrival, now):
        status = replace(status, warned=True)
        dsns += delay_warning(message, status, results, policy, hostname=hostname, now=now)
    message.status = status
    dsn_ids: list[str] = []
    if status.done and not dsns:
        message.spool.discard_delivered(message.qid, state)
    else:
        dsn_ids = await asyncio.to_thread(_store, message, state, dsns)
    spooled = tuple(dsn_ids) + (() if expansions is None else tuple(expansions.released))
    verdict = verdict_of(status)
    # status.last_error outlives the attempt that set it: a delivery has no error to report.
    error = "" if verdict is AttemptOutcome.DELIVERED else status.last_error
    return Attempt(
        message.qid,
        verdict,
        results,
        error,
        spooled,
        double_bounce=bounce_to,
        dropped_bounce=dropped,
    )


def reports(
    message: Message,
    results: dict[int, Result],
    failed: list[Notice],
    sizes: dict[int, int],
    *,
    hostname: str,
    now: float,
) -> list[DsnMessage]:
    """The bounce and the success report this attempt owes the sender (none for <>)."""
    sender = message.envelope.sender
    found = []
    notices = [n for n in failed if wants_dsn(sender, n.recipient, "FAILURE")]
    if notices:
        found.append(dsn_for(message, notices, hostname=hostname, now=now))
    successes = success_notices(message.envelope, results, sizes)
    if successes:
        found.append(dsn_for(message, successes, hostname=hostname, now=now))
    return found


def delay_warning(
    message: Message,
    status: MessageStatus,
    results: dict[int, Result],
    policy: RetryPolicy,
    *,
    hostname: str,
    now: float,
) -> list[DsnMessage]:
    """The one "still trying" DSN, for the open recipients that want delay notices."""
    envelope = message.envelope
    delayed = [
        Notice(envelope.recipients[i], results[i])
        for i in status.open
        if i in results and wants_dsn(envelope.sender, envelope.recipients[i], "DELAY")
    ]
    if not delayed:
        return []
    retry_until = policy.expires(status.arrival)
    return [
        dsn_for(message, delayed, hostname=hostname, now=now, delayed=True, retry_until=retry_until)
    ]


def success_notices(
    envelope: Envelope, results: dict[int, Result], sizes: dict[int, int]
) -> list[Notice]:
    """Success reports asked for with NOTIFY=SUCCESS (RFC 3461 5.2.2, 6.2.7).

    `sizes` says how many targets an alias expanded each recipient to: several make an
    "expanded" report (their copies no longer ask for success, `notify_after_expansion`),
    and a single forward passes NOTIFY on with the copy, which reports for itself.
    """
    notices = []
    for i, result in results.items():
        rcpt = envelope.recipients[i]
        if result.outcome is not Outcome.DELIVERED or not wants_dsn(
            envelope.sender, rcpt, "SUCCESS"
        ):
            continue
        action = success_action(result, sizes.get(i, 0))
        if action is not None:
            notices.append(Notice(rcpt, result, action))
    return notices


def success_action(result: Result, targets: int) -> Action | None:
    """The Action of a delivered recipient, or None when someone else reports it."""
    if targets > 1:
        return Action.EXPANDED
    if result.handoff is Handoff.PASSED:
        return None  # the next hop, or the forwarded copy, carries NOTIFY on
    return Action.RELAYED if result.handoff is Handoff.RELAYED else Action.DELIVERED


def double_bounce_target(
    envelope: Envelope, failed: list[Notice], postmaster: str
) -> tuple[str, bool]:
    """Where the report about failed mail from <> goes, and whether it is dropped.

    It goes to the postmaster, unless it was such a report already (or a copy the
    postmaster's alias forwarded), or the postmaster is whom it failed to reach:
    another report would go the same way and could loop, so it is dropped and logged.
    """
    if not postmaster or is_double_bounce(envelope):
        return "", True
    if any(n.recipient.address.lower() == postmaster.lower() for n in failed):
        return "", True
    return postmaster, False


def dsn_for(
    message: Message,
    notices: list[Notice],
    *,
    hostname: str,
    now: float,
    delayed: bool = False,
    retry_until: float | None = None,
    to: str | None = None,
) -> DsnMessage:
    return build_dsn(
        hostname=hostname,
        qid=message.qid,
        envelope=message.envelope,
        data=message.data,
        notices=notices,
        arrival=message.status.arrival,
        now=now,
        delayed=delayed,
        retry_until=retry_until,
        to=to,
    )


def _store(message: Message, state: QueueState, dsns: list[DsnMessage]) -> list[str]:
    """Commit the DSNs, then the status (or the removal); returns the DSNs' queue ids.

    DSNs come first so that a crash can only repeat a bounce, never lose one. A status
    write that fails (a full disk) is not a crash: the attempt counts as not made and
    will be repeated, so the DSNs it committed are taken back, or the sender would get
    one more copy per failed attempt; unless the record is in place and only its sync
    failed (RecordNotDurable): the next attempt reads it and makes no DSN again.
    """
    spool, qid = message.spool, message.qid
    dsn_ids: list[str] = []
    try:
        for envelope, data in dsns:
            dsn_ids.append(spool.commit(envelope, data))
        if message.status.done:
            spool.remove(qid, durable=False)
        else:
            spool.write_status(qid, message.status.to_bytes())
    except RecordNotDurable:
        raise  # the record says those recipients are final: their DSNs must stay
    except OSError:
        _withdraw(spool, dsn_ids)
        raise
    if not message.status.done and state == QueueState.QUEUE:
        spool.move(qid, QueueState.QUEUE, QueueState.DEFERRED)
    return dsn_ids


def _withdraw(spool: Spool, dsn_ids: list[str]) -> None:
    """Remove DSNs of an attempt that could not be recorded (best effort).

    A DSN some runner already holds is left alone: delivering it twice is the
    at-least-once case, taking it from under a delivery is not allowed.
    """
    for dsn in dsn_ids:
        with contextlib.suppress(OSError, KeyError), spool.locked(dsn) as state:
            if state is not None:
                spool.remove(dsn)


def apply_results(
    status: MessageStatus, results: dict[int, Result], policy: RetryPolicy, now: float
) -> MessageStatus:
    """The status after an attempt: recipient states, attempt counts and next retry."""
    for i, result in results.items():
        old = status.recipients[i]
        status = status.with_recipient(
            i, RcptStatus(result.outcome.state, old.attempts + 1, result.line, result.remote)
        )
    attempts = status.attempts + 1
    # The reason it is still queued matters most, so deferrals come before failures.
    errors = [r.line for r in results.values() if r.outcome is Outcome.DEFERRED]
    errors += [r.line for r in results.values() if r.outcome is Outcome.FAILED]
    return replace(
        status,
        attempts=attempts,
        last_attempt=now,
        last_error=errors[0] if errors else status.last_error,
        next_attempt=0.0 if status.done else policy.next_attempt(status.arrival, attempts, now),
    )


def verdict_of(status: MessageStatus) -> AttemptOutcome:
    if not status.done:
        return AttemptOutcome.DEFERRED
    if any(r.state is RcptState.FAILED for r in status.recipients):
        return AttemptOutcome.BOUNCED
    return AttemptOutcome.DELIVERED
