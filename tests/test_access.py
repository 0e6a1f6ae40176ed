"""Tests for netserver.admit.access: rule parsing, decisions, policy files, name confirmation.

DNS is only ever answered by `LoopbackDNS` on 127.0.0.1; `SystemResolver` is tested
with the socket functions replaced, so nothing here asks the machine's resolver.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterator, Sequence
from ipaddress import IPv4Address, IPv6Address, ip_address
from pathlib import Path

import dns.flags
import dns.message
import dns.query
import dns.rcode
import pytest
from dnsserver import LoopbackDNS, Records, reverse_name

from netserver.admit.access import AccessPolicy, Decision, parse_rule
from netserver.dnsresolver import DnsResolver
from netserver.endpoint import IPAddress
from netserver.errors import AccessSpecError, ConfigError
from netserver.resolver import Resolver, SystemResolver, confirmed_names, normalize_ip

NO_NAMES: frozenset[str] = frozenset()


def names_of(resolver: Resolver, client: IPAddress) -> frozenset[str]:
    """The confirmed names, as the access gate takes them (none when DNS cannot tell)."""
    return asyncio.run(confirmed_names(resolver, client)) or NO_NAMES


def ip(text: str) -> IPAddress:
    return ip_address(text)


def names(*items: str) -> frozenset[str]:
    return frozenset(items)


# --------------------------------------------------------------------------- normalize_ip


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("192.0.2.1", IPv4Address("192.0.2.1")),
        ("::1", IPv6Address("::1")),
        ("[::1]", IPv6Address("::1")),
        ("::ffff:192.0.2.1", IPv4Address("192.0.2.1")),
        ("[::ffff:192.0.2.1]", IPv4Address("192.0.2.1")),
        ("fe80::1%eth0", IPv6Address("fe80::1")),
        ("[fe80::1%2]", IPv6Address("fe80::1")),
        (IPv6Address("::ffff:10.0.0.1"), IPv4Address("10.0.0.1")),
        (IPv6Address("fe80::1%eth0"), IPv6Address("fe80::1")),
        (IPv4Address("10.0.0.1"), IPv4Address("10.0.0.1")),
    ],
)
def test_normalize_ip(value: str | IPAddress, expected: IPAddress) -> None:
    result = normalize_ip(value)
    assert result == expected
    assert type(result) is type(expected)
    assert str(result) == str(expected)  # no zone id left over


@pytest.mark.parametrize("value", ["", "nonsense", "1.2.3", "[10.0.0.1", "::g"])
def test_normalize_ip_rejects_non_addresses(value: str) -> None:
    with pytest.raises(ValueError, match="not an IP address"):
        normalize_ip(value)


# --------------------------------------------------------------------------- rule matching

MATCH_CASES: list[tuple[str, str, frozenset[str], bool]] = [
    # IPv4 addresses and blocks
    ("192.0.2.1", "192.0.2.1", NO_NAMES, True),
    ("192.0.2.1", "192.0.2.2", NO_NAMES, False),
    ("10.0.0.0/8", "10.255.1.2", NO_NAMES, True),
    ("10.0.0.0/8", "11.0.0.1", NO_NAMES, False),
    ("0.0.0.0/0", "203.0.113.9", NO_NAMES, True),
    ("0.0.0.0/0", "2001:db8::1", NO_NAMES, False),
    # IPv6 addresses and blocks, bracketed or not
    ("::1", "::1", NO_NAMES, True),
    ("[::1]", "::1", NO_NAMES, True),
    ("::1", "::2", NO_NAMES, False),
    ("2001:db8::/32", "2001:db8:1::5", NO_NAMES, True),
    ("[2001:db8::]/32", "2001:db8::1", NO_NAMES, True),
    ("2001:db8::/32", "2001:db9::1", NO_NAMES, False),
    ("2001:DB8::/32", "2001:db8::1", NO_NAMES, True),
    ("fe80::/10", "fe80::1%eth0", NO_NAMES, True),
    ("::/0", "2001:db8::1", NO_NAMES, True),
    # IPv4-mapped clients are judged as IPv4, and so are mapped rules
    ("10.0.0.0/8", "::ffff:10.1.2.3", NO_NAMES, True),
    ("192.0.2.1", "::ffff:192.0.2.1", NO_NAMES, True),
    ("192.0.2.1", "::ffff:192.0.2.2", NO_NAMES, False),
    ("::ffff:192.0.2.1", "192.0.2.1", NO_NAMES, True),
    ("[::ffff:192.0.2.1]", "::ffff:192.0.2.1", NO_NAMES, True),
    ("::ffff:10.0.0.0/104", "10.9.9.9", NO_NAMES, True),
    ("::ffff:10.0.0.0/104", "11.9.9.9", NO_NAMES, False),
    ("::ffff:0:0/96", "203.0.113.9", NO_NAMES, True),
    ("::/0", "192.0.2.1", NO_NAMES, False),  # IPv6 block; ALL is for everyone
    # ALL
    ("ALL", "192.0.2.1", NO_NAMES, True),
    ("ALL", "2001:db8::1", NO_NAMES, True),
    ("all", "::ffff:192.0.2.1", NO_NAMES, True),
    # host names: exact, case-insensitive, trailing dot ignored
    ("host.example.test", "192.0.2.1", names("host.example.test"), True),
    ("HOST.Example.Test.", "192.0.2.1", names("host.example.test"), True),
    ("host.example.test", "192.0.2.1", names("HOST.EXAMPLE.TEST."), True),
    ("host.example.test", "192.0.2.1", names("other.example.test"), False),
    ("host.example.test", "192.0.2.1", names("a.host.example.test"), False),
    ("host.example.test", "192.0.2.1", NO_NAMES, False),
    ("localhost", "127.0.0.1", names("localhost"), True),
    # .domain suffixes: strictly below the domain
    (".example.test", "192.0.2.1", names("a.example.test"), True),
    (".example.test", "192.0.2.1", names("b.a.example.test"), True),
    (".example.test", "192.0.2.1", names("example.test"), False),
    (".example.test", "192.0.2.1", names("badexample.test"), False),
    (".example.test", "192.0.2.1", names("a.example.test.evil.test"), False),
    (".example.test", "192.0.2.1", names("x.test", "a.example.test"), True),
    (".Example.Test.", "192.0.2.1", names("a.example.test"), True),
    (".example.test", "2001:db8::1", names("v6.example.test"), True),
]


@pytest.mark.parametrize(("spec", "client", "client_names", "expected"), MATCH_CASES)
def test_rule_matches(spec: str, client: str, client_names: frozenset[str], expected: bool) -> None:
    rule = parse_rule(spec)
    assert rule.matches(normalize_ip(client), client_names) is expected


@pytest.mark.parametrize(("spec", "client", "client_names", "expected"), MATCH_CASES)
def test_policy_agrees_with_rule(
    spec: str, client: str, client_names: frozenset[str], expected: bool
) -> None:
    """A single allow rule and a single deny rule give mirror-image decisions."""
    assert AccessPolicy(allow=[spec]).decide(ip(client), client_names).allowed is expected
    assert AccessPolicy(deny=[spec]).decide(ip(client), client_names).allowed is not expected


@pytest.mark.parametrize(
    ("spec", "is_name_rule"),
    [
        ("10.0.0.0/8", False),
        ("::1", False),
        ("ALL", False),
        ("host.example.test", True),
        (".example.test", True),
    ],
)
def test_is_name_rule(spec: str, is_name_rule: bool) -> None:
    assert parse_rule(spec).is_name_rule is is_name_rule


def test_rule_keeps_spec_as_written() -> None:
    assert parse_rule("  [2001:DB8::]/32 ").spec == "[2001:DB8::]/32"
    assert parse_rule("Host.Example.Test").spec == "Host.Example.Test"


# --------------------------------------------------------------------------- malformed specs


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("", "empty access spec"),
        ("   ", "empty access spec"),
        ("10.0.0.0/33", "prefix length must be a number from 0 to 32"),
        ("::/129", "prefix length must be a number from 0 to 128"),
        ("10.0.0.0/", "prefix length"),
        ("10.0.0.0/-1", "prefix length"),
        ("10.0.0.0/8x", "prefix length"),
        ("10.0.0.0/255.0.0.0", "prefix length"),
        ("10.0.0.1/8", "host bits set after /8; did you mean 10.0.0.0/8"),
        ("2001:db8::1/32", "did you mean 2001:db8::/32"),
        ("1.2.3", "not a valid IP address"),
        ("1.2.3.4.5", "not a valid IP address"),
        ("256.1.1.1", "not a valid IP address"),
        ("010.0.0.1", "not a valid IP address"),
        ("::g", "not a valid IP address"),
        ("1:2:3", "not a valid IP address"),
        ("host.example.test:25", "not a valid IP address"),
        ("example.test/24", "not a valid IP address"),
        ("[10.0.0.1]", "brackets are only for IPv6"),
        ("[::1", "unbalanced brackets"),
        ("::1]/128", "unbalanced brackets"),
        ("fe80::1%eth0", "zone ids are not allowed"),
        ("host_name.example.test", "not a valid host name"),
        ("*.example.test", "not a valid host name"),
        ("-bad.example.test", "not a valid host name"),
        ("bad-.example.test", "not a valid host name"),
        ("a..example.test", "not a valid host name"),
        ("..example.test", "not a valid host name"),
        (".", "not a valid host name"),
        ("example.123", "not a valid host name"),
        ("b\u00fccher.example.test", "not a valid host name"),
        ("a" * 64 + ".example.test", "not a valid host name"),
        (".".join(["abcdefghi"] * 26), "not a valid host name"),
        ("evil\nhost", "not a valid host name"),
    ],
)
def test_malformed_spec(spec: str, message: str) -> None:
    with pytest.raises(AccessSpecError, match=message) as raised:
        parse_rule(spec)
    text = str(raised.value)
    assert "\n" not in text
    if spec.strip():
        assert repr(spec.strip()) in text


def test_malformed_spec_is_a_config_error() -> None:
    with pytest.raises(ConfigError):
        AccessPolicy(allow=["10.0.0.0/33"])


# --------------------------------------------------------------------------- decisions


@pytest.mark.parametrize(
    ("allow", "deny", "client", "client_names", "expected"),
    [
        ((), (), "192.0.2.1", NO_NAMES, Decision(True, None, "no rules")),
        ((), ("10.0.0.0/8",), "192.0.2.1", NO_NAMES, Decision(True, None, "no deny rule matched")),
        (
            (),
            ("10.0.0.0/8",),
            "10.1.1.1",
            NO_NAMES,
            Decision(False, "10.0.0.0/8", "matched deny rule 10.0.0.0/8"),
        ),
        (
            ("10.0.0.0/8",),
            (),
            "10.1.1.1",
            NO_NAMES,
            Decision(True, "10.0.0.0/8", "matched allow rule 10.0.0.0/8"),
        ),
        (
            ("10.0.0.0/8",),
            (),
            "192.0.2.1",
            NO_NAMES,
            Decision(False, None, "no allow rule matched"),
        ),
        # deny beats allow, whatever the order of appearance
        (
            ("ALL",),
            ("192.0.2.1",),
            "192.0.2.1",
            NO_NAMES,
            Decision(False, "192.0.2.1", "matched deny rule 192.0.2.1"),
        ),
        (
            ("192.0.2.1",),
            ("192.0.2.0/24",),
            "192.0.2.1",
            NO_NAMES,
            Decision(False, "192.0.2.0/24", "matched deny rule 192.0.2.0/24"),
        ),
        # the first matching deny rule is the one reported
        (
            (),
            ("192.0.2.0/24", "ALL"),
            "192.0.2.1",
            NO_NAMES,
            Decision(False, "192.0.2.0/24", "matched deny rule 192.0.2.0/24"),
        ),
        (
            ("10.0.0.0/8", ".example.test"),
            (),
            "192.0.2.1",
            names("a.example.test"),
            Decision(True, ".example.test", "matched allow rule .example.test"),
        ),
        (
            (".example.test",),
            ("bad.example.test",),
            "192.0.2.1",
            names("bad.example.test"),
            Decision(False, "bad.example.test", "matched deny rule bad.example.test"),
        ),
        # a v4-mapped client cannot dodge an IPv4 deny rule
        (
            ("ALL",),
            ("10.0.0.0/8",),
            "::ffff:10.0.0.7",
            NO_NAMES,
            Decision(False, "10.0.0.0/8", "matched deny rule 10.0.0.0/8"),
        ),
        (
            ("::ffff:192.0.2.0/120",),
            (),
            "192.0.2.9",
            NO_NAMES,
            Decision(True, "::ffff:192.0.2.0/120", "matched allow rule ::ffff:192.0.2.0/120"),
        ),
    ],
)
def test_decide(
    allow: Sequence[str],
    deny: Sequence[str],
    client: str,
    client_names: frozenset[str],
    expected: Decision,
) -> None:
    assert AccessPolicy(allow=allow, deny=deny).decide(ip(client), client_names) == expected


def test_unix_socket_peers_are_allowed() -> None:
    decision = AccessPolicy(deny=["ALL"]).decide(None)
    assert decision.allowed
    assert decision.rule is None
    assert "unix" in decision.reason


def test_policy_accessors_merged_and_describe() -> None:
    first = AccessPolicy(allow=["10.0.0.0/8"], deny=["10.9.0.0/16"])
    second = AccessPolicy(allow=[".example.test"], deny=["ALL"])
    both = first.merged(second)
    assert [rule.spec for rule in both.allow] == ["10.0.0.0/8", ".example.test"]
    assert [rule.spec for rule in both.deny] == ["10.9.0.0/16", "ALL"]
    assert both.describe() == "deny 10.9.0.0/16, ALL; allow 10.0.0.0/8, .example.test"
    assert AccessPolicy(allow=["::1"]).describe() == "allow ::1"
    assert "no access rules" in AccessPolicy().describe()
    # merging leaves the originals alone
    assert [rule.spec for rule in first.allow] == ["10.0.0.0/8"]


def test_policy_accepts_parsed_rules() -> None:
    rule = parse_rule("192.0.2.0/24")
    assert AccessPolicy(deny=[rule]).deny == (rule,)


# --------------------------------------------------------------------------- policy files


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "access.rules"
    path.write_text(text, encoding="utf-8")
    return path


def test_from_file(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "# trusted networks\n"
        "\n"
        "allow 10.0.0.0/8 [2001:db8::]/32   # office\n"
        "   allow .example.test\n"
        "deny 10.66.0.0/16\n"
        "DENY bad.example.test # shouting is fine\n"
        "    # indented comment\n",
    )
    policy = AccessPolicy.from_file(path)
    assert [rule.spec for rule in policy.allow] == [
        "10.0.0.0/8",
        "[2001:db8::]/32",
        ".example.test",
    ]
    assert [rule.spec for rule in policy.deny] == ["10.66.0.0/16", "bad.example.test"]
    assert not policy.decide(ip("10.66.1.1")).allowed
    assert policy.decide(ip("10.1.1.1")).allowed


def test_from_file_accepts_str_path(tmp_path: Path) -> None:
    path = write(tmp_path, "deny ALL\n")
    assert [rule.spec for rule in AccessPolicy.from_file(str(path)).deny] == ["ALL"]


@pytest.mark.parametrize(
    ("text", "line", "message"),
    [
        ("allow 10.0.0.0/8\n# ok\nallow 10.0.0.1/8\n", 3, "host bits set"),
        ("\n\ndeny 1.2.3\n", 3, "'1.2.3'"),
        ("permit 10.0.0.0/8\n", 1, "expected 'allow' or 'deny', got 'permit'"),
        ("allow 10.0.0.0/8\ndeny   # nothing\n", 2, "'deny' needs at least one spec"),
        ("allow ::1 host_name.test\n", 1, "not a valid host name"),
    ],
)
def test_from_file_errors_name_path_and_line(
    tmp_path: Path, text: str, line: int, message: str
) -> None:
    path = write(tmp_path, text)
    with pytest.raises(AccessSpecError) as raised:
        AccessPolicy.from_file(path)
    error = str(raised.value)
    assert error.startswith(f"{path}:{line}: ")
    assert message in error
    assert "\n" not in error


def test_from_file_missing_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.rules"
    with pytest.raises(ConfigError, match=r"cannot read access file .*nope\.rules"):
        AccessPolicy.from_file(missing)


# --------------------------------------------------------------------------- needs_names


@pytest.mark.parametrize(
    ("allow", "deny", "client", "expected"),
    [
        ((), (), "192.0.2.1", False),  # no rules at all
        (("10.0.0.0/8",), ("10.9.0.0/16",), "192.0.2.1", False),  # address rules only
        (("ALL",), ("192.0.2.0/24", ".bad.test"), "192.0.2.1", False),  # address deny decides
        (("ALL",), (".bad.test",), "192.0.2.1", True),  # a name could still deny
        ((), ("bad.example.test",), "192.0.2.1", True),
        ((".example.test",), (), "192.0.2.1", True),  # only a name can allow
        (("10.0.0.0/8", ".example.test"), (), "10.1.1.1", False),  # allowed by address
        (("10.0.0.0/8", ".example.test"), (".bad.test",), "10.1.1.1", True),
        (("10.0.0.0/8",), (".bad.test",), "192.0.2.1", False),  # refused whatever the name
        (("10.0.0.0/8",), (), "::ffff:10.1.1.1", False),
        ((), ("10.0.0.0/8", ".bad.test"), "::ffff:10.1.1.1", False),
    ],
)
def test_needs_names(
    allow: Sequence[str], deny: Sequence[str], client: str, expected: bool
) -> None:
    policy = AccessPolicy(allow=allow, deny=deny)
    address = ip(client)
    assert policy.needs_names(address) is expected
    # The accept path's question, remembered per address: the same answer, twice.
    for _ in range(2):
        quick = policy.quick(address)
        assert quick == (None if expected else policy.decide(address))
    if not expected:
        # Skipping the lookup must be safe: no set of names changes the outcome.
        baseline = policy.decide(address).allowed
        for some in (names("a.example.test"), names("x.bad.test"), names("bad.example.test")):
            assert policy.decide(address, some).allowed is baseline


def test_needs_names_for_unix_peer() -> None:
    assert not AccessPolicy(allow=[".example.test"]).needs_names(None)
    assert AccessPolicy(allow=[".example.test"]).quick(None) == Decision(
        True, None, "unix-socket peer; access rules apply to IP clients"
    )


# --------------------------------------------------------------------------- DNS confirmation

CLIENT = "192.0.2.10"
SPOOFER = "192.0.2.66"
CLIENT6 = "2001:db8::10"

RECORDS: Records = {
    ("trusted.example.test", "A"): [CLIENT],
    (reverse_name(CLIENT), "PTR"): ["trusted.example.test"],
    # The spoofer controls its own reverse zone and claims the trusted name.
    (reverse_name(SPOOFER), "PTR"): ["trusted.example.test"],
    ("v6host.example.test", "AAAA"): [CLIENT6],
    (reverse_name(CLIENT6), "PTR"): ["V6Host.Example.Test."],
    # Several PTRs: only the one whose A record agrees counts; junk is ignored.
    (reverse_name("192.0.2.20"), "PTR"): [
        "liar.example.test",
        "multi.example.test",
        "192.0.2.20",
    ],
    ("multi.example.test", "A"): ["192.0.2.99", "192.0.2.20"],
    ("liar.example.test", "A"): ["192.0.2.21"],
    # .domain edge cases, each name properly forward-confirmed
    (reverse_name("192.0.2.31"), "PTR"): ["example.test"],
    ("example.test", "A"): ["192.0.2.31"],
    (reverse_name("192.0.2.32"), "PTR"): ["badexample.test"],
    ("badexample.test", "A"): ["192.0.2.32"],
    (reverse_name("192.0.2.33"), "PTR"): ["b.a.example.test"],
    ("b.a.example.test", "A"): ["192.0.2.33"],
    # a confirmed name found through a CNAME
    (reverse_name("192.0.2.40"), "PTR"): ["alias.example.test"],
    ("alias.example.test", "CNAME"): ["real.example.test"],
    ("real.example.test", "A"): ["192.0.2.40"],
    # the name exists, but only with an AAAA record
    (reverse_name("192.0.2.50"), "PTR"): ["v6only.example.test"],
    ("v6only.example.test", "AAAA"): ["2001:db8::50"],
    (reverse_name("192.0.2.60"), "PTR"): ["broken.example.test"],
}


@pytest.fixture(scope="module")
def dns_server() -> Iterator[LoopbackDNS]:
    with LoopbackDNS(RECORDS, servfail=["broken.example.test"]) as server:
        yield server


@pytest.fixture
def resolver(dns_server: LoopbackDNS) -> DnsResolver:
    return DnsResolver(["127.0.0.1"], port=dns_server.port)


def check(policy: AccessPolicy, resolver: Resolver, client: IPAddress) -> Decision:
    """What the server does per connection: look names up only if they could matter."""
    found = names_of(resolver, client) if policy.needs_names(client) else NO_NAMES
    return policy.decide(client, found)


@pytest.mark.parametrize(
    ("client", "expected"),
    [
        (CLIENT, {"trusted.example.test"}),
        ("::ffff:" + CLIENT, {"trusted.example.test"}),
        (SPOOFER, set()),
        (CLIENT6, {"v6host.example.test"}),
        ("192.0.2.20", {"multi.example.test"}),
        ("192.0.2.40", {"alias.example.test"}),
        ("192.0.2.50", set()),
        ("192.0.2.60", set()),  # SERVFAIL on the forward lookup
        ("192.0.2.200", set()),  # no PTR at all
        ("2001:db8::dead", set()),
    ],
)
def test_dns_resolver_confirmed_names(
    resolver: DnsResolver, client: str, expected: set[str]
) -> None:
    assert names_of(resolver, ip(client)) == expected


def test_forward_confirmed_name_is_allowed(resolver: DnsResolver) -> None:
    policy = AccessPolicy(allow=[".example.test"])
    decision = check(policy, resolver, ip(CLIENT))
    assert decision == Decision(True, ".example.test", "matched allow rule .example.test")


def test_spoofed_ptr_is_not_allowed(resolver: DnsResolver) -> None:
    policy = AccessPolicy(allow=[".example.test"])
    decision = check(policy, resolver, ip(SPOOFER))
    assert decision == Decision(False, None, "no allow rule matched")


def test_spoofed_ptr_does_not_dodge_a_name_deny(resolver: DnsResolver) -> None:
    """Nor can a client dodge a deny by claiming someone else's name."""
    policy = AccessPolicy(allow=["trusted.example.test"])
    assert not check(policy, resolver, ip(SPOOFER)).allowed
    assert check(policy, resolver, ip(CLIENT)).allowed


