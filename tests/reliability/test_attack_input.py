"""Hostile input to `leafmail serve`: header injection through ESMTP parameters and HELO
names, overlong lines and paths, a client that never sends CRLF, error floods and too
many recipients.

Injection: a CR or LF smuggled through an xtext value (``+0D+0A``), a utf-8-addr escape
(``\\x{0D}``), or raw in the command line must be refused; what is accepted must come
out as one line wherever leafmail writes it: the spooled message, its Received header,
the MAIL/RCPT lines sent onward (checked at a real aiosmtpd smarthost) and the DSN
leafmail writes when that smarthost refuses a recipient.

Limits (RFC 5321 4.5.3.1): command lines of 512 octets (2048 for MAIL/RCPT with
extensions), text lines of 1000, local part 64, domain 255, path 256; memory stays
bounded whatever the client sends; max_errors ends abusive sessions; max_recipients
answers 452 4.5.3 and the message goes to the accepted recipients only.
"""

from __future__ import annotations

import email
import email.message
import email.policy
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
import soak
from attack_support import (
    RCPT,
    SENDER,
    RawCapture,
    codes,
    config,
    flush,
    open_transaction,
    peak_rss_kib,
    record,
    replies_until_close,
    session,
)
from leafmail_fixtures import (
    Leafmail,
    LeafmailFactory,
    RawSMTP,
    leafmail_servers,
    split_received,
)
from smarthost import Smarthost
from test_dsn import PER_MESSAGE, PER_RECIPIENT

pytestmark = pytest.mark.timeout(soak.scaled(60, 600))

INJECTED = "X-Injected"
MESSAGE = f"From: <{SENDER}>\r\nTo: <{RCPT}>\r\nSubject: input\r\n\r\nbody\r\n".encode()


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LeafmailFactory]:
    yield from leafmail_servers(tmp_path_factory.mktemp("input"))


@pytest.fixture(scope="module")
def plain(shared: LeafmailFactory) -> Leafmail:
    return shared(config("reject"))


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[LeafmailFactory]:
    yield from leafmail_servers(tmp_path)


def injected_lines(data: bytes) -> list[bytes]:
    """Lines of `data` (split at any CR or LF) that start like an injected header."""
    return [line for line in re.split(rb"\r\n|\r|\n", data) if line.startswith(INJECTED.encode())]


# --- header injection through parameters -----------------------------------------------

# (MAIL parameters, RCPT parameters, the reply code the hostile one must get)
REFUSED = {
    "orcpt xtext CRLF": ("", "ORCPT=rfc822;a+0D+0AX-Injected:+20yes@dst.test", 501),
    "orcpt xtext LF": ("", "ORCPT=rfc822;a+0AX-Injected:+20yes@dst.test", 501),
    "orcpt xtext NUL": ("", "ORCPT=rfc822;a+00b@dst.test", 501),
    "orcpt utf-8 escaped CRLF": ("", "ORCPT=utf-8;a\\x{0D}\\x{0A}X-Injected:\\x{20}yes", 501),
    "orcpt utf-8 escaped NEL": ("", "ORCPT=utf-8;a\\x{85}X-Injected:\\x{20}yes", 501),
    "orcpt addr-type with space": ("", "ORCPT=rfc822 X-Injected:;a@dst.test", 501),
    "envid xtext CRLF": ("ENVID=id+0D+0AX-Injected:+20yes", "", 501),
    "envid xtext NUL": ("ENVID=id+00", "", 501),
    "envid over 100": ("ENVID=" + "i" * 101, "", 501),
    "auth= not offered": ("AUTH=<a+0D+0AX-Injected:+20yes@dst.test>", "", 555),
    "size garbage": ("SIZE=12x", "", 501),
    "size xtext CRLF": ("SIZE=1+0D+0A", "", 501),
    "body garbage": ("BODY=8BITMIME+0D+0A", "", 501),
    "ret garbage": ("RET=FULL+0A", "", 501),
    "notify garbage": ("", "NOTIFY=SUCCESS+0D+0A", 501),
    "notify never and more": ("", "NOTIFY=NEVER,SUCCESS", 501),
    "duplicate envid": ("ENVID=a ENVID=b", "", 501),
    "unknown keyword": ("X-INJECTED=yes", "", 555),
}


