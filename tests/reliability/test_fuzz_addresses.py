"""Fuzzing the envelope address parser (netserver.smtp.addresses) against RFC 5321.

* Robustness: any text at all (surrogates included: sendmail's argv and alias files
  reach the parser as text decoded with surrogateescape) gives a `Mailbox` or the
  documented `RemoteProtocolError`, never another exception.
* Grammar oracle: an independent reading of the ABNF of RFC 5321 4.1.2/4.1.3 (with the
  RFC 6531 extensions under SMTPUTF8) and the limits of 4.5.3.1, as regular expressions
  and small checks, must agree with the parser on every input, accept or refuse.  The
  inputs are built from the grammar's own pieces so that most of them are near misses.
* Generated valid paths (dot-atom and quoted local parts, host names, IPv4, IPv6 and
  general address literals, U-labels) parse to exactly their parts, and parse -> str ->
  parse is stable.
* ESMTP parameters: any parameter text gives validated parameters or the documented
  error; xtext encode/decode round-trips.
"""

from __future__ import annotations

import contextlib
import ipaddress
import re
import subprocess
from pathlib import Path

import pytest
import soak
from fuzz_support import Tally, budget
from hypothesis import assume, example, given
from hypothesis import strategies as st
from leafmail_fixtures import clean_env, leafmail_command, write_config

from netserver.smtp import RemoteProtocolError
from netserver.smtp.addresses import (
    MAX_DOMAIN,
    MAX_LOCAL_PART,
    MAX_PATH,
    Mailbox,
    parse_forward_path,
    parse_reverse_path,
    split_path,
)
from netserver.smtp.parameters import (
    mail_parameters,
    parse_parameters,
    rcpt_parameters,
    xtext_decode,
    xtext_encode,
)

# --- an independent reading of the grammar -------------------------------------------

_ATEXT = r"[A-Za-z0-9!#$%&'*+\-/=?^_`{|}~]"
_UTF8 = r"[^\x00-\x9f\ud800-\udfff]"  # UTF8-non-ascii, without the C1 controls
_QTEXT = r"[\x20\x21\x23-\x5b\x5d-\x7e]"
_QPAIR = r"\\[\x20-\x7e]"
_LET_DIG = r"[A-Za-z0-9]"
_SUB_DOMAIN = rf"{_LET_DIG}(?:[A-Za-z0-9-]*{_LET_DIG})?"
_SNUM = r"(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[0-9]{1,2}|0[0-9]{2})"
_IPV4 = rf"{_SNUM}(?:\.{_SNUM}){{3}}"
_HEX4 = r"[0-9A-Fa-f]{1,4}"
_DCONTENT = r"[\x21-\x5a\x5e-\x7e]"


def _grammar(utf8: bool) -> tuple[re.Pattern[str], re.Pattern[str]]:
    """(Mailbox, Domain) regexes of RFC 5321 4.1.2, widened by RFC 6531 3.3 if `utf8`."""
    atext = f"(?:{_ATEXT}|{_UTF8})" if utf8 else _ATEXT
    qtext = f"(?:{_QTEXT}|{_UTF8})" if utf8 else _QTEXT
    label = _SUB_DOMAIN
    # A U-label's IDNA validity is delivery's business; here: LDH and non-ASCII, not
    # starting or ending with "-".
    if utf8:
        edge = f"(?:{_LET_DIG}|{_UTF8})"
        label = f"{edge}(?:(?:[A-Za-z0-9-]|{_UTF8})*{edge})?"
    domain = rf"{label}(?:\.{label})*"
    dot_string = rf"{atext}+(?:\.{atext}+)*"
    # An empty quoted string is grammatical, but the parser refuses it on purpose (it
    # delivers nowhere); the oracle follows that documented choice.
    quoted = rf'"(?:{qtext}|{_QPAIR})+"'
    # Standardized-tag is an Ldh-str that IANA registered; none starts with "-", and
    # refusing an unregistered tag is allowed, so the oracle takes the parser's tag shape.
    tag = rf"{_LET_DIG}(?:[A-Za-z0-9-]*{_LET_DIG})?"
    literal = rf"\[(?:{_IPV4}|{tag}:{_DCONTENT}+)\]"
    mailbox = rf"(?P<local>{dot_string}|{quoted})@(?P<domain>{domain}|{literal})"
    return re.compile(mailbox), re.compile(domain)


