"""Tables for netserver.smtp.addresses (paths, mailboxes, limits) and .parameters (xtext too)."""

from __future__ import annotations

import pytest

from netserver.smtp.addresses import Mailbox, parse_forward_path, parse_reverse_path, split_path
from netserver.smtp.parameters import (
    Body,
    MailParameters,
    Notify,
    OriginalRecipient,
    RcptParameters,
    Ret,
    mail_parameters,
    parse_parameters,
    rcpt_parameters,
    xtext_decode,
    xtext_encode,
)
from netserver.smtp.replies import RemoteProtocolError

LOCAL_64 = "l" * 64
LABEL_63 = "d" * 63
# 4 labels of 63 and dots: 255 octets exactly
DOMAIN_255 = ".".join([LABEL_63] * 3 + ["e" * 63])

VALID = [
    ("<user@example.org>", "user", "example.org"),
    ("<User.Name+tag@Example.ORG>", "User.Name+tag", "Example.ORG"),
    ("<!#$%&'*+-/=?^_`{|}~@example.org>", "!#$%&'*+-/=?^_`{|}~", "example.org"),
    ('<"a b"@example.org>', '"a b"', "example.org"),
    ('<"a\\"b"@example.org>', '"a\\"b"', "example.org"),
    ('<"a>b"@example.org>', '"a>b"', "example.org"),
    # %, ! and a quoted @ stay in the local part: the domain is the parsed one.
    ("<victim%elsewhere.example@local.example>", "victim%elsewhere.example", "local.example"),
    ("<elsewhere.example!victim@local.example>", "elsewhere.example!victim", "local.example"),
    ('<"victim@elsewhere.example"@local.example>', '"victim@elsewhere.example"', "local.example"),
    # Source routes are parsed and dropped (RFC 5321 4.1.1.3, appendix C).
    ("<@relay.example:user@example.org>", "user", "example.org"),
    ("<@a.example,@b.example:user@example.org>", "user", "example.org"),
    ("<user@[192.0.2.1]>", "user", "[192.0.2.1]"),
    ("<user@[IPv6:2001:db8::1]>", "user", "[IPv6:2001:db8::1]"),
    ("<user@[ipv6:::ffff:192.0.2.1]>", "user", "[ipv6:::ffff:192.0.2.1]"),
    ("<user@[x-tag:some-thing]>", "user", "[x-tag:some-thing]"),
    ("<u@1.example>", "u", "1.example"),
    ("<u@localhost>", "u", "localhost"),
    (f"<{LOCAL_64}@example.org>", LOCAL_64, "example.org"),
    (f"<u@{LABEL_63}.example>", "u", f"{LABEL_63}.example"),
]

INVALID = [
    ("user@example.org", "enclosed"),
    ("<user@example.org", "enclosed"),
    ("<user>", "missing @domain"),
    ("<@example.org>", "source route"),
    ("<user@>", "empty domain"),
    ("<@a.example:>", "empty local"),
    ("<.user@example.org>", "misplaced"),
    ("<user.@example.org>", "misplaced"),
    ("<us..er@example.org>", "misplaced"),
    ("<us er@example.org>", "not allowed"),
    ("<us(er@example.org>", "not allowed"),
    ('<""@example.org>', "empty local"),
    ('<"abc@example.org>', "unterminated"),
    ('<"a"b@example.org>', "missing @domain"),
    ("<user@-example.org>", "starts or ends"),
    ("<user@example-.org>", "starts or ends"),
    ("<user@example..org>", "empty domain label"),
    ("<user@example.org.>", "empty domain label"),
    ("<user@exa_mple.org>", "not allowed in domain"),
    ("<user@[192.0.2.256]>", "IPv4"),
    ("<user@[192.0.2]>", "address literal"),
    ("<user@[IPv6:2001:db8::g]>", "IPv6"),
    ("<user@[IPv6:fe80::1%eth0]>", "IPv6"),
    ("<user@[IPv6:1::2::3]>", "IPv6"),
    ("<user@[]>", "address literal"),
    ("<user@[tag:a[b]>", "address literal"),
    ("<user@example.org\x00>", "control"),
    ("<us\ter@example.org>", "control"),
    ("<user@exam\x7fple.org>", "control"),
    ("<@relay.example,user@example.org>", "source route"),
    ("<@a.example,b.example:user@example.org>", "bad source route"),
    ('<"a\\>', "bad quoted pair"),
    ("<user@[-tag:x]>", "tag"),
    (f"<{LOCAL_64}x@example.org>", "local part longer"),
    (f"<u@{LABEL_63}x.example>", "label longer"),
    ("<u@" + DOMAIN_255 + "x>", "longer"),
]


