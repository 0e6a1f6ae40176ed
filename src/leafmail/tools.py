"""The queue tools for one message: show, delete, hold, release and requeue.

They are safe while the daemon runs: every change takes the message's lock first
(`Spool.locked`), so it waits for a delivery in progress instead of racing it, and a
message the runner has just finished is reported as gone rather than half-changed.
Listing is `leafmail.listing`; many messages at once, `leafmail.bulk`. A name in a state
directory that is not a message file (junk, a symlink) is never read through: only
`leafmail delete STATE/NAME` acts on it, and removes the entry itself.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from netserver.errors import EX_DATAERR, EX_NOUSER, NetserverError

from .envelope import EnvelopeError
from .forwards import settle_copy
from .printable import printable
from .spool import CorruptMessage, Junk, Spool, valid_id
from .states import QueueState
from .status import MessageStatus


class BadQueueId(NetserverError):
    """Not a queue id at all, or not a message (EX_DATAERR)."""

    exit_code = EX_DATAERR


class NoSuchMessage(NetserverError):
    """A well-formed id that is not in the spool (EX_NOUSER: no such addressee)."""

    exit_code = EX_NOUSER


# --- one message ---------------------------------------------------------------------------


def check_id(spool: Spool, qid: str) -> QueueState:
    """The message's state, or BadQueueId (junk too) / NoSuchMessage."""
    if not valid_id(qid):
        raise BadQueueId(f"{qid!r} is not a queue id (24 hex digits, as `leafmail queue` shows)")
    state = spool.find(qid)
    if state is None:
        junk = find_junk(spool, qid)
        if junk is not None:
            raise not_a_message(junk)
        raise NoSuchMessage(f"{qid}: no such message in {spool.root} (delivered or deleted?)")
    return state


def not_a_message(junk: Junk) -> BadQueueId:
    """The error for a tool other than delete pointed at junk."""
    ref = printable(junk.ref)
    return BadQueueId(f"{ref} is {junk.why}, not a message; `leafmail delete {ref}` removes it")


def find_junk(spool: Spool, word: str) -> Junk | None:
    """`word` as a junk entry: STATE/NAME as listed, or a bare name in any state."""
    if "/" in word:
        where, _, name = word.partition("/")
        try:
            state = QueueState(where)  # the directory name, as Junk.ref writes it
        except ValueError:
            return None
        return spool.junk(state, name)
    for state in QueueState:
        junk = spool.junk(state, word)
        if junk is not None:
            return junk
    return None


def show(spool: Spool, qid: str) -> tuple[dict[str, Any], bytes]:
    """The envelope and status as JSON-ready data, and the message bytes."""
    # Here, not at the top: hold, release and delete have no use for the delivery side
    # that leafmail.message loads (asyncio), at each start.
    from .message import UnknownMessage, unfreeze

    if check_id(spool, qid) is QueueState.CORRUPT:
        raise BadQueueId(f"{qid} failed its self-check; the file is kept in {spool.root}/corrupt")
    try:
        message = unfreeze(spool, qid)
    except UnknownMessage:
        raise NoSuchMessage(f"{qid}: no such message (delivered or deleted?)") from None
    except CorruptMessage as exc:
        raise BadQueueId(f"{exc}; the file is kept in corrupt/") from None
    info = {
        "id": qid,
        "state": QueueState(message.stored.state).shown,
        "envelope": message.envelope.to_json(),
        "status": _status_json(message.status),
    }
    return info, message.data


def _status_json(status: MessageStatus) -> dict[str, Any]:
    return {
        "arrival": status.arrival,
        "attempts": status.attempts,
        "next_attempt": status.next_attempt or None,
        "last_error": status.last_error,
        "recipients": [r.to_json() for r in status.recipients],
    }


def delete(spool: Spool, qid: str) -> None:
    """Remove the message (a forwarded copy's parent settled first: leafmail.forwards)."""
    found = check_id(spool, qid)
    if found is QueueState.CORRUPT:
        try:
            spool.remove(qid)  # takes the file's lock itself (nothing else yields it)
        except KeyError:
            raise NoSuchMessage(f"{qid}: no such message (deleted meanwhile)") from None
        return
    settle_copy(spool, qid, found, release=False)
    with spool.locked(qid, wait=True) as state:
        if state is None:
            raise NoSuchMessage(f"{qid}: no such message (delivered or deleted meanwhile)")
        spool.remove(qid)


def hold(spool: Spool, qid: str) -> bool:
    """Move to hold/; False if it was held already.

    A forwarded copy's parent is settled first (leafmail.forwards), or its recovery
    would release the copy again."""
    return _move(spool, qid, (QueueState.QUEUE, QueueState.DEFERRED), QueueState.HOLD)


def release(spool: Spool, qid: str) -> bool:
    """Move from hold/ to queue/, where the runner takes it at once; False if not held.

    A forwarded copy a crash left in hold/ is released by settling its parent's
    record (leafmail.forwards), never behind that record's back."""
    return _move(spool, qid, (QueueState.HOLD,), QueueState.QUEUE)


def requeue(spool: Spool, qid: str) -> bool:
    """Make a message due now with a fresh retry schedule (Postfix's ``postsuper -r``).

    Its status keeps every recipient's result, so a recipient delivered already is not
    sent the message again; only the message's attempt count (which sets the back-off)
    and its next attempt time are reset. Like ``postsuper -r`` it also takes a held
    message back into the queue. The arrival time stays, so the queue lifetime still
    counts from the real arrival. Always True.
    """
    found = check_id(spool, qid)
    if found is QueueState.CORRUPT:
        raise BadQueueId(f"{qid} is corrupt; inspect it in {spool.root}/corrupt or delete it")
    settle_copy(spool, qid, found)
    with spool.locked(qid, wait=True) as state:
        if state is None:
            raise NoSuchMessage(f"{qid}: no such message (delivered or deleted meanwhile)")
        _reset_schedule(spool, qid, state)
        if state != QueueState.QUEUE:
            spool.move(qid, state, QueueState.QUEUE)
        return True


def _reset_schedule(spool: Spool, qid: str, state: QueueState) -> None:
    """Rewrite the status with attempts 0 and no next attempt (hold the lock)."""
    blob = spool.read_status(qid)
    if blob is None:
        return  # never tried: nothing is scheduled
    try:
        stored = spool.get(qid, state)
    except CorruptMessage as exc:
        raise BadQueueId(f"{exc}; the file is kept in corrupt/") from None
    try:
        status = MessageStatus.from_bytes(blob, stored.envelope)
    except EnvelopeError:
        return  # the runner starts a damaged record over anyway (load_status)
    spool.write_status(qid, replace(status, attempts=0, next_attempt=0.0).to_bytes())


def _move(spool: Spool, qid: str, sources: tuple[QueueState, ...], target: QueueState) -> bool:
    found = check_id(spool, qid)
    if found is QueueState.CORRUPT:
        raise BadQueueId(f"{qid} is corrupt; inspect it in {spool.root}/corrupt or delete it")
    releasing = target is QueueState.QUEUE
    if qid in settle_copy(spool, qid, found, release=releasing) and releasing:
        return True  # released by its parent's record, as the daemon would have
    with spool.locked(qid, wait=True) as state:
        if state is None:
            raise NoSuchMessage(f"{qid}: no such message (delivered or deleted meanwhile)")
        if state not in sources:
            return False
        spool.move(qid, state, target)
        return True
