"""Policy checks at named stages, as small functions returning a `Verdict`.

The stages follow the SMTP dialogue (Postfix's smtpd_*_restrictions): connect, helo,
mail, rcpt, data and end-of-data. A check looks at the `CheckContext` facts it needs and
returns ACCEPT, a `Tag` (accept, and add these header fields to the message), a
`Reject` carrying the 5xx reply, or a `Defer` carrying the 4xx reply. The first check
that does not accept decides; the tags of the checks that accepted are merged.

A `Check` is a plain function and never does I/O. Checks that must ask the DNS
(DNSBL, reverse DNS, SPF, DKIM) are an `AsyncCheck`: a coroutine function, kept in a
list of its own so the caller awaits exactly those, each bounded in time by itself.
Facts that only depend on the client (its address) are looked up once per connection
and kept in `CheckContext.cache`, so a client sending ten messages costs one set of lookups.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from enum import Enum

from netserver.admit.access import AccessPolicy
from netserver.endpoint import IPAddress
from netserver.smtp.addresses import Mailbox
from netserver.smtp.parameters import MailParameters
from netserver.smtp.replies import Reply


class Stage(Enum):
    """Where in the dialogue a check runs.

    Hashed by identity (members are singletons): the policy looks each stage up in its
    tables about a dozen times a message, and `Enum.__hash__` is a Python call.
    """

    __hash__ = object.__hash__

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
class Tag(Accept):
    """Go on, and change the message: add `fields` on top, remove the `drop` fields.

    A tag is an accept, so code that only asks "accepted?" keeps working. Each field
    is a complete header field ending in CRLF (build it with `header_field`); each
    dropped field is the exact raw text of a field of the message as received.
    """

    fields: tuple[bytes, ...] = ()
    drop: tuple[bytes, ...] = ()


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
_TRANSACTION_STAGES = (Stage.MAIL, Stage.RCPT, Stage.DATA, Stage.END_OF_DATA)


@dataclass(slots=True)
class CheckContext:
    """What the checks may look at: the client and the transaction so far.

    `params` are the MAIL FROM parameters (BODY=, SMTPUTF8). `tags` keeps the tags of
    each stage until the message they belong to is accepted: those of MAIL and later
    stages are forgotten at the next MAIL, those of HELO at the next HELO.
    `auth_results` holds RFC 8601 results found so far ("spf=pass smtp.mailfrom=..."),
    which the end-of-data check writes into one Authentication-Results field.
    `cache` and `dnswl` are about the client, not the transaction: they live as long
    as the connection. `recipients` and `auth_results` start as the shared empty tuple
    and are replaced as they grow: most sessions are idle, and a list each would cost.
    """

    client_ip: IPAddress | None
    helo: str | None = None
    tls: bool = False
    user: str | None = None
    sender: Mailbox | None = None
    recipient: Mailbox | None = None
    recipients: tuple[Mailbox, ...] = ()
    data: bytes = b""
    params: MailParameters | None = None
    auth_results: Sequence[str] = ()
    dnswl: str | None = None  # the DNSWL zone that lists the client
    # `tags` and `cache`, made at first use: most sessions never need them.
    _tags: dict[Stage, list[Tag]] | None = field(default=None, repr=False)
    _cache: dict[str, Verdict] | None = field(default=None, repr=False)

    @property
    def tags(self) -> dict[Stage, list[Tag]]:
        """Each stage's tags, kept until the message they belong to is accepted."""
        if self._tags is None:
            self._tags = {}
        return self._tags

    @property
    def cache(self) -> dict[str, Verdict]:
        """Verdicts about the client (DNSBL, rDNS), kept for the connection's life."""
        if self._cache is None:
            self._cache = {}
        return self._cache

    def forget_tags(self, *stages: Stage) -> None:
        """Drop the tags of `stages` (without making the dict when there is none)."""
        if self._tags:
            for stage in stages:
                self._tags.pop(stage, None)

    def reset_for_tls(self) -> None:
        """Forget what the client said before STARTTLS (RFC 3207 4.2), login included."""
        self.tls = True
        self.helo = self.user = self.sender = self.recipient = self.params = None
        self.recipients = ()
        self.forget_tags(Stage.HELO)
        self.start_transaction()

    def start_transaction(self) -> None:
        """Forget the tags and results of the previous transaction (at MAIL FROM)."""
        self.forget_tags(*_TRANSACTION_STAGES)
        self.auth_results = ()

    def all_tags(self) -> Accept:
        """Every tag kept so far, merged, in the order of the dialogue."""
        kept = self._tags
        if not kept:
            return ACCEPT  # most messages: no stage tagged anything
        return merge_tags(tag for stage in Stage for tag in kept.get(stage, ()))