@pytest.mark.parametrize(("path", "local", "domain"), VALID)
def test_valid_paths(path: str, local: str, domain: str) -> None:
    assert parse_reverse_path(path, utf8=False) == Mailbox(local, domain)
    assert parse_forward_path(path, utf8=False) == Mailbox(local, domain)


@pytest.mark.parametrize(("path", "reason"), INVALID)
def test_invalid_paths(path: str, reason: str) -> None:
    with pytest.raises(RemoteProtocolError) as sender:
        parse_reverse_path(path, utf8=True)
    assert sender.value.reply.code == 501
    assert sender.value.reply.enhanced == "5.1.7"
    assert reason.lower() in str(sender.value.reply).lower()
    with pytest.raises(RemoteProtocolError) as recipient:
        parse_forward_path(path, utf8=True)
    assert recipient.value.reply.enhanced == "5.1.3"


def test_null_sender_only_as_reverse_path() -> None:
    assert parse_reverse_path("<>", utf8=False) is None
    with pytest.raises(RemoteProtocolError):
        parse_forward_path("<>", utf8=False)


@pytest.mark.parametrize("path", ["<Postmaster>", "<postmaster>", "<POSTMASTER>"])
def test_postmaster_without_domain_is_a_recipient_only(path: str) -> None:
    assert parse_forward_path(path, utf8=False) == Mailbox(path[1:-1], "")
    with pytest.raises(RemoteProtocolError):
        parse_reverse_path(path, utf8=False)


def test_path_length_limit_counts_brackets_and_source_route() -> None:
    domain = ".".join(["a" * 60] * 2)
    mailbox = f"{LOCAL_64}@{domain}"
    for route_length, ok in ((256, True), (257, False)):
        filler = route_length - len(mailbox) - len("<@:>")
        route = "@" + ".".join(["r" * 60, "s" * (filler - 61)]) + ":"
        path = f"<{route}{mailbox}>"
        assert len(path) == route_length
        if ok:
            assert parse_forward_path(path, utf8=False) == Mailbox(LOCAL_64, domain)
        else:
            with pytest.raises(RemoteProtocolError, match="256 octets"):
                parse_forward_path(path, utf8=False)


def test_domain_length_is_bounded_by_the_path() -> None:
    # A 255-octet domain (RFC 5321 4.5.3.1.2) cannot fit in a 256-octet path.
    domain = ".".join([LABEL_63] * 3 + ["e" * 60])
    assert parse_forward_path(f"<u@{domain}>", utf8=False).domain == domain
    with pytest.raises(RemoteProtocolError, match="256 octets"):
        parse_forward_path(f"<u@{DOMAIN_255}>", utf8=False)


@pytest.mark.parametrize(
    ("path", "local", "domain"),
    [
        ("<jürgen@example.org>", "jürgen", "example.org"),
        ("<用户@例子.广告>", "用户", "例子.广告"),
        ('<"ü b"@example.org>', '"ü b"', "example.org"),
    ],
)
def test_utf8_addresses_need_smtputf8(path: str, local: str, domain: str) -> None:
    assert parse_forward_path(path, utf8=True) == Mailbox(local, domain)
    with pytest.raises(RemoteProtocolError) as exc:
        parse_forward_path(path, utf8=False)
    assert (exc.value.reply.code, exc.value.reply.enhanced) == (553, "5.6.7")


def test_utf8_local_part_limit_is_in_octets() -> None:
    assert parse_forward_path("<" + "ü" * 32 + "@example.org>", utf8=True).local == "ü" * 32
    with pytest.raises(RemoteProtocolError, match="64 octets"):
        parse_forward_path("<" + "ü" * 33 + "@example.org>", utf8=True)


