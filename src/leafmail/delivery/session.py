"""One SMTP transaction on an open aiosmtplib connection, shared by the remote agents.

The smarthost agent and the MX agent differ in how they find and secure a connection,
but once a server has greeted them they run the same MAIL/RCPT/DATA exchange: the same
refusal to downgrade a message the next hop cannot carry (SMTPUTF8, 8BITMIME, SIZE), the
same DSN parameters passed onward, and the same per-recipient results. Keeping that in
one module means a fix to the transaction reaches every route.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import replace

import aiosmtplib

from netserver.smtp.parameters import xtext_encode

from ..envelope import Envelope, Recipient
from . import Handoff, Result, all_results


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
    reply = await path_command(
        smtp,
        b"MAIL",
        b"FROM:",
        envelope.sender,
        mail_options(smtp, envelope, data, utf8=utf8),
        encoding,
    )
    if reply.code != 250:
        results.update(all_results(rcpts, Result.refused(reply.code, reply.message, remote)))
        return await reset(smtp)
    dsn = smtp.supports_extension("dsn")
    accepted = []
    for index in rcpts:
        rcpt = envelope.recipients[index]
        options = rcpt_options(rcpt, dsn)
        reply = await path_command(smtp, b"RCPT", b"TO:", rcpt.address, options, encoding)
        if reply.code in (250, 251):
            accepted.append(index)
        else:
            results[index] = rcpt_refused(reply, remote)
    if not accepted:
        return await reset(smtp)
    try:
        reply = await smtp.data(data)
    except aiosmtplib.SMTPDataError as exc:
        results.update(all_results(accepted, Result.refused(exc.code, exc.message, remote)))
        return await reset(smtp)
    done = Result.from_reply(reply.code, reply.message, remote)
    # RFC 3461 5.2.2: a next hop with DSN took NOTIFY and ORCPT and reports success
    # itself; one without it leaves us to report "relayed" to whoever asked.
    done = replace(done, handoff=Handoff.PASSED if dsn else Handoff.RELAYED)
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


async def path_command(
    smtp: aiosmtplib.SMTP,
    verb: bytes,
    keyword: bytes,
    address: str,
    options: list[str],
    encoding: str,
) -> aiosmtplib.SMTPResponse:
    """MAIL FROM:<path> or RCPT TO:<path>, with the path exactly as it was received.

    aiosmtplib's mail() and rcpt() re-parse the address as an RFC 5322 header address,
    which can rewrite a valid RFC 5321 path (quoted local parts, comments); the spool
    holds paths our server already checked, so they are sent as they are.
    """
    path = b"<" + address.encode(encoding) + b">"
    return await smtp.execute_command(verb, keyword + path, *(o.encode("ascii") for o in options))


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
