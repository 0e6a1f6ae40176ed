"""Floods: slowloris, idle connections, per-source limits, a client that never reads.

Each attack runs against a real server while a second, well-behaved client from another
loopback address checks it is still served promptly: the point of every limit is that
one source cannot take the service away from the others. Sizes grow under SOAK=1.
"""

from __future__ import annotations

import contextlib
import functools
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import soak
from conftest import RunningServer, ServerFactory
from leafmail_fixtures import Leafmail, LeafmailFactory, RawSMTP, Reply, leafmail_servers
from lifecycle_handlers import (
    HANDLER_ENV,
    closed_by_peer,
    connect,
    round_trip,
    rss_kb,
    serve_args,
    served,
    wait_until,
)

pytestmark = pytest.mark.timeout(soak.scaled(60, 600))

ATTACKER = "127.0.0.2"
BYSTANDER = "127.0.0.3"
PROMPT = 2.0  # seconds a bystander may wait, generous for a loaded 2-core machine
REFUSAL = "421 too many connections"


def echo_server(netserver_proc: ServerFactory, mode: str, *flags: str) -> RunningServer:
    return netserver_proc(serve_args(mode, "--refuse-message", REFUSAL, *flags), env=HANDLER_ENV)


def served_promptly(address: tuple[str, int]) -> float:
    """Seconds a bystander's echo round trip took; fails if it was not served."""
    start = time.monotonic()
    assert served(address, BYSTANDER)
    took = time.monotonic() - start
    assert took < PROMPT, took
    return took


# --- slowloris ---------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["thread", "async"])
def test_slowloris_is_cut_off_and_others_are_served(
    netserver_proc: ServerFactory, mode: str
) -> None:
    """One byte every 0.05 s and never a newline: the line limit ends it (16 bytes)."""
    server = echo_server(netserver_proc, mode, "--timeout", "1", "--max-line", "16")
    start = time.monotonic()
    sent = 0
    worst = 0.0
    with connect(server.host_port, ATTACKER) as sock:
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            while time.monotonic() - start < 10:
                sock.sendall(b"x")
                sent += 1
                if sent % 10 == 0:
                    worst = max(worst, served_promptly(server.host_port))
                if closed_by_peer(sock, 0.05):
                    break
        cut = time.monotonic() - start
    assert cut < 5, f"slowloris still connected after {cut:.1f}s ({sent} bytes)"
    soak.record("attack", f"slowloris ({mode})", bytes_sent=sent, cut_after_s=round(cut, 2),
                bystander_worst_s=round(worst, 3))  # fmt: skip


@pytest.mark.parametrize("mode", ["thread", "async"])
def test_a_client_silent_mid_line_is_cut_at_the_idle_timeout(
    netserver_proc: ServerFactory, mode: str
) -> None:
    server = echo_server(netserver_proc, mode, "--timeout", "0.5")
    with connect(server.host_port, ATTACKER) as sock:
        sock.sendall(b"half a li")
        start = time.monotonic()
        assert closed_by_peer(sock, 5)
        took = time.monotonic() - start
    assert 0.4 < took < 2.5, took  # 0.5 s, checked every timeout/4


# --- slowloris against leafmail: the deadline of a command line ----------------------------

# Postfix's smtpd_timeout and smtpd_min_data_rate's grace, made short.
LINE_DEADLINE = '[smtp]\ntimeout = "1s"\nmin_data_rate = 500\ndata_rate_grace = "1s"\n'
OCTET_EVERY = 0.2  # well inside the idle timeout: only a per-line deadline can cut it


def dribbled(client: RawSMTP, data: bytes, every: float = OCTET_EVERY) -> Reply | None:
    """Send `data` one octet every `every` seconds; the reply that cut it short, if any."""
    client.sock.settimeout(every)
    for octet in data:
        try:
            client.send(bytes([octet]))
        except (BrokenPipeError, ConnectionResetError):
            break
        with contextlib.suppress(TimeoutError):
            return client.reply()
    client.sock.settimeout(PROMPT)
    return client.reply() if not client.at_eof() else None


@pytest.fixture(scope="module")
def deadline_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Leafmail]:
    for factory in leafmail_servers(tmp_path_factory.mktemp("line-deadline")):
        yield factory(LINE_DEADLINE)


