"""`leafmail queue`: the spool listed as a stream, in constant memory.

As Postfix's ``postqueue -p`` does, each state directory is read with scandir and each
message is read, printed and forgotten before the next, so a queue of a million messages
costs the memory of a few hundred. The order is the directories' own (active, deferred,
held, corrupt, and within each as the file system returns it), not sorted: sorting
needs every entry in memory first. Each message costs two small reads (its file, checked
against its checksum, and its status record) and a peek at the envelope
(`Spool.summary`), not a full load.

Anything in a state directory that is not a message file (a symlink, a stray file, a
directory) is listed as ``junk`` under its STATE/NAME and never followed; ``leafmail
delete STATE/NAME`` removes the entry itself.
"""

from __future__ import annotations

import io
import json
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Protocol, TextIO

from .printable import printable
from .selection import Selection
from .spool import CorruptMessage, Junk, MessageSummary, Spool, arrival_time
from .states import QueueState
from .status import RcptState

JUNK = "junk"  # what an entry that is not a message file shows as its state
CORRUPT = QueueState.CORRUPT.shown
OPEN_STATES = (RcptState.PENDING, RcptState.DEFERRED)
_JSON = json.JSONDecoder()
_str = json.encoder.encode_basestring_ascii


@dataclass(frozen=True)
class QueueEntry:
    """One message (or junk entry) of `leafmail queue`."""

    qid: str
    state: str
    size: int
    arrival: float
    sender: str
    recipients: list[dict[str, str]]
    last_error: str
    next_attempt: float

    def json(self) -> str:
        """The entry as one line of JSON: id, state, size, arrival, sender, recipients
        (address, state, reply), last_error and next_attempt (null when none).

        Written by hand with the json module's C string encoder: one json.dumps per
        message was a sixth of a long listing's time.
        """
        rcpts = ", ".join(
            f'{{"address": {_str(r["address"])}, "state": {_str(r["state"])}, '
            f'"reply": {_str(r["reply"])}}}'
            for r in self.recipients
        )
        after = repr(float(self.next_attempt)) if self.next_attempt else "null"
        return (
            f'{{"id": {_str(self.qid)}, "state": {_str(self.state)}, "size": {self.size:d}, '
            f'"arrival": {float(self.arrival)!r}, "sender": {_str(self.sender)}, '
            f'"recipients": [{rcpts}], "last_error": {_str(self.last_error)}, '
            f'"next_attempt": {after}}}'
        )

    @property
    def open_recipients(self) -> Iterator[str]:
        """Addresses still to be delivered (what a --to filter looks at)."""
        return (r["address"] for r in self.recipients if r["state"] in OPEN_STATES)


def iter_queue(
    spool: Spool,
    selection: Selection | None = None,
    now: float | None = None,
    share: Callable[[str], bool] | None = None,
) -> Iterator[QueueEntry]:
    """The selected messages, one at a time, in directory order (see the module doc).

    Junk is listed only when no filter is given (it has no sender, recipients or
    arrival). A file found damaged while listing is moved to corrupt/ and listed once.
    `share`, when given, picks the queue ids this caller lists (one worker's part).
    """
    selection = selection or Selection()
    now = time.time() if now is None else now
    set_aside: set[str] = set()  # found corrupt now, moved into a directory still to come
    for state in selection.states:
        for item in spool.scan(state):
            if isinstance(item, Junk):
                if not selection.filtered and (share is None or share("")):
                    yield junk_entry(item)
                continue
            if share is not None and not share(item):
                continue
            if item in set_aside or not selection.id_matches(item, now):
                continue
            entry = entry_for(spool, state, item, selection)
            if entry is not None:
                if entry.state == CORRUPT and state != QueueState.CORRUPT:
                    set_aside.add(item)
                yield entry


