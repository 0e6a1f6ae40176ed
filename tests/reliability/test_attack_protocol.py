"""STARTTLS command injection and pipelining abuse against `leafmail serve`.

STARTTLS (RFC 3207 4.2, the CVE-2011-0411 family): plaintext that arrives with or after
the STARTTLS command, before the handshake, was sent by whoever is on the wire, not by
the party that will own the TLS session. It must be thrown away (or the connection
dropped), never answered once TLS is up. The tests inject commands in the same write,
put a whole ClientHello in it too early, send plaintext where the handshake should
be, and use STARTTLS where it is not allowed.

Pipelining (RFC 2920): a server must answer every command exactly once and in order,
whatever the client sends in one write: commands before the greeting, a message body
before the 354, junk between BDAT chunks, a refused BDAT's octets, groups after HELO
(where PIPELINING is not even offered), thousands of commands at once. And it must not
read without bound from a client that never reads its replies.
"""

from __future__ import annotations

import random
import socket
import ssl
import threading
import time
from collections.abc import Iterator

import pytest
import soak
from attack_support import (
    EVIL,
    RCPT,
    SENDER,
    VICTIM,
    codes,
    config,
    open_transaction,
    peak_rss_kib,
    record,
    replies_until_close,
    send_split,
    session,
)
from leafmail_fixtures import (
    IO_TIMEOUT,
    Leafmail,
    LeafmailFactory,
    RawSMTP,
    TLSFiles,
    extensions,
    leafmail_servers,
    make_tls,
    split_received,
    toml_string,
)

pytestmark = pytest.mark.timeout(soak.scaled(60, 600))

INJECTIONS = {
    "rset": b"RSET\r\n",
    "mail": f"MAIL FROM:<{EVIL}>\r\nRCPT TO:<{VICTIM}>\r\n".encode(),
    "ehlo+mail+data": (
        f"EHLO evil.test\r\nMAIL FROM:<{EVIL}>\r\nRCPT TO:<{VICTIM}>\r\nDATA\r\n"
        "Subject: injected\r\n\r\nowned\r\n.\r\n"
    ).encode(),
}
SPLITS = soak.scaled(1, 30)
PIPELINED = soak.scaled(10000, 200000)  # commands in one write


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LeafmailFactory]:
    yield from leafmail_servers(tmp_path_factory.mktemp("protocol"))


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> TLSFiles:
    return make_tls(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="module")
def tls_server(shared: LeafmailFactory, tls_files: TLSFiles) -> Leafmail:
    extra = f"tls_cert = {toml_string(tls_files.cert)}\ntls_key = {toml_string(tls_files.key)}"
    return shared(config("reject", extra))


@pytest.fixture(scope="module")
def plain(shared: LeafmailFactory) -> Leafmail:
    return shared(config("reject"))


@pytest.fixture(scope="module")
def outside(shared: LeafmailFactory) -> Leafmail:
    """A server whose relay_networks leave the client out: foreign RCPTs are refused."""
    return shared(config("reject", "") + '[relay]\nrelay_networks = ["127.0.0.2/32"]\n')


def after_tls_is_clean(client: RawSMTP, server: Leafmail, before: set[str]) -> None:
    """Under TLS: our EHLO is the first reply, no transaction exists, nothing was spooled."""
    reply = client.ehlo("tls.client.test")
    assert reply.lines[0] == "mx.test greets tls.client.test", reply
    assert "STARTTLS" not in extensions(reply)
    client.send(f"RCPT TO:<{RCPT}>\r\nNOOP\r\nQUIT\r\n".encode())
    assert codes(replies_until_close(client)) == [503, 250, 221]
    assert set(server.queue_ids()) == before


