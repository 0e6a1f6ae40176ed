"""One SMTP transaction on an open client connection, shared by the remote agents.

The smarthost agent and the MX agent differ in how they find and secure a connection,
but once a server has greeted them they run the same MAIL/RCPT/DATA exchange: the same
refusal to downgrade a message the next hop cannot carry (SMTPUTF8, 8BITMIME, SIZE), the
same DSN parameters passed onward, and the same per-recipient results. Keeping that in
one module means a fix to the transaction reaches every route. Which command goes when
(pipelined when the server offers PIPELINING) is `netserver.smtp.mailexchange`'s
decision; the bytes travel over `leafmail.delivery.wire`.
"""

from __future__ import annotations

import asyncio
import contextlib
import operator
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

from netserver.smtp.client import Answered, Awaited
from netserver.smtp.mailexchange import MailCommands, MailExchange
from netserver.smtp.parameters import MAX_ORCPT, utf8_addr_xtext, xtext_encode
from netserver.smtp.replies import Reply

from ..envelope import Envelope, Recipient
from ..trace import header_section
from . import Handoff, Outcome, Result, all_results
from .bounce import is_double_bounce
from .wire import ClientLink, WireError, describe, message_of

# Bound once: Enum attribute access is slow on CPython 3.11 (see netserver.smtp.client).
_MAIL, _RCPT, _DATA, _MESSAGE = Awaited.MAIL, Awaited.RCPT, Awaited.DATA, Awaited.MESSAGE
_FORBIDDEN = re.compile(rb"[\x00-\x1f\x7f]")  # never inside a command's arguments


def command(*args: bytes) -> bytes:
    """One command line; ValueError for a control character (no command injection)."""
    for arg in args:
        if _FORBIDDEN.search(arg):
            raise ValueError("command argument contains a control character")
    return b" ".join(args) + b"\r\n"


async def greet(conn: ClientLink, helo: str) -> None:
    """EHLO, falling back to HELO for a server that does not know EHLO."""
    name = helo.encode("ascii", "replace")
    reply = await conn.command(Awaited.EHLO, command(b"EHLO", name))
    if reply.code == 250:
        return
    reply = await conn.command(Awaited.HELO, command(b"HELO", name))
    if reply.code != 250:
        raise WireError(f"HELO refused: {describe(reply)}")


async def quit_and_drop(conn: ClientLink, timeout: float) -> None:
    """QUIT, briefly (a dead peer must not hold us), then close whatever happened."""
    with contextlib.suppress(WireError, OSError, TimeoutError):
        async with asyncio.timeout(timeout):
            await conn.command(Awaited.QUIT, b"QUIT\r\n")
    conn.abort()


async def transaction(
    conn: ClientLink,
    envelope: Envelope,
    data: bytes,
    rcpts: Sequence[int],
    results: dict[int, Result],
    remote: str,
    *,
    hostname: str,
    reused: bool = False,
) -> bool:
    """MAIL, RCPT for each recipient, DATA; fills `results`; True if the connection is reusable.

    `hostname` is this server's name, the domain of a bare ``<Postmaster>`` (see
    `forward_path`).

    A recipient's result is recorded as soon as it is final for this attempt (a RCPT
    refusal), and the accepted ones after the reply to DATA, so if the connection dies
    half-way the caller defers exactly the recipients that have no result yet.

    A server that takes only so many recipients in one transaction refuses the rest as
    too many (`too_many_recipients`); RFC 5321 4.5.3.1.10 asks a client to be prepared
    to send the message to them in further transactions, so they go at once in a new
    one on the same connection (Exim does the same), rather than waiting a retry
    interval per batch. Each further transaction must deliver to someone: one that
    delivers to nobody ends the attempt with those recipients deferred, so the rounds
    are bounded by the number of recipients.

    `reused` says the connection has carried a message before this one; a transaction
    after the first is on such a connection too. There a refusal of MAIL that ends the
    session's transactions (`spent_session`) raises SessionSpent before anything is
    recorded for the transaction's recipients: the session, not the message, was
    refused, and a new connection may take it.
    """
    job = Outgoing(conn, envelope, data, remote, hostname)
    pending = rcpts
    while True:
        reusable, crowded = await one_transaction(job, pending, results, reused=reused)
        reused = True
        if not (crowded and reusable and _delivered_any(pending, results)):
            return reusable
        for i in crowded:
            del results[i]
        pending = crowded


