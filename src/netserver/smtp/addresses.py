"""Envelope addresses: the paths of MAIL and RCPT (RFC 5321 4.1.2, 4.5.3.1).

The parser follows the ABNF of RFC 5321 4.1.2, extended by RFC 6531 for SMTPUTF8:

* ``<>`` is the null reverse-path; ``<Postmaster>`` (any case) is a valid forward-path.
* A local part is a dot-string or a quoted string (``"a b"@example.org``) and is kept
  *as transmitted*, quotes and backslashes included, because that is the form a relay
  must hand on.  Inside it ``%``, ``!`` and a quoted ``@`` are ordinary characters: the
  domain is only ever what follows the last unquoted ``@``.  Relay control depends on
  that, since ``<"victim@elsewhere"@local>`` and ``<victim%elsewhere@local>`` are
  addressed to *local*, and must be judged as such.
* The domain is a host name or an address literal (``[192.0.2.1]``,
  ``[IPv6:2001:db8::1]``, or a general ``[tag:content]`` literal).
* A source route (``<@relay1,@relay2:user@example.org>``) is parsed and dropped, as
  RFC 5321 4.1.1.3 and appendix C tell a server to.
* Limits of 4.5.3.1: 64 octets of local part, 255 of domain, 256 for the whole path.
* Non-ASCII is allowed in the local part and the domain (U-labels) only when the
  transaction declared SMTPUTF8; control characters, NUL and DEL never.

The parameters after the path (``KEY=VALUE``) are `netserver.smtp.parameters`' to parse;
`split_path` here separates them from the path.

Errors raise `RemoteProtocolError` carrying the reply: 501 for syntax, 553 5.6.7 for
non-ASCII without SMTPUTF8.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

from .replies import (
    NON_ASCII_ADDRESS,
    RemoteProtocolError,
    Reply,
    syntax_error,
)

__all__ = [
    "MAX_DOMAIN",
    "MAX_LOCAL_PART",
    "MAX_PATH",
    "Mailbox",
    "parse_forward_path",
    "parse_reverse_path",
    "split_path",
]

MAX_LOCAL_PART = 64  # octets, RFC 5321 4.5.3.1.1
MAX_DOMAIN = 255  # octets, RFC 5321 4.5.3.1.2
MAX_PATH = 256  # octets including "<", ">" and any source route, RFC 5321 4.5.3.1.3
MAX_LABEL = 63  # octets of one ASCII label (RFC 1035 2.3.4)

# atext of RFC 5322 3.2.3, which RFC 5321 4.1.2 reuses for Atom.
_LETTERS_DIGITS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
_ATEXT = frozenset(_LETTERS_DIGITS + "!#$%&'*+-/=?^_`{|}~")
_LDH = frozenset(_LETTERS_DIGITS + "-")
# C0, DEL and the C1 controls (which UTF-8 could otherwise smuggle in with SMTPUTF8),
# and lone surrogates: what surrogateescape made of bytes that were not UTF-8.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\ud800-\udfff]")
_KEYWORD = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]*")
_IPV4 = re.compile(r"([0-9]{1,3})\.([0-9]{1,3})\.([0-9]{1,3})\.([0-9]{1,3})")
_IPV6_CHARS = re.compile(r"[0-9A-Fa-f:.]+")


class _Invalid(Exception):
    """Internal: why a path failed, turned into a reply by the public functions."""

    def __init__(self, reason: str, *, non_ascii: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.non_ascii = non_ascii


@dataclass(frozen=True, slots=True)
class Mailbox:
    """A parsed mailbox: the local part as transmitted, and the parsed domain.

    ``domain`` is a host name, or an address literal with its brackets; it is empty
    only for the special recipient ``<Postmaster>`` (RFC 5321 4.1.1.3), which means
    the postmaster of this host.
    """

    local: str
    domain: str

    def __str__(self) -> str:
        return f"{self.local}@{self.domain}" if self.domain else self.local

    @property
    def is_address_literal(self) -> bool:
        """True for ``user@[192.0.2.1]`` style mailboxes."""
        return self.domain.startswith("[")

    @property
    def is_ascii(self) -> bool:
        """False when the mailbox needs SMTPUTF8 to be relayed."""
        return self.local.isascii() and self.domain.isascii()

    @property
    def local_unquoted(self) -> str:
        """The local part with quoting undone: ``"a\\"b"`` becomes ``a"b``."""
        if not self.local.startswith('"'):
            return self.local
        return re.sub(r"\\(.)", r"\1", self.local[1:-1])


# --- paths -------------------------------------------------------------------------


def split_path(text: str) -> tuple[str, str]:
    """Split ``<path> params`` into the path (with brackets) and the parameter text.

    The closing ``>`` is looked for only after a quoted local part and an address
    literal, either of which may itself contain ``>`` or spaces.
    """
    if not text.startswith("<"):
        raise RemoteProtocolError(syntax_error("Syntax: address must be enclosed in <>"))
    i = 1
    if text.startswith("<@"):
        i = text.find(":") + 1  # a source route holds domains only, so no ":" or quote
    if text[i : i + 1] == '"':
        i = _skip_quoted(text, i)
    at = text.find("@", i, text.find(">", i))
    if at >= 0 and text[at + 1 : at + 2] == "[":
        i = text.find("]", at) + 1 or i
    close = text.find(">", i)
    if close < 0 or i == 0:
        raise RemoteProtocolError(syntax_error("Syntax: missing >"))
    rest = text[close + 1 :]
    if rest and not rest.startswith(" "):
        raise RemoteProtocolError(syntax_error("Syntax: space expected after >"))
    return text[: close + 1], rest.strip(" ")


def _skip_quoted(text: str, start: int) -> int:
    """Index after the quoted string opening at ``start``, or ``len(text)`` if unclosed."""
    i = start + 1
    while i < len(text):
        if text[i] == "\\":
            i += 2
        elif text[i] == '"':
            return i + 1
        else:
            i += 1
    return len(text)


def parse_reverse_path(path: str, *, utf8: bool) -> Mailbox | None:
    """Parse a MAIL FROM path; ``<>`` gives None (the null sender, RFC 5321 4.5.5)."""
    if path == "<>":
        return None
    try:
        return _parse_path(path, utf8=utf8)
    except _Invalid as exc:
        raise RemoteProtocolError(_path_reply(exc, "5.1.7", "sender")) from None


def parse_forward_path(path: str, *, utf8: bool) -> Mailbox:
    """Parse a RCPT TO path, including the special ``<Postmaster>``."""
    if path[1:-1].lower() == "postmaster" and path.startswith("<") and path.endswith(">"):
        return Mailbox(path[1:-1], "")
    try:
        return _parse_path(path, utf8=utf8)
    except _Invalid as exc:
        raise RemoteProtocolError(_path_reply(exc, "5.1.3", "recipient")) from None


def _path_reply(exc: _Invalid, enhanced: str, role: str) -> Reply:
    if exc.non_ascii:
        return NON_ASCII_ADDRESS
    return Reply(501, enhanced, f"Bad {role} address syntax: {exc.reason}")


def _parse_path(path: str, *, utf8: bool) -> Mailbox:
    """Path = "<" [ A-d-l ":" ] Mailbox ">" within the length limits."""
    if _CONTROL.search(path):
        raise _Invalid("control character")
    if not utf8 and not path.isascii():
        raise _Invalid("non-ASCII", non_ascii=True)
    if len(path.encode("utf-8")) > MAX_PATH:
        raise _Invalid(f"path longer than {MAX_PATH} octets")
    if len(path) < 2 or path[0] != "<" or path[-1] != ">":
        raise _Invalid("address must be enclosed in <>")
    inner = path[1:-1]
    if inner.startswith("@"):
        inner = _drop_source_route(inner, utf8=utf8)
    return _parse_mailbox(inner, utf8=utf8)


def _drop_source_route(text: str, *, utf8: bool) -> str:
    """Check and discard ``@a,@b:`` (A-d-l), returning the mailbox after the colon."""
    route, colon, rest = text.partition(":")
    if not colon:
        raise _Invalid("source route without ':'")
    for hop in route.split(","):
        if not hop.startswith("@"):
            raise _Invalid("bad source route")
        _check_domain(hop[1:], utf8=utf8)
    return rest


def _parse_mailbox(text: str, *, utf8: bool) -> Mailbox:
    """Mailbox = Local-part "@" ( Domain / address-literal )."""
    if text.startswith('"'):
        end = _quoted_string_end(text, utf8=utf8)
        local = text[:end]
    else:
        local = text.split("@", 1)[0]
        _check_dot_string(local, utf8=utf8)
    rest = text[len(local) :]
    if not rest.startswith("@"):
        raise _Invalid("missing @domain")
    domain = rest[1:]
    if len(local.encode("utf-8")) > MAX_LOCAL_PART:
        raise _Invalid(f"local part longer than {MAX_LOCAL_PART} octets")
    if domain.startswith("["):
        _check_address_literal(domain)
    else:
        _check_domain(domain, utf8=utf8)
    return Mailbox(local, domain)


def _is_atext(char: str, utf8: bool) -> bool:
    return char in _ATEXT or (utf8 and ord(char) > 0x7F)


def _check_dot_string(text: str, *, utf8: bool) -> None:
    """Dot-string = Atom *("." Atom): no empty atom, so no leading, trailing or double dot."""
    if not text:
        raise _Invalid("empty local part")
    for atom in text.split("."):
        if not atom:
            raise _Invalid("misplaced '.' in local part")
        for char in atom:
            if not _is_atext(char, utf8):
                raise _Invalid(f"character {char!r} not allowed in local part")


def _quoted_string_end(text: str, *, utf8: bool) -> int:
    """Index just past the closing quote of the Quoted-string that starts ``text``."""
    i = 1
    while i < len(text):
        char = text[i]
        if char == "\\":
            if i + 1 >= len(text) or not 32 <= ord(text[i + 1]) <= 126:
                raise _Invalid("bad quoted pair in local part")
            i += 2
            continue
        if char == '"':
            if i == 1:
                # An empty quoted local part is grammatical but delivers nowhere.
                raise _Invalid("empty local part")
            return i + 1
        if not (32 <= ord(char) <= 126 or (utf8 and ord(char) > 0x7F)):
            raise _Invalid(f"character {char!r} not allowed in quoted local part")
        i += 1
    raise _Invalid("unterminated quoted local part")


def _check_domain(domain: str, *, utf8: bool) -> None:
    """Domain = sub-domain *("." sub-domain); a sub-domain may be a U-label with SMTPUTF8."""
    if not domain:
        raise _Invalid("empty domain")
    if len(domain.encode("utf-8")) > MAX_DOMAIN:
        raise _Invalid(f"domain longer than {MAX_DOMAIN} octets")
    for label in domain.split("."):
        _check_label(label, utf8=utf8)


def _check_label(label: str, *, utf8: bool) -> None:
    """Let-dig [Ldh-str]: letters, digits and inner hyphens (and non-ASCII in U-labels)."""
    if not label:
        raise _Invalid("empty domain label")
    if label[0] == "-" or label[-1] == "-":
        raise _Invalid("domain label starts or ends with '-'")
    for char in label:
        if char not in _LDH and not (utf8 and ord(char) > 0x7F):
            raise _Invalid(f"character {char!r} not allowed in domain")
    # An A-label (or plain label) is limited to 63 octets; the length of a U-label's
    # A-label form is only known after IDNA conversion, which is left to delivery.
    if label.isascii() and len(label) > MAX_LABEL:
        raise _Invalid(f"domain label longer than {MAX_LABEL} octets")


def _check_address_literal(literal: str) -> None:
    """address-literal: ``[IPv4]``, ``[IPv6:...]`` or ``[tag:content]`` (RFC 5321 4.1.3)."""
    if len(literal) < 3 or not literal.endswith("]"):
        raise _Invalid("bad address literal")
    body = literal[1:-1]
    match = _IPV4.fullmatch(body)
    if match:
        if any(int(part) > 255 for part in match.groups()):
            raise _Invalid("bad IPv4 address literal")
        return
    tag, colon, content = body.partition(":")
    if not colon or not content:
        raise _Invalid("bad address literal")
    if tag.lower() == "ipv6":
        _check_ipv6(content)
        return
    # General-address-literal = Standardized-tag ":" 1*dcontent
    if not _KEYWORD.fullmatch(tag) or tag.endswith("-"):
        raise _Invalid("bad address literal tag")
    if any(not (33 <= ord(c) <= 90 or 94 <= ord(c) <= 126) for c in content):
        raise _Invalid("bad address literal")


def _check_ipv6(text: str) -> None:
    # ipaddress accepts a "%scope" suffix, which is no part of the SMTP grammar, so the
    # characters are checked first.
    if not _IPV6_CHARS.fullmatch(text):
        raise _Invalid("bad IPv6 address literal")
    try:
        ipaddress.IPv6Address(text)
    except ValueError:
        raise _Invalid("bad IPv6 address literal") from None
    if "::" in text and _ipv6_groups(text) > 6:
        # RFC 5321 4.1.3: "::" stands for at least 2 groups, so 6 more at most;
        # ipaddress also lets it stand for one.
        raise _Invalid("bad IPv6 address literal")


def _ipv6_groups(text: str) -> int:
    """The 16-bit groups written out (an IPv4 tail is two)."""
    parts = [p for p in text.replace("::", ":").split(":") if p]
    return sum(2 if "." in p else 1 for p in parts)