# --- STARTTLS --------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(INJECTIONS))
def test_plaintext_after_starttls_in_one_write_is_discarded(
    tls_server: Leafmail, tls_files: TLSFiles, name: str
) -> None:
    before = set(tls_server.queue_ids())
    for i in range(SPLITS):
        rng = random.Random(f"{name}/{i}") if i else None
        with RawSMTP(tls_server.address()) as client:
            client.greeting()
            client.ehlo()
            # Cuts fall before the STARTTLS line's LF, which goes in one write with the
            # injection: bytes that came after the 220 are the next test's case.
            if rng is None:
                client.send(b"NOOP\r\nSTARTTLS\r\n" + INJECTIONS[name])
            else:
                send_split(client, b"NOOP\r\nSTARTTLS\r", rng)
                client.send(b"\n" + INJECTIONS[name])
            assert [client.reply().code, client.reply().code] == [250, 220]
            client.start_tls(tls_files.client_context())  # nothing else came in plaintext
            after_tls_is_clean(client, tls_server, before)
    record(f"starttls injection {name}", "discarded", tries=SPLITS)


def test_plaintext_where_the_handshake_belongs_kills_the_session(
    tls_server: Leafmail, tls_files: TLSFiles
) -> None:
    """Commands sent after the 220 are read as a (broken) TLS record, never obeyed."""
    before = set(tls_server.queue_ids())
    with RawSMTP(tls_server.address()) as client:
        client.greeting()
        client.ehlo()
        assert client.command("STARTTLS").code == 220
        client.send(INJECTIONS["ehlo+mail+data"])
        assert client.at_eof(), bytes(client.buf)
    assert set(tls_server.queue_ids()) == before
    with session(tls_server) as client:  # the server goes on serving
        assert client.command("NOOP").code == 250
    record("starttls then plaintext commands", "connection closed, nothing answered")


