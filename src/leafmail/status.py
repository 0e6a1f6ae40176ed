"""Delivery state of a spooled message, per recipient, kept in the spool beside it.

The message file is written once and never changed (its checksum covers it); what
changes as delivery goes on lives in a small status record: each recipient's state,
attempt count and last reply, and the message's next retry time. The queue runner
reads it to decide what to do, writes it durably after every attempt, and a restarted
runner picks up from it, so no schedule lives only in memory. It is strict JSON, like the
envelope: no format that can run code when loaded.

A recipient that local delivery expanded (an alias) also keeps one mark per target:
what each mailbox, file, command or forwarded copy already got, so a retry gives each
target the message once (`leafmail.expansion` writes them). Version 1 records, from
before these marks, are still read.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from enum import StrEnum
from typing import Any

from .envelope import (
    Envelope,
    EnvelopeError,
    finite_number,
    load_json,
    record_fields,
    string_field,
)
from .spool import valid_id


class RcptState(StrEnum):
    """Where one recipient stands. DELIVERED and FAILED are final."""

    PENDING = "pending"
    DEFERRED = "deferred"
    DELIVERED = "delivered"
    FAILED = "failed"

    @property
    def final(self) -> bool:
        return self in (RcptState.DELIVERED, RcptState.FAILED)


class TargetState(StrEnum):
    """Where one target of an expanded recipient stands.

    A forwarded copy goes STAGED (its id chosen, nothing spooled yet), then FORWARDED
    (spooled into hold/, where no runner takes it), then DELIVERED once released into
    the queue. Each step is durable before the next starts, so after a crash the mark
    and the copy's place in the spool say what happened (`leafmail.expansion`).
    """

    STAGED = "staged"
    FORWARDED = "forwarded"
    DELIVERED = "delivered"
    FAILED = "failed"

    @property
    def final(self) -> bool:
        return self in (TargetState.DELIVERED, TargetState.FAILED)


@dataclass(frozen=True)
class TargetMark:
    """One target of an expanded recipient: its key, state, result line and copy id."""

    key: str
    state: TargetState
    reply: str = ""
    qid: str = ""  # the forwarded copy, for a forward

    def to_json(self) -> dict[str, Any]:
        return {"key": self.key, "state": self.state.value, "reply": self.reply, "qid": self.qid}

    @classmethod
    def from_json(cls, data: object) -> TargetMark:
        obj = record_fields(data, "target", {"key", "state", "reply", "qid"})
        try:
            state = TargetState(str(obj["state"]))
        except ValueError:
            raise EnvelopeError("bad target state") from None
        qid = string_field(obj, "qid")
        if qid and not valid_id(qid):
            raise EnvelopeError("bad queue id in a target")
        return cls(string_field(obj, "key"), state, string_field(obj, "reply"), qid)


@dataclass(frozen=True)
class RcptStatus:
    """One recipient: its state, how often it was tried, the last reply (or error), and
    the marks of its targets when it is an alias."""

    state: RcptState = RcptState.PENDING
    attempts: int = 0
    reply: str = ""
    remote: str = ""
    targets: tuple[TargetMark, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {
            "state": self.state.value,
            "attempts": self.attempts,
            "reply": self.reply,
            "remote": self.remote,
            "targets": [t.to_json() for t in self.targets],
        }

    @classmethod
    def from_json(cls, data: object, version: int = 2) -> RcptStatus:
        keys = {"state", "attempts", "reply", "remote"} | ({"targets"} if version > 1 else set())
        obj = record_fields(data, "recipient status", keys)
        try:
            state = RcptState(str(obj["state"]))
        except ValueError:
            raise EnvelopeError("bad recipient state") from None
        targets = obj.get("targets", [])
        if not isinstance(targets, list):
            raise EnvelopeError("targets must be a list")
        return cls(
            state,
            _int(obj, "attempts"),
            string_field(obj, "reply"),
            string_field(obj, "remote"),
            tuple(TargetMark.from_json(t) for t in targets),
        )


@dataclass(frozen=True)
class MessageStatus:
    """The delivery state of a whole message.

    `arrival` is when it was spooled (epoch seconds); `next_attempt` when the runner may
    try it again; `warned` whether a delay warning went out already (at most one).
    """

    arrival: float
    recipients: tuple[RcptStatus, ...]
    next_attempt: float = 0.0
    last_attempt: float = 0.0
    attempts: int = 0
    last_error: str = ""
    warned: bool = False

    @classmethod
    def fresh(cls, envelope: Envelope, arrival: float) -> MessageStatus:
        return cls(arrival, tuple(RcptStatus() for _ in envelope.recipients))

    @property
    def open(self) -> list[int]:
        """Indexes of recipients still to be delivered."""
        return [i for i, r in enumerate(self.recipients) if not r.state.final]

    @property
    def done(self) -> bool:
        return not self.open

    def with_recipient(self, index: int, rcpt: RcptStatus) -> MessageStatus:
        rcpts = list(self.recipients)
        rcpts[index] = rcpt
        return replace(self, recipients=tuple(rcpts))

    def to_bytes(self) -> bytes:
        data = {
            "version": 2,
            "arrival": self.arrival,
            "next_attempt": self.next_attempt,
            "last_attempt": self.last_attempt,
            "attempts": self.attempts,
            "last_error": self.last_error,
            "warned": self.warned,
            "recipients": [r.to_json() for r in self.recipients],
        }
        return json.dumps(data, separators=(",", ":"), ensure_ascii=True).encode() + b"\n"

    @classmethod
    def from_bytes(cls, blob: bytes, envelope: Envelope) -> MessageStatus:
        """Parse a status record; EnvelopeError if it is damaged or not for `envelope`."""
        data = load_json(blob, "status")
        keys = {"version", "arrival", "next_attempt", "last_attempt", "attempts"}
        obj = record_fields(data, "status", keys | {"last_error", "warned", "recipients"})
        version = obj["version"]
        if version not in (1, 2) or isinstance(version, bool):
            raise EnvelopeError("unknown status version")
        rcpts = obj["recipients"]
        if not isinstance(rcpts, list) or len(rcpts) != len(envelope.recipients):
            raise EnvelopeError("status does not match the envelope's recipients")
        if not isinstance(obj["warned"], bool):
            raise EnvelopeError("warned must be true or false")
        return cls(
            arrival=_number(obj, "arrival"),
            recipients=tuple(RcptStatus.from_json(r, int(version)) for r in rcpts),
            next_attempt=_number(obj, "next_attempt"),
            last_attempt=_number(obj, "last_attempt"),
            attempts=_int(obj, "attempts"),
            last_error=string_field(obj, "last_error"),
            warned=obj["warned"],
        )


def peek_next_attempt(blob: bytes) -> float:
    """A status record's next attempt time without the envelope (0.0 if unreadable).

    The runner checks this for every deferred message when it looks for due work, so it
    must not load the messages themselves; a damaged record reads as "due now", and the
    attempt then deals with it.
    """
    try:
        data = load_json(blob, "status")
        if not isinstance(data, dict):
            return 0.0
        return finite_number(data.get("next_attempt"), "next_attempt")
    except EnvelopeError:
        return 0.0


def _int(obj: dict[str, object], key: str) -> int:
    value = obj[key]
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise EnvelopeError(f"{key} must be a non-negative integer")
    return value


def _number(obj: dict[str, object], key: str) -> float:
    return finite_number(obj[key], key)