@pytest.mark.parametrize("name", list(REFUSED))
def test_hostile_parameter_is_refused(plain: Leafmail, name: str) -> None:
    mail_params, rcpt_params, code = REFUSED[name]
    with session(plain) as client:
        reply = client.command(f"MAIL FROM:<{SENDER}> {mail_params}".rstrip())
        if not mail_params:
            assert reply.code == 250
            reply = client.command(f"RCPT TO:<{RCPT}> {rcpt_params}")
        assert reply.code == code, (name, reply)
        assert reply.text.isprintable() and INJECTED not in reply.text.split(" ", 2)[0]
        client.send(b"RSET\r\nNOOP\r\nQUIT\r\n")
        assert codes(replies_until_close(client)) == [250, 250, 221]
    record(f"parameter {name}", f"refused {code}")


@pytest.mark.parametrize(
    "raw",
    [b"ENVID=id\rX-Injected: yes", b"ENVID=id\nX-Injected: yes", b"ENVID=id\x00X-Injected"],
    ids=["raw CR", "raw LF", "raw NUL"],
)
def test_raw_control_character_in_parameters_is_refused(plain: Leafmail, raw: bytes) -> None:
    with session(plain) as client:
        reply = client.command(f"MAIL FROM:<{SENDER}> ".encode() + raw)
        assert reply.code in (500, 501), reply
        # Nothing after the CR/LF ran as a command: the next MAIL is the first.
        assert client.command(f"MAIL FROM:<{SENDER}>").code == 250
    record(f"parameter with {raw[8:9]!r}", f"refused {reply.code}")


ACCEPTED_MAIL = "ENVID=id+20X-Injected:+20yes RET=HDRS"
ACCEPTED_RCPT = {
    "bob@dst.test": "NOTIFY=FAILURE ORCPT=rfc822;x+20X-Injected:+20yes@dst.test",
    "carol@dst.test": "NOTIFY=FAILURE,DELAY ORCPT=rfc822;y+3BX-Injected:+20yes@dst.test",
    "dave@dst.test": "NOTIFY=FAILURE ORCPT=utf-8;z\\x{2028}X-Injected:\\x{20}yes",
}
REFUSING = ("carol@dst.test", "dave@dst.test")  # the smarthost refuses these: a DSN
ALLOWED_FIELDS = PER_MESSAGE | PER_RECIPIENT  # RFC 3464 2.2 and 2.3, plus ours


def spool_accepted_hostile_parameters(server: Leafmail) -> None:
    with session(server) as client:
        assert client.command(f"MAIL FROM:<{SENDER}> {ACCEPTED_MAIL}").code == 250
        for rcpt, params in ACCEPTED_RCPT.items():
            reply = client.command(f"RCPT TO:<{rcpt}> {params}")
            assert reply.code == 250, (rcpt, reply)
        assert client.command("DATA").code == 354
        assert client.command(MESSAGE + b".").code == 250
    [msg] = server.messages()
    assert injected_lines(msg.data) == []
    assert msg.envelope.envid == "id X-Injected: yes"


def flush_until_dsn(tmp_path: Path, server: Leafmail, sink: Smarthost) -> bytes:
    """Flush until the DSN leafmail wrote has reached the smarthost; its bytes."""
    for _ in range(3):
        flush(tmp_path, server, sink.address)
        dsns = [got for got in sink.received if got.sender in ("", "<>")]
        if dsns:
            [dsn] = dsns
            assert dsn.recipients == [SENDER]
            return dsn.content
    raise AssertionError(f"no DSN arrived; smarthost got {sink.received}")