_MAILBOX = {flag: _grammar(flag)[0] for flag in (False, True)}
_DOMAIN = {flag: _grammar(flag)[1] for flag in (False, True)}


def rfc_ipv6(text: str) -> bool:
    """IPv6-addr of RFC 5321 4.1.3, group counts included ("::" is 2+ groups)."""
    v4 = re.fullmatch(rf"(.*:)({_IPV4})", text)
    head, room = (v4.group(1), 6) if v4 else (text, 8)
    if "::" in head:
        left, _, right = head.partition("::")
        if "::" in right:
            return False
        if v4 and right:
            right = right[:-1]  # "hex *(: hex) :" before the IPv4 part
            if not right:
                return False
        groups = (left.split(":") if left else []) + (right.split(":") if right else [])
        return len(groups) <= room - 2 and all(re.fullmatch(_HEX4, g) for g in groups)
    groups = (head[:-1] if v4 else head).split(":")
    return len(groups) == room and all(re.fullmatch(_HEX4, g) for g in groups)


def has_surrogate(text: str) -> bool:
    """True for text that cannot be UTF-8 (surrogateescape'd bytes)."""
    return any(0xD800 <= ord(c) <= 0xDFFF for c in text)


def oracle(path: str, utf8: bool, forward: bool) -> Mailbox | None:
    """What RFC 5321 says `path` is: a Mailbox, or None when it must be refused."""
    if has_surrogate(path):
        return None  # not text: cannot have come from a UTF-8 wire
    if len(path.encode("utf-8")) > MAX_PATH or not (path.startswith("<") and path.endswith(">")):
        return None
    inner = path[1:-1]
    if forward and inner.lower() == "postmaster":
        return Mailbox(inner, "")
    if inner.startswith("@"):
        route, colon, inner = inner.partition(":")
        hops = route.split(",")
        if not colon or not all(h.startswith("@") and _domain_ok(h[1:], utf8) for h in hops):
            return None
    match = _MAILBOX[utf8].fullmatch(inner)
    if match is None:
        return None
    local, domain = match.group("local"), match.group("domain")
    if len(local.encode("utf-8")) > MAX_LOCAL_PART:
        return None
    if domain.startswith("["):
        if not _literal_ok(domain[1:-1]):
            return None
    elif not _domain_ok(domain, utf8):
        return None
    return Mailbox(local, domain)


def _domain_ok(domain: str, utf8: bool) -> bool:
    if not _DOMAIN[utf8].fullmatch(domain) or len(domain.encode("utf-8")) > MAX_DOMAIN:
        return False
    return all(len(label) <= 63 or not label.isascii() for label in domain.split("."))


def _literal_ok(body: str) -> bool:
    if re.fullmatch(_IPV4, body):
        return True
    tag, _, content = body.partition(":")
    if tag.lower() == "ipv6":
        return rfc_ipv6(content)
    return True  # the general literal's shape was checked by the regex


# --- what the parser says --------------------------------------------------------------


def parse(path: str, utf8: bool, forward: bool) -> Mailbox | None:
    """The parser's verdict; only RemoteProtocolError may say no."""
    try:
        if forward:
            return parse_forward_path(path, utf8=utf8)
        return parse_reverse_path(path, utf8=utf8) if path != "<>" else None
    except RemoteProtocolError as exc:
        assert exc.reply.code in (501, 553), exc.reply
        return None


# --- strategies ------------------------------------------------------------------------