def _delivered_any(rcpts: Sequence[int], results: dict[int, Result]) -> bool:
    """Whether a recipient of `rcpts` was delivered (so a further transaction may follow)."""
    return any(i in results and results[i].outcome is Outcome.DELIVERED for i in rcpts)


@dataclass(slots=True)  # (not frozen: its __init__ would set each field through object)
class Outgoing:
    """What every transaction of one attempt shares: the connection and the message."""

    conn: ClientLink
    envelope: Envelope
    data: bytes
    remote: str
    hostname: str


class SessionSpent(WireError):
    """A reused connection's MAIL was refused in a way that ends its session's mail."""


async def one_transaction(
    job: Outgoing, rcpts: Sequence[int], results: dict[int, Result], *, reused: bool
) -> tuple[bool, list[int]]:
    """One MAIL ... DATA for `rcpts`, filling `results`.

    Returns whether the connection is reusable, and the recipients refused as too many.
    """
    conn, envelope, data, remote = job.conn, job.envelope, job.data, job.remote
    offered = conn.engine.extensions  # from EHLO: keyword (lower case) -> parameters
    utf8 = sends_smtputf8(envelope, data)
    refusal = cannot_carry(offered, envelope, data, remote, utf8=utf8)
    if refusal is not None:
        results.update(all_results(rcpts, refusal))
        return True, []
    encoding = "utf-8" if utf8 else "ascii"
    dsn = "dsn" in offered
    options = mail_options(offered, envelope, data, utf8=utf8)
    exchange = MailExchange(
        MailCommands(
            mail=path_line(b"MAIL", b"FROM:", envelope.sender, options, encoding),
            rcpts=tuple(
                rcpt_line(envelope.recipients[i], dsn, encoding, job.hostname) for i in rcpts
            ),
            message=data,
            pipelining="pipelining" in offered,
        )
    )
    handoff = Handoff.PASSED if dsn else Handoff.RELAYED  # RFC 3461 5.2.2
    crowded: list[int] = []
    conn.send(exchange.start())
    while not exchange.finished:
        progress = exchange.receive(await conn.reply())
        answered, position = progress.answered, progress.position
        negative = answered.reply.code >= 400  # (the checks below only for a refusal)
        if negative and reused and answered.awaited is _MAIL and spent_session(answered.reply):
            raise SessionSpent(f"{remote} ended this session's mail: {describe(answered.reply)}")
        record(exchange, answered, position, rcpts, results, remote, handoff)
        if negative and position is not None and crowding(exchange, answered):
            crowded.append(rcpts[position])
        if progress.send:
            conn.send(progress.send)
    return exchange.delivered or await reset(conn), crowded


def crowding(exchange: MailExchange, answered: Answered) -> bool:
    """Whether this reply refused a RCPT of an open transaction as one too many."""
    return answered.awaited is _RCPT and exchange.mail_ok and too_many_recipients(answered.reply)


def record(
    exchange: MailExchange,
    answered: Answered,
    position: int | None,
    rcpts: Sequence[int],
    results: dict[int, Result],
    remote: str,
    handoff: Handoff,
) -> None:
    """The results one reply of the transaction decides."""
    reply, awaited = answered.reply, answered.awaited
    if awaited is _MAIL and reply.code != 250:
        results.update(all_results(rcpts, refused(reply, remote)))
    elif awaited is _RCPT and exchange.mail_ok and position is not None:
        if reply.code not in (250, 251):
            results[rcpts[position]] = rcpt_refused(reply, remote)
        return
    accepted = [rcpts[p] for p in exchange.accepted]
    if awaited is _DATA and reply.code != 354:
        results.update(all_results(accepted, refused(reply, remote)))
    elif awaited is _MESSAGE and accepted:
        if exchange.delivered:
            done = Result.from_reply(reply.code, message_of(reply), remote)
            results.update(all_results(accepted, replace(done, handoff=handoff)))
        else:
            results.update(all_results(accepted, refused(reply, remote)))


def refused(reply: Reply, remote: str) -> Result:
    return Result.refused(reply.code, message_of(reply), remote)


def too_many_recipients(reply: Reply) -> bool:
    """Whether a refused RCPT means "no more recipients in this transaction".

    RFC 5321 4.5.3.1.10: a server's limit on RCPT commands is answered 452, and a client
    should be prepared for 552 from old servers (which `rcpt_refused` defers as 452).
    RFC 3463's X.5.3 says "too many recipients" whatever the code (OpenSMTPD answers
    451 4.5.3). A 452 with another enhanced code is about that recipient (452 4.2.2, a
    full mailbox), and a 5xx other than 552 is a refusal to keep (a site's policy).
    """
    if reply.code == 552:
        return True
    if reply.code // 100 != 4:
        return False
    return reply.enhanced == "4.5.3" if reply.enhanced else reply.code == 452


