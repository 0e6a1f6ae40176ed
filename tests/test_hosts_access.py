"""hosts.allow / hosts.deny: the parser, the matcher, options and expansions, and the
`check` command as tables; then real `netserver serve` processes with the files.

The matcher's answers are tcpd's (Debian 7.6.q), as found with tcpdmatch; the
differential test (test_hosts_access_tcpdmatch.py) compares hundreds more.  Names come
from `FixedHostNames` or from `LoopbackDNS`, never from the machine's resolver.
"""

from __future__ import annotations

import asyncio
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import ROOT, RunningServer, ServerFactory
from dnsserver import LoopbackDNS, reverse_name
from hypothesis import given, settings
from hypothesis import strategies as st
from lifecycle_handlers import (
    HANDLER_ENV,
    connect,
    echo,
    read_to_end,
    serve_args,
    served,
    wait_until,
)

from netserver import cli
from netserver.dnsresolver import DnsResolver
from netserver.errors import EX_CONFIG
from netserver.handlers import Command, StdioHandler
from netserver.resolver import canonical_name
from netserver.tcpd.access import HostsAccess, default_daemon_name, load_hosts
from netserver.tcpd.check import check_lines
from netserver.tcpd.match import HostInfo, NameNeeded, Request, wildcard_match
from netserver.tcpd.names import FixedHostNames, ResolverNames, verified_name
from netserver.tcpd.options import Banner, Spawn, percent_x, sanitize
from netserver.tcpd.parse import HostsSyntaxError, parse_table, split_at


def tables(allow: str, deny: str = "") -> HostsAccess:
    return HostsAccess(parse_table("hosts.allow", allow), parse_table("hosts.deny", deny))


def request(
    client: str = "10.0.0.1",
    name: str | None = "unknown",
    daemon: str = "sshd",
    server: str = "10.0.0.9",
    user: str = "unknown",
) -> Request:
    return Request(
        daemon,
        HostInfo("client", client, 4242, name),
        HostInfo("server", server, 22, "unknown"),
        user,
    )


def verdict(allow: str, deny: str = "", **kwargs: str | None) -> str:
    return tables(allow, deny).decide(request(**kwargs)).verdict  # type: ignore[arg-type]


# --------------------------------------------------------------------------- parsing


def test_continuation_joins_lines_with_nothing_between() -> None:
    table = parse_table("f", "ALL: 10.0.0.2 \\\n  10.0.0.1\nALL: 10.0.0.3\\\n4\n")
    assert [rule.clients for rule in table.rules] == [("10.0.0.2", "10.0.0.1"), ("10.0.0.34",)]
    assert [rule.line for rule in table.rules] == [2, 4]  # tcpd counts the last line


@pytest.mark.parametrize(
    ("text", "clients"),
    [
        ("# ALL: ALL\nALL: 10.0.0.1\n", [("10.0.0.1",)]),
        ("#ALL: 10.0.0.9 \\\nALL: 10.0.0.1\nALL: 10.0.0.2\n", [("10.0.0.2",)]),  # comment goes on
        ("ALL: 10.0.0.2 # 10.0.0.1\n", [("10.0.0.2", "#", "10.0.0.1")]),  # '#' mid-line: a word
        ("   # indented, no colon\n\n \t\nALL:10.0.0.1\n", [("10.0.0.1",)]),
        ("ALL,sshd :\t10.0.0.2,,10.0.0.1\r\n", [("10.0.0.2", "10.0.0.1")]),
        ("ALL: [::1] [2001:db8::]/32: allow\n", [("[::1]", "[2001:db8::]/32")]),
    ],
)
def test_comments_blanks_and_separators(text: str, clients: list[tuple[str, ...]]) -> None:
    assert [rule.clients for rule in parse_table("f", text).rules] == clients


