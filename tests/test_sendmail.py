"""`leafmail sendmail`: real processes writing into a real spool, read back with Spool.

Every submission runs ``python -m leafmail.cli sendmail ...`` (or a symlink named
``sendmail``) with the message on stdin, in an environment scrubbed of LEAFMAIL_* and
pointed into the test's directory: LEAFMAIL_CONFIG names a config with hostname
leaf.test, LEAFMAIL_SPOOL the spool. What was spooled is read back with
`leafmail.spool.Spool` and compared byte for byte. The option parser and the address
list reader also get pure tables of cases. The mail(1) test drives Debian's bsd-mailx,
which runs ``sendmail -i -t`` from its ``sendmail`` variable.
"""

from __future__ import annotations

import email.utils
import errno
import os
import pwd
import re
import shutil
import smtplib
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from io import BytesIO
from pathlib import Path

import pytest
from conftest import ROOT
from leafmail_fixtures import (
    LeafmailFactory,
    clean_env,
    leafmail_command,
    leafmail_servers,
    queued_id,
    smtplib_send,
    toml_string,
    write_config,
)
from smarthost import Smarthost

from leafmail import sendmail
from leafmail.queue import SCAN_INTERVAL
from leafmail.sendmail.smtp_session import LocalLineEnds
from leafmail.spool import CorruptMessage, Spool, SpooledMessage
from leafmail.states import QueueState
from netserver.errors import (
    EX_CANTCREAT,
    EX_CONFIG,
    EX_DATAERR,
    EX_TEMPFAIL,
    EX_USAGE,
    CantCreateError,
    NetserverError,
    UsageError,
)

HOST = "leaf.test"
LOGIN = pwd.getpwuid(os.getuid()).pw_name
ME = f"{LOGIN}@{HOST}"
TIMEOUT = 20.0

# Received: by leaf.test (leafmail, from userid UID)\r\n\t[with PROTO ]id QID
# then either "\r\n\tfor <RCPT>; DATE\r\n" (one recipient) or ";\r\n\tDATE\r\n".
_RECEIVED = re.compile(
    rb"Received: by leaf\.test \(leafmail, from userid (?P<uid>\d+)\)\r\n"
    rb"\t(?:with (?P<proto>[A-Z0-9]+) )?id (?P<qid>[0-9A-F]{24})"
    rb"(?:;\r\n\t|\r\n\tfor <(?P<rcpt>[^>\r\n]*)>; )(?P<date>[^\r\n]+)\r\n"
)


@dataclass(frozen=True)
class Box:
    """A test's own config, spool and environment."""

    tmp: Path
    spool: Path
    config: Path
    env: dict[str, str]


def make_box(tmp_path: Path, config_text: str = "") -> Box:
    spool = tmp_path / "spool"
    config = write_config(tmp_path, f'hostname = "{HOST}"\n{config_text}')
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    env = clean_env(
        tmp_path,
        {"LEAFMAIL_CONFIG": str(config), "LEAFMAIL_SPOOL": str(spool), "HOME": str(home)},
    )
    env.pop("NAME", None)  # the full name comes from -F, $NAME or GECOS: only GECOS here
    env.pop("MAILRC", None)
    return Box(tmp_path, spool, config, env)


@pytest.fixture
def box(tmp_path: Path) -> Box:
    return make_box(tmp_path)


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[LeafmailFactory]:
    yield from leafmail_servers(tmp_path)


