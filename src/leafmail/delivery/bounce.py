"""Delivery status notifications (RFC 3464): failure bounces and delay warnings.

A DSN is a multipart/report with three parts: a short human-readable explanation, the
machine-readable message/delivery-status, and the original message (or only its header
section when the sender asked for RET=HDRS or the message is large). It goes from the
null sender `<>` to the original sender, so it can never cause another DSN (RFC 5321
4.5.5); mail from `<>` never gets one, and a recipient whose NOTIFY excludes FAILURE
(or DELAY) gets none either. One DSN covers all the recipients of a message that
failed in the same attempt, so a message to fifty bad addresses makes one bounce.

Internationalized mail (SMTPUTF8) gets the RFC 6533 types, message/global-* .
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import format_datetime, formatdate, make_msgid

from ..envelope import ClientInfo, Envelope, Recipient
from . import Result

FULL_MESSAGE_LIMIT = 256 * 1024  # larger originals are returned as headers only


@dataclass(frozen=True)
class Notice:
    """One recipient's line in a DSN."""

    recipient: Recipient
    result: Result


def wants_dsn(sender: str, rcpt: Recipient, kind: str) -> bool:
    """Whether a DSN of `kind` ("FAILURE" or "DELAY") goes out for this recipient.

    Without NOTIFY the default is failures and delays (RFC 3461 4.1 leaves it to us).
    """
    if sender == "":
        return False
    if not rcpt.notify:
        return True
    return kind in rcpt.notify and "NEVER" not in rcpt.notify


def build_dsn(
    *,
    hostname: str,
    qid: str,
    envelope: Envelope,
    data: bytes,
    notices: Sequence[Notice],
    arrival: float,
    now: float,
    delayed: bool = False,
    retry_until: float | None = None,
) -> tuple[Envelope, bytes]:
    """The envelope and bytes of a DSN about `notices` for message `qid`."""
    utf8 = envelope.smtputf8
    boundary = _boundary(data)
    headers_only = envelope.ret == "HDRS" or len(data) > FULL_MESSAGE_LIMIT
    original = _header_section(data) if headers_only else data
    status_type = "message/global-delivery-status" if utf8 else "message/delivery-status"
    if headers_only:
        original_type = "message/global-headers" if utf8 else "text/rfc822-headers"
    else:
        original_type = "message/global" if utf8 else "message/rfc822"
    subject = (
        "Delayed Mail (still being retried)" if delayed else "Undelivered Mail Returned to Sender"
    )
    head = [
        f"From: Mail Delivery System <MAILER-DAEMON@{hostname}>",
        f"To: {_angle(envelope.sender)}",
        f"Subject: {subject}",
        f"Date: {formatdate(now, usegmt=True)}",
        f"Message-ID: {make_msgid(domain=hostname)}",
        "Auto-Submitted: auto-replied",
        "MIME-Version: 1.0",
        f'Content-Type: multipart/report; report-type=delivery-status; boundary="{boundary}"',
    ]
    parts = [
        _part("text/plain; charset=utf-8", "8bit", _explanation(hostname, notices, delayed)),
        _part(
            status_type,
            "8bit" if utf8 else "7bit",
            _status(hostname, qid, envelope, notices, arrival, now, delayed, retry_until),
        ),
        _part(original_type, "8bit" if not original.isascii() else "7bit", original),
    ]
    body = b"".join(b"--%s\r\n%s\r\n" % (boundary.encode(), p) for p in parts)
    blob = _lines(head) + b"\r\n" + b"This is a MIME-encapsulated message.\r\n\r\n" + body
    blob += b"--%s--\r\n" % boundary.encode()
    dsn_envelope = Envelope(
        sender="",
        recipients=(Recipient(envelope.sender),),
        client=ClientInfo(protocol="local", helo=hostname),
        body="8BITMIME" if not blob.isascii() else "7BIT",
        smtputf8=utf8,
    )
    return dsn_envelope, blob


def _explanation(hostname: str, notices: Sequence[Notice], delayed: bool) -> bytes:
    if delayed:
        lead = (
            f"This is the mail system at {hostname}.\r\n\r\n"
            "Your message has not yet been delivered to the recipients below. It is still\r\n"
            "queued and will be retried; you do not need to resend it.\r\n"
        )
    else:
        lead = (
            f"This is the mail system at {hostname}.\r\n\r\n"
            "Your message could not be delivered to the recipients below. It will not be\r\n"
            "retried for them.\r\n"
        )
    lines = [f"<{n.recipient.address}>: {n.result.line}" for n in notices]
    text = "\r\n".join(_clean(line, utf8=True) for line in lines)
    return (lead + "\r\n" + text + "\r\n").encode()