def test_options_fields_escapes_and_equals() -> None:
    rule = parse_table("f", "ALL: ALL: spawn echo a\\:b : setenv=X  y z :severity auth.notice\n")
    assert [str(option) for option in rule.rules[0].options] == [
        "spawn echo a:b",
        "setenv X  y z",
        "severity auth.notice",
    ]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("ALL 10.0.0.1\n", 'f:1: missing ":" separator'),
        ("ALL: ALL\nALL: 10.0.0.1", "f:2: no newline at the end of the file"),
        ("ALL: 10.0.0.1 \\\n", "f:1: continuation at the end of the file"),
        ("ALL: ALL: bogus\n", 'f:1: bad option name: "bogus"'),
        ("ALL: ALL: spawn\n", 'f:1: option "spawn" requires value'),
        ("ALL: ALL: allow x\n", 'f:1: option "allow" requires no value'),
        ("ALL: ALL: deny: allow\n", 'f:1: option "deny" must be at end'),
        ("ALL: ALL: twist echo: deny\n", 'f:1: option "twist" must be at end'),
        ("ALL: ALL:\n", "f:1: missing option name"),
        ("ALL: ALL: allow:\n", 'f:1: option "allow" must be at end'),
        ("# x\nALL: ALL: severity loud\n", 'f:2: bad syslog facility or severity: "loud"'),
        ("ALL: ALL: severity nope.info\n", "bad syslog facility"),
        ("ALL: ALL: linger x\n", 'bad linger value: "x"'),
        ("ALL: ALL: rfc931 0\n", 'bad rfc931 timeout: "0"'),
        ("ALL: ALL: user nobody\n", 'option "user" is not supported'),
        ("ALL: " + "x " * 1030 + "\n", "f:1: rule longer than 2047 characters"),
    ],
)
def test_syntax_errors_name_file_and_line(text: str, message: str) -> None:
    with pytest.raises(HostsSyntaxError, match=message.replace("(", r"\(")):
        parse_table("f", text)


def test_a_nul_byte_and_an_unreadable_file_are_errors(tmp_path: Path) -> None:
    path = tmp_path / "hosts.allow"
    path.write_bytes(b"ALL: ALL\nALL: 10.0.0.1\0\n")
    with pytest.raises(HostsSyntaxError, match=r"hosts.allow:2: NUL"):
        load_hosts(path, None)
    with pytest.raises(HostsSyntaxError, match="cannot read"):
        load_hosts(tmp_path, None)  # a directory


def test_missing_files_are_empty_and_netgroups_warn(tmp_path: Path) -> None:
    (tmp_path / "deny").write_text("ALL: @staff\n")
    access = load_hosts(tmp_path / "absent", tmp_path / "deny")
    assert access.allow.rules == ()
    assert any("no such file" in w for w in access.warnings)
    assert any("netgroups are not supported" in w for w in access.warnings)
    assert access.decide(request()).verdict == "granted"


@pytest.mark.parametrize(
    ("text", "delimiter", "expected"),
    [
        ("ALL: [::1]: x", ":", ("ALL", " [::1]: x")),
        ("[::1]: x", ":", ("[::1]", " x")),
        ("sshd]: ALL", ":", None),  # a stray ']' stops all splitting, as in tcpd
        ("a [x: b", ":", ("a [x", " b")),
        ("[2001:db8::]/32", "/", ("[2001:db8::]", "32")),
    ],
)
def test_split_at_counts_brackets(
    text: str, delimiter: str, expected: tuple[str, str] | None
) -> None:
    if text == "a [x: b":
        assert split_at(text, delimiter) is None  # still inside the bracket
        return
    assert split_at(text, delimiter) == expected


# --------------------------------------------------------------------------- matching


