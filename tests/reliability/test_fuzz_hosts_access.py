"""Fuzzing the hosts_access(5) reader and matcher, with tcpdmatch(8) as the oracle.

* Any file content (bytes: NULs, invalid UTF-8, stray brackets, backslashes, colons)
  gives a table or the documented `HostsSyntaxError`, never another exception.
* Any table that loads decides any numeric client without raising.
* Differential: rule files built by hypothesis from the pieces of the grammar (lists,
  EXCEPT, wildcards, net/mask, [v6]/len, keywords, user@host, daemon@host,
  continuations, comments, options) are judged by our code and by the real tcpdmatch
  (Debian's tcpd) on the same files; the reports must be equal.  Clients are numeric,
  so neither side resolves names (tcpdmatch runs in a network namespace with only
  loopback when one can be made; the machine's resolver is never asked about names).
  tests/test_hosts_access_tcpdmatch.py does this with a fixed seeded corpus; here the
  corpus is hypothesis's, shrinks to a minimal file when they disagree, and grows in
  make soak.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import soak
from fuzz_support import Tally, budget
from hypothesis import assume, given
from hypothesis import strategies as st
from test_hosts_access_tcpdmatch import TCPDMATCH, in_namespace, tcpdmatch_lines

from netserver.errors import NetserverError
from netserver.tcpd.access import HostsSyntaxError, load_hosts
from netserver.tcpd.check import check_lines
from netserver.tcpd.names import FixedHostNames
from netserver.tcpd.parse import parse_table, read_table

# Pattern files named in a rule are read at load time: keep arbitrary text away from
# device and kernel files.
_SYSTEM_PATH = re.compile(r"/(dev|proc|sys|run|var|etc)\b")

# --- strategies -------------------------------------------------------------------------

V4 = ["10.0.0.1", "10.0.0.2", "10.1.2.3", "192.168.1.10", "127.0.0.1", "8.8.8.8", "0.0.0.0"]
# No IPv4-mapped IPv6 clients: netserver judges ::ffff:a.b.c.d as a.b.c.d on purpose
# (netserver.admit.access.normalize_ip: dual-stack sockets report IPv4 peers that way).
V6 = ["::1", "2001:db8::1", "2001:db8:1::5", "fe80::1", "2001:db9::1"]
HOSTS = [
    *V4, *(f"[{a}]" for a in V6), "10.", "10.0.", "192.168.", "10.0.0.0/8", "10.0.0.0/255.0.0.0",
    "10.0.0.1/32", "10.0.0.0/255.0.255.0", "10.0.0.0/33", "0.0.0.0/0", "[2001:db8::]/32",
    "[::]/0", "[2001:db8::1]/128", "[::1]/129", "10.*", "10.0.0.?", "*", "?", "*.1", "[*]",
    "ALL", "LOCAL", "KNOWN", "UNKNOWN", "PARANOID", "all", "local", ".example.com",
    "localhost", "@netgroup", "#", "EXCEPT", "except", "[", "]", "/x", "10.0.0.0/",
    "10.0.0.0/8x", "012.0.0.0/8", "joe@10.0.0.1", "ALL@ALL", "KNOWN@10.", "x@", "@",
]  # fmt: skip
DAEMONS = [
    "ALL", "sshd", "SSHD", "in.fingerd", "*d", "s?hd", "sshd@10.0.0.9", "ALL@10.0.0.0/8",
    "ALL@[2001:db8::]/32", "KNOWN", "EXCEPT", "ALL EXCEPT sshd", "sshd@", "@", "in.",
]  # fmt: skip
OPTIONS = ["allow", "deny", "DENY", "severity auth.notice", "severity warning", "keepalive"]
SEPARATORS = [" ", ",", ", ", "\t", " \\\n ", ",,"]


@st.composite
def word_list(draw: st.DrawFn, pool: list[str]) -> str:
    words = draw(st.lists(st.sampled_from(pool), min_size=1, max_size=4))
    if draw(st.integers(0, 3)) == 0:
        words += ["EXCEPT", *draw(st.lists(st.sampled_from(pool), min_size=1, max_size=2))]
    return draw(st.sampled_from(SEPARATORS)).join(words)


@st.composite
def rule_line(draw: st.DrawFn) -> str:
    kind = draw(st.integers(0, 9))
    if kind == 0:
        return draw(st.sampled_from(["# comment", "", "  # indented", "#ALL: ALL \\\n# x"]))
    fields = [draw(word_list(DAEMONS)), draw(word_list(HOSTS))]
    options = draw(st.lists(st.sampled_from(OPTIONS), max_size=2))
    return " : ".join(fields + options)


@st.composite
def table_text(draw: st.DrawFn) -> str:
    return "".join(line + "\n" for line in draw(st.lists(rule_line(), max_size=5)))


requests = st.tuples(
    st.sampled_from(["sshd", "in.fingerd", "ftpd", "sshd@10.0.0.9", "ftpd@2001:db8::9"]),
    st.sampled_from([*V4, *V6, "joe@10.0.0.1", "10.1.2.3"]),
)
raw_files = st.binary(max_size=200) | st.lists(
    st.sampled_from([b":", b"[", b"]", b"\\\n", b"\n", b"#", b" ", b",", b"=", b"\\:", b"\0",
                     b"\xff", b"ALL", b"spawn", b"twist", b"banners", b"linger", b"1", b"\r",
                     b"EXCEPT", b"/", b"@", b"severity", b"rfc931", b"umask 022", b"allow"]),
    max_size=30,
).map(b"".join)  # fmt: skip

# --- parsing and deciding never crash ------------------------------------------------------

TALLY_PARSE = Tally("hosts_access.parse")


@budget(200, 50_000)
@given(data=raw_files, request=requests)
@TALLY_PARSE.count
def _fuzz_parse(tmp: Path, data: bytes, request: tuple[str, str]) -> None:
    assume(not _SYSTEM_PATH.search(data.decode("latin-1")))
    path = tmp / "hosts.allow"
    path.write_bytes(data)
    try:
        table = read_table(path)
    except HostsSyntaxError as exc:
        assert str(exc).startswith(f"{path}:"), exc  # FILE:LINE, as documented
        return
    assert all(rule.line >= 1 for rule in table.rules)
    access = load_hosts(path, None)
    try:
        lines = check_lines(access, *request, FixedHostNames())
    except NetserverError:
        return  # e.g. a server address that is not unique: the documented refusal
    assert lines and lines[-1].startswith("access:")


@pytest.mark.timeout(soak.scaled(60, 900))
def test_any_file_gives_a_table_or_syntax_error(tmp_path: Path) -> None:
    with TALLY_PARSE.recorded():
        _fuzz_parse(tmp_path)


TALLY_TEXT = Tally("hosts_access.parse-text")


@budget(150, 50_000)
@given(text=table_text() | st.text(max_size=120))
@TALLY_TEXT.count
def _fuzz_parse_text(text: str) -> None:
    assume(not _SYSTEM_PATH.search(text))
    try:
        table = parse_table("hosts.allow", text)
    except HostsSyntaxError as exc:
        assert str(exc).startswith("hosts.allow:")
        return
    for rule in table.rules:
        assert 1 <= rule.line <= text.count("\n")


@pytest.mark.timeout(soak.scaled(60, 900))
def test_any_text_gives_a_table_or_syntax_error() -> None:
    with TALLY_TEXT.recorded():
        _fuzz_parse_text()


# --- differential: tcpdmatch -------------------------------------------------------------


def ours(work: Path, daemon: str, client: str) -> list[str] | None:
    """Our report without the lines Debian's tcpdmatch no longer prints; None: refused."""
    try:
        access = load_hosts(work / "hosts.allow", work / "hosts.deny")
    except HostsSyntaxError:
        return None  # tcpd would only warn; we refuse to start (documented)
    lines = check_lines(access, daemon, client, FixedHostNames())
    return [line for line in lines if not line.startswith(("matched:", "option:"))]


