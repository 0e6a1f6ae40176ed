"""Matching one request against hosts_access(5) patterns, with tcpd's exact semantics.

The rules of the language are tcpd's (Debian 7.6.q), checked against tcpdmatch:

* ``list_match``: the first matching element decides; ``a EXCEPT b EXCEPT c`` is
  ``a EXCEPT (b EXCEPT c)``; an element after EXCEPT is never a positive match;
* a host pattern is compared with the client's address text and, unless it is made
  only of digits, dots and slashes, with its host name too (so ``.1`` matches the
  address 10.0.0.1, and ``.example.com`` makes tcpd look the name up);
* ``ALL``, ``KNOWN``, ``LOCAL`` and ``EXCEPT`` are keywords in any case; ``UNKNOWN`` and
  ``PARANOID`` are not keywords at all: they match because tcpd's names for a failed or
  inconsistent lookup are the strings "unknown" and "paranoid";
* ``n.n.n.n/m.m.m.m``, ``n.n.n.n/len`` and ``[v6]/len`` follow tcpd's parsing quirks
  (inet_addr accepts octal and hex parts; 255.255.255.255 is no valid mask; a /0 IPv4
  prefix matches nothing; an IPv4 net with host bits set never matches, an IPv6 one is
  masked first; an IPv6 prefix is read like atoi, so ``/`` alone is /0);
* ``*`` and ``?`` wildcards (ASCII case-insensitive) take precedence over ``.suffix``
  and ``prefix.`` forms, and a pattern with ``/`` is only ever a net/mask.

Host names are looked up lazily, as tcpd does: `HostInfo.name` raises `NameNeeded`
when a pattern needs a name that has not been looked up.  The caller looks it up (off
the accept path) and evaluates again; evaluation is pure, so a retry is harmless.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from .parse import fold, split_at

__all__ = [
    "PARANOID",
    "UNKNOWN",
    "HostInfo",
    "NameNeeded",
    "Request",
    "client_match",
    "host_match",
    "list_match",
    "server_match",
    "string_match",
    "wildcard_match",
]

UNKNOWN = "unknown"
PARANOID = "paranoid"
_NUMERIC = frozenset("01234567890./")
_INADDR_NONE = 0xFFFFFFFF


class NameNeeded(Exception):
    """A pattern or expansion needs the name of *role* ("client" or "server")."""

    def __init__(self, role: str) -> None:
        super().__init__(role)
        self.role = role


def hostname_known(name: str) -> bool:
    """tcpd's HOSTNAME_KNOWN: neither of its two names for "no usable name"."""
    return fold(name) not in (UNKNOWN, PARANOID)


@dataclass
class HostInfo:
    """One end of the connection as tcpd sees it: address text, port, lazy name.

    *resolved* is the looked-up name (a name, "unknown" or "paranoid"), None while no
    lookup has been made.  *evaluated* records whether this evaluation pass asked for
    the name: tcpd's %h gives the name only after something looked it up.
    """

    role: str
    addr: str = UNKNOWN
    port: int = 0
    resolved: str | None = None
    evaluated: bool = False

    def name(self) -> str:
        """The host name (eval_hostname); raises NameNeeded until it is looked up."""
        if self.resolved is None:
            raise NameNeeded(self.role)
        self.evaluated = True
        return self.resolved

    def info(self) -> str:
        """The name if one was asked for and is usable, else the address (eval_hostinfo)."""
        if self.evaluated and self.resolved is not None and hostname_known(self.resolved):
            return self.resolved
        return self.addr


@dataclass
class Request:
    """What a decision is about: daemon, client, server and the (unknown) user.

    *patterns* maps ``/file`` patterns to their contents, read at load time.  With
    *names_first* set, both names must be resolved before a pass starts.
    """

    daemon: str
    client: HostInfo = field(default_factory=lambda: HostInfo("client"))
    server: HostInfo = field(default_factory=lambda: HostInfo("server"))
    user: str = UNKNOWN
    pid: int = 0
    patterns: Mapping[str, Sequence[str]] = field(default_factory=dict)
    names_first: bool = False

    def new_pass(self) -> None:
        """Forget which names this pass asked for (kept: the lookups themselves).

        With *names_first* (tcpdmatch, which prints both names before it matches) the
        names count as asked for from the start, which is what %h then shows.
        """
        self.client.evaluated = self.names_first
        self.server.evaluated = self.names_first


