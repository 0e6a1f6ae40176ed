"""The queue runner: which messages to try, how many at once, and what to do when the link is down.

A *pass* takes every message in queue/ and every deferred message whose time has come,
and works through them with `concurrency` workers, each making one `message.attempt`.
Mail that arrives during a pass joins it (`notify`). Passes never overlap: a flush asked
for while a scheduled pass runs waits for it, then runs its own.

When the next hop cannot be reached at all (`LinkDown`), the message that found out is
deferred, the pass stops taking new messages, and the runner leaves the link alone for
a while that doubles each time it is still down (from one minute, or retry_initial if
shorter, up to retry_max): the laptop that is offline does not spin. Expired messages
still bounce while the link is down. `flush` (a network-up hook) ignores that wait.

Time comes from an injected clock, and `run_once` is one pass, so tests drive the
schedule without sleeping.

`build_runner` makes the runner the config's queue sections (`QueueConfig`) ask for,
with an agent per route in use: the queue manager of `leafmail serve` and `leafmail
flush` without a daemon both get theirs from it.

Bounces that cannot be delivered go to `postmaster` (`[delivery] double_bounce_to`,
default postmaster at our first local domain), and each one is logged; one that
fails on its way to the postmaster as well is dropped with an error line.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from netserver.connlog import ServerLog
from netserver.errors import ConfigError

from . import reaper
from .config import QueueConfig
from .delivery import Agent
from .delivery.router import build_agent
from .message import Attempt, AttemptOutcome, Unrecorded, attempt
from .retry import RetryPolicy
from .spool import Spool, arrival_time
from .states import QueueState, Route
from .status import peek_next_attempt

LINK_RETRY_FIRST = 60.0
SCAN_INTERVAL = 60.0  # how often a waiting runner looks for mail other processes spooled

Progress = Callable[[Attempt], None]


@dataclass
class PassSummary:
    """What a pass did, message by message."""

    counts: Counter[str] = field(default_factory=Counter)
    link_error: str = ""

    def add(self, done: Attempt) -> None:
        self.counts[done.verdict.value] += 1

    @property
    def deferred(self) -> int:
        """Messages still queued after this pass (tried and deferred, or not tried)."""
        return (
            self.counts[AttemptOutcome.DEFERRED.value] + self.counts[AttemptOutcome.WAITING.value]
        )


class QueueRunner:
    """Runs passes over the spool with one delivery agent."""

    def __init__(
        self,
        spool: Spool,
        agent: Agent | None,
        policy: RetryPolicy,
        *,
        hostname: str,
        concurrency: int = 4,
        clock: Callable[[], float] = time.time,
        log: ServerLog | None = None,
        postmaster: str | None = None,
    ) -> None:
        self.spool = spool
        if spool.reaper is None:  # delivered files are freed off the event loop
            spool.reaper = reaper.shared()
        self.postmaster = f"postmaster@{hostname}" if postmaster is None else postmaster
        self.agent = agent
        self.policy = policy
        self.hostname = hostname
        self.concurrency = concurrency
        self.clock = clock
        self.log = log
        self.link_down_until = 0.0
        self.link_wait = 0.0
        self._pass_lock = asyncio.Lock()
        self._wake = asyncio.Event()
        self._arrived: deque[str] = deque()
        self.unrecorded = Unrecorded()  # attempts a full disk kept from being recorded

    # -- what is due --------------------------------------------------------------------
    def due(self, now: float, *, force: bool = False) -> list[str]:
        """New messages first (oldest first), then deferred ones whose time has come."""
        ready = self.spool.ids(QueueState.QUEUE)
        waiting = self.unrecorded.retry_at
        if waiting and not force:  # (only an attempt that was not recorded makes one wait)
            ready = [q for q in ready if q not in waiting or self._when(q, 0.0, now) <= now]
        for qid in self.spool.ids(QueueState.DEFERRED):
            if force or self._when(qid, self.next_attempt(qid), now) <= now:
                ready.append(qid)
        return ready

    def next_attempt(self, qid: str) -> float:
        """When a deferred message may be tried again (0 when unknown: try it)."""
        try:
            blob = self.spool.read_status(qid)
        except OSError:
            return 0.0
        return 0.0 if blob is None else peek_next_attempt(blob)

    def next_wakeup(self, now: float) -> float:
        """Seconds until something may be due: the earliest retry, capped by the scan interval."""
        deferred = self.spool.ids(QueueState.DEFERRED)
        times = [self._when(qid, self.next_attempt(qid), now) for qid in deferred]
        waiting = self.unrecorded.retry_at
        if waiting:  # a new message waits only after an attempt that was not recorded
            queued = self.spool.ids(QueueState.QUEUE)
            times += [self._when(q, 0.0, now) for q in queued if q in waiting]
        soonest = min(times, default=now + SCAN_INTERVAL)
        if self._resting(now):
            soonest = max(soonest, self.link_down_until)
        return max(0.0, min(soonest - now, SCAN_INTERVAL))

    def _when(self, qid: str, next_attempt: float, now: float) -> float:
        """When a message is due: at its `next_attempt`, or after the wait that follows an
        attempt that could not be recorded (`Unrecorded`), whichever is later. A time
        further ahead than any wait of the policy was set by a clock since set back: now
        (`RetryPolicy.due`)."""
        when = max(next_attempt, self.unrecorded.retry_at.get(qid, 0.0))
        return now if when > now and self.policy.due(when, now) else when

    def _resting(self, now: float) -> bool:
        """Whether the link is still left alone at `now`. A rest lasts `link_wait` at most:
        one that ends further ahead was set by a clock since set back, and is over."""
        return now < self.link_down_until and self.link_down_until - now <= self.link_wait

    # -- passes -------------------------------------------------------------------------
    def notify(self, qid: str) -> None:
        """A message was just spooled: take it in the running pass, or start one."""
        self._arrived.append(qid)
        self._wake.set()

    def share_passes_with(self, other: QueueRunner) -> None:
        """Never run a pass at the same time as `other` (a flush waits for a pass)."""
        self._pass_lock = other._pass_lock
        self.unrecorded = other.unrecorded

    def notify_scan(self) -> None:
        """Something changed in the spool behind our back (a release, a sendmail): look."""
        self._wake.set()

    async def run_once(
        self,
        *,
        force: bool = False,
        progress: Progress | None = None,
        on_total: Callable[[int], None] | None = None,
    ) -> PassSummary:
        """One pass over what is due now (everything, with `force`)."""
        async with self._pass_lock:
            self._wake.clear()
            self._arrived.clear()
            now = self.clock()
            if force:
                self.link_down_until = 0.0
            link_up = not self._resting(now)
            work = deque(self.due(now, force=force))
            if not link_up:  # only expiries can happen while the link rests
                work = deque(q for q in work if self.policy.expired(arrival_time(q), now))
            seen = set(work)
            if on_total is not None:
                on_total(len(work))
            summary = PassSummary()
            workers = max(1, min(self.concurrency, len(work)))
            await asyncio.gather(
                *(
                    self._worker(work, seen, summary, progress, force, link_up)
                    for _ in range(workers)
                )
            )
            if self.agent is not None:
                await self.agent.close()
            if force and self.spool.reaper is not None:
                # A flush reports done only once the space of what it removed is free
                # again; the daemon's own passes go on at once (it is freed meanwhile).
                await self.spool.reaper.settle()
            return summary

    async def _worker(
        self,
        work: deque[str],
        seen: set[str],
        summary: PassSummary,
        progress: Progress | None,
        force: bool,
        link_up: bool,
    ) -> None:
        while True:
            if not work:
                self._take_arrivals(work, seen)
            if not work:
                return
            qid = work.popleft()
            now = self.clock()
            usable = link_up and not summary.link_error and not self._resting(now)
            if not usable and not self.policy.expired(arrival_time(qid), now):
                reason = summary.link_error or "next hop unreachable earlier; waiting"
                done = Attempt(qid, AttemptOutcome.WAITING, {}, f"not tried: {reason}")
            else:
                done = await self._attempt(qid, now, summary, force, usable)
            self._arrived.extend(done.dsns)  # bounces go out in this same pass
            summary.add(done)
            self._report(done)
            if progress is not None:
                progress(done)

    async def _attempt(
        self, qid: str, now: float, summary: PassSummary, force: bool, usable: bool
    ) -> Attempt:
        try:
            done = await attempt(
                self.spool,
                qid,
                self.agent if usable else None,
                self.policy,
                hostname=self.hostname,
                now=now,
                force=force,
                postmaster=self.postmaster,
                unrecorded=self.unrecorded,
            )
        except Exception as exc:  # one message must not stop the queue
            # E.g. the disk is full and its status cannot be written. The message stays
            # where it is, unchanged, and is tried again after a wait; what the attempt
            # learned is carried into that one (`Unrecorded`).
            error = f"not recorded, will retry: {type(exc).__name__}: {exc}"
            if self.log is not None:
                self.log.info("delivery error", qid=qid, error=error)
            # (Failed before its record, too: its old schedule says "now" all the same.)
            if self.unrecorded.retry_at.get(qid, 0.0) <= now:
                self.unrecorded.wait(qid, self.policy.after_unrecorded(arrival_time(qid), now))
            return Attempt(qid, AttemptOutcome.DEFERRED, {}, error)
        if done.verdict is not AttemptOutcome.SKIPPED:
            self.unrecorded.recorded(qid)
        if done.link_down:
            if not summary.link_error:  # once per pass, however many workers found out
                self._link_failed(done.error, now)
                summary.link_error = done.error
            return done
        if usable and done.verdict is not AttemptOutcome.SKIPPED:
            self.link_wait = 0.0
        return done

    def _take_arrivals(self, work: deque[str], seen: set[str]) -> None:
        while self._arrived:
            qid = self._arrived.popleft()
            if qid not in seen:
                seen.add(qid)
                work.append(qid)

    def _link_failed(self, reason: str, now: float) -> None:
        first = min(LINK_RETRY_FIRST, self.policy.initial)
        self.link_wait = min(self.link_wait * 2 if self.link_wait else first, self.policy.maximum)
        self.link_down_until = now + self.link_wait
        if self.log is not None:
            self.log.info(
                "next hop unreachable; holding the queue", error=reason, retry_in=self.link_wait
            )

    def _report(self, done: Attempt) -> None:
        if self.log is None or done.verdict in (AttemptOutcome.SKIPPED, AttemptOutcome.WAITING):
            return
        error = {"error": done.error} if done.error else {}
        self.log.event("delivery", qid=done.qid, result=done.verdict.value, **error)
        if done.double_bounce:
            self.log.info(
                "undeliverable bounce reported to the postmaster",
                qid=done.qid,
                to=done.double_bounce,
                error=done.error,
            )
        if done.dropped_bounce:
            self.log.error(
                "undeliverable bounce DROPPED: the postmaster cannot be reached either",
                qid=done.qid,
                postmaster=self.postmaster or "(none: delivery.double_bounce_to is empty)",
                error=done.error,
            )

    # -- the daemon's loop --------------------------------------------------------------
    async def serve(self, stopping: asyncio.Event) -> None:
        """Run passes until `stopping` is set: at once, then whenever mail arrives or is due."""
        while not stopping.is_set():
            try:
                await self.run_once()
                delay = 0.0 if self._arrived else self.next_wakeup(self.clock())
            except OSError as exc:  # the spool itself failed (listing, reading statuses)
                if self.log is not None:
                    self.log.info("queue run failed; retrying", error=str(exc))
                delay = SCAN_INTERVAL
            if delay == 0.0:
                continue
            waits = {
                asyncio.ensure_future(self._wake.wait()),
                asyncio.ensure_future(stopping.wait()),
            }
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            for task in waits:
                task.cancel()


def build_runner(
    config: QueueConfig,
    spool: Spool,
    *,
    routes: frozenset[Route] | None = None,
    local: Agent | None = None,
    **kwargs: Any,
) -> QueueRunner | None:
    """The queue runner, None when nothing is configured to deliver to; ConfigError if
    the delivery settings cannot work (a bad CA file, an unreadable password file).

    `routes` limits it to some routes (offline: "local" only); the others wait.
    """
    runner = QueueRunner(
        spool,
        None,
        RetryPolicy.from_config(config.delivery),
        hostname=config.hostname,
        concurrency=config.delivery.concurrency,
        postmaster=config.postmaster,
        **kwargs,
    )
    try:  # forwarded copies (aliases to other domains) join the pass that made them
        runner.agent = build_agent(config, spool, notify=runner.notify, routes=routes, local=local)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    return None if runner.agent is None else runner