@pytest.mark.parametrize(
    "start",
    [b"", b"X" * 600],  # a line, and an over-long line that is being dropped
    ids=["command line", "over-long line"],
)
def test_a_command_line_dribbled_an_octet_at_a_time_is_cut_at_its_deadline(
    deadline_server: Leafmail, start: bytes
) -> None:
    """One octet every 0.2 s never trips the idle timeout (1 s); before the per-line
    deadline such a client held its session, and a slot of its source's, for ever."""
    with RawSMTP(deadline_server.address(), source=ATTACKER) as client:
        client.greeting()
        client.ehlo()
        client.send(start)
        began = time.monotonic()
        cut = dribbled(client, b"MAIL FROM:<" + b"a" * 40 + b"@example.org>")
        took = time.monotonic() - began
        assert cut is not None, f"not cut after {took:.1f}s"
        assert (cut.code, cut.enhanced) == (421, "4.4.2"), cut
        assert client.at_eof()
    assert 0.9 < took < 1 + PROMPT, took


def test_a_refused_chunk_dribbled_an_octet_at_a_time_is_cut_by_the_data_rate(
    deadline_server: Leafmail,
) -> None:
    """A BDAT chunk out of sequence is refused and its octets read and dropped; they
    are message data in all but name, timed by the minimum data rate as DATA is (before,
    only the idle timeout did: one octet every 0.2 s held the session for ever)."""
    with RawSMTP(deadline_server.address(), source=ATTACKER) as client:
        client.greeting()
        client.ehlo()
        assert client.command("BDAT 100000 LAST").code == 503
        began = time.monotonic()
        cut = dribbled(client, b"x" * 50)
        took = time.monotonic() - began
        assert cut is not None, f"not cut after {took:.1f}s"
        assert (cut.code, cut.enhanced) == (421, "4.4.2"), cut
        assert "Data rate too low" in cut.text
    assert 0.9 < took < 1 + PROMPT, took


def test_lines_that_each_end_within_the_deadline_are_never_cut(deadline_server: Leafmail) -> None:
    """A slow client whose every line ends in time keeps its session, even when a new
    line always begins in the packet that ends the last one: the deadline restarts."""
    with RawSMTP(deadline_server.address(), source=BYSTANDER) as client:
        client.greeting()
        client.ehlo()
        client.send(b"NO")
        for _ in range(5):  # 3 s in all, three times the deadline
            time.sleep(0.6)
            client.send(b"OP\r\nNO")
            assert client.reply().code == 250
        client.send(b"OP\r\n")
        assert client.reply().code == 250
        assert client.command("QUIT").code == 221


# --- idle floods -------------------------------------------------------------------------

IDLE = soak.scaled(300, 3000)


def open_idle(address: tuple[str, int], count: int, source: str = ATTACKER) -> list[socket.socket]:
    return [connect(address, source) for _ in range(count)]


def test_idle_flood_on_netserver(netserver_proc: ServerFactory) -> None:
    server = echo_server(netserver_proc, "async", "--max-conns", str(IDLE + 100))
    socks = open_idle(server.host_port, IDLE)
    try:
        took = served_promptly(server.host_port)
        rss = rss_kb(server.proc.pid)
    finally:
        for sock in socks:
            sock.close()
    soak.record("attack", "idle flood netserver", idle=IDLE, bystander_s=round(took, 3),
                server_rss_kb=rss)  # fmt: skip


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[LeafmailFactory]:
    yield from leafmail_servers(tmp_path)


def greeted_and_mail_taken(server: Leafmail, source: str = BYSTANDER) -> float:
    """Seconds for a bystander's whole SMTP transaction."""
    start = time.monotonic()
    with RawSMTP(server.address(), source=source) as client:
        client.greeting()
        client.ehlo()
        assert client.command("MAIL FROM:<a@mx.test>").code == 250
        assert client.command("RCPT TO:<b@mx.test>").code == 250
        assert client.command("DATA").code == 354
        assert client.command(b"Subject: x\r\n\r\nx\r\n.").code == 250
    return time.monotonic() - start


def test_idle_flood_on_leafmail(servers: LeafmailFactory) -> None:
    server = servers()
    socks = open_idle(server.address(), IDLE)
    try:
        took = greeted_and_mail_taken(server)
        assert took < PROMPT * 2, took
        rss = rss_kb(server.proc.pid)
    finally:
        for sock in socks:
            sock.close()
    soak.record("attack", "idle flood leafmail", idle=IDLE, bystander_s=round(took, 3),
                server_rss_kb=rss)  # fmt: skip


# --- per-source limits ---------------------------------------------------------------------


def first_line(sock: socket.socket) -> bytes:
    """What the server says first: the refusal, or b"" for a served echo client."""
    sock.settimeout(0.5)
    try:
        return sock.recv(100)
    except TimeoutError:
        return b""