@pytest.mark.parametrize(
    ("pattern", "client", "granted"),
    [
        ("10.0.0.1", "10.0.0.1", True),
        ("010.0.0.1", "10.0.0.1", False),  # addresses compare as text
        ("10.0.", "10.0.0.1", True),
        ("10.0", "10.0.0.1", False),
        (".1", "10.0.0.1", True),  # a suffix pattern matches address text too
        ("10.0.0.0/8", "10.1.1.1", True),
        ("10.0.0.0/255.0.0.0", "10.1.1.1", True),
        ("10.0.0.0/255.0.255.0", "10.5.0.1", True),  # any mask, even a strange one
        ("10.0.0.0/0", "10.0.0.0", False),  # /0 is no valid IPv4 prefix for tcpd
        ("0.0.0.0/0.0.0.0", "10.1.1.1", True),
        ("10.0.0.0/33", "10.0.0.1", False),
        ("10.0.0.1/8", "10.0.0.1", False),  # host bits in the net: never matches
        ("10.0.0.0/255.255.255.255", "10.0.0.0", False),
        ("10.0.0.0/8x", "10.200.0.1", True),  # strtol stops at the x
        ("012.0.0.0/8", "10.0.0.1", True),  # inet_addr: octal
        ("0x0a.0.0.0/0xff.0.0.0", "10.0.0.1", True),  # and hex
        ("10/8", "10.0.0.1", False),
        ("10.0.0.*", "10.0.0.1", True),
        ("10.0.?.1", "10.0.0.1", True),
        ("10.0.0.1?", "10.0.0.1", False),
        ("10.0.0.*/8", "10.0.0.1", False),  # a '/' makes it a net/mask
        ("[::1]", "0:0::1", True),
        ("[2001:DB8::1]", "2001:db8::1", True),
        ("[2001:db8::]/32", "2001:db8::1", True),
        ("[2001:db8::1]/32", "2001:db8::5", True),  # IPv6: the net is masked first
        ("[2001:db8::]/", "2001:db9::1", True),  # atoi("") is 0
        ("[2001:db8::]/129", "2001:db8::", False),
        ("[::]/0", "10.0.0.1", False),
        ("[::ffff:10.0.0.1]", "10.0.0.1", False),
        ("[10.0.0.1]", "10.0.0.1", False),
        ("[fe80::1%eth0]", "fe80::1", False),
        ("2001*", "2001:db8::1", True),
        ("ALL", "10.0.0.1", True),
        ("all", "10.0.0.1", True),
        ("KNOWN", "10.0.0.1", False),  # the name is unknown
        ("UNKNOWN", "10.0.0.1", True),
        ("unknown", "10.0.0.1", True),
        ("UNK*", "10.0.0.1", True),  # wildcards ignore case
        ("LOCAL", "10.0.0.1", False),
        ("PARANOID", "10.0.0.1", False),
        ("@staff", "10.0.0.1", False),
        ("10.0.0.1 EXCEPT 10.0.0.1", "10.0.0.1", False),
        ("EXCEPT 10.0.0.1", "10.0.0.1", False),
        ("ALL EXCEPT", "10.0.0.1", True),
        ("10.0.0.1 except 10.0.0.2 EXCEPT 10.0.0.1", "10.0.0.1", True),  # a EXCEPT (b EXCEPT c)
        ("10.0.0.0/8 EXCEPT 10.0.0.0/16 EXCEPT 10.0.0.1", "10.0.0.1", True),
        ("10.0.0.2 EXCEPT 10.0.0.1 10.0.0.1", "10.0.0.1", False),
        ("ALL@ALL", "10.0.0.1", True),
        ("KNOWN@ALL", "10.0.0.1", False),  # no ident: the user is unknown
        ("UNKNOWN@10.0.0.1", "10.0.0.1", True),
        ("@10.0.0.1", "10.0.0.1", False),  # a netgroup, not user@host
    ],
)
def test_client_patterns(pattern: str, client: str, granted: bool) -> None:
    got = verdict(f"ALL: {pattern}: allow\n", "ALL: ALL\n", client=client)
    assert got == ("granted" if granted else "denied")


@pytest.mark.parametrize(
    ("daemons", "daemon", "server", "granted"),
    [
        ("SSHD", "sshd", "10.0.0.9", True),
        ("in.", "in.fingerd", "10.0.0.9", True),
        (".fingerd", "in.fingerd", "10.0.0.9", True),
        ("s?hd, ftpd", "sshd", "10.0.0.9", True),
        ("*D", "sshd", "10.0.0.9", True),
        ("ALL EXCEPT sshd", "sshd", "10.0.0.9", False),
        ("ALL EXCEPT EXCEPT sshd", "sshd", "10.0.0.9", True),
        ("sshd@10.0.0.9", "sshd", "10.0.0.9", True),
        ("sshd@10.0.0.9", "sshd", "10.0.0.10", False),
        ("sshd@10.0.0.0/8", "sshd", "10.0.0.10", True),
        ("sshd@[::]/0", "sshd", "::1", True),
        ("sshd@UNKNOWN", "sshd", "10.0.0.9", True),
        ("sshd@KNOWN", "sshd", "10.0.0.9", False),
        ("ALL EXCEPT sshd@10.0.0.9", "sshd", "10.0.0.9", False),
    ],
)
def test_daemon_patterns(daemons: str, daemon: str, server: str, granted: bool) -> None:
    got = verdict(f"{daemons}: ALL: allow\n", "ALL: ALL\n", daemon=daemon, server=server)
    assert got == ("granted" if granted else "denied")