PIECES = [
    "<", ">", "@", ".", ":", ",", "[", "]", '"', "\\", " ", "-", "a", "Z", "0", "9", "!",
    "#", "~", "=", "(", ";", "ü", "é", "\x00", "\t", "\x85", "\x7f", "\udcff", "IPv6:",
    "ipv6:", "::", "1.2.3.4", "255.255.255.255", "256.1.1.1", "2001:db8", "ffff", "x-y:",
    "Postmaster", "example", "org", "xn--bcher-kva", "a" * 63, "b" * 64, "c" * 200, "@a,@b:",
]  # fmt: skip
near_misses = st.lists(st.sampled_from(PIECES), max_size=14).map("".join)
any_text = st.text(max_size=80)
path_text = st.one_of(
    near_misses.map(lambda s: f"<{s}>"), near_misses, any_text, any_text.map(lambda s: f"<{s}>")
)


@st.composite
def dot_string(draw: st.DrawFn, utf8: bool) -> str:
    alphabet = st.sampled_from("abcXYZ019!#$%&'*+-/=?^_`{|}~" + ("üßж中" if utf8 else ""))
    atoms = draw(st.lists(st.text(alphabet, min_size=1, max_size=12), min_size=1, max_size=4))
    return ".".join(atoms)


@st.composite
def quoted_string(draw: st.DrawFn, utf8: bool) -> str:
    plain = st.characters(min_codepoint=0x20, max_codepoint=0x7E, exclude_characters='"\\')
    pair = st.characters(min_codepoint=0x20, max_codepoint=0x7E).map(lambda c: "\\" + c)
    wide = st.sampled_from("üж中") if utf8 else st.nothing()
    return '"' + "".join(draw(st.lists(plain | pair | wide, min_size=1, max_size=20))) + '"'


@st.composite
def domain_name(draw: st.DrawFn, utf8: bool) -> str:
    letters = "abcXYZ0189" + ("üж中" if utf8 else "")
    edge = st.sampled_from(letters)
    middle = st.text(st.sampled_from(letters + "-"), max_size=61)
    label = st.builds(lambda a, m, b: a + m + b, edge, middle, edge) | edge
    return ".".join(draw(st.lists(label, min_size=1, max_size=5)))


@st.composite
def address_literal(draw: st.DrawFn) -> str:
    kind = draw(st.integers(0, 2))
    if kind == 0:
        return f"[{ipaddress.IPv4Address(draw(st.integers(0, 2**32 - 1)))}]"
    if kind == 1:
        address = ipaddress.IPv6Address(draw(st.integers(0, 2**128 - 1)))
        text = draw(st.sampled_from([address.compressed, address.exploded]))
        if draw(st.booleans()) and not rfc_ipv6(text):
            text = address.exploded  # the compressed form may shorten one group to "::"
        return f"[{draw(st.sampled_from(['IPv6', 'ipv6', 'IPV6']))}:{text}]"
    tag = draw(st.from_regex(r"[A-Za-z0-9][A-Za-z0-9-]{0,8}[A-Za-z0-9]", fullmatch=True))
    assume(tag.lower() != "ipv6")
    dcontent = st.characters(min_codepoint=0x21, max_codepoint=0x7E, exclude_characters="[\\]")
    return f"[{tag}:{''.join(draw(st.lists(dcontent, min_size=1, max_size=20)))}]"


@st.composite
def valid_mailbox(draw: st.DrawFn) -> tuple[str, str, bool]:
    utf8 = draw(st.booleans())
    local = draw(dot_string(utf8) | quoted_string(utf8))
    domain = draw(domain_name(utf8) | address_literal())
    return local, domain, utf8


# --- robustness and the grammar oracle -----------------------------------------------


TALLY_ORACLE = Tally("addresses.grammar-oracle")
ACCEPTED = [0]