def run(
    box: Box,
    *args: str,
    stdin: bytes = b"",
    argv: list[str] | None = None,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[bytes]:
    """Run sendmail (``leafmail sendmail`` unless `argv` says how) with `stdin`."""
    return subprocess.run(
        [*(argv or leafmail_command("sendmail")), *args],
        input=stdin,
        cwd=ROOT,
        env={**box.env, **(env or {})},
        capture_output=True,
        timeout=TIMEOUT,
        check=False,
    )


def ok(done: subprocess.CompletedProcess[bytes]) -> None:
    """Exit 0 and silence, as sendmail(8) is on success."""
    assert done.returncode == 0, done.stderr.decode()
    assert (done.stdout, done.stderr) == (b"", b"")


def messages(box: Box) -> list[SpooledMessage]:
    if not box.spool.exists():
        return []
    found = []
    for item in Spool(box.spool, create=False).messages(QueueState.QUEUE):
        assert not isinstance(item, CorruptMessage), f"corrupt spool file: {item}"
        found.append(item)
    return found


def only(box: Box) -> SpooledMessage:
    found = messages(box)
    assert len(found) == 1, found
    return found[0]


@dataclass(frozen=True)
class Trace:
    uid: int
    protocol: str | None
    qid: str
    recipient: str | None
    date: datetime


def split_trace(msg: SpooledMessage) -> tuple[Trace, bytes]:
    """The leading Received header, checked against the queue id; and the rest."""
    match = _RECEIVED.match(msg.data)
    assert match is not None, f"no local Received header first: {msg.data[:300]!r}"
    trace = Trace(
        int(match["uid"]),
        match["proto"].decode() if match["proto"] else None,
        match["qid"].decode(),
        match["rcpt"].decode() if match["rcpt"] is not None else None,
        email.utils.parsedate_to_datetime(match["date"].decode()),
    )
    assert trace.qid == msg.qid
    assert trace.uid == os.getuid()
    assert abs(datetime.now(UTC) - trace.date) < timedelta(minutes=5)
    return trace, msg.data[match.end() :]


def headers(data: bytes) -> list[tuple[str, str]]:
    """(lower-case name, unfolded value) of each header field before the empty line."""
    head = data.split(b"\r\n\r\n", 1)[0].decode("utf-8")
    fields: list[tuple[str, str]] = []
    for line in head.split("\r\n"):
        if line[:1] in (" ", "\t"):
            name, value = fields[-1]
            fields[-1] = (name, value + line)
        else:
            name, _, value = line.partition(":")
            fields.append((name.lower(), value.strip()))
    return fields


def added(data: bytes) -> dict[str, str]:
    """The Date, Message-ID and From fields of a message."""
    return {k: v for k, v in headers(data) if k in ("date", "message-id", "from")}


def rcpts(msg: SpooledMessage) -> list[str]:
    return [r.address for r in msg.envelope.recipients]


def wait_for(what: str, condition: Callable[[], bool], timeout: float = 20.0) -> None:
    """Poll a condition the product gives no signal for, within a deadline."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


COMPLETE = (
    b"From: Alice <alice@src.test>\r\n"
    b"To: bob@dst.test\r\n"
    b"Date: Mon, 02 Feb 2026 10:00:00 +0000\r\n"
    b"Message-ID: <given@src.test>\r\n"
    b"Subject: complete\r\n"
    b"\r\n"
    b"Hello.\r\n"
)


# --- -bm: a message on stdin -------------------------------------------------------------


def test_plain_message_to_argument_recipients(box: Box) -> None:
    ok(run(box, "bob@dst.test", "carol", stdin=b"Subject: hi\n\nHello Bob.\n"))

    msg = only(box)
    trace, rest = split_trace(msg)
    assert (trace.protocol, trace.recipient) == (None, None)  # two recipients: no "for"
    assert rcpts(msg) == ["bob@dst.test", f"carol@{HOST}"]  # a bare name gets @hostname
    env = msg.envelope
    assert (env.sender, env.body, env.smtputf8) == (ME, "7BIT", False)
    assert (env.client.protocol, env.client.ip, env.client.helo) == ("local", None, None)
    fields = added(rest)
    assert rest.startswith(b"Subject: hi\r\n")
    assert rest.endswith(b"\r\n\r\nHello Bob.\r\n")
    assert fields["message-id"] == f"<{msg.qid}@{HOST}>"
    date = email.utils.parsedate_to_datetime(fields["date"])
    assert abs(datetime.now(UTC) - date) < timedelta(minutes=5)
    gecos = pwd.getpwuid(os.getuid()).pw_gecos.split(",")[0].replace("&", LOGIN.capitalize())
    assert fields["from"] == (f'"{gecos}" <{ME}>' if gecos else ME)


def test_nul_octets_never_reach_the_spool(box: Box) -> None:
    """CRLF NUL "." CRLF is an end of DATA to a next hop that drops NULs (SMTP
    smuggling); a locally submitted message loses its NULs before it is stored."""
    smuggled = b"Subject: nul\n\nbefore\n\x00.\nMAIL FROM:<x@evil.test>\nmid\x00dle\n"
    ok(run(box, "-i", "bob@dst.test", stdin=smuggled))

    _trace, rest = split_trace(only(box))
    assert b"\0" not in rest
    assert rest.endswith(b"before\r\n.\r\nMAIL FROM:<x@evil.test>\r\nmiddle\r\n")


def test_one_recipient_is_named_in_the_received_header(box: Box) -> None:
    ok(run(box, "bob@dst.test", stdin=b"Subject: x\n\nx\n"))
    trace, _ = split_trace(only(box))
    assert trace.recipient == "bob@dst.test"


def test_complete_headers_are_left_alone(box: Box) -> None:
    ok(run(box, "bob@dst.test", stdin=COMPLETE))
    msg = only(box)
    _, rest = split_trace(msg)
    assert rest == COMPLETE


@pytest.mark.parametrize("missing", ["date", "message-id", "from"])
def test_each_missing_header_is_added_and_only_that_one(box: Box, missing: str) -> None:
    lines = [
        line for line in COMPLETE.split(b"\r\n") if not line.lower().startswith(missing.encode())
    ]
    ok(run(box, "bob@dst.test", "-F", "Ann Other", stdin=b"\r\n".join(lines)))
    _, rest = split_trace(only(box))
    fields = added(rest)
    assert len(fields) == 3, fields
    given = dict(headers(COMPLETE))
    for name in ("date", "message-id", "from"):
        if name != missing:
            assert fields[name] == given[name]
    if missing == "from":
        assert fields["from"] == f'"Ann Other" <{ME}>'


def test_from_uses_the_envelope_sender_and_the_full_name(box: Box) -> None:
    ok(run(box, "-f", "me@src.test", "-F", 'Ann "Q" Other', "bob@dst.test", stdin=b"x\n"))
    ok(run(box, "bob@dst.test", stdin=b"x\n", env={"NAME": "Jörg Ünicode"}))
    first, second = messages(box)
    assert added(split_trace(first)[1])["from"] == r'"Ann \"Q\" Other" <me@src.test>'
    encoded = added(split_trace(second)[1])["from"]
    assert encoded.startswith("=?utf-8?") and encoded.endswith(f"<{ME}>")
    name, _ = email.utils.parseaddr(encoded)
    assert str(email.header.make_header(email.header.decode_header(name))) == "Jörg Ünicode"


def test_a_full_name_cannot_add_header_lines(box: Box) -> None:
    ok(run(box, "-F", "Eve\r\nBcc: spy@evil.test", "bob@dst.test", stdin=b"x\n"))
    _, rest = split_trace(only(box))
    assert b"spy" not in rest.split(b"\r\nFrom:")[0]
    assert added(rest)["from"] == f'"EveBcc: spy@evil.test" <{ME}>'
    assert [k for k, _ in headers(rest)].count("bcc") == 0


def test_a_message_without_a_header_section_gets_one(box: Box) -> None:
    ok(run(box, "bob@dst.test", stdin=b"just a line of text\nand another\n"))
    _, rest = split_trace(only(box))
    head, body = rest.split(b"\r\n\r\n", 1)
    assert {k for k, _ in headers(rest)} == {"date", "message-id", "from"}
    assert body == b"just a line of text\r\nand another\r\n"
    assert b"just" not in head


# --- -t ---------------------------------------------------------------------------------


def test_t_takes_to_cc_bcc_and_arguments_and_drops_bcc(box: Box) -> None:
    message = (
        b"From: me@src.test\n"
        b"To: Bob <bob@dst.test>, carol@dst.test\n"
        b"Cc: dave@dst.test (Dave),\n  friends: erin@dst.test, frank;\n"
        b"Bcc: hidden@dst.test\n"
        b"BCC: Other Hidden <hidden2@dst.test>\n"
        b"Subject: -t\n"
        b"\n"
        b"Body.\n"
    )
    ok(run(box, "-t", "extra@dst.test", "bob@dst.test", stdin=message))
    msg = only(box)
    assert rcpts(msg) == [
        "extra@dst.test",
        "bob@dst.test",
        "carol@dst.test",
        "dave@dst.test",
        "erin@dst.test",
        f"frank@{HOST}",
        "hidden@dst.test",
        "hidden2@dst.test",
    ]
    _, rest = split_trace(msg)
    assert b"hidden" not in rest
    assert [k for k, _ in headers(rest)][:3] == ["from", "to", "cc"]
    assert rest.endswith(b"Subject: -t\r\nDate: " + rest.split(b"Date: ")[1])


def test_bare_names_in_address_headers_get_the_origin(box: Box) -> None:
    """Issue 13 item 9: ``To: root`` was spooled as it was; Postfix's cleanup adds
    @myorigin (append_at_myorigin). Names, comments, groups and folding stay."""
    message = (
        b"From: cron\n"
        b"To: root, Bob <bob>, carol@dst.test\n"
        b'Cc: "Q x" (quoted),\n  team: dave, erin@dst.test;\n'
        b"Reply-To: <@relay.test:frank>\n"
        b"Subject: root's mail\n"
        b"\n"
        b"To: root in the body is not a header\n"
    )
    ok(run(box, "-t", stdin=message))
    msg = only(box)
    assert rcpts(msg) == [
        f"root@{HOST}",
        f"bob@{HOST}",
        "carol@dst.test",
        f'"Q x"@{HOST}',
        f"dave@{HOST}",
        "erin@dst.test",
    ]
    rest = split_trace(msg)[1]
    assert rest.startswith(
        f"From: cron@{HOST}\r\n"
        f"To: root@{HOST}, Bob <bob@{HOST}>, carol@dst.test\r\n"
        f'Cc: "Q x"@{HOST} (quoted),\r\n  team: dave@{HOST}, erin@dst.test;\r\n'
        f"Reply-To: <@relay.test:frank@{HOST}>\r\n"
        "Subject: root's mail\r\n".encode()
    )
    assert rest.endswith(b"\r\n\r\nTo: root in the body is not a header\r\n")


def test_origin_and_masquerade_domains(tmp_path: Path) -> None:
    """[sendmail] origin is what bare names get; masquerade_domains hides host names in
    the envelope sender and the headers, not in envelope recipients (as Postfix)."""
    box = make_box(
        tmp_path,
        '[sendmail]\norigin = "Example.ORG."\nmasquerade_domains = ["example.org"]\n',
    )
    head = b"From: Ops <ops@build1.example.org>\n"
    head += b"To: root, alice@mail.example.org, bob@dst.test, eve@notexample.org\n"
    ok(run(box, "-t", "-f", "cron@host1.example.org", stdin=head + b"\nx\n"))
    msg = only(box)
    assert msg.envelope.sender == "cron@example.org"
    assert rcpts(msg) == [
        "root@example.org",
        "alice@mail.example.org",
        "bob@dst.test",
        "eve@notexample.org",
    ]
    fields = dict(headers(split_trace(msg)[1]))
    assert fields["from"] == "Ops <ops@example.org>"
    assert fields["to"] == "root@example.org, alice@example.org, bob@dst.test, eve@notexample.org"
    ok(run(box, "-f", "", "someone@dst.test", stdin=b"Subject: no From\n\nx\n"))
    added = next(m for m in messages(box) if m.envelope.sender == "")
    assert f"<{LOGIN}@example.org>" in dict(headers(split_trace(added)[1]))["from"]


@pytest.mark.parametrize("origin", ["a b", "x@y.test", "-bad.test"])
def test_a_bad_origin_is_a_config_error(tmp_path: Path, origin: str) -> None:
    box = make_box(tmp_path, f'[sendmail]\norigin = "{origin}"\n')
    done = run(box, "root", stdin=b"Subject: x\n\nx\n")
    assert done.returncode == EX_CONFIG and b"not a domain name" in done.stderr
    assert messages(box) == []


def test_t_uses_resent_headers_when_there_are_any(box: Box) -> None:
    message = b"To: original@dst.test\nResent-To: new@dst.test\nResent-Bcc: quiet@dst.test\n\nx\n"
    ok(run(box, "-t", stdin=message))
    msg = only(box)
    assert rcpts(msg) == ["new@dst.test", "quiet@dst.test"]
    assert b"quiet" not in split_trace(msg)[1]


def test_t_with_undisclosed_recipients_and_bcc(box: Box) -> None:
    ok(run(box, "-t", stdin=b"To: undisclosed-recipients:;\nBcc: b@dst.test\n\nx\n"))
    msg = only(box)
    assert rcpts(msg) == ["b@dst.test"]
    trace, rest = split_trace(msg)
    assert trace.recipient == "b@dst.test"  # it goes to b alone: no one else sees this
    assert b"b@dst.test" not in rest


def test_t_with_no_recipient_headers_exits_64(box: Box) -> None:
    done = run(box, "-t", stdin=b"Subject: nobody\n\nx\n")
    assert done.returncode == EX_USAGE
    assert b"no recipients" in done.stderr
    assert messages(box) == []


def test_bcc_is_removed_without_t_too(box: Box) -> None:
    ok(run(box, "bob@dst.test", stdin=b"Bcc: secret@dst.test\nSubject: x\n\nx\n"))
    msg = only(box)
    assert rcpts(msg) == ["bob@dst.test"]
    assert b"secret" not in msg.data


# --- the end of the input ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "body"),
    [
        ((), b"one\r\n"),
        (("-i",), b"one\r\n.\r\ntwo\r\n"),
        (("-oi",), b"one\r\n.\r\ntwo\r\n"),
        (("-o", "i"), b"one\r\n.\r\ntwo\r\n"),
        (("-ti",), b"one\r\n.\r\ntwo\r\n"),
    ],
)
def test_a_dot_line_ends_the_message_unless_i(box: Box, args: tuple[str, ...], body: bytes) -> None:
    rcpt = () if "-ti" in args else ("bob@dst.test",)
    ok(run(box, *args, *rcpt, stdin=b"To: bob@dst.test\n\none\n.\ntwo\n"))
    assert split_trace(only(box))[1].split(b"\r\n\r\n", 1)[1] == body


@pytest.mark.parametrize(
    ("stdin", "body"),
    [
        (b"x\n\none\r\n.\r\ntwo\r\n", b"one\r\n"),  # CRLF "." line
        (b"x\n\none\n.", b"one\r\n"),  # "." as the last line, no newline
        (b"x\n\none\n..\n.x\n", b"one\r\n..\r\n.x\r\n"),  # not "." alone; no unstuffing
    ],
)
def test_dot_lines_without_i(box: Box, stdin: bytes, body: bytes) -> None:
    ok(run(box, "bob@dst.test", stdin=stdin.replace(b"x\n", b"Subject: x\n", 1)))
    assert split_trace(only(box))[1].split(b"\r\n\r\n", 1)[1] == body


def test_a_dot_line_ends_input_without_waiting_for_eof(box: Box) -> None:
    """A terminal user types "." and sendmail is done; stdin is still open."""
    proc = subprocess.Popen(
        leafmail_command("sendmail", "bob@dst.test"),
        cwd=ROOT,
        env=box.env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdin is not None
    try:
        proc.stdin.write(b"Subject: typed\n\nhello\n.\n")
        proc.stdin.flush()
        assert proc.wait(TIMEOUT) == 0
    finally:
        proc.stdin.close()
        proc.kill()
        proc.wait()
    assert b"Subject: typed\r\n" in only(box).data


# --- line ends and content ------------------------------------------------------------------


def test_lf_becomes_crlf_and_bare_cr_never_makes_a_line(box: Box) -> None:
    stdin = b"Subject: a\r\r\nX-Mixed: b\r\n\nlf\ncrlf\r\nbare\rcr\nend"
    ok(run(box, "bob@dst.test", stdin=stdin))
    rest = split_trace(only(box))[1]
    assert rest.startswith(b"Subject: a\r\nX-Mixed: b\r\n")
    assert rest.endswith(b"\r\n\r\nlf\r\ncrlf\r\nbare cr\r\nend\r\n")
    assert re.search(rb"\r(?!\n)|(?<!\r)\n", rest) is None


def test_eight_bit_content_is_8bitmime(box: Box) -> None:
    ok(run(box, "bob@dst.test", stdin="Subject: café\n\nnaïve\n".encode()))
    ok(run(box, "bob@dst.test", stdin=b"Subject: plain\n\nascii\n"))
    eight, seven = messages(box)
    assert (eight.envelope.body, eight.envelope.smtputf8) == ("8BITMIME", False)
    assert "naïve\r\n".encode() in eight.data
    assert (seven.envelope.body, seven.envelope.smtputf8) == ("7BIT", False)


def test_non_ascii_addresses_ask_for_smtputf8(box: Box) -> None:
    ok(run(box, "jörg@bücher.test", stdin=b"Subject: x\n\nx\n"))
    ok(run(box, "-f", "ännchen@src.test", "bob@dst.test", stdin=b"Subject: x\n\nx\n"))
    rcpt, sender = messages(box)
    assert rcpts(rcpt) == ["jörg@bücher.test"]
    assert rcpt.envelope.smtputf8 and sender.envelope.smtputf8
    assert sender.envelope.sender == "ännchen@src.test"
    assert rcpt.envelope.body == "8BITMIME"  # the Received "for" clause names jörg


def test_a_body_line_over_998_octets_is_broken(box: Box) -> None:
    long = "é" * 700  # 1400 octets; no break inside a character
    ok(run(box, "bob@dst.test", stdin=f"Subject: x\n\n{long}\n".encode()))
    body = split_trace(only(box))[1].split(b"\r\n\r\n", 1)[1]
    lines = body.split(b"\r\n")[:-1]
    assert all(len(line) <= 998 for line in lines)
    assert b"".join(lines).decode() == long


def test_a_header_line_over_998_octets_exits_65(box: Box) -> None:
    done = run(box, "bob@dst.test", stdin=b"Subject: " + b"x" * 1000 + b"\n\nx\n")
    assert done.returncode == EX_DATAERR
    assert b"subject header" in done.stderr
    assert messages(box) == []


def test_over_the_size_limit_exits_65(tmp_path: Path) -> None:
    box = make_box(tmp_path, "[smtp]\nmax_message_size = 1000\n")
    ok(run(box, "bob@dst.test", stdin=b"x" * 900 + b"\n"))
    done = run(box, "bob@dst.test", stdin=(b"y" * 99 + b"\n") * 11)
    assert done.returncode == EX_DATAERR
    assert done.stderr == b"leafmail sendmail: message larger than the limit of 1000 octets\n"
    assert len(messages(box)) == 1


# --- senders, recipients and options ----------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "sender"),
    [
        (("-f", "me@src.test"), "me@src.test"),
        (("-fme@src.test",), "me@src.test"),
        (("-r", "<me@src.test>"), "me@src.test"),
        (("-f", "Me <me@src.test>"), "me@src.test"),
        (("-f", "me"), f"me@{HOST}"),
        (("-f", "<>"), ""),
        (("-f<>",), ""),
        (("-f", ""), ""),
        ((), ME),
    ],
)
def test_envelope_sender(box: Box, args: tuple[str, ...], sender: str) -> None:
    ok(run(box, *args, "bob@dst.test", stdin=b"Subject: x\n\nx\n"))
    msg = only(box)
    assert msg.envelope.sender == sender
    from_field = added(split_trace(msg)[1])["from"]
    mine = sender or ME  # the null sender still gets a From of the user
    assert from_field == mine or from_field.endswith(f"<{mine}>"), from_field


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (("foo@@bar.test",), "foo@@bar.test"),
        (("good@dst.test", "a b@dst.test"), "a b@dst.test"),
        (("bob@dst..test",), "bob@dst..test"),
        (("<bob@dst.test",), "<bob@dst.test"),
        (("-f", "bad@@src.test", "bob@dst.test"), "bad@@src.test"),
    ],
)
def test_a_bad_address_exits_65_naming_it(box: Box, args: tuple[str, ...], named: str) -> None:
    done = run(box, *args, stdin=b"Subject: x\n\nx\n")
    assert done.returncode == EX_DATAERR, done.stderr
    err = done.stderr.decode()
    assert err.startswith("leafmail sendmail: bad ") and repr(named) in err, err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert messages(box) == []


def hops(count: int) -> bytes:
    line = b"Received: from a.test by b.test; Mon, 7 Dec 2026 10:00:00 +0000\n"
    return line * count + b"Subject: loop\n\nx\n"


def test_a_message_over_the_hop_limit_exits_65_and_spools_nothing(box: Box) -> None:
    """As the end of DATA refuses it (554 5.4.6): a loop through sendmail ends too."""
    done = run(box, "bob@dst.test", stdin=hops(101))
    assert done.returncode == EX_DATAERR, done.stderr
    err = done.stderr.decode()
    assert err.startswith("leafmail sendmail: too many hops") and err.count("\n") == 1, err
    assert messages(box) == []
    ok(run(box, "bob@dst.test", stdin=hops(100)))  # the limit itself is allowed, as by SMTP
    assert len(messages(box)) == 1


def test_a_bad_address_in_a_header_exits_65(box: Box) -> None:
    done = run(box, "-t", stdin=b"To: ok@dst.test, broken@@dst.test\n\nx\n")
    assert done.returncode == EX_DATAERR
    assert b"'broken@@dst.test'" in done.stderr
    assert messages(box) == []


def test_no_recipients_exits_64(box: Box) -> None:
    done = run(box, stdin=b"Subject: x\n\nx\n")
    assert done.returncode == EX_USAGE
    assert done.stderr == b"leafmail sendmail: no recipients given (name them, or use -t)\n"
    assert messages(box) == []


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("-Z", "bob@dst.test"), "unknown option -Z"),
        (("-tZ", "bob@dst.test"), "unknown option -Z"),
        (("-bd",), "-bd is not supported"),
        (("-q30m",), "-q30m is not supported"),
        (("-N", "sometimes", "bob@dst.test"), "-N 'sometimes'"),
        (("-R", "most", "bob@dst.test"), "-R 'most'"),
        (("bob@dst.test", "-f"), "option -f needs a value"),
    ],
)
def test_usage_errors_exit_64(box: Box, args: tuple[str, ...], message: str) -> None:
    done = run(box, *args, stdin=b"x\n")
    assert done.returncode == EX_USAGE
    assert done.stderr.decode().startswith("leafmail sendmail: " + message)
    assert messages(box) == []


def test_ignored_options_are_accepted(box: Box) -> None:
    args = ["-v", "-oem", "-odb", "-m", "-n", "-U", "-B", "8BITMIME", "-h", "3", "-Ac", "-A", "m"]
    ok(run(box, *args, "-L", "x", "bob@dst.test", stdin=b"Subject: x\n\nx\n"))
    assert rcpts(only(box)) == ["bob@dst.test"]


def test_double_dash_ends_options(box: Box) -> None:
    ok(run(box, "-i", "--", "-bob@dst.test", stdin=b"Subject: x\n\nx\n"))
    assert rcpts(only(box)) == ["-bob@dst.test"]


def test_dsn_options_go_into_the_envelope(box: Box) -> None:
    args = ["-N", "failure,delay", "-R", "hdrs", "-V", "env-1", "a@dst.test", "b@dst.test"]
    ok(run(box, *args, stdin=b"Subject: x\n\nx\n"))
    msg = only(box)
    assert [r.notify for r in msg.envelope.recipients] == [("DELAY", "FAILURE")] * 2
    assert (msg.envelope.ret, msg.envelope.envid) == ("HDRS", "env-1")


def test_help(box: Box) -> None:
    done = run(box, "--help")
    assert done.returncode == 0
    assert done.stdout.startswith(b"usage: leafmail sendmail [OPTION ...]")
    listing = subprocess.run(
        leafmail_command("--help"), env=box.env, capture_output=True, check=True, timeout=TIMEOUT
    )
    assert b"sendmail" in listing.stdout


# --- the spool ---------------------------------------------------------------------------


def test_the_message_is_committed_and_private(box: Box) -> None:
    ok(run(box, "bob@dst.test", stdin=b"Subject: x\n\nx\n"))
    msg = only(box)
    path = box.spool / "queue" / msg.qid
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE((box.spool / "queue").stat().st_mode) == 0o700
    assert list((box.spool / "tmp").iterdir()) == []  # renamed into queue/, nothing left
    assert Spool(box.spool, create=False).get(msg.qid).data == msg.data  # self-check passes


def test_a_new_spool_is_private_to_its_owner(box: Box) -> None:
    done = subprocess.run(
        leafmail_command("sendmail", "bob@dst.test"),
        input=b"x\n",
        cwd=ROOT,
        env=box.env,
        capture_output=True,
        timeout=TIMEOUT,
        check=False,
        umask=0o022,  # a usual login umask
    )
    ok(done)
    assert stat.S_IMODE(box.spool.stat().st_mode) == 0o700


def test_a_spool_that_cannot_be_created_exits_73(box: Box) -> None:
    blocker = box.tmp / "file"
    blocker.write_text("not a directory")
    done = run(box, "bob@dst.test", stdin=b"x\n", env={"LEAFMAIL_SPOOL": str(blocker / "spool")})
    assert done.returncode == EX_CANTCREAT
    err = done.stderr.decode()
    assert err.startswith(f"leafmail sendmail: cannot use the spool {blocker}/spool: ")
    assert err.count("\n") == 1 and "Traceback" not in err


@pytest.mark.parametrize(
    ("code", "error"),
    [
        (errno.ENOSPC, sendmail.TryLater),
        (errno.EDQUOT, sendmail.TryLater),
        (errno.EIO, sendmail.TryLater),
        (errno.EACCES, CantCreateError),
        (errno.EROFS, CantCreateError),
    ],
)
def test_spool_errors_map_to_sysexits(code: int, error: type[NetserverError]) -> None:
    exc = sendmail._spool_error(OSError(code, os.strerror(code)), "cannot spool")
    assert type(exc) is error
    assert exc.exit_code == (EX_TEMPFAIL if error is sendmail.TryLater else EX_CANTCREAT)
    assert os.strerror(code) in str(exc)


def test_the_spool_comes_from_the_config_without_leafmail_spool(tmp_path: Path) -> None:
    spool = tmp_path / "configured-spool"
    box = make_box(tmp_path, f"spool = {toml_string(spool)}\n")
    env = {k: v for k, v in box.env.items() if k != "LEAFMAIL_SPOOL"}
    done = subprocess.run(
        leafmail_command("sendmail", "bob@dst.test"),
        input=b"x\n",
        cwd=ROOT,
        env=env,
        capture_output=True,
        timeout=TIMEOUT,
        check=False,
    )
    ok(done)
    assert len(Spool(spool, create=False).ids()) == 1
    assert not box.spool.exists()


# --- -bp and -q --------------------------------------------------------------------------------


def test_bp_lists_the_queue(box: Box) -> None:
    empty = run(box, "-bp")
    assert (empty.returncode, empty.stdout) == (0, b"Mail queue is empty\n")
    ok(run(box, "bob@dst.test", "carol@dst.test", stdin=b"Subject: x\n\nx\n"))
    listing = run(box, "-bp")
    assert listing.returncode == 0, listing.stderr
    text = listing.stdout.decode()
    qid = only(box).qid
    assert re.search(rf"^{qid} active +\d+ +\d+s  <{re.escape(ME)}>$", text, re.M), text
    assert "    pending   <bob@dst.test>\n    pending   <carol@dst.test>\n" in text
    assert text.endswith("in 1 message\n")


def test_q_without_a_smarthost_exits_78(box: Box) -> None:
    ok(run(box, "bob@dst.test", stdin=b"x\n"))
    done = run(box, "-q")
    assert done.returncode == EX_CONFIG
    assert b"no smarthost configured" in done.stderr
    assert b"Traceback" not in done.stderr
    assert len(messages(box)) == 1


def test_q_delivers_to_the_smarthost(tmp_path: Path, sink: Smarthost) -> None:
    delivery = f'[delivery]\nmode = "offline"\ntls = "none"\nsmarthost = "{sink.address}"\n'
    box = make_box(tmp_path, delivery)
    ok(run(box, "bob@dst.test", stdin=b"Subject: flushed\n\nx\n"))
    qid = only(box).qid
    done = run(box, "-q")
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"{qid} delivered\n".encode()
    assert messages(box) == []
    (got,) = sink.received
    assert (got.sender, got.recipients) == (ME, ["bob@dst.test"])
    assert b"Subject: flushed\r\n" in got.content


def test_a_running_daemon_is_woken_and_delivers_at_once(
    tmp_path: Path, sink: Smarthost, servers: LeafmailFactory
) -> None:
    spool = tmp_path / "daemon-spool"
    delivery = f'[delivery]\nmode = "smarthost"\ntls = "none"\nsmarthost = "{sink.address}"\n'
    box = make_box(tmp_path, f"spool = {toml_string(spool)}\n{delivery}")
    started = time.monotonic()  # the runner's first scan is later, its second 60 s after
    servers.spawn(["--config", str(box.config), "--listen", "127.0.0.1:0"], spool_path=spool)
    env = {k: v for k, v in box.env.items() if k != "LEAFMAIL_SPOOL"}  # spool from config

    done = subprocess.run(
        leafmail_command("sendmail", "-t"),
        input=b"To: bob@dst.test\nSubject: woken\n\nGo now.\n",
        cwd=ROOT,
        env=env,
        capture_output=True,
        timeout=TIMEOUT,
        check=False,
    )
    ok(done)

    # The daemon's own rescan is a minute away: what comes before it came of the wake
    # (a fixed 5 s, which a loaded machine can take to deliver, proved no more).
    before_the_rescan = started + SCAN_INTERVAL - 1.0 - time.monotonic()
    wait_for("the daemon to deliver", lambda: len(sink.received) == 1, before_the_rescan)
    (got,) = sink.received
    assert (got.sender, got.recipients) == (ME, ["bob@dst.test"])
    assert got.content.startswith(b"Received: by leaf.test (leafmail, from userid ")
    assert got.content.endswith(b"\r\n\r\nGo now.\r\n")
    wait_for("the spool to empty", lambda: Spool(spool, create=False).ids() == [])


# --- -bs ---------------------------------------------------------------------------------------


def start_bs(box: Box) -> tuple[subprocess.Popen[bytes], smtplib.SMTP]:
    """sendmail -bs with stdin and stdout on one end of a socket pair; smtplib on the
    other, so the dialogue is a real SMTP client's, byte for byte."""
    ours, theirs = socket.socketpair()
    proc = subprocess.Popen(
        leafmail_command("sendmail", "-bs"),
        cwd=ROOT,
        env=box.env,
        stdin=theirs.fileno(),
        stdout=theirs.fileno(),
        stderr=subprocess.PIPE,
    )
    theirs.close()
    ours.settimeout(TIMEOUT)
    client = smtplib.SMTP(local_hostname="client.test", timeout=TIMEOUT)
    client.sock = ours
    code, text = client.getreply()
    assert (code, text) == (220, f"{HOST} ESMTP ready".encode())
    return proc, client


def test_bs_dialogue_with_smtplib(box: Box) -> None:
    proc, client = start_bs(box)
    try:
        first = b"Subject: one\r\n\r\nFirst.\r\n"
        qid1 = smtplib_send(client, "me@src.test", ["bob@dst.test"], first)
        eight = "Subject: two\r\n\r\nZweite Nachricht: grüße.\r\n".encode()
        qid2 = smtplib_send(
            client,
            "",
            ["carol@dst.test", "dave@dst.test"],
            eight,
            mail_options=["BODY=8BITMIME"],
            rcpt_options=["NOTIFY=FAILURE"],
        )
        code, _ = client.rcpt("outside@dst.test")
        assert code == 503  # no MAIL: the engine still keeps order
        assert client.quit()[0] == 221
    finally:
        client.close()
        assert proc.wait(TIMEOUT) == 0
        assert proc.stderr is not None
        assert proc.stderr.read() == b""
        proc.stderr.close()

    one, two = messages(box)
    assert [one.qid, two.qid] == [qid1, qid2]
    trace, rest = split_trace(one)
    assert (trace.protocol, trace.recipient) == ("ESMTP", "bob@dst.test")
    assert rest.startswith(b"Subject: one\r\nDate: ")  # then the added headers
    assert added(rest)["from"] == "me@src.test"  # the user's name is not put on it
    assert added(rest)["message-id"] == f"<{qid1}@{HOST}>"
    assert (one.envelope.sender, rcpts(one)) == ("me@src.test", ["bob@dst.test"])
    assert one.envelope.client.helo == "client.test"
    assert two.envelope.sender == ""
    assert rcpts(two) == ["carol@dst.test", "dave@dst.test"]
    assert [r.notify for r in two.envelope.recipients] == [("FAILURE",)] * 2
    assert two.envelope.body == "8BITMIME"
    assert "grüße".encode() in two.data


def test_bs_pipelined_dialogue(box: Box) -> None:
    dialogue = (
        b"EHLO client.test\r\n"
        b"MAIL FROM:<me@src.test>\r\n"
        b"RCPT TO:<Postmaster>\r\n"
        b"DATA\r\n"
        b"Subject: piped\r\n\r\n..stuffed\r\n.\r\n"
        b"MAIL FROM:<me@src.test>\r\n"
        b"RCPT TO:<bad@@dst.test>\r\n"
        b"QUIT\r\n"
    )
    done = run(box, "-bs", stdin=dialogue)
    assert done.returncode == 0, done.stderr
    codes = [line[:4] for line in done.stdout.split(b"\r\n") if line[3:4] == b" "]
    assert codes == [
        b"220 ",
        b"250 ",
        b"250 ",
        b"250 ",
        b"354 ",
        b"250 ",
        b"250 ",
        b"501 ",
        b"221 ",
    ]
    qid = queued_id(done.stdout.split(b"\r\n")[-5][4:])
    msg = only(box)
    assert msg.qid == qid
    assert rcpts(msg) == [f"postmaster@{HOST}"]
    assert b"\r\n\r\n.stuffed\r\n" in msg.data


def test_bs_dialogue_with_lf_line_ends(box: Box) -> None:
    """A local program that writes its -bs dialogue with LF line ends (as PHP and shell
    scripts do; Postfix's and Exim's sendmail -bs take them) is answered and queued;
    before, it got its 220 and no other reply, and sendmail exited 0 with nothing queued."""
    dialogue = b"EHLO c\nMAIL FROM:<a@src.test>\nRCPT TO:<b@dst.test>\nDATA\n"
    done = run(box, "-bs", stdin=dialogue + b"Subject: lf\n\n..dot\r\nx\n.\nQUIT\n")
    assert done.returncode == 0, done.stderr
    codes = [line[:4] for line in done.stdout.split(b"\r\n") if line[3:4] == b" "]
    assert codes == [b"220 ", b"250 ", b"250 ", b"250 ", b"354 ", b"250 ", b"221 "]
    data = only(box).data
    assert b"\r\nSubject: lf\r\n" in data
    assert data.endswith(b"\r\n\r\n.dot\r\nx\r\n")


def test_bs_line_ends_are_made_crlf_across_reads() -> None:
    """A CR at the end of one read and its LF at the start of the next stay one CRLF;
    a bare CR is left for the engine to refuse."""
    ends = LocalLineEnds()
    assert ends(b"EHLO a\n") + ends(b"NOOP\r") + ends(b"\nx\ry\r\n") == (
        b"EHLO a\r\nNOOP\r\nx\ry\r\n"
    )
    assert ends(b"\n") == b"\r\n"


def test_bs_line_ends_of_a_crlf_dialogue_are_left_as_they_come() -> None:
    """The first line end decides, across reads too: a dialogue that starts with CRLF
    needs nothing made, and its BDAT chunks are octets (a bare LF in one stays)."""
    ends = LocalLineEnds()
    assert ends(b"EHL") + ends(b"O a\r") + ends(b"\nBDAT 3\r\na\nb") == (
        b"EHLO a\r\nBDAT 3\r\na\nb"
    )


def test_bs_bdat_chunk_of_a_crlf_dialogue_is_taken_as_counted(box: Box) -> None:
    """BDAT counts octets (RFC 3030): a chunk is not lines, and a dialogue written with
    CRLF needs no line ends made. Its chunk with a bare LF is refused as on the network
    (smtp.bare_lf = "reject"); before, each of its LFs was made a CRLF first, so the
    chunk's count ended early: a message cut short by as many octets was queued with
    250, and its last octets were read as commands."""
    dialogue = b"EHLO c\r\nMAIL FROM:<a@src.test>\r\nRCPT TO:<b@dst.test>\r\n"
    done = run(box, "-bs", stdin=dialogue + b"BDAT 13 LAST\r\nSubject: x\nyzQUIT\r\n")
    assert done.returncode == 0, done.stderr
    codes = [line[:4] for line in done.stdout.split(b"\r\n") if line[3:4] == b" "]
    assert codes == [b"220 ", b"250 ", b"250 ", b"250 ", b"554 ", b"221 "], done.stdout
    assert messages(box) == []


def test_bs_end_of_input_without_quit_keeps_what_was_committed(box: Box) -> None:
    dialogue = b"HELO c\r\nMAIL FROM:<a@src.test>\r\nRCPT TO:<b@dst.test>\r\nDATA\r\nx\r\n.\r\n"
    done = run(box, "-bs", stdin=dialogue + b"MAIL FROM:<a@src.test>\r\n")
    assert done.returncode == 0
    assert len(messages(box)) == 1


def test_bs_with_an_unusable_spool_says_421_and_exits_73(box: Box) -> None:
    blocker = box.tmp / "file"
    blocker.write_text("")
    done = run(box, "-bs", stdin=b"QUIT\r\n", env={"LEAFMAIL_SPOOL": str(blocker / "s")})
    assert done.returncode == EX_CANTCREAT
    assert done.stdout.startswith(b"421 leaf.test spool unavailable\r\n")


# --- installed under the name sendmail ------------------------------------------------------


def sendmail_symlink(tmp_path: Path, target: Path) -> Path:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    link = bin_dir / "sendmail"
    link.symlink_to(target)
    return link


def wrapper_script(tmp_path: Path) -> Path:
    """What a user could write: a script that runs leafmail's main."""
    script = tmp_path / "leafmail-wrapper"
    script.write_text(
        f"#!{sys.executable}\nimport sys\nfrom leafmail.cli import main\nsys.exit(main())\n"
    )
    script.chmod(0o755)
    return script


def console_script() -> Path | None:
    """The `leafmail` script pip installed next to this interpreter, if any."""
    path = Path(sys.executable).parent / "leafmail"
    return path if path.exists() else None


@pytest.mark.parametrize("target", ["wrapper", "console script"])
def test_a_symlink_named_sendmail_is_sendmail(box: Box, target: str) -> None:
    if target == "wrapper":
        script = wrapper_script(box.tmp)
    else:
        found = console_script()
        if found is None:
            pytest.skip("no leafmail console script next to this Python")
        script = found
    link = sendmail_symlink(box.tmp, script)
    ok(run(box, "-oi", "-t", argv=[str(link)], stdin=b"To: bob@dst.test\n\n.\n"))
    msg = only(box)
    assert rcpts(msg) == ["bob@dst.test"]
    assert msg.data.endswith(b"\r\n\r\n.\r\n")
    done = run(box, "-Q", argv=[str(link)])
    assert (done.returncode, done.stderr) == (EX_USAGE, b"sendmail: unknown option -Q\n")


def mail_program() -> str | None:
    return shutil.which("bsd-mailx") or shutil.which("mail")


@pytest.mark.skipif(mail_program() is None, reason="no mail(1) here (apt-get install bsd-mailx)")
def test_bsd_mailx_sends_through_our_sendmail(box: Box) -> None:
    """mail(1) runs `$sendmail -i -t` (Debian's bsd-mailx), set in a MAILRC file."""
    link = sendmail_symlink(box.tmp, wrapper_script(box.tmp))
    mailrc = box.tmp / "mailrc"
    mailrc.write_text(f"set sendmail={link}\n")
    program = mail_program()
    assert program is not None
    body = "Hello from mail(1).\n.\nA dot line above; ünïcode here.\n"
    done = subprocess.run(
        [program, "-s", "Mailx subject", "-c", "cc@example.test", "rcpt@example.test"],
        input=body.encode(),
        cwd=box.tmp,
        env={**box.env, "MAILRC": str(mailrc)},
        capture_output=True,
        timeout=TIMEOUT,
        check=False,
    )
    assert done.returncode == 0, (done.stdout, done.stderr)
    msg = only(box)
    assert rcpts(msg) == ["rcpt@example.test", "cc@example.test"]
    assert msg.envelope.sender == ME
    _, rest = split_trace(msg)
    fields = dict(headers(rest))
    assert fields["subject"] == "Mailx subject"
    assert fields["to"] == "rcpt@example.test"
    assert {"date", "message-id", "from"} <= set(fields)
    assert rest.split(b"\r\n\r\n", 1)[1] == body.replace("\n", "\r\n").encode()
    assert msg.envelope.body == "8BITMIME"


# --- the option parser and the address reader, as tables ------------------------------------


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["-t", "-i"], {"extract": True, "dots_end": False}),
        (["-ti", "a"], {"extract": True, "dots_end": False, "recipients": ["a"]}),
        (["a", "-oi", "b"], {"dots_end": False, "recipients": ["a", "b"]}),
        (["-fme", "-F", "Me"], {"sender": "me", "full_name": "Me"}),
        (["-tfme"], {"extract": True, "sender": "me"}),
        (["-r", "me"], {"sender": "me"}),
        (["-bs"], {"mode": "smtp"}),
        (["-b", "p"], {"mode": "queue"}),
        (["-bm", "a"], {"mode": "deliver", "recipients": ["a"]}),
        (["-q"], {"mode": "flush"}),
        (["-N", "never"], {"notify": ("NEVER",)}),
        (["-Nsuccess,Delay"], {"notify": ("DELAY", "SUCCESS")}),
        (["-R", "full", "-V", "id"], {"ret": "FULL", "envid": "id"}),
        (["--", "-t"], {"recipients": ["-t"]}),
        (["-"], {"recipients": ["-"]}),
    ],
)
def test_parse_options(argv: list[str], expected: dict[str, object]) -> None:
    opts = sendmail.parse_options(argv)
    for key, value in expected.items():
        assert getattr(opts, key) == value, key


