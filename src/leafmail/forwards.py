"""Forwarded copies a crash left half-made, settled outside an attempt.

A forwarded copy is committed into hold/ and released by the attempt that made it, in
recorded steps (leafmail.expansion). A crash between the steps leaves the copy in
hold/ with its mark STAGED or FORWARDED in the parent message's status, and the next
attempt of the parent settles it. Until then the copy looks like any held message, and
the queue tools must not act on it blindly:

* `leafmail release` of a copy whose mark is still STAGED took it out of hold/ before
  the record said it existed; once it was delivered, the parent's recovery found
  STAGED and no copy, concluded "never made", and made a second one (a duplicate);
* `leafmail hold` of a copy whose mark is still FORWARDED was undone by that recovery,
  which releases every pending copy it finds in hold/;
* `leafmail delete` of a copy whose mark is still STAGED was undone the same way: the
  recovery found no copy and made a new one.

So a tool that changes a copy first settles its parent, under the parent's lock (it
waits for an attempt in progress), exactly as the parent's next attempt would, and
records the result; then it acts on a copy the record no longer waits for (hold and
delete leave a copy that is in hold/ there, recorded as forwarded: it never passes
through the queue, where a runner could send it before the operator's change). The queue
manager does the same at its start for every copy in hold/, so a copy made during a
deferred message's attempt is not kept until that message's next retry. A copy whose
parent is gone, or settled already, is an ordinary held message.
"""

from __future__ import annotations

from .envelope import EnvelopeError
from .spool import CorruptMessage, Spool
from .states import QueueState


def parent_of(spool: Spool, qid: str, state: QueueState) -> str | None:
    """The message whose record tracks `qid`, if `qid` is a forwarded copy."""
    try:
        return spool.get(qid, state).envelope.forward_of
    except (CorruptMessage, KeyError, OSError, ValueError):
        return None  # gone, or damaged (moved to corrupt/): nothing to settle


def settle_parent(spool: Spool, parent: str, *, release: bool = True) -> list[str]:
    """Settle `parent`'s pending forwards now and record them; the copies released
    (`release=False`: complete copies stay in hold/, see RecordedExpansions.settle)."""
    # Here, not at the top: only a forwarded copy gets this far, and these load the
    # delivery side (asyncio), which the queue tools, asked about any other message,
    # have no use for at each start.
    from .expansion import RecordedExpansions
    from .message import UnknownMessage, unfreeze

    with spool.locked(parent, wait=True) as state:
        if state is None:
            return []
        try:
            message = unfreeze(spool, parent, state)
        except (UnknownMessage, CorruptMessage, EnvelopeError):
            return []
        return RecordedExpansions(spool, parent, message.status).settle(release=release)


def settle_copy(spool: Spool, qid: str, state: QueueState, *, release: bool = True) -> list[str]:
    """Before a queue tool changes `qid`: settle its parent if it is a copy."""
    parent = parent_of(spool, qid, state)
    return [] if parent is None else settle_parent(spool, parent, release=release)


def settle_held(spool: Spool) -> int:
    """At the queue manager's start: settle the parent of every copy in hold/."""
    released = 0
    parents: set[str] = set()
    for qid in spool.ids(QueueState.HOLD):
        parent = parent_of(spool, qid, QueueState.HOLD)
        if parent is not None and parent not in parents:
            parents.add(parent)
            released += len(settle_parent(spool, parent))
    return released