def client_hello(context: ssl.SSLContext) -> bytes:
    """The first flight of a TLS client, as bytes (without a socket)."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = context.wrap_bio(incoming, outgoing, server_hostname="127.0.0.1")
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    return outgoing.read()


def test_client_hello_sent_with_starttls_is_discarded(
    tls_server: Leafmail, tls_files: TLSFiles
) -> None:
    """A ClientHello in the STARTTLS write is plaintext-before-220: dropped unseen.

    Proof: a fresh handshake started after the 220 succeeds, which it could not if the
    server had taken the early bytes as the start of its TLS session, and no reply came
    to the NOOP that followed them.
    """
    before = set(tls_server.queue_ids())
    early = client_hello(tls_files.client_context())
    with RawSMTP(tls_server.address()) as client:
        client.greeting()
        client.ehlo()
        client.send(b"STARTTLS\r\n" + early + b"\r\nNOOP\r\n")
        assert client.reply().code == 220
        client.start_tls(tls_files.client_context())
        after_tls_is_clean(client, tls_server, before)
    record("starttls with an early ClientHello", "discarded, fresh handshake works")


def test_starttls_where_it_does_not_belong(tls_server: Leafmail) -> None:
    """Before EHLO, inside a transaction, with an argument: refused, the session intact."""
    with RawSMTP(tls_server.address()) as client:
        client.greeting()
        assert client.command("STARTTLS").code == 503  # no EHLO yet
        client.ehlo()
        assert client.command("STARTTLS now").code == 501
        assert client.command(f"MAIL FROM:<{SENDER}>").code == 250
        assert client.command("STARTTLS").code == 503
        # The transaction survived the refusal.
        assert client.command(f"RCPT TO:<{RCPT}>").code == 250
        assert client.command("RSET").code == 250
        assert client.command("HELO client.test").code == 250
        assert client.command("STARTTLS").code == 503  # RFC 3207: after EHLO only
    record("starttls out of sequence", "503/501, session intact")


def test_starttls_twice_is_refused(tls_server: Leafmail, tls_files: TLSFiles) -> None:
    with RawSMTP(tls_server.address()) as client:
        client.greeting()
        client.ehlo()
        client.send(b"STARTTLS\r\n")
        assert client.reply().code == 220
        client.start_tls(tls_files.client_context())
        client.ehlo()
        client.send(b"STARTTLS\r\nNOOP\r\nQUIT\r\n")
        assert codes(replies_until_close(client)) == [503, 250, 221]
    record("starttls twice", "503")


# --- pipelining ------------------------------------------------------------------------


def test_early_talker_gets_the_greeting_first_then_answers_in_order(plain: Leafmail) -> None:
    """Commands sent before the greeting: the greeting, then one reply each, in order."""
    with RawSMTP(plain.address()) as client:
        client.send(b"EHLO early.test\r\nNOOP\r\nHELP\r\nQUIT\r\n")
        got = replies_until_close(client)
    assert codes(got) == [220, 250, 250, 214, 221]
    assert got[1].lines[0] == "mx.test greets early.test"
    record("early talker", "greeting first, replies in order")


def test_body_sent_with_data_before_the_354(plain: Leafmail) -> None:
    """The body in the same write as DATA is read as the body (after the 354), once."""
    before = set(plain.queue_ids())
    body = b"Subject: eager\r\n\r\nNOOP\r\nRSET\r\n"
    with session(plain) as client:
        client.send(
            f"MAIL FROM:<{SENDER}>\r\nRCPT TO:<{RCPT}>\r\nDATA\r\n".encode()
            + body
            + b".\r\nNOOP\r\nQUIT\r\n"
        )
        assert codes(replies_until_close(client)) == [250, 250, 354, 250, 250, 221]
    [msg] = [m for m in plain.messages() if m.qid not in before]
    assert split_received(msg.data)[1] == body
    record("body before 354", "one message, in order")


def test_body_after_a_refused_data_is_commands_of_the_same_client(outside: Leafmail) -> None:
    """DATA refused (no valid recipient): what follows is commands, each answered once."""
    before = set(outside.queue_ids())
    with session(outside) as client:
        client.send(
            f"MAIL FROM:<{SENDER}>\r\nRCPT TO:<{VICTIM}>\r\nDATA\r\n".encode()
            + b"Subject: x\r\n\r\nbody\r\n.\r\nNOOP\r\nQUIT\r\n"
        )
        got = codes(replies_until_close(client))
    # MAIL, refused RCPT, refused DATA, four non-commands, NOOP, QUIT.
    assert got == [250, 550, 554, 500, 500, 500, 500, 250, 221]
    assert set(outside.queue_ids()) == before
    record("body after refused DATA", "read as commands, nothing spooled")


def test_bdat_with_junk_between_chunks(plain: Leafmail) -> None:
    before = set(plain.queue_ids())
    one, two = b"Subject: chunks\r\n\r\n", b"second\r\n"
    with session(plain) as client:
        open_transaction(client, data=False)
        client.send(
            b"BDAT %d\r\n" % len(one)
            + one
            + b"JUNK\r\nDATA\r\nMAIL FROM:<x@example.test>\r\n"
            + b"BDAT %d LAST\r\n" % len(two)
            + two
            + b"QUIT\r\n"
        )
        got = codes(replies_until_close(client))
    assert got == [250, 500, 503, 503, 250, 221]
    [msg] = [m for m in plain.messages() if m.qid not in before]
    assert split_received(msg.data)[1] == one + two
    record("bdat with junk between chunks", "junk refused, message intact")


def test_refused_bdat_octets_are_skipped_not_run(plain: Leafmail) -> None:
    """RFC 3030 2: a BDAT out of sequence still owns its octets; they are never commands."""
    chunk = b"RSET\r\nQUIT\r\n"
    with session(plain) as client:
        client.send(b"BDAT %d\r\n" % len(chunk) + chunk + b"NOOP\r\nQUIT\r\n")
        assert codes(replies_until_close(client)) == [503, 250, 221]
    record("refused bdat chunk", "octets skipped")


def test_pipelined_group_after_helo(plain: Leafmail) -> None:
    """HELO offers no PIPELINING; a client pipelining anyway still gets ordered replies."""
    before = set(plain.queue_ids())
    with RawSMTP(plain.address()) as client:
        client.greeting()
        client.send(
            f"HELO old.test\r\nMAIL FROM:<{SENDER}>\r\nRCPT TO:<{RCPT}>\r\n"
            f"RCPT TO:<bad address>\r\nDATA\r\nSubject: helo\r\n\r\nhi\r\n.\r\nQUIT\r\n".encode()
        )
        got = codes(replies_until_close(client))
    assert got == [250, 250, 250, 501, 354, 250, 221]
    [msg] = [m for m in plain.messages() if m.qid not in before]
    assert msg.envelope.client.protocol == "SMTP"
    record("pipelining after HELO", "ordered replies")


CYCLE = [(b"NOOP\r\n", 250), (b"HELP\r\n", 214), (b"VRFY someone\r\n", 252), (b"RSET\r\n", 250)]


@pytest.fixture(scope="module")
def junk_allowed(shared: LeafmailFactory) -> Leafmail:
    return shared(config("reject", "max_junk_commands = 0"))


def test_thousands_of_pipelined_commands_in_one_write(junk_allowed: Leafmail) -> None:
    """Every command answered once, in order; read while writing, as RFC 2920 clients must.

    The junk-command limit is off here: this is about buffering and order, not policy.
    """
    commands = [CYCLE[i % len(CYCLE)] for i in range(PIPELINED)]
    stream = b"".join(c for c, _ in commands) + b"QUIT\r\n"
    rss_before = peak_rss_kib(junk_allowed.proc.pid)
    started = time.monotonic()
    with session(junk_allowed) as client:
        writer = threading.Thread(target=client.send, args=(stream,), daemon=True)
        writer.start()
        got = codes(replies_until_close(client))
        writer.join(IO_TIMEOUT)
    elapsed = time.monotonic() - started
    assert got == [code for _, code in commands] + [221]
    growth = peak_rss_kib(junk_allowed.proc.pid) - rss_before
    assert growth < 32 * 1024, f"peak RSS grew by {growth} KiB"
    record(
        "thousands of pipelined commands",
        "all answered in order",
        commands=PIPELINED,
        seconds=round(elapsed, 2),
        peak_rss_growth_kib=growth,
    )


def test_a_session_of_only_junk_commands_is_closed(plain: Leafmail) -> None:
    """NOOP/HELP/VRFY/RSET keep-alives: 100 free, then each is an error, and past
    max_errors (10 by default) the session ends with 421, as Postfix's junk limit does."""
    commands = [CYCLE[i % len(CYCLE)] for i in range(1000)]
    with session(plain) as client:
        client.send(b"".join(c for c, _ in commands))
        got = codes(replies_until_close(client))
    assert got == [code for _, code in commands[:110]] + [421]
    record("only junk commands", "421 after 100 free and 10 counted", answered=len(got))


def test_client_that_never_reads_replies_is_not_buffered_without_bound(plain: Leafmail) -> None:
    """The server stops reading when its replies cannot be sent; memory stays flat.

    The client offers far more commands than its and the server's socket buffers can
    hold without reading a reply. If the server kept reading regardless, it would take
    everything (and its memory would grow with it).
    """
    offered = soak.scaled(48, 256) * 1024 * 1024
    command = b"EHLO client.test\r\n"  # a short command with a long reply
    block = command * (65536 // len(command))
    rss_before = peak_rss_kib(plain.proc.pid)
    sent = 0
    with session(plain) as client:
        client.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        client.sock.settimeout(2.0)
        try:
            while sent < offered:
                sent += client.sock.send(block)
        except TimeoutError:
            pass
    assert sent < offered, "the server read everything a non-reading client sent"
    growth = peak_rss_kib(plain.proc.pid) - rss_before
    assert growth < 32 * 1024, f"peak RSS grew by {growth} KiB"
    with session(plain) as client:
        assert client.command("NOOP").code == 250
    record(
        "client never reads replies",
        "server stopped reading",
        offered_bytes=offered,
        accepted_bytes=sent,
        peak_rss_growth_kib=growth,
    )