Check = Callable[[CheckContext], Verdict]
AsyncCheck = Callable[[CheckContext], Awaitable[Verdict]]


def run_checks(checks: Sequence[Check], session: CheckContext) -> Verdict:
    """The verdict of the first check that does not accept, else ACCEPT or the tags.

    Most checks accept plainly (ACCEPT itself), and a stage without a tag needs no list
    and no merge: that is nearly every stage of nearly every message.
    """
    tags: list[Accept] | None = None
    for check in checks:
        verdict = check(session)
        if verdict is ACCEPT:
            continue
        if not isinstance(verdict, Accept):
            return verdict
        if tags is None:
            tags = [verdict]
        else:
            tags.append(verdict)
    return ACCEPT if tags is None else merge_tags(tags)


async def run_async_checks(checks: Sequence[AsyncCheck], session: CheckContext) -> Verdict:
    """`run_checks` for checks that must wait for the network, one after the other.

    One after the other, not all at once, because an earlier check may record a fact a
    later one needs (a DNSWL listing relaxes the DNSBL and SPF checks).
    """
    tags: list[Accept] = []
    for check in checks:
        verdict = await check(session)
        if not isinstance(verdict, Accept):
            return verdict
        tags.append(verdict)
    return merge_tags(tags)


def merge_tags(verdicts: Iterable[Accept]) -> Accept:
    """One accept carrying every field to add and to drop, in order; ACCEPT if none."""
    fields: list[bytes] = []
    drop: list[bytes] = []
    for verdict in verdicts:
        if isinstance(verdict, Tag):
            fields.extend(verdict.fields)
            drop.extend(verdict.drop)
    return Tag(tuple(fields), tuple(drop)) if fields or drop else ACCEPT


def is_trusted(session: CheckContext, relay_networks: AccessPolicy) -> bool:
    """True for an authenticated client or one in relay_networks: our own users.

    Their mail is neither tagged nor refused by the content and origin checks (the
    Postfix permit_mynetworks, permit_sasl_authenticated idiom), so local programs
    need no DNS at all and a submission client on a listed dial-up address still works.
    A peer on a unix socket has no address to judge and is a local program: trusted.
    """
    if session.user is not None or session.client_ip is None:
        return True
    return relay_networks.decide(session.client_ip).allowed


_UNSAFE = re.compile(r"[^\x20-\x7e]")


def ascii_line(text: str, limit: int = 200) -> str:
    """Client-supplied text made safe for a header field or a reply: ASCII, one line,
    anything else replaced by "?" and cut at `limit` (not `leafmail.printable`, which
    escapes text for a terminal and keeps all of it)."""
    return _UNSAFE.sub("?", text)[:limit]


def header_field(name: str, value: str) -> bytes:
    """``Name: value`` CRLF, with anything but printable ASCII replaced by "?"."""
    return f"{name}: {ascii_line(value, 900)}\r\n".encode("ascii")


def tag_or_reject(mode: str, field_: bytes, reply: Reply) -> Verdict:
    """What a failed check answers: a `Tag` in "tag" mode, a `Reject` in "reject" mode."""
    return Reject(reply) if mode == "reject" else Tag((field_,))
