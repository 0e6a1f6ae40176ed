"""One SMTP transaction on an open aiosmtplib connection, shared by the remote agents.

The smarthost agent and the MX agent differ in how they find and secure a connection,
but once a server has greeted them they run the same MAIL/RCPT/DATA exchange: the same
refusal to downgrade a message the next hop cannot carry (SMTPUTF8, 8BITMIME, SIZE), the
same DSN parameters passed onward, and the same per-recipient results. Keeping that in
one module means a fix to the transaction reaches every route. The commands go out
through `leafmail.delivery.wire`, pipelined when the server offers PIPELINING.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, replace

import aiosmtplib

from netserver.smtp.parameters import xtext_encode

from ..envelope import Envelope, Recipient
from . import Handoff, Result, all_results
from .wire import Wire, command, data_block, taken_over


async def greet(smtp: aiosmtplib.SMTP) -> None:
    """EHLO, falling back to HELO for a server that does not know EHLO."""
    try:
        await smtp.ehlo()
    except aiosmtplib.SMTPHeloError:
        await smtp.helo()


async def transaction(
    smtp: aiosmtplib.SMTP,
    envelope: Envelope,
    data: bytes,
    rcpts: Sequence[int],
    results: dict[int, Result],
    remote: str,
) -> bool:
    """MAIL, RCPT for each recipient, DATA; fills `results`; True if the connection is reusable.

    A recipient's result is recorded as soon as it is final for this attempt (a RCPT
    refusal), and the accepted ones after the reply to DATA, so if the connection dies
    half-way the caller defers exactly the recipients that have no result yet.
    """
    refusal = cannot_carry(smtp, envelope, data, remote)
    if refusal is not None:
        results.update(all_results(rcpts, refusal))
        return True
    utf8 = envelope.smtputf8 and needs_smtputf8(envelope, data)
    encoding = "utf-8" if utf8 else "ascii"
    dsn = smtp.supports_extension("dsn")
    options = mail_options(smtp, envelope, data, utf8=utf8)
    plan = Commands(
        mail=path_line(b"MAIL", b"FROM:", envelope.sender, options, encoding),
        rcpts=[(i, rcpt_line(envelope.recipients[i], dsn, encoding)) for i in rcpts],
        data=data,
        handoff=Handoff.PASSED if dsn else Handoff.RELAYED,
        pipelining=smtp.supports_extension("pipelining"),
    )
    with taken_over(smtp) as wire:
        finished = await exchange(wire, plan, results, remote)
    return finished or await reset(smtp)


@dataclass(frozen=True)
class Commands:
    """The command lines of one transaction, and how to send them."""

    mail: bytes
    rcpts: list[tuple[int, bytes]]  # (recipient index, its RCPT line)
    data: bytes
    handoff: Handoff  # RFC 3461 5.2.2: with DSN the next hop reports success itself
    pipelining: bool  # the server offers PIPELINING: MAIL, RCPTs and DATA in one write


async def exchange(wire: Wire, plan: Commands, results: dict[int, Result], remote: str) -> bool:
    """Send the transaction and read its replies; False when it must be reset (RSET).

    Without pipelining a command goes only when the one before it succeeded, as
    before; with it, every reply is read, even those after a refused MAIL.
    """
    piped = plan.pipelining
    lines = [plan.mail, *(line for _i, line in plan.rcpts), b"DATA\r\n"]
    wire.write(b"".join(lines) if piped else plan.mail)
    reply = await wire.reply()
    mail_ok = reply.code == 250
    if not mail_ok:
        rcpts = [i for i, _line in plan.rcpts]
        results.update(all_results(rcpts, Result.refused(reply.code, reply.message, remote)))
        if not piped:
            return False
    accepted = []
    for index, line in plan.rcpts:
        if not piped:
            wire.write(line)
        reply = await wire.reply()
        if not mail_ok:
            continue  # refused with MAIL already
        if reply.code in (250, 251):
            accepted.append(index)
        else:
            results[index] = rcpt_refused(reply, remote)
    if not piped and not accepted:
        return False
    if not piped:
        wire.write(b"DATA\r\n")
    reply = await wire.reply()
    if reply.code != 354:
        results.update(all_results(accepted, Result.refused(reply.code, reply.message, remote)))
        return False
    if not accepted:  # a pipelined DATA taken although no recipient was: send nothing
        wire.write(b".\r\n")
        await wire.reply()
        return False
    wire.write(data_block(plan.data))
    reply = await wire.reply()
    if reply.code != 250:
        results.update(all_results(accepted, Result.refused(reply.code, reply.message, remote)))
        return False
    done = replace(Result.from_reply(reply.code, reply.message, remote), handoff=plan.handoff)
    results.update(all_results(accepted, done))
    return True


def rcpt_refused(reply: aiosmtplib.SMTPResponse, remote: str) -> Result:
    """The result of a refused RCPT.

    552 is deferred, not bounced: RFC 5321 4.5.3.1.10 has clients treat it as 452 (too
    many recipients), because old servers sent 552 for that; Postfix does the same.
    """
    if reply.code == 552:
        text = " ".join(reply.message.split())
        return Result.deferred("4.5.3", f"552 {text} (taken as 452, too many recipients)", remote)
    return Result.refused(reply.code, reply.message, remote)


def rcpt_line(rcpt: Recipient, dsn: bool, encoding: str) -> bytes:
    return path_line(b"RCPT", b"TO:", rcpt.address, rcpt_options(rcpt, dsn), encoding)


def path_line(
    verb: bytes, keyword: bytes, address: str, options: list[str], encoding: str
) -> bytes:
    """MAIL FROM:<path> or RCPT TO:<path>, with the path exactly as it was received.

    aiosmtplib's mail() and rcpt() re-parse the address as an RFC 5322 header address,
    which can rewrite a valid RFC 5321 path (quoted local parts, comments); the spool
    holds paths our server already checked, so they are sent as they are.
    """
    path = b"<" + address.encode(encoding) + b">"
    return command(verb, keyword + path, *(o.encode("ascii") for o in options))


async def reset(smtp: aiosmtplib.SMTP) -> bool:
    """RSET after a transaction that did not end with DATA; False if that failed too."""
    try:
        await smtp.rset()
    except (aiosmtplib.SMTPException, OSError):
        return False
    return True


def cannot_carry(
    smtp: aiosmtplib.SMTP, envelope: Envelope, data: bytes, remote: str
) -> Result | None:
    """A permanent failure when the next hop lacks an extension this message needs.

    Nothing is ever downgraded silently: an internationalized message to a server
    without SMTPUTF8 bounces 5.6.7 (RFC 6531 3.2), 8-bit content to a server without
    8BITMIME bounces 5.6.3 (RFC 6152 3 allows only conversion or a bounce), and a
    message over the server's declared SIZE bounces 5.3.4 (RFC 1870).
    """
    utf8 = envelope.smtputf8 and needs_smtputf8(envelope, data)
    if utf8 and not smtp.supports_extension("smtputf8"):
        return Result.failed(
            "5.6.7", f"{remote} does not support SMTPUTF8, which this message needs", remote
        )
    if not smtp.supports_extension("8bitmime") and has_8bit(data):
        return Result.failed(
            "5.6.3", f"{remote} does not support 8BITMIME and the message has 8-bit data", remote
        )
    limit = smtp.esmtp_extensions.get("size", "").strip()
    if limit.isdigit() and int(limit) > 0 and len(data) > int(limit):
        return Result.failed(
            "5.3.4",
            f"message of {len(data)} bytes exceeds the {limit} bytes {remote} takes",
            remote,
        )
    return None


def mail_options(
    smtp: aiosmtplib.SMTP, envelope: Envelope, data: bytes, *, utf8: bool
) -> list[str]:
    """MAIL FROM parameters passed onward: SIZE, BODY, SMTPUTF8, and DSN's RET/ENVID."""
    options = []
    if smtp.supports_extension("size"):
        options.append(f"SIZE={len(data)}")
    if envelope.body.upper() != "7BIT" and smtp.supports_extension("8bitmime"):
        options.append("BODY=8BITMIME")
    if utf8:
        options.append("SMTPUTF8")
    if smtp.supports_extension("dsn"):
        if envelope.ret:
            options.append(f"RET={envelope.ret}")
        if envelope.envid:
            options.append(f"ENVID={xtext_encode(envelope.envid)}")
    return options


