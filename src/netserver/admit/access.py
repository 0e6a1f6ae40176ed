"""Allow/deny access control for incoming connections.

A policy is two ordered lists of rules, *deny* and *allow*.  A client is refused if
it matches a deny rule, or if allow rules exist and it matches none of them; anything
else is allowed.  Deny is checked first so that a broad allow rule (``ALL``) can never
let a specifically denied client through.

A rule is one of:

* an IPv4 or IPv6 address, or a CIDR block (``10.0.0.0/8``, ``2001:db8::/32``); IPv6
  may be bracketed (``[::1]``, ``[2001:db8::]/32``);
* a host name (``host.example.com``), matched exactly and case-insensitively;
* a domain suffix (``.example.com``), matching names strictly below that domain;
* ``ALL``, matching every client.

Name rules only ever see *forward-confirmed* names: the PTR records of the client's
address give candidate names, and a candidate counts only if its own A/AAAA records
lead back to the same address.  Without that check anyone who controls the reverse
zone of their own addresses could claim to be ``trusted.example.com``.

The deciding logic (`AccessPolicy.decide`) does no I/O; the access gate asks
`AccessPolicy.needs_names` first and a `netserver.resolver.Resolver` only when a name
could change the outcome, so a policy made of address rules never touches DNS.

An IPv4-mapped IPv6 address (``::ffff:192.0.2.1``), which a dual-stack socket reports
for IPv4 clients, is judged as the IPv4 address it carries; otherwise an IPv4 deny rule
could be dodged simply by the server listening on ``::``.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from ..endpoint import IPAddress
from ..errors import AccessSpecError, ConfigError
from ..memo import BoundedMemo
from ..resolver import canonical_name, canonical_names, normalize_ip

__all__ = ["AccessPolicy", "Decision", "Rule", "confirmed_choice", "parse_rule"]

_IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# ::ffff:0:0/96 holds the IPv4-mapped addresses (RFC 4291 2.5.5.2).
_V4_MAPPED = ipaddress.IPv6Network("::ffff:0:0/96")

KNOWN_DECISIONS = 4096  # addresses an AccessPolicy remembers its decision for

# --------------------------------------------------------------------------- matchers


@dataclass(frozen=True)
class _MatchAll:
    """``ALL``: every client."""

    is_name_rule = False

    def matches(self, ip: IPAddress, names: frozenset[str]) -> bool:
        return True


@dataclass(frozen=True)
class _MatchNetwork:
    """An address or CIDR block (an address is stored as a /32 or /128)."""

    network: _IPNetwork
    is_name_rule = False

    def matches(self, ip: IPAddress, names: frozenset[str]) -> bool:
        # Membership across families is simply False, which is what we want.
        return ip in self.network


@dataclass(frozen=True)
class _MatchHost:
    """One exact host name."""

    name: str
    is_name_rule = True

    def matches(self, ip: IPAddress, names: frozenset[str]) -> bool:
        return self.name in names


@dataclass(frozen=True)
class _MatchDomain:
    """Names strictly below a domain; *suffix* keeps its leading dot.

    Keeping the dot is what stops ``.example.com`` from matching ``badexample.com``,
    and requiring something before it keeps ``example.com`` itself out.
    """

    suffix: str
    is_name_rule = True

    def matches(self, ip: IPAddress, names: frozenset[str]) -> bool:
        return any(name.endswith(self.suffix) for name in names)


_Matcher = _MatchAll | _MatchNetwork | _MatchHost | _MatchDomain


# --------------------------------------------------------------------------- rules


@dataclass(frozen=True)
class Rule:
    """One parsed allow/deny spec; build it with `parse_rule`.

    *spec* is the text as written (minus surrounding blanks), so logs and decisions
    quote the rule the way the administrator wrote it.
    """

    spec: str
    matcher: _Matcher

    @property
    def is_name_rule(self) -> bool:
        """True if matching needs the client's confirmed names (and hence DNS)."""
        return self.matcher.is_name_rule

    def matches(self, ip: IPAddress, names: frozenset[str]) -> bool:
        """Whether a client at *ip* with confirmed *names* matches this rule."""
        return self.matcher.matches(normalize_ip(ip), canonical_names(names))


def parse_rule(spec: str) -> Rule:
    """Parse one spec; raise AccessSpecError with a one-line reason if it is malformed."""
    text = spec.strip()
    if not text:
        raise AccessSpecError("empty access spec")
    return Rule(text, _parse_matcher(text))


def _spec_error(spec: str, why: str) -> AccessSpecError:
    return AccessSpecError(f"bad access spec {spec!r}: {why}")


def _parse_matcher(spec: str) -> _Matcher:
    """Pick the kind of rule from its shape, then parse it strictly.

    The shape decides, not trial and error: anything with ``/``, ``:`` or ``[`` is an
    address or network, anything made of digits and dots is meant as IPv4, and only
    the rest is a name.  That way ``1.2.3`` is reported as a bad address instead of
    silently becoming a host name that never matches.
    """
    if spec.upper() == "ALL":
        return _MatchAll()
    if spec.startswith("[") or "/" in spec or ":" in spec or _looks_numeric(spec):
        return _MatchNetwork(_parse_network(spec))
    if spec.startswith("."):
        return _MatchDomain("." + _parse_name(spec, spec[1:]))
    return _MatchHost(_parse_name(spec, spec))