@pytest.mark.parametrize(
    ("client", "allowed"),
    [
        ("192.0.2.31", False),  # example.test itself
        ("192.0.2.32", False),  # badexample.test
        ("192.0.2.33", True),  # b.a.example.test
    ],
)
def test_domain_suffix_edges_with_dns(resolver: DnsResolver, client: str, allowed: bool) -> None:
    policy = AccessPolicy(allow=[".example.test"])
    assert check(policy, resolver, ip(client)).allowed is allowed


def test_no_dns_queries_when_addresses_decide(
    dns_server: LoopbackDNS, resolver: DnsResolver
) -> None:
    before = len(dns_server.queries)
    denied = AccessPolicy(allow=[".example.test"], deny=["192.0.2.0/24"])
    assert check(denied, resolver, ip(CLIENT)) == Decision(
        False, "192.0.2.0/24", "matched deny rule 192.0.2.0/24"
    )
    address_only = AccessPolicy(allow=["10.0.0.0/8"])
    assert not check(address_only, resolver, ip(CLIENT)).allowed
    assert len(dns_server.queries) == before


def test_dns_lookup_happens_when_names_matter(
    dns_server: LoopbackDNS, resolver: DnsResolver
) -> None:
    before = len(dns_server.queries)
    check(AccessPolicy(allow=[".example.test"]), resolver, ip(CLIENT))
    asked = dns_server.queries[before:]
    assert (reverse_name(CLIENT).rstrip("."), "PTR") in asked
    assert ("trusted.example.test", "A") in asked