def rcpt_options(rcpt: Recipient, dsn: bool) -> list[str]:
    """RCPT TO parameters passed onward when the next hop speaks DSN: NOTIFY and ORCPT."""
    if not dsn:
        return []
    options = []
    if rcpt.notify:
        options.append("NOTIFY=" + ",".join(rcpt.notify))
    if rcpt.orcpt:
        addr_type, _, address = rcpt.orcpt.partition(";")
        if address.isascii():
            options.append(f"ORCPT={addr_type};{xtext_encode(address)}")
    return options


def needs_smtputf8(envelope: Envelope, data: bytes) -> bool:
    """True when an address or the header section is not ASCII (RFC 6531's test)."""
    addresses = [envelope.sender, *(r.address for r in envelope.recipients)]
    if not all(a.isascii() for a in addresses):
        return True
    end = data.find(b"\r\n\r\n")
    return not data[: end if end >= 0 else len(data)].isascii()


def has_8bit(data: bytes) -> bool:
    return not data.isascii()


def why(exc: BaseException) -> str:
    """A one-line reason for a log or a DSN, never including credentials."""
    if isinstance(exc, aiosmtplib.SMTPResponseException):
        return f"{exc.code} {' '.join(exc.message.split())}"
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


def drop(smtp: aiosmtplib.SMTP, transport: asyncio.BaseTransport | None) -> None:
    """Close the connection now, without waiting for a TLS close_notify from the peer.

    Nothing is left to say once QUIT is answered (or the attempt failed), and a graceful
    TLS shutdown would leave the socket open until the peer answers it, which a
    hostile or broken MX may never do.
    """
    smtp.close()
    if isinstance(transport, asyncio.WriteTransport):
        transport.abort()