def spent_session(reply: Reply) -> bool:
    """Whether a refusal of MAIL on a connection that carried mail blames the session.

    421 closes the session (RFC 5321 3.8), whatever it says; an X.5.3 for now is a
    per-session count reached (OpenSMTPD's `smtp limit max-mails`, default 100, answers
    452 4.5.3 "Too many messages sent" and keeps the session open). Other refusals of
    MAIL (a sender's rate, a full disk) would be the same on a new connection.
    """
    return reply.code == 421 or (reply.code // 100 == 4 and reply.enhanced == "4.5.3")


def defer_tls_refusals(rcpts: Sequence[int], results: dict[int, Result], handshake: str) -> bool:
    """Defer the recipients a plaintext session after a failed STARTTLS handshake got
    530 for (its error: `handshake`); True if any did.

    A server that requires TLS answers MAIL in a session without it "530 5.7.0 Must
    issue a STARTTLS command first" (RFC 3207 4): that refuses the session, whose
    handshake failed (maybe a reset, for once), not the message, which must not bounce
    for it but wait for a handshake that works.
    """
    refused = [i for i in rcpts if i in results and results[i].code == 530]
    for index in refused:
        reply = results[index].reply or results[index].line
        text = f"{reply} (in plaintext: the STARTTLS handshake failed: {handshake})"
        results[index] = Result.deferred("4.7.0", text, results[index].remote)
    return bool(refused)


def rcpt_refused(reply: Reply, remote: str) -> Result:
    """The result of a refused RCPT.

    552 is deferred, not bounced: RFC 5321 4.5.3.1.10 has clients treat it as 452 (too
    many recipients), because old servers sent 552 for that; Postfix does the same.
    """
    if reply.code == 552:
        text = describe(reply)
        return Result.deferred("4.5.3", f"{text} (taken as 452, too many recipients)", remote)
    return refused(reply, remote)


def rcpt_line(rcpt: Recipient, dsn: bool, encoding: str, hostname: str) -> bytes:
    address = forward_path(rcpt.address, hostname)
    return path_line(b"RCPT", b"TO:", address, rcpt_options(rcpt, dsn), encoding)


def forward_path(address: str, hostname: str) -> str:
    """The recipient as another server must see it: a bare ``Postmaster`` qualified.

    ``<Postmaster>`` without a domain is the only bare path SMTP allows, and it means the
    postmaster of the server it was sent to (RFC 5321 4.1.1.3): ours. Passed on bare, the
    next hop would take it for its own postmaster; qualified with our name it keeps its
    meaning, as Postfix's append_at_myorigin qualifies it.
    """
    return address if "@" in address else f"{address}@{hostname}"


def path_line(
    verb: bytes, keyword: bytes, address: str, options: list[str], encoding: str
) -> bytes:
    """MAIL FROM:<path> or RCPT TO:<path>, with the path exactly as it was received.

    The spool holds paths our server already checked, so they are sent as they are,
    never re-parsed as RFC 5322 header addresses (which can rewrite a valid RFC 5321
    path: quoted local parts, comments).
    """
    path = b"<" + address.encode(encoding) + b">"
    return command(verb, keyword + path, *(o.encode("ascii") for o in options))


async def reset(conn: ClientLink) -> bool:
    """RSET after a transaction that did not end with DATA; False if that failed too."""
    if not conn.is_connected:
        return False
    try:
        reply = await conn.command(Awaited.RSET, b"RSET\r\n")
    except (WireError, OSError):
        return False
    return reply.code == 250


def cannot_carry(
    offered: Mapping[str, str], envelope: Envelope, data: bytes, remote: str, *, utf8: bool
) -> Result | None:
    """A permanent failure when the next hop lacks an extension this message needs.

    Nothing is ever downgraded silently: an internationalized message to a server
    without SMTPUTF8 bounces 5.6.7 (RFC 6531 3.2), 8-bit content to a server without
    8BITMIME bounces 5.6.3 (RFC 6152 3 allows only conversion or a bounce), and a
    message over the server's declared SIZE bounces 5.3.4 (RFC 1870). `utf8`: whether
    the transaction needs SMTPUTF8 (`sends_smtputf8`, which the caller has at hand).
    """
    if utf8 and "smtputf8" not in offered:
        return Result.failed(
            "5.6.7", f"{remote} does not support SMTPUTF8, which this message needs", remote
        )
    if "8bitmime" not in offered and has_8bit(data):
        return Result.failed(
            "5.6.3", f"{remote} does not support 8BITMIME and the message has 8-bit data", remote
        )
    limit = offered.get("size", "").strip()
    if limit.isdigit() and int(limit) > 0 and len(data) > int(limit):
        return Result.failed(
            "5.3.4",
            f"message of {len(data)} bytes exceeds the {limit} bytes {remote} takes",
            remote,
        )
    return None


def mail_options(
    offered: Mapping[str, str], envelope: Envelope, data: bytes, *, utf8: bool
) -> list[str]:
    """MAIL FROM parameters passed onward: SIZE, BODY, SMTPUTF8, and DSN's RET/ENVID.

    BODY=8BITMIME goes with every message that has 8-bit data, whatever its client
    declared: leafmail accepts undeclared 8-bit data as Postfix does, but passes it on
    only as RFC 6152 3 allows, declared (a strict next hop refuses it otherwise).
    """
    options = []
    if "size" in offered:
        options.append(f"SIZE={len(data)}")
    if "8bitmime" in offered and (envelope.body.upper() != "7BIT" or has_8bit(data)):
        options.append("BODY=8BITMIME")
    if utf8:
        options.append("SMTPUTF8")
    if "dsn" in offered:
        if envelope.ret:
            options.append(f"RET={envelope.ret}")
        if envelope.envid and not is_double_bounce(envelope):  # (our own mark: kept here)
            options.append(f"ENVID={xtext_encode(envelope.envid)}")
    return options


def rcpt_options(rcpt: Recipient, dsn: bool) -> list[str]:
    """RCPT TO parameters passed onward when the next hop speaks DSN: NOTIFY and ORCPT.

    ORCPT goes on as it came (RFC 3461 4.2), re-encoded: xtext, or for the utf-8 type
    RFC 6533's ``\\x{HEX}`` escapes, which are ASCII whether or not the next hop has
    SMTPUTF8. One that no longer fits the 500 characters a server must take is left out
    rather than have the RCPT refused.
    """
    if not dsn:
        return []
    options = []
    if rcpt.notify:
        options.append("NOTIFY=" + ",".join(rcpt.notify))
    if rcpt.orcpt:
        options += orcpt_option(rcpt.orcpt)
    return options


def orcpt_option(orcpt: str) -> list[str]:
    """``ORCPT=type;address`` encoded for the wire, or nothing when it cannot go."""
    addr_type, _, address = orcpt.partition(";")
    if addr_type.lower() == "utf-8":
        value = f"{addr_type};{utf8_addr_xtext(address)}"
    elif address.isascii():
        value = f"{addr_type};{xtext_encode(address)}"
    else:
        return []
    return [f"ORCPT={value}"] if len(value) <= MAX_ORCPT else []


def sends_smtputf8(envelope: Envelope, data: bytes) -> bool:
    """Whether this transaction needs SMTPUTF8: for a message received with it, when
    `needs_smtputf8`; for any message, when an address is UTF-8.

    An alias's forwarded copy for a UTF-8 address spooled unmarked (before such copies
    were marked) has one, and without SMTPUTF8 its RCPT cannot be written at all. 8-bit
    headers in a message received without SMTPUTF8 are undeclared 8-bit data, passed on
    as such.
    """
    return needs_smtputf8(envelope, data) if envelope.smtputf8 else has_utf8_address(envelope)


def needs_smtputf8(envelope: Envelope, data: bytes) -> bool:
    """True when an address or the header section is not ASCII (RFC 6531's test)."""
    return has_utf8_address(envelope) or not header_section(data).isascii()


def has_utf8_address(envelope: Envelope) -> bool:
    """Whether the sender or a recipient is not ASCII (tested in C: this runs for every
    message)."""
    addresses = map(_ADDRESS, envelope.recipients)
    return not (envelope.sender.isascii() and all(map(str.isascii, addresses)))


_ADDRESS = operator.attrgetter("address")


def has_8bit(data: bytes) -> bool:
    return not data.isascii()


def why(exc: BaseException) -> str:
    """A one-line reason for a log or a DSN, never including credentials."""
    text = " ".join(str(exc).split())
    return text or type(exc).__name__