def _looks_numeric(spec: str) -> bool:
    return any(char.isdigit() for char in spec) and all(
        char.isdigit() or char == "." for char in spec
    )


def _parse_name(spec: str, text: str) -> str:
    name = canonical_name(text)
    if name is None:
        raise _spec_error(
            spec,
            "not a valid host name (letters, digits, '-' and '.' only; "
            "labels of 1-63 characters; not ending in a numeric label)",
        )
    return name


def _parse_network(spec: str) -> _IPNetwork:
    """Parse an address or CIDR block, rejecting set host bits and zone ids."""
    address_text, prefix_text = _split_prefix(spec)
    if "%" in address_text:
        raise _spec_error(spec, "zone ids are not allowed in rules")
    try:
        address = ipaddress.ip_address(address_text)
    except ValueError:
        raise _spec_error(spec, f"not a valid IP address: {address_text!r}") from None
    prefix: int = address.max_prefixlen
    if prefix_text is not None:
        prefix = _parse_prefix(spec, prefix_text, address.max_prefixlen)
    try:
        network = ipaddress.ip_network((address, prefix), strict=True)
    except ValueError:
        base = ipaddress.ip_network((address, prefix), strict=False).network_address
        raise _spec_error(
            spec, f"host bits set after /{prefix}; did you mean {base}/{prefix}?"
        ) from None
    return _unmap_network(network)


def _split_prefix(spec: str) -> tuple[str, str | None]:
    """Split ``addr[/len]`` or ``[addr][/len]``; brackets are for IPv6 only."""
    address_text, slash, prefix_text = spec.partition("/")
    if address_text.startswith("[") or address_text.endswith("]"):
        if not (address_text.startswith("[") and address_text.endswith("]")):
            raise _spec_error(spec, "unbalanced brackets")
        address_text = address_text[1:-1]
        if ":" not in address_text:
            raise _spec_error(spec, "brackets are only for IPv6 addresses")
    return address_text, (prefix_text if slash else None)


def _parse_prefix(spec: str, text: str, max_prefix: int) -> int:
    """A prefix length must be plain decimal within the family's range."""
    if not (text.isascii() and text.isdigit()) or int(text) > max_prefix:
        raise _spec_error(spec, f"prefix length must be a number from 0 to {max_prefix}")
    return int(text)


def _unmap_network(network: _IPNetwork) -> _IPNetwork:
    """Turn a block inside ::ffff:0:0/96 into the IPv4 block it stands for.

    Clients are unmapped by `normalize_ip`, so a rule written in the mapped form must
    be unmapped the same way to ever match.  A wider IPv6 block that merely contains
    the mapped range (``::/0``) stays IPv6 and so does not match IPv4 clients.
    """
    if isinstance(network, ipaddress.IPv6Network) and network.subnet_of(_V4_MAPPED):
        mapped = network.network_address.ipv4_mapped
        assert mapped is not None
        return ipaddress.IPv4Network((mapped, network.prefixlen - 96))
    return network


# --------------------------------------------------------------------------- decisions


@dataclass(frozen=True)
class Decision:
    """The outcome for one client and why, for the connection log.

    *rule* is the spec that decided, or None when the outcome is a default.
    """

    allowed: bool
    rule: str | None
    reason: str


def confirmed_choice(names: frozenset[str]) -> str | None:
    """The one confirmed name a connection is known by (the first in order), or None."""
    return min(names) if names else None


def _first_match(rules: Sequence[Rule], ip: IPAddress, names: frozenset[str]) -> Rule | None:
    return next((rule for rule in rules if rule.matcher.matches(ip, names)), None)


def _has_name_rule(rules: Sequence[Rule]) -> bool:
    return any(rule.is_name_rule for rule in rules)


def _as_rule(item: str | Rule) -> Rule:
    return item if isinstance(item, Rule) else parse_rule(item)


