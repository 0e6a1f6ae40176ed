"""What the engine tells the I/O layer, and the facts the events carry.

`netserver.smtp.protocol.ServerProtocol.receive_data` returns `Event` values. A
`DecisionEvent` waits for the I/O layer's accept or reject; `StartTLS` and `Closed` need
no decision. `Session` (what is known about the client) and `Transaction` (the mail
transaction so far) are plain values the engine replaces as the dialogue goes on.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .addresses import Mailbox
from .parameters import MailParameters, RcptParameters
from .replies import Reply

__all__ = [
    "AcceptedRecipient",
    "AuthRequest",
    "Closed",
    "DataStart",
    "DecisionEvent",
    "Event",
    "Helo",
    "MailFrom",
    "MessageReady",
    "RcptTo",
    "Session",
    "StartTLS",
    "Transaction",
    "received_protocol",
]


# --- session facts -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)  # one per connection, thousands idle at once
class Session:
    """What is known about the client; reset by STARTTLS (RFC 3207 4.2)."""

    helo: str | None = None
    esmtp: bool = False
    tls: bool = False
    auth_user: str | None = None


@dataclass(frozen=True)
class AcceptedRecipient:
    """An accepted recipient with its DSN parameters."""

    mailbox: Mailbox
    params: RcptParameters = field(default_factory=RcptParameters)


@dataclass(frozen=True)
class Transaction:
    """The mail transaction so far: sender, its parameters, accepted recipients."""

    sender: Mailbox | None
    params: MailParameters = field(default_factory=MailParameters)
    recipients: tuple[AcceptedRecipient, ...] = ()


def received_protocol(session: Session, envelope: Transaction) -> str:
    """The "with" keyword of a Received header (RFC 3848, RFC 6531 3.7.3)."""
    if not session.esmtp:
        return "SMTP"
    base = "UTF8SMTP" if envelope.params.smtputf8 else "ESMTP"
    return base + ("S" if session.tls else "") + ("A" if session.auth_user else "")


# --- events ------------------------------------------------------------------------


class Event:
    """Something the I/O layer must know about."""

    __slots__ = ()


class DecisionEvent(Event):
    """An event that waits for `ServerProtocol.accept` or `ServerProtocol.reject`."""

    __slots__ = ()


@dataclass(frozen=True)
class Helo(DecisionEvent):
    """HELO (``esmtp`` False) or EHLO; the helo stage of the policy."""

    name: str
    esmtp: bool


@dataclass(frozen=True)
class MailFrom(DecisionEvent):
    """MAIL FROM with a valid path; ``sender`` None is the null sender ``<>``."""

    sender: Mailbox | None
    params: MailParameters


@dataclass(frozen=True)
class RcptTo(DecisionEvent):
    """RCPT TO with a valid path, within the recipient limit."""

    recipient: Mailbox
    params: RcptParameters


@dataclass(frozen=True)
class DataStart(DecisionEvent):
    """DATA, or the first BDAT of a transaction: the data stage of the policy."""

    chunking: bool


@dataclass(frozen=True)
class MessageReady(DecisionEvent):
    """A complete message: accept only once it is durably stored.

    ``data`` is the message as received: unstuffed, CRLF line ends, no terminator.
    A Received header, if wanted, is the I/O layer's to prepend.
    """

    envelope: Transaction
    session: Session
    data: bytes = field(repr=False)


@dataclass(frozen=True)
class AuthRequest(DecisionEvent):
    """Credentials to verify; accept makes ``username`` the session's user."""

    mechanism: str
    authzid: str
    username: str
    password: str = field(repr=False)


@dataclass(frozen=True)
class StartTLS(Event):
    """Start the TLS handshake now, then call `ServerProtocol.tls_started`."""

    discarded: int  # plaintext octets that followed the STARTTLS line, thrown away


@dataclass(frozen=True)
class Closed(Event):
    """The session is over; ``reply`` (221 or 421) is the last thing queued."""

    reply: Reply