def entry_for(
    spool: Spool, state: QueueState, qid: str, selection: Selection | None = None
) -> QueueEntry | None:
    """The listing entry of one message, or None if it is gone or does not match."""
    by_envelope = selection is not None and selection.by_envelope
    if state == QueueState.CORRUPT:
        return None if by_envelope else _corrupt(spool, qid, "failed its self-check")
    try:
        summary = spool.summary(qid, state)
    except FileNotFoundError:
        return None  # delivered, moved or deleted while we looked
    except CorruptMessage as exc:
        return None if by_envelope else _corrupt(spool, qid, str(exc))
    except OSError as exc:  # replaced by a symlink meanwhile (ELOOP), or unreadable
        return junk_entry(Junk(state, qid, f"cannot read: {exc.strerror}"))
    entry = _with_status(spool, summary)
    if entry is None or not by_envelope:
        return entry
    assert selection is not None
    return entry if selection.envelope_matches(entry.sender, entry.open_recipients) else None


def _with_status(spool: Spool, summary: MessageSummary) -> QueueEntry | None:
    """The entry with its delivery status; a record that does not read quickly is read
    the full way (`load_status`), which also reports a damaged one."""
    try:
        blob = spool.read_status(summary.qid)
    except OSError as exc:  # a symlink in status/, say
        return _entry(summary, arrival_time(summary.qid), f"status unreadable: {exc.strerror}")
    if blob is None:
        return _entry(summary, arrival_time(summary.qid), "")
    try:
        return _peek_status(summary, blob)
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError):
        pass
    from .message import load_status  # rarely needed; importing it costs a listing 0.1 s

    try:
        stored = spool.get(summary.qid, summary.state)
    except (KeyError, FileNotFoundError, CorruptMessage):
        return None
    status = load_status(spool, stored)
    rcpts = [
        {"address": r.address, "state": s.state.value, "reply": s.reply}
        for r, s in zip(stored.envelope.recipients, status.recipients, strict=True)
    ]
    return _entry(summary, status.arrival, status.last_error, rcpts, status.next_attempt)


def _peek_status(summary: MessageSummary, blob: bytes) -> QueueEntry:
    """The fields a listing shows, straight from the status JSON (raises if odd)."""
    obj = _JSON.decode(blob.decode("utf-8"))
    records = obj["recipients"]
    if len(records) != len(summary.recipients):
        raise ValueError("status does not match the envelope")
    rcpts = [
        {"address": address, "state": _text(r["state"]), "reply": _text(r["reply"])}
        for address, r in zip(summary.recipients, records, strict=True)
    ]
    arrival, next_attempt = _number(obj["arrival"]), _number(obj["next_attempt"])
    return _entry(summary, arrival, _text(obj["last_error"]), rcpts, next_attempt)


def _text(value: object) -> str:
    if not isinstance(value, str):
        raise TypeError("not a string")
    return value


def _number(value: object) -> float:
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise TypeError("not a number")
    return float(value)


def _entry(
    summary: MessageSummary,
    arrival: float,
    last_error: str,
    rcpts: list[dict[str, str]] | None = None,
    next_attempt: float = 0.0,
) -> QueueEntry:
    if rcpts is None:
        rcpts = [
            {"address": a, "state": RcptState.PENDING, "reply": ""} for a in summary.recipients
        ]
    return QueueEntry(
        summary.qid,
        QueueState(summary.state).shown,
        summary.size,
        arrival,
        summary.sender,
        rcpts,
        last_error,
        next_attempt,
    )


def junk_entry(junk: Junk) -> QueueEntry:
    return QueueEntry(junk.ref, JUNK, junk.size, junk.mtime, "", [], junk.why, 0)


def _corrupt(spool: Spool, qid: str, why: str) -> QueueEntry:
    try:
        size = spool.path(QueueState.CORRUPT, qid).lstat().st_size
    except OSError:
        size = 0
    return QueueEntry(qid, CORRUPT, size, arrival_time(qid), "", [], why, 0)


# --- rendering -----------------------------------------------------------------------------