def test_c1_control_characters_are_refused_even_with_smtputf8() -> None:
    with pytest.raises(RemoteProtocolError, match="control"):
        parse_forward_path("<a\x85b@example.org>", utf8=True)


def test_mailbox_helpers() -> None:
    quoted = Mailbox('"a\\"b c"', "example.org")
    assert quoted.local_unquoted == 'a"b c'
    assert str(quoted) == '"a\\"b c"@example.org'
    assert Mailbox("plain", "x").local_unquoted == "plain"
    assert Mailbox("u", "[192.0.2.1]").is_address_literal
    assert not Mailbox("ü", "x").is_ascii
    assert str(Mailbox("Postmaster", "")) == "Postmaster"


@pytest.mark.parametrize(
    ("text", "path", "params"),
    [
        ("<a@b>", "<a@b>", ""),
        ("<a@b> SIZE=10", "<a@b>", "SIZE=10"),
        ("<> SIZE=10  BODY=8BITMIME", "<>", "SIZE=10  BODY=8BITMIME"),
        ('<"x> y"@b> RET=HDRS', '<"x> y"@b>', "RET=HDRS"),
        ("<a@[tag:x>y]> X", "<a@[tag:x>y]>", "X"),
        ("<@r.example:a@b> X", "<@r.example:a@b>", "X"),
    ],
)
def test_split_path(text: str, path: str, params: str) -> None:
    assert split_path(text) == (path, params)


@pytest.mark.parametrize("text", ["a@b", "<a@b", "<a@b>SIZE=1", '<"a@b>', ""])
def test_split_path_errors(text: str) -> None:
    with pytest.raises(RemoteProtocolError) as exc:
        split_path(text)
    assert exc.value.reply.code == 501


# --- parameters --------------------------------------------------------------------


def test_parse_parameters() -> None:
    assert parse_parameters("size=10 Body=7BIT SMTPUTF8", utf8=False) == {
        "SIZE": "10",
        "BODY": "7BIT",
        "SMTPUTF8": None,
    }
    assert parse_parameters("", utf8=False) == {}
    assert parse_parameters("X-Y=ü", utf8=True) == {"X-Y": "ü"}


@pytest.mark.parametrize(
    ("text", "code"),
    [
        ("SIZE=1 size=2", 501),
        ("-X=1", 501),
        ("X_Y=1", 501),
        ("X=", 501),
        ("X=a=b", 501),
        ("X=ü", 501),
    ],
)
def test_parse_parameters_errors(text: str, code: int) -> None:
    with pytest.raises(RemoteProtocolError) as exc:
        parse_parameters(text, utf8=False)
    assert exc.value.reply.code == code


MAIL_OK = [
    ({}, MailParameters()),
    ({"SIZE": "12345"}, MailParameters(size=12345)),
    ({"BODY": "8bitmime"}, MailParameters(body=Body.EIGHTBITMIME)),
    ({"BODY": "7BIT"}, MailParameters(body=Body.SEVENBIT)),
    ({"SMTPUTF8": None}, MailParameters(smtputf8=True)),
    ({"RET": "hdrs"}, MailParameters(ret=Ret.HDRS)),
    ({"RET": "FULL", "ENVID": "QQ314159+2B1"}, MailParameters(ret=Ret.FULL, envid="QQ314159+1")),
    ({"ENVID": "x" * 100}, MailParameters(envid="x" * 100)),
    ({"AUTH": "<>"}, MailParameters(auth="<>")),
    ({"AUTH": "e+2Bf@example.org"}, MailParameters(auth="e+f@example.org")),
]


@pytest.mark.parametrize(("raw", "expected"), MAIL_OK)
def test_mail_parameters(raw: dict[str, str | None], expected: MailParameters) -> None:
    assert mail_parameters(raw, allow_auth=True) == expected


MAIL_BAD = [
    ({"SIZE": "ten"}, 501),
    ({"SIZE": None}, 501),
    ({"SIZE": "1" * 21}, 501),
    ({"BODY": "BINARYMIME"}, 501),
    ({"SMTPUTF8": "yes"}, 501),
    ({"RET": "ALL"}, 501),
    ({"ENVID": "x" * 101}, 501),
    ({"ENVID": "a+0Ab"}, 501),
    ({"ENVID": "a+zz"}, 501),
    ({"ENVID": "a+4"}, 501),
    ({"FOO": "bar"}, 555),
    ({"NOTIFY": "NEVER"}, 555),
]


