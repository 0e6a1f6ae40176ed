"""MAIL and RCPT parameters (RFC 5321 4.1.1.11, 4.1.2) and the xtext they are written in.

Parameters (``KEY=VALUE`` after the path, which `netserver.smtp.addresses.split_path`
separates) are split by `parse_parameters` and then checked by `mail_parameters` /
`rcpt_parameters`: SIZE, BODY, SMTPUTF8, RET, ENVID and AUTH on MAIL; NOTIFY and ORCPT
on RCPT, with the xtext of RFC 3461 4 decoded.

Errors raise `RemoteProtocolError` carrying the reply: 501 for syntax, 555 for an
unknown parameter.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum
from typing import TypeVar

from .addresses import _ATEXT, _CONTROL, _KEYWORD
from .replies import (
    DUPLICATE_PARAMETER,
    RemoteProtocolError,
    syntax_error,
    unsupported_parameter,
)

__all__ = [
    "MAX_ENVID",
    "MAX_ORCPT",
    "Body",
    "MailParameters",
    "Notify",
    "OriginalRecipient",
    "RcptParameters",
    "Ret",
    "mail_parameters",
    "parse_parameters",
    "rcpt_parameters",
    "utf8_addr_xtext",
    "xtext_decode",
    "xtext_encode",
]

MAX_ENVID = 100  # characters of the xtext value, RFC 3461 4.4
MAX_ORCPT = 500  # characters of the value, RFC 3461 4.2

_HEX = frozenset("0123456789ABCDEFabcdef")
_E = TypeVar("_E", bound=Enum)


# --- parameters --------------------------------------------------------------------


class Body(Enum):
    """BODY= values this server accepts (RFC 6152); BINARYMIME is not offered."""

    SEVENBIT = "7BIT"
    EIGHTBITMIME = "8BITMIME"


class Ret(Enum):
    """RET= of RFC 3461 4.3: what a DSN should return of the message."""

    FULL = "FULL"
    HDRS = "HDRS"


class Notify(Enum):
    """NOTIFY= keywords of RFC 3461 4.1; NEVER stands alone."""

    NEVER = "NEVER"
    SUCCESS = "SUCCESS"
    FAILURE = "FAILURE"
    DELAY = "DELAY"


@dataclass(frozen=True, slots=True)
class OriginalRecipient:
    """ORCPT=addr-type;address of RFC 3461 4.2, with the xtext decoded."""

    addr_type: str
    address: str


@dataclass(frozen=True, slots=True)
class MailParameters:
    """The validated parameters of MAIL FROM.  None means "not given"."""

    size: int | None = None
    body: Body | None = None
    smtputf8: bool = False
    ret: Ret | None = None
    envid: str | None = None
    auth: str | None = None  # RFC 4954 5: AUTH=<mailbox> or "<>", xtext decoded


@dataclass(frozen=True, slots=True)
class RcptParameters:
    """The validated parameters of RCPT TO.  None means "not given"."""

    notify: frozenset[Notify] | None = None
    orcpt: OriginalRecipient | None = None


_MAIL_KEYWORDS = frozenset({"SIZE", "BODY", "SMTPUTF8", "RET", "ENVID", "AUTH"})
_RCPT_KEYWORDS = frozenset({"NOTIFY", "ORCPT"})


def parse_parameters(text: str, *, utf8: bool) -> dict[str, str | None]:
    """Split ``KEY=VALUE KEY ...`` into a dict with upper-cased keys (RFC 5321 4.1.2).

    esmtp-keyword = (ALPHA / DIGIT) *(ALPHA / DIGIT / "-"); esmtp-value is one or more
    characters from 33 to 126 except "=", plus UTF-8 when SMTPUTF8 is in force
    (RFC 6531 3.3).  A keyword given twice is a syntax error.
    """
    params: dict[str, str | None] = {}
    for item in text.split(" "):
        if not item:
            continue
        keyword, equals, value = item.partition("=")
        if not _KEYWORD.fullmatch(keyword):
            # !a (ascii): the item may hold what a reply line must not (a control
            # character), and reply text is ASCII (RFC 5321 4.2): a client that did not
            # ask for SMTPUTF8 gets no UTF-8 back
            raise RemoteProtocolError(syntax_error(f"Bad parameter syntax: {item[:40]!a}"))
        if equals and not _valid_value(value, utf8=utf8):
            raise RemoteProtocolError(syntax_error(f"Bad value for parameter {keyword}"))
        key = keyword.upper()
        if key in params:
            raise RemoteProtocolError(DUPLICATE_PARAMETER)
        params[key] = value if equals else None
    return params


def _valid_value(value: str, *, utf8: bool) -> bool:
    if not value:
        return False
    return all((33 <= ord(c) <= 126 and c != "=") or (utf8 and ord(c) > 0x7F) for c in value)


def mail_parameters(raw: dict[str, str | None], *, allow_auth: bool) -> MailParameters:
    """Validate MAIL FROM parameters; unknown keywords get 555, bad values 501.

    ``allow_auth`` says whether AUTH was advertised in this session, which is what
    makes the AUTH= parameter of RFC 4954 5 known.
    """
    known = _MAIL_KEYWORDS if allow_auth else _MAIL_KEYWORDS - {"AUTH"}
    for key in raw:
        if key not in known:
            raise RemoteProtocolError(unsupported_parameter(key))
    return MailParameters(
        size=_size(raw),
        body=_choice(raw, "BODY", Body),
        smtputf8=_flag(raw, "SMTPUTF8"),
        ret=_choice(raw, "RET", Ret),
        envid=_envid(raw),
        auth=_auth(raw),
    )


def rcpt_parameters(raw: dict[str, str | None], *, utf8: bool) -> RcptParameters:
    """Validate RCPT TO parameters: NOTIFY and ORCPT; anything else gets 555."""
    for key in raw:
        if key not in _RCPT_KEYWORDS:
            raise RemoteProtocolError(unsupported_parameter(key))
    return RcptParameters(notify=_notify(raw), orcpt=_orcpt(raw, utf8=utf8))


def _value(raw: dict[str, str | None], key: str) -> str | None:
    """The value of ``key``, None when absent; a keyword without a value is an error."""
    if key not in raw:
        return None
    value = raw[key]
    if value is None:
        raise RemoteProtocolError(syntax_error(f"{key} requires a value"))
    return value


def _size(raw: dict[str, str | None]) -> int | None:
    value = _value(raw, "SIZE")
    if value is None:
        return None
    # size-value ::= 1*20DIGIT (RFC 1870 3)
    if not (value.isascii() and value.isdigit() and len(value) <= 20):
        raise RemoteProtocolError(syntax_error("SIZE requires a number"))
    return int(value)


def _choice(raw: dict[str, str | None], key: str, enum: type[_E]) -> _E | None:
    value = _value(raw, key)
    if value is None:
        return None
    try:
        return enum(value.upper())
    except ValueError:
        raise RemoteProtocolError(syntax_error(f"Unsupported {key} value")) from None


def _flag(raw: dict[str, str | None], key: str) -> bool:
    if key not in raw:
        return False
    if raw[key] is not None:
        raise RemoteProtocolError(syntax_error(f"{key} takes no value"))
    return True


def _envid(raw: dict[str, str | None]) -> str | None:
    value = _value(raw, "ENVID")
    if value is None:
        return None
    if len(value) > MAX_ENVID:
        raise RemoteProtocolError(syntax_error(f"ENVID longer than {MAX_ENVID} characters"))
    decoded = _decode_or_fail(value, "ENVID")
    # The envelope id is printable US-ASCII once decoded (RFC 3461 4.4).
    if not all(32 <= ord(c) <= 126 for c in decoded):
        raise RemoteProtocolError(syntax_error("ENVID must be printable ASCII"))
    return decoded


def _auth(raw: dict[str, str | None]) -> str | None:
    value = _value(raw, "AUTH")
    return None if value is None else _decode_or_fail(value, "AUTH")


def _notify(raw: dict[str, str | None]) -> frozenset[Notify] | None:
    value = _value(raw, "NOTIFY")
    if value is None:
        return None
    try:
        items = frozenset(Notify(part.upper()) for part in value.split(","))
    except ValueError:
        raise RemoteProtocolError(syntax_error("Bad NOTIFY value")) from None
    if Notify.NEVER in items and len(items) > 1:
        raise RemoteProtocolError(syntax_error("NOTIFY=NEVER cannot be combined"))
    return items


def _orcpt(raw: dict[str, str | None], *, utf8: bool) -> OriginalRecipient | None:
    value = _value(raw, "ORCPT")
    if value is None:
        return None
    if len(value) > MAX_ORCPT:
        raise RemoteProtocolError(syntax_error(f"ORCPT longer than {MAX_ORCPT} characters"))
    addr_type, semicolon, encoded = value.partition(";")
    if not semicolon or not encoded or not addr_type or not all(c in _ATEXT for c in addr_type):
        raise RemoteProtocolError(syntax_error("Syntax: ORCPT=addr-type;address"))
    address = _decode_or_fail(encoded, "ORCPT", unitext=utf8)
    if addr_type.lower() == "utf-8":
        address = _decode_unicode_escapes(address)
    if _CONTROL.search(address):
        raise RemoteProtocolError(syntax_error("Control character in ORCPT"))
    return OriginalRecipient(addr_type, address)


def _decode_or_fail(value: str, key: str, *, unitext: bool = False) -> str:
    try:
        return xtext_decode(value, allow_utf8=unitext)
    except ValueError:
        raise RemoteProtocolError(syntax_error(f"Bad xtext in {key}")) from None


_UNICODE_ESCAPE = re.compile(r"\\x\{([0-9A-Fa-f]{1,6})\}")


def _decode_unicode_escapes(text: str) -> str:
    r"""Undo the ``\x{HEX}`` escapes of utf-8-addr-xtext (RFC 6533 3)."""

    def char(match: re.Match[str]) -> str:
        point = int(match.group(1), 16)
        if point > 0x10FFFF or 0xD800 <= point <= 0xDFFF:
            raise RemoteProtocolError(syntax_error("Bad escape in ORCPT"))
        return chr(point)

    return _UNICODE_ESCAPE.sub(char, text)


def utf8_addr_xtext(address: str, *, unitext: bool = False) -> str:
    r"""An address of ORCPT's type utf-8 as RFC 6533 3 writes it (the inverse of the
    decoding above): utf-8-addr-xtext, ASCII only, where every character outside QCHAR
    (33..126 but "+", "=" and "\") is ``\x{HEX}``. With `unitext` (utf-8-addr-unitext,
    for a message/global-delivery-status) printable non-ASCII stays as it is.
    """
    return "".join(_qchar(char, unitext) for char in address)


def _qchar(char: str, unitext: bool) -> str:
    point = ord(char)
    if (0x21 <= point <= 0x7E and char not in "+=\\") or (
        unitext and point > 0x7F and char.isprintable()
    ):
        return char
    return f"\\x{{{point:X}}}"


# --- xtext -------------------------------------------------------------------------


def xtext_decode(text: str, *, allow_utf8: bool = False) -> str:
    """Decode xtext (RFC 3461 4): ``+HH`` is an octet, other characters stand for themselves.

    Literal characters must be in 33..126 and not "+" or "="; the octets that result
    must be UTF-8.  Lower-case hex digits are accepted although the RFC writes upper
    case.  With ``allow_utf8`` raw non-ASCII is also taken (RFC 6533 unitext).
    Raises ValueError on anything else.
    """
    out = bytearray()
    i = 0
    while i < len(text):
        char = text[i]
        if char == "+":
            pair = text[i + 1 : i + 3]
            if len(pair) != 2 or not all(c in _HEX for c in pair):
                raise ValueError("bad +HH escape in xtext")
            out.append(int(pair, 16))
            i += 3
            continue
        if 33 <= ord(char) <= 126 and char != "=":
            out.append(ord(char))
        elif allow_utf8 and ord(char) > 0x7F:
            out += char.encode("utf-8")
        else:
            raise ValueError(f"character {char!r} not allowed in xtext")
        i += 1
    return out.decode("utf-8")


def xtext_encode(text: str) -> str:
    """Encode text as xtext: every octet outside 33..126, "+" and "=" becomes ``+HH``."""
    out = []
    for octet in text.encode("utf-8"):
        if 33 <= octet <= 126 and octet not in (0x2B, 0x3D):
            out.append(chr(octet))
        else:
            out.append(f"+{octet:02X}")
    return "".join(out)
