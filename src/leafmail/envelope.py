"""The envelope of a message: who sent it, to whom, and how it arrived.

It is plain data with a strict mapping to and from JSON: the spool stores it as JSON, a
format that cannot run code when loaded (the 1998 spool used a frozen Perl object).
`from_json` refuses a record that lacks a key `to_json` always writes, or whose values
have the wrong type.

Keys it does not know it passes over, in the envelope and in its client and recipient
records: that is the spool's rule for reading what a newer leafmail wrote, so that a
downgrade does not send its mail to corrupt/ (a leafmail from before this rule moves a
forwarded copy there, for its `forward_of`). A newer leafmail may add a key to this format only
if a reader that ignores it still handles the message correctly, at worst knowing less
(`forward_of` only guides the queue tools, see leafmail.forwards); a key whose meaning
must not be ignored needs a new spool format (`spool.MAGIC`), which this reader refuses.
Postfix's queue manager likewise passes over the named attributes (REC_TYPE_ATTR) of a
queue file that it does not know. The spool's checksum covers the whole envelope,
unknown keys included, and is checked before any key is read; a spooled file is never
rewritten, so what this version does not understand stays in it for the next one.
"""

from __future__ import annotations

import json
import math
from collections.abc import Set
from dataclasses import dataclass, field
from typing import Any


class EnvelopeError(ValueError):
    """A stored envelope does not have the expected shape."""


@dataclass(frozen=True)
class Recipient:
    """One forward path and its DSN parameters (RFC 3461)."""

    address: str
    notify: tuple[str, ...] = ()
    orcpt: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"address": self.address, "notify": list(self.notify), "orcpt": self.orcpt}

    @classmethod
    def from_json(cls, data: object) -> Recipient:
        obj = known_fields(data, "recipient", _RECIPIENT_KEYS)
        notify = obj["notify"]
        if not isinstance(notify, list) or not all(isinstance(n, str) for n in notify):
            raise EnvelopeError("recipient notify must be a list of strings")
        return cls(string_field(obj, "address"), tuple(notify), _opt_str(obj, "orcpt"))


# `ClientInfo.protocol` of mail made on this host (sendmail, pickup, the API, bounces):
# the word a Received field gives after "with", never a route.
LOCAL_PROTOCOL = "local"


@dataclass(frozen=True)
class ClientInfo:
    """How the message arrived: the peer, its HELO name, TLS and AUTH facts."""

    ip: str | None = None
    port: int | None = None
    helo: str | None = None
    protocol: str = "ESMTP"
    tls: str | None = None
    auth: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "ip": self.ip,
            "port": self.port,
            "helo": self.helo,
            "protocol": self.protocol,
            "tls": self.tls,
            "auth": self.auth,
        }

    @classmethod
    def from_json(cls, data: object) -> ClientInfo:
        obj = known_fields(data, "client", _CLIENT_KEYS)
        port = obj["port"]
        if port is not None and (not isinstance(port, int) or isinstance(port, bool)):
            raise EnvelopeError("client port must be an integer")
        return cls(
            _opt_str(obj, "ip"),
            port,
            _opt_str(obj, "helo"),
            string_field(obj, "protocol"),
            _opt_str(obj, "tls"),
            _opt_str(obj, "auth"),
        )