# --------------------------------------------------------------------------- lists


def list_match(items: Sequence[str], match: Callable[[str], bool]) -> bool:
    """tcpd's list_match: first match wins, then the EXCEPT part may veto it."""
    for index, item in enumerate(items):
        if fold(item) == "except":
            return False
        if match(item):
            rest = items[index + 1 :]
            for offset, later in enumerate(rest):
                if fold(later) == "except":
                    return not list_match(rest[offset + 1 :], match)
            return True
    return False


def server_match(pattern: str, request: Request) -> bool:
    """A daemon-list element: ``daemon`` or ``daemon@host``."""
    split = split_at(pattern[1:], "@")
    if split is None:
        return string_match(pattern, request.daemon)
    daemon = pattern[0] + split[0]
    return string_match(daemon, request.daemon) and host_match(split[1], request.server, request)


def client_match(pattern: str, request: Request) -> bool:
    """A client-list element: ``host`` or ``user@host`` (the host is checked first)."""
    split = split_at(pattern[1:], "@")
    if split is None:
        return host_match(pattern, request.client, request)
    user = pattern[0] + split[0]
    return host_match(split[1], request.client, request) and string_match(user, request.user)


# --------------------------------------------------------------------------- hosts


def host_match(pattern: str, host: HostInfo, request: Request, depth: int = 0) -> bool:
    """Match one host pattern against an address and, where it may, a name."""
    keyword = fold(pattern)
    if pattern.startswith("@"):
        return False  # NIS netgroups: unsupported, reported when the file is loaded
    if pattern.startswith("/"):
        return depth < 8 and any(
            host_match(inner, host, request, depth + 1)
            for inner in request.patterns.get(pattern, ())
        )
    if keyword == "known":
        name = host.name()
        return fold(host.addr) != UNKNOWN and hostname_known(name)
    if keyword == "local":
        name = host.name()
        return "." not in name and hostname_known(name)
    net_mask = split_at(pattern, "/")
    if net_mask is not None:
        return masked_match(net_mask[0], net_mask[1], host.addr)
    if string_match(pattern, host.addr):
        return True
    return not_inaddr(pattern) and string_match(pattern, host.name())


def not_inaddr(pattern: str) -> bool:
    """tcpd's NOT_INADDR: the pattern has a character other than digits, '.', '/'."""
    return any(char not in _NUMERIC for char in pattern)


def string_match(pattern: str, text: str) -> bool:
    """tcpd's string_match: wildcards, .suffix, ALL, KNOWN, prefix., exact."""
    if "*" in pattern or "?" in pattern:
        return wildcard_match(pattern, text)
    if pattern.startswith("."):
        cut = len(text) - len(pattern)
        return cut > 0 and fold(text[cut:]) == fold(pattern)
    keyword = fold(pattern)
    if keyword == "all":
        return True
    if keyword == "known":
        return fold(text) != UNKNOWN
    if pattern.endswith("."):
        return fold(text[: len(pattern)]) == keyword
    if keyword == fold(text):
        return True
    return _bracketed_v6_equal(pattern, text)


def wildcard_match(pattern: str, text: str) -> bool:
    """``*`` any run, ``?`` one character; ASCII case is ignored (Debian's matcher).

    The text is a host name from a PTR record, which the client chooses. A regular
    expression (``.*`` per ``*``) or tcpd's recursive matcher backtracks over every way
    of placing the stars: ``*-*-*-*.dyn.example.net`` against a 245-character name of
    hyphens cost a second of CPU per connection, each more star a factor of the name's
    length. Retrying from the last star only, as here, is enough for ``*`` (what an
    earlier star would have taken, the last one can take too), so the cost is at most
    the product of the two lengths.
    """
    pattern, text = fold(pattern), fold(text)
    p = t = 0
    star = -1  # where the last star seen is in the pattern
    resume = 0  # the text position that star is tried from next
    while t < len(text):
        if p < len(pattern) and pattern[p] == "*":
            star, resume = p, t
            p += 1
        elif p < len(pattern) and pattern[p] in ("?", text[t]):
            p += 1
            t += 1
        elif star >= 0:
            resume += 1  # the last star takes one more character
            p, t = star + 1, resume
        else:
            return False
    return pattern.count("*", p) == len(pattern) - p


