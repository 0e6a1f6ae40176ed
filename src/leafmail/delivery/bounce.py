"""Delivery status notifications (RFC 3464): bounces, delay warnings and success reports.

A DSN is a multipart/report with three parts: a short human-readable explanation, the
machine-readable message/delivery-status, and the original message (or only its header
section when the sender asked for RET=HDRS, the message is large, or the report is a
success report without RET=FULL). It goes from the null sender `<>` to the original
sender, so it can never cause another DSN (RFC 5321 4.5.5); mail from `<>` never gets
one, and a recipient whose NOTIFY excludes FAILURE (or DELAY) gets none either. A
success report (`Action: delivered`, `relayed` or `expanded`) goes only to a recipient
that asked for it with NOTIFY=SUCCESS (RFC 3461 4.1). One DSN covers all the recipients
of a message with the same kind of news in the same attempt, so a message to fifty bad
addresses makes one bounce.

A DSN must be deliverable wherever the original was not. An original with 8-bit content
is often refused exactly because the next hop lacks 8BITMIME (5.6.3), and the bounce
goes back through the same hop; so a DSN about an 8-bit original returns only its
header section (text/rfc822-headers, quoted-printable when the headers themselves are
8-bit) and is 7-bit throughout. Internationalized mail (SMTPUTF8) gets the RFC 6533
types, message/global-*, which are 8-bit by definition.

A bounce that cannot be delivered itself (a "double bounce") is not dropped: the queue
sends a report about it to the postmaster (`build_dsn(to=...)`), as sendmail's
DoubleBounceAddress and Postfix's notify_classes = bounce do.
"""

from __future__ import annotations

import ipaddress
import quopri
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import format_datetime, make_msgid
from enum import StrEnum

from netserver.smtp.parameters import utf8_addr_xtext

from ..envelope import LOCAL_PROTOCOL, ClientInfo, Envelope, Recipient
from ..trace import header_section
from . import Result

FULL_MESSAGE_LIMIT = 256 * 1024  # larger originals are returned as headers only
# The ENVID of a report to the postmaster about an undeliverable bounce. Mail from <>
# gets no DSN, so ENVID means nothing else there; local forwarding keeps it, so a
# report that the postmaster's alias sends on elsewhere is still known as one.
DOUBLE_BOUNCE_ENVID = "leafmail-double-bounce"


class Action(StrEnum):
    """The Action field of one recipient in a DSN (RFC 3464 2.3.3)."""

    FAILED = "failed"
    DELAYED = "delayed"
    DELIVERED = "delivered"  # final delivery here
    RELAYED = "relayed"  # to a next hop that does not speak DSN: it will not report
    EXPANDED = "expanded"  # an alias made several copies


SUCCESS_ACTIONS = frozenset({Action.DELIVERED, Action.RELAYED, Action.EXPANDED})


class Report(StrEnum):
    """What a whole DSN is about: it picks the subject, the explanation and the return."""

    FAILURE = "failure"
    DELAY = "delay"
    SUCCESS = "success"


@dataclass(frozen=True)
class Notice:
    """One recipient's line in a DSN."""

    recipient: Recipient
    result: Result
    action: Action = Action.FAILED


def wants_dsn(sender: str, rcpt: Recipient, kind: str) -> bool:
    """Whether a DSN of `kind` ("FAILURE", "DELAY" or "SUCCESS") goes out for this recipient.

    Without NOTIFY the default is failures and delays (RFC 3461 4.1 leaves it to us);
    success is reported only when asked for.
    """
    if sender == "":
        return False
    if not rcpt.notify:
        return kind != "SUCCESS"
    return kind in rcpt.notify and "NEVER" not in rcpt.notify