class AccessPolicy:
    """Ordered deny and allow rules; immutable once built.

    Rules may be given as spec strings (parsed here, so a bad spec fails at start-up)
    or as already parsed `Rule` objects.
    """

    def __init__(self, allow: Iterable[str | Rule] = (), deny: Iterable[str | Rule] = ()) -> None:
        self._allow = tuple(_as_rule(item) for item in allow)
        self._deny = tuple(_as_rule(item) for item in deny)
        # Decisions on an address alone, remembered: an SMTP server asks the same
        # question of one client at every stage of every message (relay control).
        self._known = BoundedMemo[IPAddress, Decision](self._decide_by_address, KNOWN_DECISIONS)
        # The accept path's question, `quick`, remembered too (in a 1-tuple: the memo
        # takes None for "not known yet", and None here means "names are needed").
        self._quick = BoundedMemo[IPAddress, tuple[Decision | None]](
            self._quick_by_address, KNOWN_DECISIONS
        )

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> AccessPolicy:
        """Read ``allow SPEC ...`` / ``deny SPEC ...`` lines; ``#`` starts a comment.

        Errors name ``path:lineno`` so the administrator can go straight to the line.
        """
        allow: list[Rule] = []
        deny: list[Rule] = []
        for lineno, line in enumerate(_read_lines(path), start=1):
            where = f"{os.fspath(path)}:{lineno}"
            try:
                parsed = _parse_line(line)
            except AccessSpecError as exc:
                raise AccessSpecError(f"{where}: {exc}") from exc
            if parsed is not None:
                keyword, rules = parsed
                (allow if keyword == "allow" else deny).extend(rules)
        return cls(allow=allow, deny=deny)

    def merged(self, other: AccessPolicy) -> AccessPolicy:
        """A policy holding this policy's rules followed by *other*'s."""
        return AccessPolicy(allow=self._allow + other._allow, deny=self._deny + other._deny)

    @property
    def allow(self) -> tuple[Rule, ...]:
        return self._allow

    @property
    def deny(self) -> tuple[Rule, ...]:
        return self._deny

    @property
    def has_name_rules(self) -> bool:
        """Whether any rule needs the client's names (and so, maybe, DNS)."""
        return _has_name_rule(self._allow) or _has_name_rule(self._deny)

    def needs_names(self, ip: IPAddress | None) -> bool:
        """Whether the client's names could change the outcome for *ip*.

        False means `decide` gives the same answer whatever the names are, so the
        server can skip DNS: a deny rule already matches the address, no name rule
        exists on the side that could still change things, or the client is a Unix
        socket peer.
        """
        if ip is None:
            return False
        address = normalize_ip(ip)
        if _first_match(self._deny, address, frozenset()) is not None:
            return False
        names_could_deny = _has_name_rule(self._deny)
        if not self._allow or _first_match(self._allow, address, frozenset()) is not None:
            return names_could_deny
        # Refused unless a name is allowed (a name deny would only confirm that).
        return _has_name_rule(self._allow)

    def quick(self, ip: IPAddress | None) -> Decision | None:
        """`decide(ip)` when no name could change it (`needs_names` is False), else None.

        Asked of every client on the accept path (a fork-exec spawner asks it per
        connection), so it is remembered per address as `decide` is: `needs_names`
        walks the rules twice, several microseconds a connection."""
        if ip is None:
            return self.decide(None)
        return self._quick(ip)[0]

    def _quick_by_address(self, ip: IPAddress) -> tuple[Decision | None]:
        return (None,) if self.needs_names(ip) else (self._known(ip),)

    def decide(self, ip: IPAddress | None, names: frozenset[str] = frozenset()) -> Decision:
        """Judge a client; *names* must already be forward-confirmed.  No I/O here."""
        if ip is None:
            return Decision(True, None, "unix-socket peer; access rules apply to IP clients")
        if not names:
            return self._known(ip)
        return self._decide(ip, names)

    def _decide_by_address(self, ip: IPAddress) -> Decision:
        return self._decide(ip, frozenset())

    def _decide(self, ip: IPAddress, names: frozenset[str]) -> Decision:
        address = normalize_ip(ip)
        confirmed = canonical_names(names)
        denied_by = _first_match(self._deny, address, confirmed)
        if denied_by is not None:
            return Decision(False, denied_by.spec, f"matched deny rule {denied_by.spec}")
        if not self._allow:
            return Decision(True, None, "no deny rule matched" if self._deny else "no rules")
        allowed_by = _first_match(self._allow, address, confirmed)
        if allowed_by is not None:
            return Decision(True, allowed_by.spec, f"matched allow rule {allowed_by.spec}")
        return Decision(False, None, "no allow rule matched")

    def describe(self) -> str:
        """One line listing the rules in evaluation order, for the startup log."""
        parts = [
            f"{label} {', '.join(rule.spec for rule in rules)}"
            for label, rules in (("deny", self._deny), ("allow", self._allow))
            if rules
        ]
        return "; ".join(parts) if parts else "no access rules (all clients allowed)"

    def __repr__(self) -> str:
        allow = [rule.spec for rule in self._allow]
        deny = [rule.spec for rule in self._deny]
        return f"AccessPolicy(allow={allow!r}, deny={deny!r})"


def _read_lines(path: str | os.PathLike[str]) -> list[str]:
    try:
        with open(path, encoding="utf-8") as stream:
            return stream.read().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read access file {os.fspath(path)}: {exc}") from exc


def _parse_line(line: str) -> tuple[str, list[Rule]] | None:
    """One file line to (keyword, rules); None for a blank or comment-only line."""
    words = line.split("#", 1)[0].split()
    if not words:
        return None
    keyword = words[0].lower()
    if keyword not in ("allow", "deny"):
        raise AccessSpecError(f"expected 'allow' or 'deny', got {words[0]!r}")
    if len(words) == 1:
        raise AccessSpecError(f"{keyword!r} needs at least one spec")
    return keyword, [parse_rule(word) for word in words[1:]]
