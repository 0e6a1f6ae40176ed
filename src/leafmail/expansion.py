"""What an alias expansion already delivered, kept in the message's status record.

An alias (``team: alice, bob@far.example``) makes one recipient into several targets.
The recipient stays open while any target defers, so without a record each retry
would give the others another copy: six passes, six copies for bob. Here each target
has a mark in the recipient's status (`leafmail.status.TargetMark`): a mailbox, file
or command that got the message, or failed for good, is not tried again, and its
result counts again when the recipient's result is worked out.

A forwarded copy (a new message spooled for the remote targets) must be made exactly
once even across a crash, so it is made in durable steps, each recorded before the
next starts:

1. STAGED: the copy's queue id is chosen and recorded in the status; nothing spooled;
2. the copy is committed into hold/, where no runner (and no forced flush) takes it;
3. FORWARDED: recorded;
4. the copy is moved into queue/ (released); the mark becomes DELIVERED and is
   written with the attempt's status.

Every attempt first settles marks a crash left half-way (`recover`), from the mark and
where its copy is: STAGED and no copy means step 2 never finished (forget the mark,
make a new copy); a copy in hold/ is complete (record FORWARDED if need be, then
release it); FORWARDED with the copy in the queue or gone means it was released (and
perhaps already delivered). The copy only leaves hold/ after FORWARDED is durable, so
"gone" can never be mistaken for "never made": no duplicate, and no loss. The copy's
envelope names its parent (`forward_of`), so the queue tools keep that rule too: before
they hold, release or requeue a copy they settle its parent as an attempt would, and the
queue manager settles every copy in hold/ at its start (leafmail.forwards).

`UnrecordedExpansions` is the same interface without a record, for an agent used on its
own (a test, or a tool), where a copy is simply spooled.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace

from .delivery import Outcome, Result
from .delivery.bounce import notify_after_expansion, wants_dsn
from .envelope import Envelope
from .spool import Spool, new_id
from .states import QueueState
from .status import MessageStatus, RcptState, TargetMark, TargetState

Marks = dict[str, TargetMark]


class RecordedExpansions:
    """The `leafmail.delivery.Expansions` of one attempt, backed by the status record.

    Made by the attempt under the message's lock, from the status it loaded; only
    that attempt writes the record, so read-modify-write here is safe.
    """

    def __init__(
        self, spool: Spool, qid: str, status: MessageStatus, envelope: Envelope | None = None
    ) -> None:
        self.spool = spool
        self.qid = qid
        self.base = status
        self.envelope = envelope  # (without it, `settled` records nothing)
        self.early: dict[int, Result] = {}  # delivered before the attempt's end (`settled`)
        self.marks: dict[int, Marks] = {
            i: {m.key: m for m in r.targets} for i, r in enumerate(status.recipients) if r.targets
        }
        self.sizes: dict[int, int] = {}  # how many targets each recipient had this attempt
        self.released: list[str] = []  # forwarded copies moved into the queue
        self._lock = asyncio.Lock()  # one status write at a time

    # -- the Expansions interface --------------------------------------------------------
    def expanding(self, index: int, keys: Sequence[str]) -> None:
        self.sizes[index] = len(keys)

    def result(self, index: int, key: str) -> Result | None:
        mark = self.marks.get(index, {}).get(key)
        if mark is None or not mark.state.final:
            return None
        return _result_of(mark)

    def record(self, index: int, key: str, result: Result) -> None:
        if result.outcome is Outcome.DEFERRED:
            return
        state = TargetState.DELIVERED if result.outcome is Outcome.DELIVERED else TargetState.FAILED
        self.marks.setdefault(index, {})[key] = TargetMark(key, state, result.line)

    async def forward(
        self, index: int, keys: Sequence[str], envelope: Envelope, data: bytes
    ) -> str:
        """Steps 1-4 of the module doc; OSError when the copy could not be made now."""
        if self.sizes.get(index, 0) > 1:  # an "expanded" DSN reports success for them all
            rcpts = tuple(
                replace(r, notify=notify_after_expansion(r.notify)) for r in envelope.recipients
            )
            envelope = replace(envelope, recipients=rcpts)
        envelope = replace(envelope, forward_of=self.qid)  # whose record tracks the copy
        copy = new_id()
        marks = self.marks.setdefault(index, {})
        for key in keys:
            marks[key] = TargetMark(key, TargetState.STAGED, qid=copy)
        await self._save()
        # A failure from here on leaves the marks STAGED: the next attempt's `recover`
        # looks for the copy and either releases it or forgets it.
        await asyncio.to_thread(self.spool.commit, envelope, data, copy, state=QueueState.HOLD)
        for key in keys:
            marks[key] = TargetMark(key, TargetState.FORWARDED, qid=copy)
        await self._save()
        if await asyncio.to_thread(self._move_out, copy):
            self.released.append(copy)
        for key in keys:
            self._released(index, marks[key])
        return copy

    async def settled(self, results: Mapping[int, Result]) -> None:
        """Record now the recipients of `results` that were delivered (the others' own
        results come with the attempt's record, or the next attempt's). Not a failure,
        nor a delivery that owes a success report: its DSN is committed before the
        record that makes it final, or a crash could lose the report. A write that fails
        (a full disk) changes nothing: the attempt's record says the same later."""
        envelope = self.envelope
        if envelope is None:
            return
        fresh = {
            i: r
            for i, r in results.items()
            if r.outcome is Outcome.DELIVERED
            and i not in self.early
            and 0 <= i < len(self.base.recipients)
            and not self.base.recipients[i].state.final
            and not wants_dsn(envelope.sender, envelope.recipients[i], "SUCCESS")
        }
        if not fresh:
            return
        self.early.update(fresh)
        with contextlib.suppress(OSError):
            await self._save()

    def carry(self, marks: Mapping[int, Marks]) -> None:
        """Take the final marks an earlier attempt made but could not record (a full
        disk: `leafmail.message.Unrecorded`), where the record has none that is final."""
        for index, carried in marks.items():
            mine = self.marks.setdefault(index, {})
            for key, mark in carried.items():
                known = mine.get(key)
                if mark.state.final and (known is None or not known.state.final):
                    mine[key] = mark

    # -- recovery ------------------------------------------------------------------------
    async def recover(self) -> None:
        """Settle the forwards a crash left between steps (see the module doc)."""
        pending = self._pending()
        if pending:
            await asyncio.to_thread(self._recover, pending)

    def settle(self, *, release: bool = True) -> list[str]:
        """`recover` outside an attempt (a queue tool, the queue manager's start; the
        caller holds the message's lock), with the settled marks written at once, since
        no attempt will write them: the copies released.

        `release=False` (the operator holds or deletes a copy) records a complete copy
        in hold/ as forwarded but leaves it there: from then on it is the operator's,
        and it never passes through the queue, where a runner could take it first."""
        pending = self._pending()
        if not pending:
            return []
        self._recover(pending, release=release)
        self._write()
        return self.released

    def _pending(self) -> list[tuple[int, TargetMark]]:
        return [
            (i, mark)
            for i, marks in self.marks.items()
            for mark in marks.values()
            if mark.state in (TargetState.STAGED, TargetState.FORWARDED)
        ]

    def _recover(self, pending: list[tuple[int, TargetMark]], *, release: bool = True) -> None:
        held: list[tuple[int, str]] = []
        changed = False
        for index, mark in pending:
            where = self.spool.find(mark.qid)
            if where == QueueState.HOLD:
                if mark.state is TargetState.STAGED:
                    self.marks[index][mark.key] = replace(mark, state=TargetState.FORWARDED)
                    changed = True
                held.append((index, mark.key))
            elif mark.state is TargetState.STAGED and where is None:
                del self.marks[index][mark.key]  # never spooled: a new copy will be made
                changed = True
            else:  # released (in the queue), or released and already delivered
                self._released(index, mark)
        if changed:
            self._write()  # FORWARDED is durable before any copy leaves hold/
        if release:
            self._release(held)
            return
        for index, key in held:  # complete copies, left in hold/ for the operator
            self._released(index, self.marks[index][key])

    def _release(self, targets: list[tuple[int, str]]) -> None:
        for index, key in targets:
            mark = self.marks[index][key]
            if self._move_out(mark.qid):
                self.released.append(mark.qid)
            self._released(index, mark)

    def _move_out(self, copy: str) -> bool:
        """Release a copy from hold/ into the queue; False if it was released already
        (by the copy's other targets, or by the operator).

        Under the copy's lock, as every move (`Spool.move_from`): a holder of it (the
        runner skipping a held message, `settle_duplicates` at a start) is waited for.
        No holder waits for this parent's lock meanwhile: a tool settles the parent
        before it locks a copy (leafmail.forwards)."""
        return self.spool.move_from(copy, QueueState.HOLD, QueueState.QUEUE)

    def _released(self, index: int, mark: TargetMark) -> None:
        reply = f"250 2.0.0 forwarded as {mark.qid}"
        self.marks[index][mark.key] = TargetMark(mark.key, TargetState.DELIVERED, reply, mark.qid)

    # -- the status record ---------------------------------------------------------------
    def merged(self, status: MessageStatus) -> MessageStatus:
        """`status` with the marks of this attempt; a final recipient needs none."""
        for index, rcpt in enumerate(status.recipients):
            marks = () if rcpt.state.final else tuple(self.marks.get(index, {}).values())
            if marks != rcpt.targets:
                status = status.with_recipient(index, replace(rcpt, targets=marks))
        return status

    def current(self) -> MessageStatus:
        """The status as it stands in this attempt: the loaded one with the recipients
        delivered early (`settled`) and the marks."""
        status = self.base
        for index, result in self.early.items():
            rcpt = replace(
                status.recipients[index],
                state=RcptState.DELIVERED,
                reply=result.line,
                remote=result.remote,
            )
            status = status.with_recipient(index, rcpt)
        return self.merged(status)

    def _write(self) -> None:
        """Write the record now (from the recovery's thread: nothing else runs then)."""
        self.spool.write_status(self.qid, self.current().to_bytes())

    async def _save(self) -> None:
        """Write the record, one write at a time; the bytes are made on the loop, where
        the marks change, so a write never reads them half-changed."""
        async with self._lock:
            blob = self.current().to_bytes()
            await asyncio.to_thread(self.spool.write_status, self.qid, blob)