def test_accepted_parameters_stay_one_line_in_the_dsn(
    servers: LeafmailFactory, tmp_path: Path, sink: Smarthost
) -> None:
    server = servers(config("reject"))
    spool_accepted_hostile_parameters(server)
    for rcpt in REFUSING:
        sink.behaviour.rcpt_replies[rcpt] = "550 5.1.1 no such user"
    dsn = flush_until_dsn(tmp_path, server, sink)
    [relayed] = [got for got in sink.received if got.sender == SENDER]
    assert relayed.recipients == ["bob@dst.test"]
    assert injected_lines(relayed.content) == []
    check_dsn(dsn)
    record("accepted hostile ENVID/ORCPT in the DSN", "one line each", dsns=1)


def test_accepted_parameters_go_onward_as_xtext(servers: LeafmailFactory, tmp_path: Path) -> None:
    """The MAIL and RCPT lines on the wire to a next hop that offers DSN."""
    server = servers(config("reject"))
    spool_accepted_hostile_parameters(server)
    capture = RawCapture()
    try:
        done = flush(tmp_path, server, capture.address)
    finally:
        capture.stop()
    assert done.returncode == 0, done.stdout + done.stderr
    [mail] = [c for c in capture.commands if c.upper().startswith(b"MAIL ")]
    rcpts = [c for c in capture.commands if c.upper().startswith(b"RCPT ")]
    assert len(rcpts) == len(ACCEPTED_RCPT)
    check_onward_options(mail, rcpts)
    [onward] = capture.messages
    assert injected_lines(onward) == []
    record("accepted hostile ENVID/ORCPT onward", "xtext, one line each")


def check_onward_options(mail: bytes, rcpts: list[bytes]) -> None:
    """Only the keywords leafmail passes on; values are xtext (printable, no spaces)."""
    options = mail.split(b" ")[2:]
    assert {o.partition(b"=")[0].upper() for o in options} <= {b"SIZE", b"BODY", b"RET", b"ENVID"}
    assert b"ENVID=id+20X-Injected:+20yes" in options, mail
    for rcpt in rcpts:
        options += rcpt.split(b" ")[2:]
        assert {o.partition(b"=")[0] for o in rcpt.split(b" ")[2:]} <= {b"NOTIFY", b"ORCPT"}
    assert b"ORCPT=rfc822;x+20X-Injected:+20yes@dst.test" in options
    for option in options:
        assert re.fullmatch(rb"[A-Za-z0-9-]+(=[\x21-\x7e]+)?", option), option


def check_dsn(dsn: bytes) -> None:
    """Every header line of the status part is a DSN field; the hostile text is inside one."""
    assert injected_lines(dsn) == []
    parsed = email.message_from_bytes(dsn, policy=email.policy.default)
    assert isinstance(parsed, email.message.EmailMessage)
    [status] = [p for p in parsed.walk() if p.get_content_type() == "message/delivery-status"]
    raw = status.get_payload()
    assert isinstance(raw, list)
    names: set[str] = set()
    for block in raw:
        assert isinstance(block, email.message.Message)
        names.update(block.keys())
    assert names <= ALLOWED_FIELDS, names - ALLOWED_FIELDS
    text = dsn.decode("utf-8", "replace")
    assert "Original-Envelope-Id: id X-Injected: yes\r\n" in text
    assert "Original-Recipient: rfc822;y;X-Injected: yes@dst.test\r\n" in text