class Writer(Protocol):
    """Where a listing goes: stdout, or `Printable` in front of it."""

    def write(self, text: str, /) -> int: ...

    def flush(self) -> None: ...


class Printable:
    """Text for a terminal: each piece goes through `printable` on its way to `out`.

    The listing is written in pieces of whole entries, so a line is never split between
    two pieces and the escaping sees each line whole.
    """

    def __init__(self, out: TextIO) -> None:
        self.out = out

    def write(self, text: str, /) -> int:
        return self.out.write(printable(text, lines=True))

    def flush(self) -> None:
        self.out.flush()


HEADER = f"{'Queue ID':<24} {'State':<8} {'Size':>8} {'Age':>6}  Sender"


def text_block(e: QueueEntry, now: float) -> str:
    """One message of the mailq-like listing: its line, its error, its recipients."""
    if e.state == JUNK:
        name = printable(e.qid)
        return f"{name:<24} {JUNK:<8} {e.size:>8} {'-':>6}  ?\n    ({e.last_error})\n"
    sender = "?" if e.state == CORRUPT else f"<{e.sender}>"
    lines = [f"{e.qid:<24} {e.state:<8} {e.size:>8} {_age(now - e.arrival):>6}  {sender}"]
    if e.last_error:
        lines.append(f"    ({e.last_error})")
    for r in e.recipients:
        note = f"  {r['reply']}" if r["reply"] and r["state"] != RcptState.PENDING else ""
        lines.append(f"    {r['state']:<9} <{r['address']}>{note}")
    return "\n".join(lines) + "\n"


def footer(messages: int, total: int, junk: int = 0) -> str:
    """The last line: the messages and their bytes, then the junk entries apart, which
    are not messages (a stray file's size is not mail waiting to go)."""
    if not messages and not junk:
        return "Mail queue is empty\n"
    text = f"{total} bytes in {messages} message{'s' if messages != 1 else ''}"
    if junk:
        entries = "entry" if junk == 1 else "entries"
        text += f", {junk} junk {entries} (not messages; `leafmail delete --junk` removes them)"
    return f"-- {text}\n"


def write_queue(entries: Iterable[QueueEntry], out: Writer, now: float | None = None) -> int:
    """Print the mailq-like listing as the entries come; returns how many there were."""
    now = time.time() if now is None else now
    count = total = junk = 0
    with Batched(out) as write:
        for e in entries:
            if not count:
                write(HEADER + "\n")
            count += 1
            if e.state == JUNK:
                junk += 1
            else:
                total += e.size
            write(text_block(e, now))
    out.write(footer(count - junk, total, junk))
    return count


def write_json(entries: Iterable[QueueEntry], out: Writer) -> int:
    """A JSON array, one message per line, written as the entries come."""
    count = 0
    with Batched(out) as write:
        for e in entries:
            write(("[\n" if not count else ",\n") + e.json())
            count += 1
    out.write("\n]\n" if count else "[]\n")
    return count


def format_queue(entries: Iterable[QueueEntry], now: float | None = None) -> str:
    """The listing of `write_queue` as one string (for small lists and tests)."""
    out = io.StringIO()
    write_queue(entries, out, now)
    return out.getvalue()


class Batched:
    """Hands text to `out` a few hundred entries at a time.

    One write per entry costs more than building the entry; a bounded batch keeps the
    memory constant and still lets the first lines out before the last file is read.
    """

    SIZE = 256

    def __init__(self, out: Writer) -> None:
        self.out = out
        self.pending: list[str] = []

    def __enter__(self) -> Callable[[str], None]:
        return self.write

    def write(self, text: str) -> None:
        self.pending.append(text)
        if len(self.pending) >= self.SIZE:
            self.flush()

    def flush(self) -> None:
        if self.pending:
            self.out.write("".join(self.pending))
            self.pending.clear()

    def __exit__(self, *exc: object) -> None:
        self.flush()


def _age(seconds: float) -> str:
    seconds = max(0, int(seconds))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"
