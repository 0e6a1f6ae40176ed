"""Trace fields (RFC 5321 4.4): the Received field leafmail adds to every accepted message.

    Received: from client.example (client.example [192.0.2.1])
            by mail.example (leafmail) with ESMTPS id 0123456789ABCDEF01234567
            for <rcpt@example>; Wed, 25 Nov 2026 21:00:00 +0000

The "from" name is what the client said in EHLO; the bracketed address is what the
server saw, so a reader can tell a claimed name from the real origin. Text that came
from the client is reduced to printable characters so it cannot fold or inject lines,
and to graphic ones so Unicode separators, bidi or format controls cannot disguise it.

`header_section` is where trace fields are read back: the loop checks count Received
fields (`count_received`) at the end of DATA and in sendmail, and look for Delivered-To
in local delivery, on both sides of the spool, so it lives here rather than with
either; so does `MAX_LINE`, the line limit the RFC 5322 check enforces and sendmail's
header completion keeps to.
"""

from __future__ import annotations

import email.utils
import re
import time
import unicodedata
from collections.abc import Sequence
from datetime import UTC, datetime

MAX_LINE = 998  # octets in a line of a message, CRLF not counted (RFC 5322 2.1.1)
MAX_HOPS = 100  # Received fields a message may carry before it is taken for a loop
_RECEIVED = re.compile(rb"^received[ \t]*:", re.IGNORECASE | re.MULTILINE)
# The C0 and C1 controls, DEL and (but for _KEEP_SPACE) the space: the complement of the
# graphic ASCII and U+00A0 onwards, written as the few it is. The complement form,
# [^\x21-\x7e\u00a0-\U0010ffff], matches the same, but compiling its range took 4 ms of
# CPU apiece at every start of every leafmail command (`leafmail sendmail` included).
_UNSAFE = re.compile(r"[\x00-\x20\x7f-\x9f]")
_UNSAFE_KEEP_SPACE = re.compile(r"[\x00-\x1f\x7f-\x9f]")
# Characters with a meaning in the Received field: "(" and ")" around the comment, ";"
# before the date, "<", ">", '"', "\\" and "@" of addresses. An EHLO name (one token, but
# any printable one) that held them could close the comment, start the date early or
# pose as another clause, so readers of the trace would parse text the client wrote.
# Postfix's smtpd writes the same characters of the HELO name as "?".
_TRACE_SPECIALS = r'()<>;"\\@'
_UNSAFE_HELO = re.compile(rf"[\x00-\x20\x7f-\x9f]|[{_TRACE_SPECIALS}]")
# Without SMTPUTF8 the message is ASCII (or 8BITMIME), and a UTF-8 EHLO name must not
# make it need SMTPUTF8 at the next hop (RFC 6531), so the name loses what is not ASCII.
_UNSAFE_HELO_ASCII = re.compile(rf"[^\x21-\x7e]|[{_TRACE_SPECIALS}]")


_last_date: tuple[int, str] = (-1, "")


def _date(second: int) -> str:
    """The RFC 5322 date of `second`, made once a second (every message in it shares it)."""
    global _last_date
    if _last_date[0] != second:
        when = datetime.fromtimestamp(second, UTC)
        # "+0000": UTC, not the "-0000" of an unknown zone.
        _last_date = (second, email.utils.format_datetime(when))
    return _last_date[1]


# What is not ASCII must also be a graphic character: a letter, mark, number,
# punctuation or symbol (Unicode categories L, M, N, P, S). The rest -- U+2028 and U+2029
# (which some readers take for line ends), the bidi controls that reorder what a reader
# sees (U+202A-202E, U+2066-2069), zero-width and other format characters (Cf), spaces
# other than ASCII's (Zs), private-use, unassigned and surrogate code points -- would let
# a client's text look like something else; they become "?" as the ASCII controls do.
_GRAPHIC = frozenset("LMNPS")


def _clean(text: str, pattern: re.Pattern[str] = _UNSAFE) -> str:
    cleaned = pattern.sub("?", text)
    if not cleaned.isascii():
        cleaned = "".join(_graphic(char) for char in cleaned)
    return cleaned[:255] or "unknown"


def _graphic(char: str) -> str:
    """`char` if it is ASCII or graphic, else "?" (ASCII was judged by the pattern)."""
    if char < "\x80" or unicodedata.category(char)[0] in _GRAPHIC:
        return char
    return "?"


def header_section(data: bytes) -> bytes:
    """The header section with its last CRLF, up to the empty line (all of it if none)."""
    if data.startswith(b"\r\n"):
        return b""
    end = data.find(b"\r\n\r\n")
    return data if end < 0 else data[: end + 2]


def count_received(data: bytes) -> int:
    """How many Received header fields the message carries (RFC 5321 6.3's loop count)."""
    return len(_RECEIVED.findall(header_section(data)))


def received_header(
    *,
    helo: str | None,
    client_ip: str | None,
    hostname: str,
    protocol: str,
    qid: str,
    recipients: Sequence[str],
    tls: str | None = None,
    timestamp: float | None = None,
    utf8: bool = False,
) -> bytes:
    """The header field, folded, ending in CRLF; UTF-8 only in an SMTPUTF8 message."""
    source = _address_literal(client_ip) if client_ip else "localhost"
    name = _clean(helo or "unknown", _UNSAFE_HELO if utf8 else _UNSAFE_HELO_ASCII)
    lines = [f"Received: from {name} ({source})"]
    via = f"by {_clean(hostname)} (leafmail) with {protocol} id {qid}"
    if tls:
        via += " (" + " ".join(_clean(word) for word in tls.split()) + ")"
    lines.append("\t" + via)
    return _finished(lines, recipients, timestamp)


def _address_literal(ip: str) -> str:
    """RFC 5321 4.1.3's address-literal: "[192.0.2.1]", or "[IPv6:2001:db8::1]" (an
    IPv6 address needs its tag; Postfix writes it so too)."""
    return f"[IPv6:{ip}]" if ":" in ip else f"[{ip}]"


def local_received_header(
    *,
    hostname: str,
    uid: int,
    qid: str,
    recipients: Sequence[str],
    protocol: str | None,
    timestamp: float | None = None,
) -> bytes:
    """The field of a local submission (sendmail, the submission socket), as Postfix's
    pickup writes it. There is no client host: the trace is the user id, which the
    kernel vouches for (RFC 5321 4.4 lets the "from" clause go; the comment names it)."""
    lines = [f"Received: by {_clean(hostname)} (leafmail, from userid {uid})"]
    lines.append(f"\twith {protocol} id {qid}" if protocol else f"\tid {qid}")
    return _finished(lines, recipients, timestamp)


def _finished(lines: list[str], recipients: Sequence[str], timestamp: float | None) -> bytes:
    """The field's last line: "for <rcpt>" only when there is one recipient (naming
    several would tell each who else got it), then the date; folded with CRLF TAB."""
    date = _date(int(time.time() if timestamp is None else timestamp))
    if len(recipients) == 1:
        # A quoted local part may hold a space; control characters still go.
        lines.append(f"\tfor <{_clean(recipients[0], _UNSAFE_KEEP_SPACE)}>; {date}")
    else:
        lines[-1] += ";"
        lines.append(f"\t{date}")
    return ("\r\n".join(lines) + "\r\n").encode("utf-8")