# --- HELO names ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "line", "code"),
    [
        ("CR", b"EHLO a\rX-Injected: yes", 500),
        ("LF", b"EHLO a\nX-Injected: yes", 500),
        ("NUL", b"EHLO a\x00b", 501),
        ("DEL", b"EHLO a\x7fb", 501),
        ("C1 NEL", "EHLO a\x85X-Injected:".encode(), 501),
        ("space", b"EHLO a X-Injected: yes", 501),
        ("bad UTF-8", b"EHLO a\xffb", 500),
        ("empty", b"EHLO", 501),
    ],
)
def test_hostile_helo_is_refused(plain: Leafmail, name: str, line: bytes, code: int) -> None:
    with RawSMTP(plain.address()) as client:
        client.greeting()
        assert client.command(line).code == code
        # Nothing was learnt from it: MAIL still needs a HELO.
        assert client.command(f"MAIL FROM:<{SENDER}>").code == 503
    record(f"HELO with {name}", f"refused {code}")


def spool_with_helo(server: Leafmail, helo: str) -> bytes:
    """Send MESSAGE after EHLO `helo`; the spooled bytes of that message."""
    before = set(server.queue_ids())
    with RawSMTP(server.address()) as client:
        client.greeting()
        client.ehlo(helo)
        open_transaction(client)
        assert client.command(MESSAGE + b".").code == 250
    [msg] = [m for m in server.messages() if m.qid not in before]
    return msg.data


def test_longest_helo_gives_a_bounded_received_header(plain: Leafmail) -> None:
    helo = "h" * (512 - len("EHLO \r\n"))
    data = spool_with_helo(plain, helo)
    received, rest = split_received(data)
    assert rest == MESSAGE
    assert len(received.helo) <= 255
    header = data[: len(data) - len(rest)]
    assert max(len(line) for line in header.split(b"\r\n")) <= 998
    record("HELO of 505 octets", f"accepted, Received from cut to {len(received.helo)}")


def test_utf8_helo_does_not_make_a_7bit_message_8bit(
    servers: LeafmailFactory, tmp_path: Path
) -> None:
    """RFC 6531/6152: a message sent without SMTPUTF8 and BODY=8BITMIME stays ASCII."""
    server = servers(config("reject"))
    data = spool_with_helo(server, "ünï.test")
    capture = RawCapture()
    try:
        flush(tmp_path, server, capture.address)
    finally:
        capture.stop()
    [mail] = [c for c in capture.commands if c.upper().startswith(b"MAIL")]
    [onward] = capture.messages
    declared = b"SMTPUTF8" in mail or b"BODY=8BITMIME" in mail
    outcome = "message stays ASCII" if data.isascii() else "8-bit Received header"
    record("UTF-8 HELO, 7-bit message", outcome + (", relayed as declared" if declared else ""))
    assert data.isascii() or declared
    assert onward.isascii(), onward[:200]


# --- overlong input --------------------------------------------------------------------


def test_command_line_limits(plain: Leafmail) -> None:
    """512 octets with CRLF for commands, 2048 for MAIL and RCPT (extension parameters)."""
    with session(plain) as client:
        assert client.command(b"NOOP " + b"x" * (512 - 7)).code == 250
        assert client.command(b"NOOP " + b"x" * (512 - 6)).code == 500
        mail = f"MAIL FROM:<{SENDER}> ENVID=".encode()
        assert client.command(mail + b"e" * (2048 - len(mail) - 2)).code == 501  # > 100
        assert client.command(mail + b"e" * (2049 - len(mail) - 2)).code == 500
        assert client.command(f"MAIL FROM:<{SENDER}>").code == 250
    record("command lines over 512 / 2048 octets", "500 5.5.2, session goes on")


@pytest.mark.parametrize(
    ("name", "address", "code"),
    [
        ("local part 64", "l" * 64 + "@dst.test", 250),
        ("local part 65", "l" * 65 + "@dst.test", 501),
        # A 255-octet domain cannot fit a 256-octet path: 252 is the longest usable.
        ("domain 252", "a@" + ".".join(["d" * 63] * 3 + ["d" * 60]), 250),
        ("domain 256", "a@" + ".".join(["d" * 63] * 3 + ["d" * 62]), 501),
        ("label 64", "a@" + "d" * 64 + ".test", 501),
        ("path 256", "l" * 64 + "@" + ".".join(["d" * 63] * 2 + ["d" * 61]), 250),
        ("path 257", "l" * 64 + "@" + ".".join(["d" * 63] * 2 + ["d" * 62]), 501),
    ],
)
def test_address_limits(plain: Leafmail, name: str, address: str, code: int) -> None:
    with session(plain) as client:
        assert client.command(f"MAIL FROM:<{SENDER}>").code == 250
        assert client.command(f"RCPT TO:<{address}>").code == code, (name, len(address))
        assert client.command("RSET").code == 250
        assert client.command(f"MAIL FROM:<{address}>").code == code, (name, len(address))
    record(f"address {name}", "accepted" if code == 250 else f"refused {code}")