def test_dns_resolver_without_a_server_returns_no_names() -> None:
    with LoopbackDNS({(reverse_name(CLIENT), "PTR"): ["trusted.example.test"]}) as server:
        port = server.port
    # Nothing listens there now, so the query times out (kept short): no names, no error.
    assert names_of(DnsResolver(["127.0.0.1"], port=port, timeout=0.2), ip(CLIENT)) == set()


@pytest.mark.parametrize("nameservers", [[], ["not-an-address"]])
def test_dns_resolver_rejects_bad_nameservers(nameservers: list[str]) -> None:
    with pytest.raises(ConfigError):
        DnsResolver(nameservers)


# --------------------------------------------------------------------------- SystemResolver


class FakeSocketResolver:
    """Stands in for gethostbyaddr/getaddrinfo so no real lookups happen."""

    def __init__(self, ptr: dict[str, list[str]], forward: dict[str, list[str]]) -> None:
        self.ptr = ptr
        self.forward = forward

    def gethostbyaddr(self, address: str) -> tuple[str, list[str], list[str]]:
        if address not in self.ptr:
            raise socket.herror(1, "Unknown host")
        primary, *aliases = self.ptr[address]
        return primary, aliases, [address]

    def getaddrinfo(
        self,
        host: str,
        port: object,
        family: int = 0,
        type: int = 0,
        proto: int = 0,
        flags: int = 0,
    ) -> list[tuple[int, int, int, str, tuple[str, int]]]:
        if host not in self.forward:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return [(family, type, 6, "", (address, 0)) for address in self.forward[host]]