def _status(
    hostname: str,
    qid: str,
    envelope: Envelope,
    notices: Sequence[Notice],
    arrival: float,
    now: float,
    delayed: bool,
    retry_until: float | None,
) -> bytes:
    utf8 = envelope.smtputf8

    def clean(text: str) -> str:
        return _clean(text, utf8=utf8)

    fields = [f"Reporting-MTA: dns; {hostname}", f"X-Leafmail-Queue-ID: {qid}"]
    if envelope.envid:
        fields.append(f"Original-Envelope-Id: {clean(envelope.envid)}")
    fields.append(f"Arrival-Date: {_date(arrival)}")
    blocks = [_lines(fields)]
    for notice in notices:
        rcpt, result = notice.recipient, notice.result
        block = []
        if rcpt.orcpt:
            block.append(f"Original-Recipient: {_original_recipient(rcpt.orcpt, utf8=utf8)}")
        addr_type = "utf-8" if not rcpt.address.isascii() else "rfc822"
        block += [
            f"Final-Recipient: {addr_type}; {rcpt.address}",
            f"Action: {'delayed' if delayed else 'failed'}",
            f"Status: {result.status}",
        ]
        if result.remote:
            block.append(f"Remote-MTA: dns; {clean(_host_of(result.remote))}")
            block.append(f"Diagnostic-Code: smtp; {clean(result.line)}")
        else:
            block.append(f"Diagnostic-Code: X-Leafmail; {clean(result.line)}")
        block.append(f"Last-Attempt-Date: {_date(now)}")
        if delayed and retry_until is not None:
            block.append(f"Will-Retry-Until: {_date(retry_until)}")
        blocks.append(_lines(block))
    return b"\r\n".join(blocks)


def _part(content_type: str, encoding: str, payload: bytes) -> bytes:
    head = f"Content-Type: {content_type}\r\nContent-Transfer-Encoding: {encoding}\r\n\r\n"
    if not payload.endswith(b"\r\n"):
        payload += b"\r\n"
    return head.encode() + payload


def _header_section(data: bytes) -> bytes:
    end = data.find(b"\r\n\r\n")
    return data if end < 0 else data[: end + 2]


def _boundary(data: bytes) -> str:
    """A boundary that does not occur in the original (RFC 2046 5.1.1)."""
    while True:
        boundary = f"=_leafmail_{secrets.token_hex(12)}"
        if boundary.encode() not in data:
            return boundary


def _lines(lines: list[str]) -> bytes:
    return "".join(line + "\r\n" for line in lines).encode()


def _clean(text: str, *, utf8: bool) -> str:
    """One printable line of at most 900 octets: a reply must not inject fields or parts.

    A message/delivery-status part is ASCII (RFC 3464); only the message/global-*
    form of an SMTPUTF8 message may carry UTF-8 (RFC 6533), so anything else becomes "?".
    The cut is by octets, keeping the line far under SMTP's 1000-octet limit.
    """
    line = "".join(c if c.isprintable() else " " for c in text)
    if not utf8:
        line = line.encode("ascii", "replace").decode("ascii")
    return line.encode("utf-8")[:900].decode("utf-8", "ignore")


def _original_recipient(orcpt: str, *, utf8: bool) -> str:
    r"""ORCPT as Original-Recipient: a utf-8 address in RFC 6533's escaped form.

    In utf-8-addr-xtext (ASCII DSNs) every character outside QCHAR is written
    ``\x{HEX}``; the utf-8-addr-unitext of a global DSN keeps printable UTF-8 as it is.
    Other address types were ASCII without controls when accepted; they are cleaned.
    """
    addr_type, semicolon, address = orcpt.partition(";")
    if not semicolon or addr_type.lower() != "utf-8":
        return _clean(orcpt, utf8=utf8)
    return f"{addr_type};" + "".join(_qchar(c, utf8) for c in address)[:900]


def _qchar(char: str, utf8: bool) -> str:
    point = ord(char)
    if (0x21 <= point <= 0x7E and char not in "+=\\") or (
        utf8 and point > 0x7F and char.isprintable()
    ):
        return char
    return f"\\x{{{point:X}}}"


def _host_of(remote: str) -> str:
    """The host of "host:port" or "[v6]:port", for Remote-MTA (a name, not an address:port)."""
    if remote.startswith("["):
        return remote[1 : remote.find("]")] if "]" in remote else remote
    return remote.rsplit(":", 1)[0] if remote.count(":") == 1 else remote


def _angle(address: str) -> str:
    return f"<{address}>"


def _date(epoch: float) -> str:
    return format_datetime(datetime.fromtimestamp(epoch, UTC))