def test_max_per_source_refuses_the_excess_with_a_reply(netserver_proc: ServerFactory) -> None:
    server = echo_server(netserver_proc, "async", "--max-per-source", "3")
    held = open_idle(server.host_port, 3)
    try:
        assert all(round_trip(s) == b"ping\n" for s in held)
        with connect(server.host_port, ATTACKER) as extra:
            assert first_line(extra) == (REFUSAL + "\r\n").encode()
        served_promptly(server.host_port)
    finally:
        for sock in held:
            sock.close()
    soak.record("attack", "max-per-source 3", held=3, excess_refused=True, others_served=True)


def test_rate_per_source_refuses_a_burst_and_spares_others(netserver_proc: ServerFactory) -> None:
    server = echo_server(netserver_proc, "async", "--rate-per-source", "2")
    refused = 0
    tries = 20
    for _ in range(tries):
        refused += not served(server.host_port, ATTACKER)
    assert refused >= tries // 2, refused
    served_promptly(server.host_port)
    soak.record("attack", "rate-per-source 2/s burst", tries=tries, refused=refused)


def test_one_source_cannot_take_every_leafmail_session(servers: LeafmailFactory) -> None:
    """The default per-source cap (half of max_sessions here) keeps room for others;
    the attacker is outside relay_networks, which are exempt as Postfix's mynetworks."""
    server = servers('[smtp]\nmax_sessions = 10\n[relay]\nrelay_networks = ["127.0.0.1"]\n')
    socks = open_idle(server.address(), 10)
    try:
        greetings = [sock.recv(512) for sock in socks]
        refused = [g for g in greetings if g.startswith(b"421 4.7.0 mx.test ")]
        assert len(refused) == 5, greetings  # 5 held, 5 told why and closed
        with RawSMTP(server.address(), source=BYSTANDER) as client:
            client.sock.settimeout(PROMPT / 2)
            assert client.reply().code == 220
        with RawSMTP(server.address(), source="127.0.0.1") as trusted:
            assert trusted.reply().code == 220  # a trusted source is not capped
    finally:
        for sock in socks:
            sock.close()
    soak.record("attack", "one source takes every leafmail session", held=5, refused=5)


# --- a client that never reads -------------------------------------------------------------


def test_a_client_that_never_reads_does_not_stall_others(netserver_proc: ServerFactory) -> None:
    server = echo_server(netserver_proc, "async")
    with connect(server.host_port, ATTACKER) as hog:
        hog.setblocking(False)
        pushed = 0
        line = b"x" * 1023 + b"\n"
        deadline = time.monotonic() + 5
        with contextlib.suppress(BlockingIOError):
            while time.monotonic() < deadline and pushed < soak.scaled(64, 512) << 20:
                pushed += hog.send(line * 64)
        took = served_promptly(server.host_port)
    soak.record("attack", "never-reading client (netserver)", pushed_bytes=pushed,
                bystander_s=round(took, 3))  # fmt: skip


def test_a_pipelining_client_that_never_reads_does_not_stall_leafmail(
    servers: LeafmailFactory,
) -> None:
    server = servers()
    with connect(server.address(), ATTACKER) as hog:
        hog.setblocking(False)
        pushed = 0
        deadline = time.monotonic() + 5
        with contextlib.suppress(BlockingIOError):
            while time.monotonic() < deadline and pushed < soak.scaled(512, 65536) << 10:
                pushed += hog.send(b"NOOP\r\n" * 4096)
        took = greeted_and_mail_taken(server)
        assert took < PROMPT * 2, took
    soak.record("attack", "never-reading pipelining client (leafmail)", pushed_bytes=pushed,
                bystander_s=round(took, 3))  # fmt: skip


def _ended_or_died(server: Leafmail, ended: str) -> bool:
    log = server.log()
    return ended in log or "died" in log


def test_a_client_that_closes_under_its_pipelined_replies_kills_no_worker(
    servers: LeafmailFactory,
) -> None:
    """5,000 pipelined EHLOs, then close without reading: the replies go to a closed socket.

    The first write of the 750 KB of replies draws a RST from the client's kernel, and the
    next one fails with EPIPE. Under a SIGPIPE at its default the smtpd worker died there
    with every session it served, so any client could kill workers at will.
    """
    server = servers()
    attacks = 3
    for _ in range(attacks):
        with connect(server.address(), ATTACKER) as attacker:
            attacker.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            attacker.sendall(b"EHLO attacker.test\r\n" * 5000)
            ended = f"conn peer={ATTACKER}:{attacker.getsockname()[1]} "
        assert wait_until(functools.partial(_ended_or_died, server, ended), PROMPT * 5)
        assert "died" not in server.log(), server.log()
    took = greeted_and_mail_taken(server)
    soak.record("attack", "closed under pipelined replies (leafmail)", attacks=attacks,
                bystander_s=round(took, 3))  # fmt: skip