@pytest.fixture
def fake_socket(monkeypatch: pytest.MonkeyPatch) -> FakeSocketResolver:
    fake = FakeSocketResolver(
        ptr={
            "127.0.0.1": ["Localhost.", "loopback.example.test"],
            "127.0.0.2": ["spoof.example.test"],
            "::1": ["ip6-localhost"],
        },
        forward={
            "localhost": ["127.0.0.1"],
            "loopback.example.test": ["127.0.0.9"],
            "spoof.example.test": ["127.0.0.3"],
            "ip6-localhost": ["::1"],
        },
    )
    monkeypatch.setattr(socket, "gethostbyaddr", fake.gethostbyaddr)
    monkeypatch.setattr(socket, "getaddrinfo", fake.getaddrinfo)
    return fake


@pytest.mark.parametrize(
    ("client", "expected"),
    [
        ("127.0.0.1", {"localhost"}),
        ("::ffff:127.0.0.1", {"localhost"}),
        ("127.0.0.2", set()),
        ("127.0.0.3", set()),
        ("::1", {"ip6-localhost"}),
    ],
)
def test_system_resolver(fake_socket: FakeSocketResolver, client: str, expected: set[str]) -> None:
    assert names_of(SystemResolver(), ip(client)) == expected


# --------------------------------------------------------------------------- the test server