class NoRecord:
    """Expansions for an attempt that keeps none (the agent used on its own): nothing
    is remembered, and forwarded copies cannot be spooled from here, so they defer."""

    def expanding(self, index: int, keys: Sequence[str]) -> None:
        """Nothing to remember."""

    def result(self, index: int, key: str) -> Result | None:
        return None

    def record(self, index: int, key: str, result: Result) -> None:
        """Nothing to remember."""

    async def forward(
        self, index: int, keys: Sequence[str], envelope: Envelope, data: bytes
    ) -> str:
        raise OSError("no expansion record to forward with")

    async def settled(self, results: Mapping[int, Result]) -> None:
        """Nothing to record."""


class UnrecordedExpansions(NoRecord):
    """Expansions with no record: each forward is spooled at once and announced."""

    def __init__(self, spool: Spool, notify: Callable[[str], None] | None = None) -> None:
        self.spool = spool
        self.notify = notify

    async def forward(
        self, index: int, keys: Sequence[str], envelope: Envelope, data: bytes
    ) -> str:
        qid = await asyncio.to_thread(self.spool.commit, envelope, data)
        if self.notify is not None:
            self.notify(qid)
        return qid


def _result_of(mark: TargetMark) -> Result:
    """The Result a final mark stands for (its reply line is "CODE X.Y.Z text")."""
    code_text, _, rest = mark.reply.partition(" ")
    code = int(code_text) if code_text.isdigit() else 0
    if mark.state is TargetState.DELIVERED:
        return Result.from_reply(code if 200 <= code < 300 else 250, rest)
    return Result.from_reply(code if 500 <= code < 600 else 554, rest)
