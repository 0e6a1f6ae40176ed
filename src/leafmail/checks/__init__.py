"""Policy checks at named stages, as small functions returning a `Verdict`.

The stages follow the SMTP dialogue (Postfix's smtpd_*_restrictions): connect, helo,
mail, rcpt, data and end-of-data. A check looks at the `Session` facts it needs and
returns ACCEPT, a `Reject` carrying the 5xx reply, or a `Defer` carrying the 4xx reply.
The first check that does not accept decides; checks never do I/O on the network.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import Enum

from netserver.endpoint import IPAddress
from netserver.smtp.addresses import Mailbox
from netserver.smtp.replies import Reply


class Stage(Enum):
    """Where in the dialogue a check runs."""

    CONNECT = "connect"
    HELO = "helo"
    MAIL = "mail"
    RCPT = "rcpt"
    DATA = "data"
    END_OF_DATA = "end-of-data"


@dataclass(frozen=True)
class Accept:
    """Go on."""


@dataclass(frozen=True)
class Reject:
    """Refuse for good (5xx)."""

    reply: Reply


@dataclass(frozen=True)
class Defer:
    """Refuse for now (4xx); the client will try again."""

    reply: Reply


Verdict = Accept | Reject | Defer
ACCEPT = Accept()


@dataclass(slots=True)
class Session:
    """What the checks may look at: the client and the transaction so far."""

    client_ip: IPAddress | None
    helo: str | None = None
    tls: bool = False
    user: str | None = None
    sender: Mailbox | None = None
    recipient: Mailbox | None = None
    recipients: list[Mailbox] = field(default_factory=list)
    data: bytes = b""

    def reset_for_tls(self) -> None:
        """Forget what the client said before STARTTLS (RFC 3207 4.2), login included."""
        self.tls = True
        self.helo = self.user = self.sender = self.recipient = None
        self.recipients = []


Check = Callable[[Session], Verdict]


def run_checks(checks: Sequence[Check], session: Session) -> Verdict:
    """The verdict of the first check that does not accept, else ACCEPT."""
    for check in checks:
        verdict = check(session)
        if not isinstance(verdict, Accept):
            return verdict
    return ACCEPT