@pytest.mark.parametrize(
    ("pattern", "name", "granted"),
    [
        (".example.com", "host.example.com", True),
        (".example.com", "example.com", False),
        (".EXAMPLE.com", "host.example.com", True),
        ("host.example.com", "HOST.example.com", True),
        ("*.example.com", "a.b.example.com", True),
        ("LOCAL", "myhost", True),
        ("LOCAL", "myhost.example.com", False),
        ("LOCAL", "paranoid", False),
        ("KNOWN", "host.example.com", True),
        ("KNOWN", "paranoid", False),
        ("PARANOID", "paranoid", True),
        ("PARANOID", "host.example.com", False),
        ("UNKNOWN", "unknown", True),
        (".example.com EXCEPT bad.example.com", "bad.example.com", False),
    ],
)
def test_name_patterns(pattern: str, name: str, granted: bool) -> None:
    got = verdict(f"ALL: {pattern}: allow\n", "ALL: ALL\n", name=name)
    assert got == ("granted" if granted else "denied")


def _wildcard_reference(pattern: str, text: str) -> bool:
    """What the matcher means: ``*`` any run, ``?`` one character, ASCII case ignored."""
    parts = (".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern)
    regex = re.compile("".join(parts), re.ASCII | re.IGNORECASE | re.DOTALL)
    return regex.fullmatch(text) is not None


_GLOB_CHARS = "aA-.*?\n\u212a\xe9"


@settings(max_examples=500, deadline=None)
@given(st.text(_GLOB_CHARS, max_size=8), st.text(_GLOB_CHARS, max_size=10))
def test_wildcards_mean_what_a_regular_expression_of_them_means(pattern: str, text: str) -> None:
    assert wildcard_match(pattern, text) == _wildcard_reference(pattern, text)


@pytest.mark.timeout(20)  # a bound on termination, not a performance figure
def test_a_long_ptr_name_does_not_make_a_wildcard_pattern_backtrack() -> None:
    """Found writing fuzz/hosts_access.py: a client chooses its PTR name (253 octets, each
    label letters, digits and inner hyphens, forward-confirmed by its own DNS). Against
    ``*-*-*-*-*.dyn.example.net`` the name below cost 0.4 s of CPU a connection with
    the regular expression the matcher was, each more star some 25 times that; with
    seven stars, as here, minutes. The matcher is now linear in each length."""
    label = "-".join("a" * 32)
    name = ".".join([label] * 3) + "." + "b" * 46 + ".dyn.example.ne"
    assert len(name) == 253 and canonical_name(name) == name
    rules = "ALL: *-*-*-*-*-*-*.dyn.example.net: deny\n"
    assert verdict(rules, name=name) == "granted"
    assert verdict(rules, name=name + "t") == "denied"  # 254 octets: the match only


@pytest.mark.parametrize(
    ("pattern", "needs_name"),
    [
        ("10.0.0.", False),  # digits, dots and slashes: compared with the address only
        ("10.0.0.0/8", False),
        ("ALL", False),
        ("[::1]", True),  # tcpd compares it with the name too (and looks it up)
        (".example.com", True),
        ("LOCAL", True),
        ("KNOWN", True),
        ("UNKNOWN", True),
    ],
)
def test_names_are_looked_up_only_when_a_pattern_needs_one(pattern: str, needs_name: bool) -> None:
    access = tables(f"ALL: {pattern}\n")
    unresolved = request(client="192.0.2.1", name=None)
    assert (access.quick(unresolved) is None) == needs_name
    if needs_name:
        with pytest.raises(NameNeeded):
            access.decide(unresolved)


def test_pattern_files_are_read_at_load(tmp_path: Path) -> None:
    patterns = tmp_path / "blocked"
    patterns.write_text("10.9.0.1\n  10.8.0.0/16 [2001:db8::]/32\n# 10.7.0.1\n")
    access = tables("", f"ALL: {patterns} {tmp_path / 'absent'}\n")
    for client in ("10.9.0.1", "10.8.3.4", "2001:db8::7", "10.7.0.1"):  # '#' is no comment
        assert access.decide(request(client=client)).verdict == "denied"
    assert access.decide(request(client="10.6.0.1")).verdict == "granted"


# --------------------------------------------------------------------------- options


def test_options_give_a_plan_in_order() -> None:
    access = tables(
        "ALL: 10.0.0.1: spawn echo %a: setenv A 1: spawn echo two: severity auth.notice\n"
        "ALL: 10.0.0.2: twist /bin/echo bye %d\n",
        "ALL: 10.0.0.3: allow\nALL: ALL: setenv X y\n",
    )
    plan = access.decide(request())
    assert plan.granted and plan.severity == "auth.notice"
    assert plan.steps == (Spawn("echo 10.0.0.1", ()), Spawn("echo two", (("A", "1"),)))
    twist = access.decide(request(client="10.0.0.2"))
    assert (twist.verdict, twist.twist) == ("twist", "/bin/echo bye sshd")
    assert access.decide(request(client="10.0.0.3")).granted  # allow in hosts.deny
    denied = access.decide(request(client="10.0.0.4"))
    assert not denied.granted and denied.env == (("X", "y"),)


def test_a_failing_option_denies() -> None:
    plan = tables("ALL: ALL: spawn first: setenv %u x: allow\n").decide(request(user="a=b"))
    assert plan.verdict == "denied" and plan.error is not None
    assert plan.steps == (Spawn("first", ()),)  # what ran before the failure stays done


def test_banners_expand_and_end_lines_with_crlf() -> None:
    access = tables("ALL: ALL: banners /b\n")
    plan = access.decide(request(), lambda path: b"hi %a from %d at " + path.encode() + b"\nx")
    assert plan.steps == (Banner(b"hi 10.0.0.1 from sshd at /b/sshd\r\nx"),)


def test_expansions_are_sanitized_for_the_shell() -> None:
    evil = request(name="$(reboot);x`id`|y>z", user="j o\ne")
    evil.client.evaluated = True
    expanded = percent_x("%n %u %h %c %% %a %x", evil)
    evil_name = "__reboot__x_id__y_z"
    assert expanded == f"{evil_name} j_o_e {evil_name} j_o_e@{evil_name} % 10.0.0.1 "
    assert (
        sanitize("caf\u00e9 ok-_.,:@!=+/%") == "caf___ok-_.,:@!=+/%"
    )  # é is two bytes; one '_' per byte


def test_percent_h_is_the_address_until_a_pattern_asked_for_the_name() -> None:
    """tcpd looks names up lazily; %h shows the name only once something did."""
    access = tables("ALL: 10.0.0.1: spawn %h\nALL: .example.com: spawn %h\n")
    by_address = access.decide(request(name="host.example.com"))
    assert by_address.steps == (Spawn("10.0.0.1"),)
    by_name = access.decide(request(client="10.0.0.2", name="host.example.com"))
    assert by_name.steps == (Spawn("host.example.com"),)


def test_percent_letters() -> None:
    req = request(user="joe")
    req.pid = 77
    expanded = percent_x("%a %A %c %d %h %H %p %r %R %s %u %N", req)
    assert expanded == "10.0.0.1 10.0.0.9 joe@10.0.0.1 sshd 10.0.0.1 10.0.0.9 77 4242 22 " + (
        "sshd@10.0.0.9 joe unknown"
    )


# --------------------------------------------------------------------------- names


@pytest.mark.parametrize(
    ("ptr", "canonical", "addresses", "expected"),
    [
        (None, None, [], "unknown"),
        ("host.example.test", "host.example.test", ["192.0.2.1"], "host.example.test"),
        ("Host.Example.Test.", "host.example.test", ["192.0.2.1"], "host.example.test"),
        ("host.example.test", "host.example.test", ["192.0.2.2"], "paranoid"),
        ("host.example.test", "other.example.test", ["192.0.2.1"], "paranoid"),  # a CNAME
        ("localhost", "localhost.localdomain", ["192.0.2.1"], "localhost"),
        ("host.example.test", None, [], "paranoid"),  # forward lookup failed
        ("192.0.2.1", "192.0.2.1", ["192.0.2.1"], "paranoid"),  # a numeric PTR
        ("x;rm -rf /", "x;rm -rf /", ["192.0.2.1"], "paranoid"),  # never an LDH name
    ],
)
def test_verified_name(
    ptr: str | None, canonical: str | None, addresses: list[str], expected: str
) -> None:
    from netserver.resolver import normalize_ip

    found = [normalize_ip(a) for a in addresses]
    assert verified_name(ptr, canonical, found, normalize_ip("192.0.2.1")) == expected


def test_dns_host_names_from_a_loopback_server() -> None:
    records = {
        (reverse_name("192.0.2.10"), "PTR"): ["good.example.test"],
        ("good.example.test", "A"): ["192.0.2.10"],
        (reverse_name("192.0.2.11"), "PTR"): ["liar.example.test"],
        ("liar.example.test", "A"): ["192.0.2.99"],
        (reverse_name("192.0.2.12"), "PTR"): ["alias.example.test"],
        ("alias.example.test", "CNAME"): ["good.example.test"],
    }
    with LoopbackDNS(records) as dns:
        names = ResolverNames(DnsResolver(["127.0.0.1"], dns.port, timeout=2.0))
        from netserver.resolver import normalize_ip

        got = [asyncio.run(names.hostname(normalize_ip(f"192.0.2.{n}"))) for n in (10, 11, 12, 13)]
        assert got == ["good.example.test", "paranoid", "paranoid", "unknown"]
        found = asyncio.run(names.addresses("good.example.test"))
        assert [str(a) for a in found] == ["192.0.2.10"]


def test_default_daemon_names() -> None:
    assert default_daemon_name(Command(("/usr/sbin/in.fingerd", "-l"))) == "in.fingerd"
    assert default_daemon_name(StdioHandler(echo)) == "lifecycle_handlers"


# --------------------------------------------------------------------------- check


def test_check_lines_like_tcpdmatch() -> None:
    access = tables("sshd: 10.0.0.0/8 EXCEPT 10.9.0.0/16: spawn echo %c: allow\n", "ALL: ALL\n")
    assert check_lines(access, "sshd@10.0.0.9", "joe@10.1.2.3", FixedHostNames()) == [
        "client:   address  10.1.2.3",
        "client:   username joe",
        "server:   address  10.0.0.9",
        "server:   process  sshd",
        "matched:  hosts.allow line 1",
        "option:   spawn echo joe@10.1.2.3",
        "option:   allow",
        "access:   granted",
    ]
    assert check_lines(access, "/usr/sbin/sshd", "10.9.1.1", FixedHostNames())[-2:] == [
        "matched:  hosts.deny line 1",
        "access:   denied",
    ]


def test_check_lines_for_a_host_name_judge_every_address() -> None:
    names = FixedHostNames(
        {"192.0.2.1": "multi.example.test", "192.0.2.2": "paranoid"},
        {"multi.example.test": ["192.0.2.1", "192.0.2.2"]},
    )
    access = tables("ALL: PARANOID: deny\nALL: .example.test\n")
    lines = check_lines(access, "sshd", "multi.example.test", names)
    assert lines.count("") == 1
    assert "client:   hostname multi.example.test" in lines
    assert [line for line in lines if line.startswith("access:")] == [
        "access:   granted",
        "access:   denied",
    ]


def run_check(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, list[str], str]:
    code = cli.main(["check", *args])
    out, err = capsys.readouterr()
    return code, out.splitlines(), err


def test_check_command(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    allow, deny = tmp_path / "hosts.allow", tmp_path / "hosts.deny"
    allow.write_text("ALL: .example.test: severity notice\n")
    deny.write_text("ALL: ALL\n")
    flags = ("--hosts-allow", str(allow), "--hosts-deny", str(deny))
    code, lines, _ = run_check(capsys, *flags, "--name", "a.example.test", "sshd", "192.0.2.7")
    assert code == 0
    assert lines[0] == "client:   hostname a.example.test"
    assert lines[-3:] == [
        f"matched:  {allow} line 1",
        "option:   severity notice",
        "access:   granted",
    ]
    code, lines, _ = run_check(capsys, *flags, "sshd", "192.0.2.7")
    assert (code, lines[-1]) == (0, "access:   denied")  # no name: the lookup "failed"
    code, lines, _ = run_check(capsys, *flags, "--allow", "10.0.0.0/8", "sshd", "192.0.2.7")
    assert lines[-2:] == ["rules:    no allow rule matched", "access:   denied"]


def test_check_errors(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    bad = tmp_path / "hosts.allow"
    bad.write_text("ALL: ALL\nsshd: ALL: spawn\n")
    code, _, err = run_check(capsys, "--hosts-allow", str(bad), "sshd", "10.0.0.1")
    assert code == EX_CONFIG and f"{bad}:2:" in err
    code, _, err = run_check(capsys, "--hosts-allow", str(bad), "10.0.0.1")
    assert code == 64 and "DAEMON and CLIENT" in err


def test_check_resolves_a_client_name_with_dns_server(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    allow = tmp_path / "allow"
    allow.write_text("ALL: KNOWN\n")
    records = {
        ("web.example.test", "A"): ["192.0.2.20"],
        (reverse_name("192.0.2.20"), "PTR"): ["web.example.test"],
    }
    with LoopbackDNS(records) as dns:
        flags = ("--hosts-allow", str(allow), "--hosts-deny", str(allow) + ".none")
        server = f"127.0.0.1:{dns.port}"
        code, lines, _ = run_check(
            capsys, *flags, "--dns-server", server, "sshd", "web.example.test"
        )
    assert code == 0
    assert lines[:2] == ["client:   hostname web.example.test", "client:   address  192.0.2.20"]
    assert lines[-1] == "access:   granted"


# --------------------------------------------------------------------------- real servers

REFUSAL = "554 go away"


@pytest.fixture
def files(tmp_path: Path) -> tuple[Path, Path]:
    return tmp_path / "hosts.allow", tmp_path / "hosts.deny"


def start(
    netserver_proc: ServerFactory, files: tuple[Path, Path], *extra: str, mode: str = "fork"
) -> RunningServer:
    allow, deny = files
    flags = ("--hosts-allow", str(allow), "--hosts-deny", str(deny), "--daemon-name", "echo")
    return netserver_proc(
        serve_args(mode, "--refuse-message", REFUSAL, *flags, *extra), env=HANDLER_ENV
    )


def start_command(
    netserver_proc: ServerFactory, files: tuple[Path, Path], script: str, *extra: str
) -> RunningServer:
    allow, deny = files
    return netserver_proc(
        ["--listen", "127.0.0.1:0", "--hosts-allow", str(allow), "--hosts-deny", str(deny),
         *extra, "--", "/bin/sh", "-c", script]
    )  # fmt: skip


def output(server: RunningServer, source: str = "127.0.0.1") -> bytes:
    with connect(server.host_port, source) as sock:
        return read_to_end(sock)


@pytest.mark.parametrize("mode", ["fork", "thread", "async"])
def test_granted_and_refused_by_source(
    netserver_proc: ServerFactory, files: tuple[Path, Path], mode: str
) -> None:
    files[0].write_text("echo: 127.0.0.2\n")
    files[1].write_text("echo: 127.0.0.0/255.255.255.0 EXCEPT 127.0.0.3\n")
    server = start(netserver_proc, files, mode=mode)
    assert served(server.host_port, "127.0.0.2")
    assert served(server.host_port, "127.0.0.3")
    assert output(server, "127.0.0.1") == (REFUSAL + "\r\n").encode()
    assert wait_until(lambda: f"denied by {files[1]}:1" in server.log()), server.log()


def test_another_daemon_name_is_not_matched(
    netserver_proc: ServerFactory, files: tuple[Path, Path]
) -> None:
    files[1].write_text("sshd: ALL\nALL EXCEPT echo: ALL\n")
    server = start(netserver_proc, files)
    assert served(server.host_port, "127.0.0.1")


def test_twist_replaces_the_service(
    netserver_proc: ServerFactory, files: tuple[Path, Path]
) -> None:
    files[0].write_text("ALL: 127.0.0.2: twist /bin/echo 421 %d is closed to %a\n")
    server = start(netserver_proc, files)
    assert output(server, "127.0.0.2") == b"421 echo is closed to 127.0.0.2\n"
    assert served(server.host_port, "127.0.0.1")
    assert wait_until(lambda: "verdict=twist" in server.log())


def test_spawn_runs_a_command_and_setenv_reaches_it(
    netserver_proc: ServerFactory, files: tuple[Path, Path], tmp_path: Path
) -> None:
    mark = tmp_path / "spawned"
    files[1].write_text(f"ALL: 127.0.0.2: setenv WHO %a: spawn echo $WHO %d >{mark}\n")
    server = start(netserver_proc, files)
    assert output(server, "127.0.0.2") == (REFUSAL + "\r\n").encode()
    assert wait_until(lambda: mark.exists() and mark.read_text() == "127.0.0.2 echo\n")


def test_setenv_reaches_the_command(
    netserver_proc: ServerFactory, files: tuple[Path, Path]
) -> None:
    files[0].write_text("sh: 127.0.0.2: setenv GREETING hello %a\n")
    server = start_command(netserver_proc, files, 'echo "$GREETING|$TCPREMOTEIP"')
    assert output(server, "127.0.0.2") == b"hello 127.0.0.2|127.0.0.2\n"
    assert output(server, "127.0.0.1") == b"|127.0.0.1\n"


def test_banners_are_sent_first(
    netserver_proc: ServerFactory, files: tuple[Path, Path], tmp_path: Path
) -> None:
    banners = tmp_path / "banners"
    banners.mkdir()
    (banners / "sh").write_text("Welcome %a\nto %d\n")
    files[0].write_text(f"ALL: 127.0.0.2: banners {banners}\n")
    files[1].write_text(f"ALL: ALL: banners {banners}\n")
    server = start_command(netserver_proc, files, "echo served")
    assert output(server, "127.0.0.2") == b"Welcome 127.0.0.2\r\nto sh\r\nserved\n"
    assert output(server, "127.0.0.1") == b"Welcome 127.0.0.1\r\nto sh\r\n"


def test_sighup_reloads_and_a_bad_reload_keeps_the_old_rules(
    netserver_proc: ServerFactory, files: tuple[Path, Path]
) -> None:
    files[1].write_text("ALL: 127.0.0.2\n")
    server = start(netserver_proc, files)
    assert not served(server.host_port, "127.0.0.2")
    files[1].write_text("ALL: 127.0.0.3\n")
    server.signal(signal.SIGHUP)
    assert wait_until(lambda: "hosts access reloaded" in server.log()), server.log()
    assert served(server.host_port, "127.0.0.2")
    assert not served(server.host_port, "127.0.0.3")
    files[1].write_text("ALL: 127.0.0.2\nALL: 127.0.0.3: nonsense\n")
    server.signal(signal.SIGHUP)
    assert wait_until(lambda: "hosts reload failed" in server.log()), server.log()
    assert f"{files[1]}:2: bad option name" in server.log()
    assert served(server.host_port, "127.0.0.2")  # the old rules are still in force
    assert not served(server.host_port, "127.0.0.3")


def test_a_syntax_error_at_startup_exits_78(files: tuple[Path, Path]) -> None:
    files[0].write_text("ALL: ALL\n# fine\nsshd 127.0.0.1\n")
    done = subprocess.run(
        [sys.executable, "-m", "netserver.cli", "serve", "--listen", "127.0.0.1:0",
         "--hosts-allow", str(files[0]), "--", "/bin/cat"],
        cwd=ROOT, capture_output=True, text=True, timeout=20, check=False,
    )  # fmt: skip
    assert done.returncode == EX_CONFIG
    assert done.stderr.strip() == f'netserver: {files[0]}:3: missing ":" separator'


@pytest.fixture
def dns() -> Iterator[LoopbackDNS]:
    with LoopbackDNS() as server:
        yield server


def test_names_are_confirmed_off_the_accept_path(
    netserver_proc: ServerFactory, files: tuple[Path, Path], dns: LoopbackDNS
) -> None:
    dns.set_records(reverse_name("127.0.0.2"), "PTR", ["good.example.test"])
    dns.set_records("good.example.test", "A", ["127.0.0.2"])
    dns.set_records(reverse_name("127.0.0.3"), "PTR", ["liar.example.test"])
    dns.set_records("liar.example.test", "A", ["192.0.2.1"])
    files[0].write_text("ALL: .example.test EXCEPT PARANOID: spawn true\n")
    files[1].write_text("ALL: ALL\n")
    server = start(netserver_proc, files, "--dns-server", f"127.0.0.1:{dns.port}")
    assert served(server.host_port, "127.0.0.2")
    assert not served(server.host_port, "127.0.0.3")  # the reverse zone lies: paranoid
    assert not served(server.host_port, "127.0.0.4")  # no PTR at all: unknown
    assert ("good.example.test", "A") in dns.queries