def notify_after_expansion(notify: tuple[str, ...]) -> tuple[str, ...]:
    """NOTIFY for the addresses an alias expands to: SUCCESS removed (RFC 3461 6.2.7.3).

    The "expanded" DSN already told the sender; every copy reporting success as well
    would tell them again, once per target. Nothing left means NEVER.
    """
    if not notify:
        return notify
    kept = tuple(n for n in notify if n != "SUCCESS")
    return kept or ("NEVER",)


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
    to: str | None = None,
) -> tuple[Envelope, bytes]:
    """The envelope and bytes of a DSN about `notices` for message `qid`.

    It goes to the envelope's sender, or to `to`: the postmaster, when the message was
    a bounce that could not be delivered (a "double bounce"; the queue sends no second
    one about it, which ends any loop). With `delayed` every notice is a delay;
    otherwise each notice's own action counts.
    """
    utf8 = envelope.smtputf8
    recipient = envelope.sender if to is None else to
    kind = _kind(notices, delayed)
    boundary = _boundary(data)
    original, original_type, encoding = _returned(envelope, data, full=_full(envelope, data, kind))
    report_type = "global-delivery-status" if utf8 else "delivery-status"
    head = [
        f"From: Mail Delivery System <MAILER-DAEMON@{hostname}>",
        f"To: {_angle(recipient)}",
        f"Subject: {_SUBJECTS[kind] if to is None else _DOUBLE_SUBJECT}",
        f"Date: {_date(now)}",  # "+0000": "GMT" is RFC 5322 4.3 obsolete syntax
        f"Message-ID: {make_msgid(domain=hostname)}",
        "Auto-Submitted: auto-replied",
        "MIME-Version: 1.0",
        # report-type names the second part's subtype (RFC 6522 3), global or not.
        f'Content-Type: multipart/report; report-type={report_type}; boundary="{boundary}"',
    ]
    explanation = _explanation(hostname, notices, kind, utf8=utf8)
    actions = [Action.DELAYED if delayed else n.action for n in notices]
    report = _status(hostname, qid, envelope, notices, actions, arrival, now, retry_until)
    parts = [
        _part("text/plain; charset=utf-8", _cte(explanation), explanation),
        _part(f"message/{report_type}", "8bit" if utf8 else "7bit", report),
        _part(original_type, encoding, original),
    ]
    body = b"".join(b"--%s\r\n%s\r\n" % (boundary.encode(), p) for p in parts)
    blob = _lines(head) + b"\r\n" + b"This is a MIME-encapsulated message.\r\n\r\n" + body
    blob += b"--%s--\r\n" % boundary.encode()
    dsn_envelope = Envelope(
        sender="",
        recipients=(Recipient(recipient),),
        client=ClientInfo(protocol=LOCAL_PROTOCOL, helo=hostname),
        body="8BITMIME" if not blob.isascii() else "7BIT",
        smtputf8=utf8,
        envid=None if to is None else DOUBLE_BOUNCE_ENVID,
    )
    return dsn_envelope, blob


def is_double_bounce(envelope: Envelope) -> bool:
    """Whether this is a report to the postmaster about a bounce (or a copy of one).

    Only one made here (local, as a forwarded copy stays): a network client that sends
    MAIL FROM:<> with the mark as its ENVID must not have its failures dropped as
    undeliverable reports instead of going to the postmaster."""
    return (
        envelope.sender == ""
        and envelope.envid == DOUBLE_BOUNCE_ENVID
        and envelope.client.protocol == LOCAL_PROTOCOL
    )


_SUBJECTS = {
    Report.FAILURE: "Undelivered Mail Returned to Sender",
    Report.DELAY: "Delayed Mail (still being retried)",
    Report.SUCCESS: "Successful Mail Delivery Report",
}
_DOUBLE_SUBJECT = "Postmaster Copy: Undeliverable Bounce"


def _kind(notices: Sequence[Notice], delayed: bool) -> Report:
    if delayed:
        return Report.DELAY
    if notices and all(n.action in SUCCESS_ACTIONS for n in notices):
        return Report.SUCCESS
    return Report.FAILURE


def _full(envelope: Envelope, data: bytes, kind: Report) -> bool:
    """Whether the whole original goes back, or only its header section.

    Headers only for RET=HDRS, for a large original, for a success report unless
    RET=FULL asked for the content (nobody needs their own message back to learn it
    arrived), and for 8-bit content outside SMTPUTF8, which the return path may not
    carry (see the module doc).
    """
    if envelope.ret == "HDRS" or len(data) > FULL_MESSAGE_LIMIT:
        return False
    if kind is Report.SUCCESS and envelope.ret != "FULL":
        return False
    return envelope.smtputf8 or data.isascii()


def _returned(envelope: Envelope, data: bytes, *, full: bool) -> tuple[bytes, str, str]:
    """The returned part: its bytes, content type and transfer encoding."""
    if envelope.smtputf8:
        if full:
            return data, "message/global", _cte(data)
        headers = header_section(data)
        return headers, "message/global-headers", _cte(headers)
    if full:
        return data, "message/rfc822", "7bit"
    headers = header_section(data)
    if headers.isascii():
        return headers, "text/rfc822-headers", "7bit"
    # 8-bit header bytes (no SMTPUTF8 was asked for): quoted-printable keeps the DSN 7-bit.
    encoded = quopri.encodestring(headers.replace(b"\r\n", b"\n")).replace(b"\n", b"\r\n")
    return encoded, "text/rfc822-headers", "quoted-printable"