@budget(300, 60_000)
@given(path=path_text, utf8=st.booleans(), forward=st.booleans())
@example(path="<\udcff@example.com>", utf8=False, forward=True)
@example(path='<"a@b"@c>', utf8=False, forward=True)
@example(path="<a@[x-y:>]>", utf8=False, forward=False)
@TALLY_ORACLE.count
def _fuzz_grammar_oracle(path: str, utf8: bool, forward: bool) -> None:
    got = parse(path, utf8, forward)
    # Without SMTPUTF8 any non-ASCII path is refused (553 5.6.7, RFC 6531 3.6).
    want = None if not utf8 and not path.isascii() else oracle(path, utf8, forward)
    assert got == want, (path, got, want)
    ACCEPTED[0] += got is not None


@pytest.mark.timeout(soak.scaled(60, 900))
def test_parser_agrees_with_the_rfc_grammar() -> None:
    ACCEPTED[0] = 0
    with TALLY_ORACLE.recorded():
        _fuzz_grammar_oracle()
    # The near misses must land on both sides of the grammar, or the oracle says nothing.
    assert 0 < ACCEPTED[0] < TALLY_ORACLE.executions


TALLY_SPLIT = Tally("addresses.split-path")


@budget(200, 40_000)
@given(text=path_text, params=st.text(max_size=40))
@TALLY_SPLIT.count
def _fuzz_split_path(text: str, params: str) -> None:
    """split_path finds the path of a MAIL/RCPT argument, or says why not."""
    try:
        path, rest = split_path(text)
    except RemoteProtocolError as exc:
        assert exc.reply.code == 501
        return
    assert text.startswith(path) and path.startswith("<") and path.endswith(">")
    assert rest == text[len(path) :].strip(" ")
    # A path that parses splits back out of "path params" unchanged.
    if not has_surrogate(path) and parse(path, True, True) is not None and " " not in path:
        clean = params.replace(">", "").lstrip(" ")
        assert split_path(f"{path} {clean}")[0] == path


@pytest.mark.timeout(soak.scaled(60, 900))
def test_split_path_never_loses_the_path() -> None:
    with TALLY_SPLIT.recorded():
        _fuzz_split_path()


TALLY_VALID = Tally("addresses.valid-round-trip")


@budget(200, 40_000)
@given(parts=valid_mailbox())
@TALLY_VALID.count
def _fuzz_valid_paths(parts: tuple[str, str, bool]) -> None:
    local, domain, utf8 = parts
    path = f"<{local}@{domain}>"
    within = (
        len(local.encode()) <= MAX_LOCAL_PART
        and len(path.encode()) <= MAX_PATH
        and (domain.startswith("[") or len(domain.encode()) <= MAX_DOMAIN)
    )
    got = parse(path, utf8, forward=True)
    if not within:
        assert got is None, path  # RFC 5321 4.5.3.1: over the limits is refused
        return
    assert got == Mailbox(local, domain), path
    again = parse(f"<{got}>", utf8, forward=True)
    assert again == got
    assert parse(path, utf8, forward=False) == got
    route = parse(f"<@relay.example,@r2.example:{got}>", utf8, forward=True)
    if len(path) + 26 <= MAX_PATH:
        assert route == got  # the source route is dropped (RFC 5321 4.1.1.3)


@pytest.mark.timeout(soak.scaled(60, 900))
def test_generated_valid_paths_parse_to_their_parts() -> None:
    with TALLY_VALID.recorded():
        _fuzz_valid_paths()


# --- parameters ------------------------------------------------------------------------

PARAM_PIECES = [
    "SIZE=", "BODY=", "SMTPUTF8", "RET=", "ENVID=", "AUTH=", "NOTIFY=", "ORCPT=", "FOO=",
    "size=", "7BIT", "8bitmime", "BINARYMIME", "FULL", "hdrs", "NEVER", "SUCCESS,DELAY",
    "FAILURE,", "rfc822;", "utf-8;", "\\x{FC}", "\\x{D800}", "\\x{110000}", "+2B", "+3d",
    "+4", "+zz", "<>", "12", "99999999999999999999999", "=", " ", "  ", "ü", "a@b", "\x00",
    "-", "x" * 101, "y" * 501,
]  # fmt: skip
param_text = st.lists(st.sampled_from(PARAM_PIECES), max_size=10).map("".join) | st.text(
    max_size=60
)
TALLY_PARAMS = Tally("addresses.parameters")