@pytest.mark.parametrize(("raw", "code"), MAIL_BAD)
def test_mail_parameter_errors(raw: dict[str, str | None], code: int) -> None:
    with pytest.raises(RemoteProtocolError) as exc:
        mail_parameters(raw, allow_auth=True)
    assert exc.value.reply.code == code


def test_auth_parameter_is_unknown_unless_auth_is_offered() -> None:
    with pytest.raises(RemoteProtocolError) as exc:
        mail_parameters({"AUTH": "<>"}, allow_auth=False)
    assert exc.value.reply.code == 555


RCPT_OK = [
    ({}, RcptParameters()),
    ({"NOTIFY": "never"}, RcptParameters(notify=frozenset({Notify.NEVER}))),
    (
        {"NOTIFY": "SUCCESS,FAILURE,DELAY"},
        RcptParameters(notify=frozenset({Notify.SUCCESS, Notify.FAILURE, Notify.DELAY})),
    ),
    (
        {"ORCPT": "rfc822;a+2Bb+3Dc@example.org"},
        RcptParameters(orcpt=OriginalRecipient("rfc822", "a+b=c@example.org")),
    ),
    (
        {"ORCPT": "utf-8;j\\x{FC}rgen@example.org"},
        RcptParameters(orcpt=OriginalRecipient("utf-8", "jürgen@example.org")),
    ),
]


@pytest.mark.parametrize(("raw", "expected"), RCPT_OK)
def test_rcpt_parameters(raw: dict[str, str | None], expected: RcptParameters) -> None:
    assert rcpt_parameters(raw, utf8=False) == expected


RCPT_BAD = [
    ({"NOTIFY": "NEVER,SUCCESS"}, 501),
    ({"NOTIFY": "SOMETIMES"}, 501),
    ({"NOTIFY": "SUCCESS,"}, 501),
    ({"NOTIFY": None}, 501),
    ({"ORCPT": "rfc822"}, 501),
    ({"ORCPT": ";a@b"}, 501),
    ({"ORCPT": "rfc822;"}, 501),
    ({"ORCPT": "rfc822;a+0Db"}, 501),
    ({"ORCPT": "rfc822;a+G0"}, 501),
    ({"ORCPT": "rfc822;" + "a" * 500}, 501),
    ({"ORCPT": "utf-8;\\x{D800}"}, 501),
    ({"SIZE": "10"}, 555),
]


@pytest.mark.parametrize(("raw", "code"), RCPT_BAD)
def test_rcpt_parameter_errors(raw: dict[str, str | None], code: int) -> None:
    with pytest.raises(RemoteProtocolError) as exc:
        rcpt_parameters(raw, utf8=False)
    assert exc.value.reply.code == code


def test_orcpt_unitext_only_with_smtputf8() -> None:
    assert rcpt_parameters({"ORCPT": "utf-8;ü@x"}, utf8=True).orcpt == OriginalRecipient(
        "utf-8", "ü@x"
    )
    with pytest.raises(RemoteProtocolError):
        rcpt_parameters({"ORCPT": "utf-8;ü@x"}, utf8=False)


# --- xtext -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("encoded", "decoded"),
    [
        ("", ""),
        ("abc", "abc"),
        ("a+2Bb", "a+b"),
        ("a+3Db", "a=b"),
        ("+20", " "),
        ("+c3+bc", "ü"),
        ("!~", "!~"),
    ],
)
def test_xtext_decode(encoded: str, decoded: str) -> None:
    assert xtext_decode(encoded) == decoded


@pytest.mark.parametrize("bad", ["a b", "a=b", "+", "+4", "+4G", "ü", "+FF"])
def test_xtext_decode_errors(bad: str) -> None:
    with pytest.raises(ValueError):
        xtext_decode(bad)


@pytest.mark.parametrize("text", ["", "plain", "a+b=c d", "jürgen@example.org", "\x00\x7f~!"])
def test_xtext_round_trip(text: str) -> None:
    encoded = xtext_encode(text)
    assert all(33 <= ord(c) <= 126 and c != "=" for c in encoded)
    assert xtext_decode(encoded) == text
