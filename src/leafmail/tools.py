"""The queue tools: list, show, delete, hold and release spooled messages.

They are safe while the daemon runs: every change takes the message's lock first
(`Spool.locked`), so it waits for a delivery in progress instead of racing it, and a
message the runner has just finished is reported as gone rather than half-changed.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from netserver.errors import EX_DATAERR, EX_NOUSER, NetserverError

from .message import UnknownMessage, load_status, unfreeze
from .spool import CorruptMessage, Spool, SpooledMessage, arrival_time, valid_id
from .status import MessageStatus

LISTED_STATES = ("queue", "deferred", "hold", "corrupt")
STATE_NAMES = {"queue": "active", "deferred": "deferred", "hold": "held", "corrupt": "corrupt"}


class BadQueueId(NetserverError):
    """Not a queue id at all (EX_DATAERR)."""

    exit_code = EX_DATAERR


class NoSuchMessage(NetserverError):
    """A well-formed id that is not in the spool (EX_NOUSER: no such addressee)."""

    exit_code = EX_NOUSER


@dataclass(frozen=True)
class QueueEntry:
    """One line of `leafmail queue`."""

    qid: str
    state: str
    size: int
    arrival: float
    sender: str
    recipients: list[dict[str, str]]
    last_error: str
    next_attempt: float

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.qid,
            "state": self.state,
            "size": self.size,
            "arrival": self.arrival,
            "sender": self.sender,
            "recipients": self.recipients,
            "last_error": self.last_error,
            "next_attempt": self.next_attempt or None,
        }


def list_queue(spool: Spool) -> list[QueueEntry]:
    """Every message in the spool, oldest first within each state."""
    entries = []
    seen: set[str] = set()  # a file found damaged in queue/ moves to corrupt/ as we list
    for state in LISTED_STATES:
        for qid in spool.ids(state):
            entry = None if qid in seen else _entry(spool, state, qid)
            if entry is not None:
                seen.add(qid)
                entries.append(entry)
    return sorted(entries, key=lambda e: e.qid)


def _entry(spool: Spool, state: str, qid: str) -> QueueEntry | None:
    if state == "corrupt":
        return _corrupt(spool, qid, "failed its self-check")
    try:
        stored = spool.get(qid)
    except (KeyError, FileNotFoundError):
        return None  # delivered or deleted while we looked
    except CorruptMessage as exc:
        return _corrupt(spool, qid, str(exc))
    status = load_status(spool, stored)
    return QueueEntry(
        qid=qid,
        state=STATE_NAMES[stored.state],
        size=len(stored.data),
        arrival=status.arrival,
        sender=stored.envelope.sender,
        recipients=_recipients(stored, status),
        last_error=status.last_error,
        next_attempt=status.next_attempt,
    )


def _corrupt(spool: Spool, qid: str, why: str) -> QueueEntry:
    size = _size(spool, "corrupt", qid)
    return QueueEntry(qid, "corrupt", size, arrival_time(qid), "", [], why, 0)


def _recipients(stored: SpooledMessage, status: MessageStatus) -> list[dict[str, str]]:
    return [
        {"address": r.address, "state": s.state.value, "reply": s.reply}
        for r, s in zip(stored.envelope.recipients, status.recipients, strict=True)
    ]


def _size(spool: Spool, state: str, qid: str) -> int:
    try:
        return spool.path(state, qid).stat().st_size
    except OSError:
        return 0


def format_queue(entries: list[QueueEntry], now: float | None = None) -> str:
    """A mailq-like listing: one block per message, recipients indented under it."""
    if not entries:
        return "Mail queue is empty\n"
    now = time.time() if now is None else now
    lines = [f"{'Queue ID':<24} {'State':<8} {'Size':>8} {'Age':>6}  Sender"]
    for e in entries:
        sender = "?" if e.state == "corrupt" else f"<{e.sender}>"
        age = _age(now - e.arrival)
        lines.append(f"{e.qid:<24} {e.state:<8} {e.size:>8} {age:>6}  {sender}")
        if e.last_error:
            lines.append(f"    ({e.last_error})")
        for r in e.recipients:
            note = f"  {r['reply']}" if r["reply"] and r["state"] != "pending" else ""
            lines.append(f"    {r['state']:<9} <{r['address']}>{note}")
    total = sum(e.size for e in entries)
    lines.append(f"-- {total} bytes in {len(entries)} message{'s' if len(entries) != 1 else ''}")
    return "\n".join(lines) + "\n"


def _age(seconds: float) -> str:
    seconds = max(0, int(seconds))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def check_id(spool: Spool, qid: str) -> str:
    """The message's state, or BadQueueId / NoSuchMessage."""
    if not valid_id(qid):
        raise BadQueueId(f"{qid!r} is not a queue id (24 hex digits, as `leafmail queue` shows)")
    state = spool.find(qid)
    if state is None:
        raise NoSuchMessage(f"{qid}: no such message in {spool.root} (delivered or deleted?)")
    return state


def show(spool: Spool, qid: str) -> tuple[dict[str, Any], bytes]:
    """The envelope and status as JSON-ready data, and the message bytes."""
    if check_id(spool, qid) == "corrupt":
        raise BadQueueId(f"{qid} failed its self-check; the file is kept in {spool.root}/corrupt")
    try:
        message = unfreeze(spool, qid)
    except UnknownMessage:
        raise NoSuchMessage(f"{qid}: no such message (delivered or deleted?)") from None
    except CorruptMessage as exc:
        raise BadQueueId(f"{exc}; the file is kept in corrupt/") from None
    info = {
        "id": qid,
        "state": STATE_NAMES[message.stored.state],
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
    if check_id(spool, qid) == "corrupt":
        spool.remove(qid)
        return
    with spool.locked(qid, wait=True) as state:
        if state is None:
            raise NoSuchMessage(f"{qid}: no such message (delivered or deleted meanwhile)")
        spool.remove(qid)


def hold(spool: Spool, qid: str) -> bool:
    """Move to hold/; False if it was held already."""
    return _move(spool, qid, ("queue", "deferred"), "hold")


def release(spool: Spool, qid: str) -> bool:
    """Move from hold/ to queue/, where the runner takes it at once; False if not held."""
    return _move(spool, qid, ("hold",), "queue")


def _move(spool: Spool, qid: str, sources: tuple[str, ...], target: str) -> bool:
    if check_id(spool, qid) == "corrupt":
        raise BadQueueId(f"{qid} is corrupt; inspect it in {spool.root}/corrupt or delete it")
    with spool.locked(qid, wait=True) as state:
        if state is None:
            raise NoSuchMessage(f"{qid}: no such message (delivered or deleted meanwhile)")
        if state not in sources:
            return False
        spool.move(qid, state, target)
        return True