def _bracketed_v6_equal(pattern: str, text: str) -> bool:
    """``[v6]`` equals an IPv6 address numerically (so [::1] matches 0:0::1)."""
    if not (pattern.startswith("[") and pattern.endswith("]")):
        return False
    ours, theirs = _ipv6(pattern[1:-1]), _ipv6(text)
    return ours is not None and ours == theirs


def _ipv6(text: str) -> ipaddress.IPv6Address | None:
    """A numeric IPv6 address without a zone, else None (as getaddrinfo(AF_INET6))."""
    if "%" in text:
        return None
    try:
        return ipaddress.IPv6Address(text)
    except ValueError:
        return None


# --------------------------------------------------------------------------- net/mask


def masked_match(net: str, mask: str, addr: str) -> bool:
    """``net/mask`` against an address text: IPv4 forms first, then ``[v6]/len``."""
    return _masked_match4(net, mask, addr) or _masked_match6(net, mask, addr)


def _masked_match4(net_text: str, mask_text: str, addr_text: str) -> bool:
    addr = dot_quad(addr_text)
    net = dot_quad(net_text)
    if addr is None or net is None:
        return False
    mask = dot_quad(mask_text)
    if mask is None:
        length = c_strtol(mask_text)
        if length is None or not 1 <= length <= 32:
            return False
        mask = (_INADDR_NONE << (32 - length)) & _INADDR_NONE
    return addr & mask == net


def _masked_match6(net_text: str, mask_text: str, addr_text: str) -> bool:
    if not (net_text.startswith("[") and net_text.endswith("]")):
        return False
    net, addr = _ipv6(net_text[1:-1]), _ipv6(addr_text)
    length = c_strtol(mask_text)
    if net is None or addr is None or length is None or not 0 <= length <= 128:
        return False
    keep = ((1 << 128) - 1) ^ ((1 << (128 - length)) - 1)
    return int(net) & keep == int(addr) & keep


def dot_quad(text: str) -> int | None:
    """tcpd's dot_quad_addr: a four-part inet_addr address, None if invalid.

    inet_addr reads each part in C notation (``012`` is octal, ``0x0a`` hex) and its
    answer for 255.255.255.255 is its error value, so that address is never valid.
    """
    value = _inet_addr(text)
    return None if value is None or value == _INADDR_NONE else value


def _inet_addr(text: str) -> int | None:
    """inet_aton's parse of a four-part dotted address; None if it is not one."""
    parts = text.split(".")
    if len(parts) != 4:
        return None
    value = 0
    for part in parts:
        number = _c_number(part)
        if number is None or number > 255:
            return None
        value = value << 8 | number
    return value


def _c_number(text: str) -> int | None:
    """An unsigned number in C notation: 0x.. hex, 0.. octal, else decimal."""
    try:
        if re.fullmatch(r"0[xX][0-9a-fA-F]+", text):
            return int(text, 16)
        if re.fullmatch(r"0[0-7]*", text):
            return int(text, 8)
        if re.fullmatch(r"[1-9][0-9]*", text):
            return int(text)
    except ValueError:
        return None
    return None


def c_strtol(text: str) -> int | None:
    """strtol/atoi on the leading decimal number (blanks and a sign allowed); no digits: 0.

    Returns None for a value too large to matter, so callers simply see "out of range".
    """
    found = re.match(r"[ \t\n\v\f\r]*([+-]?)(\d*)", text)
    assert found is not None
    sign, digits = found.groups()
    if not digits:
        return 0
    if len(digits) > 12:
        return None
    number = int(digits)
    return -number if sign == "-" else number