@budget(300, 50_000)
@given(text=param_text, utf8=st.booleans(), allow_auth=st.booleans())
@TALLY_PARAMS.count
def _fuzz_parameters(text: str, utf8: bool, allow_auth: bool) -> None:
    try:
        raw = parse_parameters(text, utf8=utf8)
    except RemoteProtocolError as exc:
        assert exc.reply.code == 501
        return
    assert all(key == key.upper() for key in raw)
    for check in (
        lambda: mail_parameters(raw, allow_auth=allow_auth),
        lambda: rcpt_parameters(raw, utf8=utf8),
    ):
        try:
            params = check()
        except RemoteProtocolError as exc:
            assert exc.reply.code in (501, 555), exc.reply
        else:
            assert params is not None


@pytest.mark.timeout(soak.scaled(60, 900))
def test_parameters_give_values_or_the_documented_error() -> None:
    with TALLY_PARAMS.recorded():
        _fuzz_parameters()


TALLY_XTEXT = Tally("addresses.xtext")


@budget(200, 40_000)
@given(text=st.text(st.characters(exclude_categories=["Cs"]), max_size=60))
@TALLY_XTEXT.count
def _fuzz_xtext(text: str) -> None:
    encoded = xtext_encode(text)
    assert all(33 <= ord(c) <= 126 and c != "=" for c in encoded)
    assert xtext_decode(encoded) == text
    with contextlib.suppress(ValueError):
        xtext_decode(text)  # anything else would be a crash


@pytest.mark.timeout(soak.scaled(60, 900))
def test_xtext_round_trip() -> None:
    with TALLY_XTEXT.recorded():
        _fuzz_xtext()


# --- crashes found, kept as regression tests -------------------------------------------


def test_surrogates_are_a_parse_error() -> None:
    """Text from surrogateescape (argv, alias files) must give the documented error."""
    with pytest.raises(RemoteProtocolError):
        parse_forward_path("<\udcff@example.com>", utf8=True)


@pytest.mark.timeout(soak.scaled(60, 120))
def test_sendmail_refuses_a_non_utf8_recipient(tmp_path: Path) -> None:
    """The real `leafmail sendmail` with a recipient whose bytes are not UTF-8.

    Expected: exit 65 (EX_DATAERR) or 64 with one line on stderr, as for any other bad
    address; what happens is a traceback from the address parser.
    """
    config = write_config(tmp_path, 'hostname = "leaf.test"\n')
    env = clean_env(tmp_path, {"LEAFMAIL_CONFIG": str(config), "LEAFMAIL_SPOOL": str(tmp_path)})
    argv = [a.encode() for a in leafmail_command("sendmail")] + [b"\xff@example.com"]
    done = subprocess.run(
        argv, input=b"Subject: x\n\nhi\n", env=env, capture_output=True, timeout=30, check=False
    )
    assert done.returncode in (64, 65), done.stderr
    assert b"Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def test_ipv6_double_colon_one_group() -> None:
    """RFC 5321 IPv6-comp: "The '::' represents at least 2 16-bit groups of zeros"."""
    assert parse("<a@[IPv6:1:2:3:4:5:6:7::]>", False, True) is None


def test_parameter_error_with_a_control_character() -> None:
    """The documented error for a bad parameter is RemoteProtocolError, whatever the text.

    Not reachable from the SMTP wire (the protocol refuses control characters in a
    command line first), but the function is public and says what it raises.
    """
    with pytest.raises(RemoteProtocolError):
        parse_parameters("\x1f", utf8=False)