TALLY_DIFF = Tally("hosts_access.tcpdmatch-differential")
PREFIX: list[str] = []
COMPARED = [0]


@budget(25, 3_000)
@given(allow=table_text(), deny=table_text(), request=requests)
@TALLY_DIFF.count
def _fuzz_against_tcpdmatch(work: Path, allow: str, deny: str, request: tuple[str, str]) -> None:
    (work / "hosts.allow").write_text(allow)
    (work / "hosts.deny").write_text(deny)
    mine = ours(work, *request)
    if mine is None:
        return
    theirs = tcpdmatch_lines(work, PREFIX, *request)
    assert mine == theirs, f"--- hosts.allow\n{allow}--- hosts.deny\n{deny}{request}"
    COMPARED[0] += 1


@pytest.mark.skipif(TCPDMATCH is None, reason="tcpdmatch is not installed (package tcpd)")
@pytest.mark.timeout(soak.scaled(60, 900))
def test_decisions_equal_tcpdmatch(tmp_path: Path) -> None:
    PREFIX[:] = in_namespace()
    COMPARED[0] = 0
    with TALLY_DIFF.recorded():
        _fuzz_against_tcpdmatch(tmp_path)
    assert COMPARED[0] >= TALLY_DIFF.executions // 4, "too few files load to compare"