def ask(server: LoopbackDNS, name: str, rdtype: str, *, tcp: bool = False) -> dns.message.Message:
    query = dns.message.make_query(name, rdtype)
    if tcp:
        return dns.query.tcp(query, "127.0.0.1", port=server.port, timeout=2.0)
    return dns.query.udp(query, "127.0.0.1", port=server.port, timeout=2.0)


def test_loopback_dns_answers(dns_server: LoopbackDNS) -> None:
    found = ask(dns_server, "trusted.example.test", "A")
    assert found.rcode() == dns.rcode.NOERROR
    assert [rdata.to_text() for rdata in found.answer[0]] == [CLIENT]
    assert ask(dns_server, "nothing.example.test", "A").rcode() == dns.rcode.NXDOMAIN
    no_data = ask(dns_server, "trusted.example.test", "MX")
    assert (no_data.rcode(), no_data.answer) == (dns.rcode.NOERROR, [])
    # a.example.test has no records but b.a.example.test does: it exists, empty
    assert ask(dns_server, "a.example.test", "A").rcode() == dns.rcode.NOERROR
    assert ask(dns_server, "broken.example.test", "A").rcode() == dns.rcode.SERVFAIL


def test_loopback_dns_tcp_and_truncation() -> None:
    big = [f'"record {n:03d} {"x" * 60}"' for n in range(20)]
    with LoopbackDNS(
        {("big.example.test", "TXT"): big, ("mx.test", "MX"): ["10 mail.mx.test"]}
    ) as s:
        over_udp = ask(s, "big.example.test", "TXT")
        assert over_udp.flags & dns.flags.TC
        over_tcp = ask(s, "big.example.test", "TXT", tcp=True)
        assert len(over_tcp.answer[0]) == len(big)
        mx = ask(s, "mx.test", "MX", tcp=True)
        assert [rdata.to_text() for rdata in mx.answer[0]] == ["10 mail.mx.test."]