def test_text_line_over_1000_octets_in_data_is_refused(plain: Leafmail) -> None:
    before = set(plain.queue_ids())
    with session(plain) as client:
        open_transaction(client)
        client.send(b"Subject: long\r\n\r\n" + b"y" * 998 + b"\r\n" + b"z" * 999 + b"\r\n.\r\n")
        reply = client.reply()
        assert (reply.code, reply.enhanced) == (554, "5.6.0")
        assert client.command("NOOP").code == 250
    assert set(plain.queue_ids()) == before
    record("DATA line of 1001 octets", "refused 554 5.6.0")


def test_text_line_over_1000_octets_in_bdat_never_reaches_the_wire(
    servers: LeafmailFactory, tmp_path: Path
) -> None:
    """Refused like DATA, or relayed without a line over 1000 octets: either will do."""
    server = servers(config("reject"))
    chunk = b"Subject: long\r\n\r\n" + b"y" * 5000 + b"\r\n"
    with session(server) as client:
        open_transaction(client, data=False)
        reply = client.command(b"BDAT %d LAST\r\n" % len(chunk) + chunk[:-2])
    record("BDAT line of 5002 octets", f"answered {reply.code}")
    if reply.code != 250:
        return
    capture = RawCapture()
    try:
        flush(tmp_path, server, capture.address)
    finally:
        capture.stop()
    [onward] = capture.messages
    assert max(len(line) + 2 for line in onward.split(b"\r\n")) <= 1000