@pytest.mark.parametrize(
    "argv",
    [["-x"], ["-bv"], ["-q1h"], ["-N", "never,success"], ["-N", ""], ["-V", "a b"], ["-f"]],
)
def test_parse_options_refuses(argv: list[str]) -> None:
    with pytest.raises(UsageError):
        sendmail.parse_options(argv)


@pytest.mark.parametrize(
    ("text", "addresses"),
    [
        ("a@b.test", ["a@b.test"]),
        ("Bob <bob@x.test>, c@y.test", ["bob@x.test", "c@y.test"]),
        ('"Smith, Bob" <bob@x.test>', ["bob@x.test"]),
        ('"a b"@x.test', ['"a b"@x.test']),
        ('"a,b"@x.test, d@e.test', ['"a,b"@x.test', "d@e.test"]),
        ("a@b.test (Comment (nested), too)", ["a@b.test"]),
        ("list: a@x.test, b@y.test;, c@z.test", ["a@x.test", "b@y.test", "c@z.test"]),
        ("undisclosed-recipients:;", []),
        ("a@b.test,, c@d.test, ", ["a@b.test", "c@d.test"]),
        ("<@r1.test,@r2.test:u@d.test>", ["u@d.test"]),
        ("x@[192.0.2.1]", ["x@[192.0.2.1]"]),
        ("=?utf-8?q?B=C3=B6b?= <bob@x.test>", ["bob@x.test"]),
        ("jörg@bücher.test", ["jörg@bücher.test"]),
        ("<>", [""]),
        ("", []),
    ],
)
def test_address_list(text: str, addresses: list[str]) -> None:
    assert sendmail.address_list(text) == addresses


@pytest.mark.parametrize(
    "text", ["a b@c.test", "Bob <b@c.test> tail", "<b@c.test", '"open@c.test', "a@b (x"]
)
def test_address_list_refuses(text: str) -> None:
    with pytest.raises(sendmail.BadInput):
        sendmail.address_list(text)


def test_read_message_counts_crlf_octets_against_the_limit() -> None:
    stream = BytesIO(b"12345678\n")  # 10 octets once the LF is a CRLF
    assert sendmail.read_message(stream, dots_end=True, limit=10) == [b"12345678"]
    with pytest.raises(sendmail.BadInput):
        sendmail.read_message(BytesIO(b"12345678\n"), dots_end=True, limit=9)
    with pytest.raises(sendmail.BadInput):
        sendmail.read_message(BytesIO(b"x" * 100), dots_end=True, limit=50)