def _cte(payload: bytes) -> str:
    return "7bit" if payload.isascii() else "8bit"


def _explanation(hostname: str, notices: Sequence[Notice], kind: Report, *, utf8: bool) -> bytes:
    lead = f"This is the mail system at {hostname}.\r\n\r\n" + _LEADS[kind]
    lines = [f"<{n.recipient.address}>: {_why(n)}" for n in notices]
    text = "\r\n".join(_clean(line, utf8=utf8) for line in lines)
    return (lead + "\r\n" + text + "\r\n").encode()


_LEADS = {
    Report.FAILURE: (
        "Your message could not be delivered to the recipients below. It will not be\r\n"
        "retried for them.\r\n"
    ),
    Report.DELAY: (
        "Your message has not yet been delivered to the recipients below. It is still\r\n"
        "queued and will be retried; you do not need to resend it.\r\n"
    ),
    Report.SUCCESS: (
        "Your message was delivered to the recipients below, as you asked to be told\r\n"
        "(NOTIFY=SUCCESS). Relayed means it went on to a system that does not report\r\n"
        "delivery; expanded means an alias passed it on to several addresses.\r\n"
    ),
}


def _why(notice: Notice) -> str:
    if notice.action in SUCCESS_ACTIONS:
        return f"{notice.action.value}: {notice.result.line}"
    return notice.result.line


def _status(
    hostname: str,
    qid: str,
    envelope: Envelope,
    notices: Sequence[Notice],
    actions: Sequence[Action],
    arrival: float,
    now: float,
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
    for notice, action in zip(notices, actions, strict=True):
        rcpt, result = notice.recipient, notice.result
        block = []
        if rcpt.orcpt:
            block.append(f"Original-Recipient: {_original_recipient(rcpt.orcpt, utf8=utf8)}")
        block += [
            f"Final-Recipient: {_final_recipient(rcpt.address, utf8=utf8)}",
            f"Action: {action.value}",
            f"Status: {result.status}",
        ]
        if result.remote:
            block.append(f"Remote-MTA: dns; {clean(_mta_name(result.remote))}")
        if result.reply:  # the remote's own words (`Result.reply`)
            block.append(f"Diagnostic-Code: smtp; {clean(result.reply)}")
        else:
            block.append(f"Diagnostic-Code: X-Leafmail; {clean(result.line)}")
        block.append(f"Last-Attempt-Date: {_date(now)}")
        if action is Action.DELAYED and retry_until is not None:
            block.append(f"Will-Retry-Until: {_date(retry_until)}")
        blocks.append(_lines(block))
    return b"\r\n".join(blocks)


def _part(content_type: str, encoding: str, payload: bytes) -> bytes:
    head = f"Content-Type: {content_type}\r\nContent-Transfer-Encoding: {encoding}\r\n\r\n"
    if not payload.endswith(b"\r\n"):
        payload += b"\r\n"
    return head.encode() + payload


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
    return f"{addr_type};" + utf8_addr_xtext(address, unitext=utf8)[:900]


def _final_recipient(address: str, *, utf8: bool) -> str:
    r"""Final-Recipient's type and address: rfc822 for ASCII, else RFC 6533's utf-8 type.

    A UTF-8 address can reach a report that is not a global one (an ASCII message an
    alias sent on to it, spooled before such copies were marked SMTPUTF8): there it is
    utf-8-addr-xtext, ASCII with ``\x{HEX}`` escapes (RFC 6533 3), so the part stays the
    7-bit message/delivery-status it says it is.
    """
    if address.isascii():
        return f"rfc822; {address}"
    return f"utf-8; {address if utf8 else utf8_addr_xtext(address)[:900]}"


def _mta_name(remote: str) -> str:
    """Remote-MTA's name (RFC 3464 2.3.5) for "host:port" or "[v6]:port": the host's
    name, or, for a host known only by its address, an address literal as SMTP writes
    one (RFC 5321 4.1.3): a bare address would read as a name, and a bare IPv6 address
    is none at all."""
    if remote.startswith("["):
        host = remote[1 : remote.find("]")] if "]" in remote else remote
    else:
        host = remote.rsplit(":", 1)[0] if remote.count(":") == 1 else remote
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host
    return f"[IPv6:{address}]" if address.version == 6 else f"[{address}]"


def _angle(address: str) -> str:
    return f"<{address}>"


def _date(epoch: float) -> str:
    return format_datetime(datetime.fromtimestamp(epoch, UTC))