@pytest.mark.parametrize("state", ["command", "data"])
def test_line_without_crlf_costs_bounded_memory(plain: Leafmail, state: str) -> None:
    """Megabytes without a CRLF: discarded as they come, refused once the CRLF arrives."""
    size = soak.scaled(16, 256) * 1024 * 1024
    block = b"x" * (1024 * 1024)
    before = peak_rss_kib(plain.proc.pid)
    with session(plain) as client:
        if state == "data":
            open_transaction(client)
        for _ in range(size // len(block)):
            client.send(block)
        client.send(b"\r\n.\r\n" if state == "data" else b"\r\n")
        reply = client.reply()
        assert reply.code == (554 if state == "data" else 500), reply
        assert client.command("NOOP").code == 250
    growth = peak_rss_kib(plain.proc.pid) - before
    assert growth < 8 * 1024, f"peak RSS grew by {growth} KiB for a {size}-octet line"
    record(
        f"line of {size // 1024 // 1024} MiB without CRLF in {state}",
        f"refused {reply.code}",
        bytes=size,
        peak_rss_growth_kib=growth,
    )


# --- error floods and recipient limits -------------------------------------------------


def test_mixed_errors_end_the_session_at_max_errors(servers: LeafmailFactory) -> None:
    server = servers(config("reject", "max_errors = 5"))
    errors = [
        b"XYZZY\r\n",  # unknown
        b"NOOP " + b"x" * 600 + b"\r\n",  # too long
        b"NOOP a\x00b\r\n",  # control character
        b"NOOP \xff\r\n",  # bad UTF-8
        b"RCPT TO:<a@dst.test>\r\n",  # out of sequence
        b"MAIL FROM:<bad address>\r\n",  # syntax
        b"NOOP\r\n",
    ]
    with session(server) as client:
        client.send(b"".join(errors))
        got = replies_until_close(client)
    assert codes(got) == [500, 500, 501, 500, 503, 421]
    assert got[-1].enhanced == "4.7.0"
    record("mixed error flood, max_errors=5", "421 after the sixth error, closed")


def test_refused_recipients_end_the_session_past_their_limit(servers: LeafmailFactory) -> None:
    """A directory harvest: RCPT after RCPT, each refused for good. Before, 2,000 of
    them in one session got a 550 each and the session went on (about 400 addresses a
    second); now the 21st (smtp.max_refused_recipients, 20 by default, as Postfix's
    smtpd_hard_error_limit) gets 421 and the session ends. max_errors is left high to
    show the limit is a count of its own."""
    server = servers(config("reject", "max_errors = 1000\n[relay]\nrelay_networks = []"))
    with session(server) as client:
        client.send(
            f"MAIL FROM:<{SENDER}>\r\n".encode()
            + b"".join(b"RCPT TO:<u%d@dst.test>\r\n" % i for i in range(100))
        )
        got = replies_until_close(client)
    assert codes(got) == [250] + [550] * 20 + [421]
    assert {r.enhanced for r in got[1:21]} == {"5.7.1"} and got[-1].enhanced == "4.7.0"
    record("100 refused recipients", "421 after the 20th refusal, closed")


def test_recipients_past_the_overshoot_limit_end_the_session(servers: LeafmailFactory) -> None:
    """RCPT after RCPT past max_recipients: before, each got 452 for as long as the
    client went on (2,000 in one session, bounded by nothing but the timeout); now,
    past smtp.max_recipient_overshoot in one transaction, each 452 also counts as an
    error (Postfix's smtpd_recipient_overshoot_limit), and past max_errors the answer
    is 421 and the session ends."""
    extra = "max_recipients = 5\nmax_recipient_overshoot = 3\nmax_errors = 2"
    server = servers(config("reject", extra))
    with session(server) as client:
        client.send(
            f"MAIL FROM:<{SENDER}>\r\n".encode()
            + b"".join(b"RCPT TO:<u%d@dst.test>\r\n" % i for i in range(100))
        )
        got = replies_until_close(client)
    # 5 accepted, 3 overshoot for free, 2 counted as errors, and the third error closes
    # (the 89 RCPTs after it are never answered)
    assert codes(got) == [250] + [250] * 5 + [452] * 5 + [421]
    assert {r.enhanced for r in got[6:11]} == {"4.5.3"} and got[-1].enhanced == "4.7.0"
    record("100 recipients, max_recipients=5", "421 after 3 + 2 over the limit, closed")


def test_too_many_recipients(servers: LeafmailFactory, tmp_path: Path, sink: Smarthost) -> None:
    """452 4.5.3 past max_recipients, not counted as errors; only the accepted get it."""
    server = servers(config("reject", "max_recipients = 5\nmax_errors = 3"))
    rcpts = [f"r{i}@dst.test" for i in range(12)]
    with session(server) as client:
        client.send(
            f"MAIL FROM:<{SENDER}>\r\n".encode()
            + b"".join(f"RCPT TO:<{r}>\r\n".encode() for r in rcpts)
            + b"DATA\r\n"
        )
        got = client.replies(2 + len(rcpts))
        assert codes(got) == [250] + [250] * 5 + [452] * 7 + [354]
        assert {r.enhanced for r in got[6:13]} == {"4.5.3"}
        assert client.command(MESSAGE + b".").code == 250
    [msg] = server.messages()
    assert [r.address for r in msg.envelope.recipients] == rcpts[:5]
    done = flush(tmp_path, server, sink.address)
    assert done.returncode == 0, done.stdout + done.stderr
    assert [got.recipients for got in sink.received] == [rcpts[:5]]
    record("12 recipients, max_recipients=5", "5 accepted, 7 got 452 4.5.3", delivered=5)