@dataclass(frozen=True)
class Envelope:
    """Sender ("" for the null reverse path), recipients, MAIL parameters and origin."""

    sender: str
    recipients: tuple[Recipient, ...]
    client: ClientInfo = field(default_factory=ClientInfo)
    received: str = ""
    body: str = "7BIT"
    smtputf8: bool = False
    ret: str | None = None
    envid: str | None = None
    # Set only by the queue manager on a forwarded copy (leafmail.expansion): the queue
    # id of the message whose status record tracks it, so the copy can be settled with
    # that record outside an attempt (leafmail.forwards). Never taken from a client.
    forward_of: str | None = None

    def to_json(self) -> dict[str, Any]:
        obj = {
            "sender": self.sender,
            "recipients": [r.to_json() for r in self.recipients],
            "client": self.client.to_json(),
            "received": self.received,
            "body": self.body,
            "smtputf8": self.smtputf8,
            "ret": self.ret,
            "envid": self.envid,
        }
        if self.forward_of is not None:  # only on copies: other files stay as they were
            obj["forward_of"] = self.forward_of
        return obj

    @classmethod
    def from_json(cls, data: object) -> Envelope:
        obj = known_fields(data, "envelope", _ENVELOPE_KEYS)
        rcpts = obj["recipients"]
        if not isinstance(rcpts, list) or not rcpts:
            raise EnvelopeError("envelope needs a non-empty recipient list")
        if not isinstance(obj["smtputf8"], bool):
            raise EnvelopeError("smtputf8 must be true or false")
        return cls(
            string_field(obj, "sender"),
            tuple(Recipient.from_json(r) for r in rcpts),
            ClientInfo.from_json(obj["client"]),
            string_field(obj, "received"),
            string_field(obj, "body"),
            obj["smtputf8"],
            _opt_str(obj, "ret"),
            _opt_str(obj, "envid"),
            _opt_str(obj, "forward_of") if "forward_of" in obj else None,  # copies only
        )


# The keys `to_json` always writes: a record without one of them is refused.
_RECIPIENT_KEYS = frozenset({"address", "notify", "orcpt"})
_CLIENT_KEYS = frozenset({"ip", "port", "helo", "protocol", "tls", "auth"})
_ENVELOPE_KEYS = frozenset(
    {"sender", "recipients", "client", "received", "body", "smtputf8", "ret", "envid"}
)


def _no_constant(name: str) -> object:
    raise EnvelopeError(f"{name} is not a JSON number")


# One decoder for every call: json.loads with any keyword builds a new JSONDecoder (and
# its scanner) each time, a few microseconds on every spool read, status read and request.
_DECODER = json.JSONDecoder(parse_constant=_no_constant)


def load_json(blob: bytes | str, what: str) -> object:
    """Parse strict JSON; EnvelopeError (a ValueError) for anything wrong with it.

    json.loads has more ways to fail than JSONDecodeError: RecursionError for deep
    nesting, ValueError for an integer past the digit limit, and it accepts NaN and
    Infinity. A damaged spool record must give the one error its readers handle, or a
    single bad file would stop every queue run that meets it. Bytes must be UTF-8 (what
    leafmail writes, and all RFC 8259 allows between systems); a bad sequence is a
    UnicodeDecodeError, a ValueError, so it gives the same EnvelopeError.
    """
    try:
        return _DECODER.decode(blob if isinstance(blob, str) else blob.decode())
    except EnvelopeError:
        raise
    except (ValueError, RecursionError) as exc:
        raise EnvelopeError(f"{what} is not JSON: {exc}") from None


def finite_number(value: object, key: str) -> float:
    """A JSON number field as a finite float (EnvelopeError otherwise)."""
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise EnvelopeError(f"{key} must be a number")
    try:
        number = float(value)
    except OverflowError:
        raise EnvelopeError(f"{key} is out of range") from None
    if not math.isfinite(number):
        raise EnvelopeError(f"{key} must be finite")
    return number


def known_fields(data: object, what: str, keys: Set[str]) -> dict[str, object]:
    """`data` as a dict with at least these keys; others are a newer writer's, passed
    over (the envelope's compatibility rule, in this module's docstring)."""
    if not isinstance(data, dict) or not keys <= data.keys():
        lacking = f" (no {', '.join(sorted(keys - data.keys()))})" if isinstance(data, dict) else ""
        raise EnvelopeError(f"{what} record has the wrong fields{lacking}")
    return data


def record_fields(data: object, what: str, keys: Set[str]) -> dict[str, object]:
    """`data` as a dict with exactly these keys (the spool's strict JSON records)."""
    if not isinstance(data, dict) or set(data) != keys:
        raise EnvelopeError(f"{what} record has the wrong fields")
    return data


def string_field(obj: dict[str, object], key: str) -> str:
    value = obj[key]
    if not isinstance(value, str):
        raise EnvelopeError(f"{key} must be a string")
    return value


def _opt_str(obj: dict[str, object], key: str) -> str | None:
    value = obj[key]
    if value is not None and not isinstance(value, str):
        raise EnvelopeError(f"{key} must be a string or null")
    return value
