"""Smarthost faults: each must lead to the right defer or bounce, nothing lost or doubled.

Real delivery: messages are committed to a real spool and `leafmail flush` runs as a
process against a next hop that fails in one way (fault_servers.FaultServer, a refused
port, the aiosmtpd `Smarthost` with a certificate for the wrong name or refusing some
recipients). After each run the spool is read back: every message is still there with
the right per-recipient state, attempt count and last reply, or was bounced with an
RFC 3464 report to its sender. Then the fault clears (the fault server relays to a
healthy smarthost, or the config points at one) and `flush` runs again: it ignores
retry times, so no test waits for a retry interval, and exactly the recipients still
open must arrive, each once (RFC 5321 6.1: at least once; a recipient answered 250 is
never sent again).
"""

from __future__ import annotations

import email
import email.message
import email.policy
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import soak
import trustme
from fault_servers import Fault, FaultServer
from leafmail_fixtures import run_flush, toml_string, write_config
from smarthost import Smarthost, delivery_counts

from leafmail.envelope import Envelope, Recipient
from leafmail.spool import Spool
from leafmail.states import QueueState
from leafmail.status import MessageStatus, RcptState
from netserver.errors import EX_TEMPFAIL

SENDER = "alice@src.test"
NULL = "<>"  # how aiosmtpd records MAIL FROM:<>
COMMAND_TIMEOUT = 0.5
DEADLINE = 1.0
LINK = "link"  # the next hop was not reachable: first message deferred, others wait
TXN = "transaction"  # every message was tried and deferred

pytestmark = pytest.mark.timeout(soak.scaled(60, 300))


# --- helpers ----------------------------------------------------------------------------


def config(
    tmp_path: Path, smarthost: str, *, tls: str = "none", ca_file: str = "", concurrency: int = 1
) -> Path:
    """A flush config with short timeouts, so a silent peer costs a second, not minutes."""
    text = (
        f'hostname = "leaf.test"\nspool = {toml_string(tmp_path / "spool")}\n\n'
        f'[delivery]\nmode = "offline"\nsmarthost = "{smarthost}"\ntls = "{tls}"\n'
        f"connect_timeout = {DEADLINE}\ncommand_timeout = {COMMAND_TIMEOUT}\n"
        f"deadline = {DEADLINE}\nretry_initial = 300\nconcurrency = {concurrency}\n"
    )
    if ca_file:
        text += f"ca_file = {toml_string(ca_file)}\n"
    return write_config(tmp_path, text)


def flush(tmp_path: Path, config_path: Path) -> subprocess.CompletedProcess[str]:
    return run_flush(tmp_path, config_path, "--no-daemon")


def body(n: int, size: int = 0) -> bytes:
    head = f"From: <{SENDER}>\r\nSubject: fault {n}\r\n\r\n".encode()
    return head + b"x" * 70 + b"\r\n" + (b"y" * 998 + b"\r\n") * (size // 1000)


def commit(tmp_path: Path, plan: list[list[str]], size: int = 0) -> list[str]:
    """One message per recipient list, committed in order; their queue ids."""
    spool = Spool(tmp_path / "spool")
    return [
        spool.commit(Envelope(SENDER, tuple(Recipient(r) for r in rcpts)), body(n, size))
        for n, rcpts in enumerate(plan)
    ]


def spool_ids(tmp_path: Path) -> list[str]:
    spool = Spool(tmp_path / "spool", create=False)
    return sorted(q for state in QueueState for q in spool.ids(state))


def status(tmp_path: Path, qid: str) -> MessageStatus | None:
    spool = Spool(tmp_path / "spool", create=False)
    blob = spool.read_status(qid)
    return None if blob is None else MessageStatus.from_bytes(blob, spool.get(qid).envelope)


def dsn_blocks(sink: Smarthost) -> list[email.message.Message]:
    """The per-recipient blocks of every DSN the smarthost got (RFC 3464 section 2.3)."""
    blocks: list[email.message.Message] = []
    for got in sink.received:
        if got.sender != NULL:
            continue
        assert got.recipients == [SENDER]
        report = email.message_from_bytes(got.content, policy=email.policy.compat32)
        assert report.get_content_type() == "multipart/report"
        assert report.get_param("report-type") == "delivery-status"
        parts = report.get_payload()
        assert isinstance(parts, list) and len(parts) == 3, parts
        status_part = parts[1]
        assert isinstance(status_part, email.message.Message)
        assert status_part.get_content_type() == "message/delivery-status"
        fields = status_part.get_payload()
        assert isinstance(fields, list) and isinstance(fields[0], email.message.Message)
        assert fields[0]["Reporting-MTA"] == "dns; leaf.test"
        for block in fields[1:]:
            assert isinstance(block, email.message.Message)
            blocks.append(block)
    return blocks


@pytest.fixture
def sink_host() -> Iterator[Smarthost]:
    host = Smarthost().start()
    yield host
    host.stop()


def wrong_name_smarthost(tmp_path: Path) -> tuple[Smarthost, str]:
    """A STARTTLS smarthost whose certificate, from a CA we trust, names another host."""
    ca = trustme.CA()
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("wrong.test").configure_cert(context)
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    return Smarthost(tls=context).start(), str(ca_file)


# --- one fault at a time ----------------------------------------------------------------------

# fault -> (kind, the reply recorded for the first recipient of the first message)
FAULTS: dict[str, tuple[str, str]] = {
    "refused": (LINK, "451 4.4.1 "),
    "silent": (LINK, "451 4.4.1 "),
    "tls-broken": (LINK, "451 4.4.1 "),
    "cert-mismatch": (LINK, "451 4.4.1 "),
    "stall": (TXN, "451 4.4.2 "),
    "slow-reader": (TXN, "451 4.4.2 "),
    "421-at-mail": (TXN, "421 4.3.2 fault.test shutting down"),
    "421-at-rcpt": (TXN, "451 4.4.2 "),
}


@pytest.mark.parametrize("fault", list(FAULTS))
def test_fault_defers_and_the_retry_delivers_each_once(
    fault: str, tmp_path: Path, sink_host: Smarthost
) -> None:
    """The fault defers (never bounces: none of these says anything about the mail),
    records why, keeps the bytes; once it clears, each recipient gets the message once."""
    kind, first_reply = FAULTS[fault]
    size = 2_000_000 if fault == "slow-reader" else 0
    qids = commit(tmp_path, [["a@dst.test", "b@dst.test"], ["c@dst.test"]], size)
    started = time.monotonic()
    with faulty_next_hop(fault, tmp_path, sink_host) as (faulty, healthy, server):
        done = flush(tmp_path, faulty)
        took = time.monotonic() - started
        assert done.returncode == EX_TEMPFAIL, done.stderr
        assert spool_ids(tmp_path) == sorted(qids)  # nothing lost, no bounce spooled
        assert sink_host.received == []
        first = status(tmp_path, qids[0])
        assert first is not None, done.stdout
        assert [r.state for r in first.recipients] == [RcptState.DEFERRED] * 2
        assert [r.attempts for r in first.recipients] == [1, 1]
        assert first.recipients[0].reply.startswith(first_reply), first.recipients
        check_second(kind, fault, status(tmp_path, qids[1]), done.stdout, qids[1])
        if fault == "slow-reader":
            assert server is not None and 0 < server.data_bytes < size
        assert took < 4 * DEADLINE + 10, took  # the deadlines hold, however slow the peer
        again = flush(tmp_path, healthy)
    assert again.returncode == 0, again.stderr + again.stdout
    assert spool_ids(tmp_path) == []
    got = delivery_counts(sink_host)
    assert got == {"a@dst.test": 1, "b@dst.test": 1, "c@dst.test": 1}
    assert all(r.sender == SENDER for r in sink_host.received)  # no bounce went out
    soak.record(
        "smarthost",
        fault,
        outcome="deferred then delivered",
        messages=2,
        recipients=3,
        deferred_reply=first.recipients[0].reply,
        delivered=sum(got.values()),
        lost=0,
        duplicates=sum(got.values()) - 3,
        seconds=round(took, 2),
    )


def check_second(
    kind: str, fault: str, second: MessageStatus | None, stdout: str, qid: str
) -> None:
    """A link fault leaves the others untried (no attempt counted); a transaction
    fault defers each of them with its own attempt."""
    if kind == LINK:
        assert second is None, second
        assert f"{qid} waiting" in stdout, stdout
        return
    assert second is not None
    assert second.recipients[0].state is RcptState.DEFERRED
    assert second.recipients[0].attempts == 1
    if fault == "421-at-rcpt":  # c was the first RCPT: accepted, then 421 at DATA
        assert second.recipients[0].reply.startswith("421 4.4.5 "), second


class faulty_next_hop:
    """Configs for the faulty next hop and for the healthy one, and the fault server."""

    def __init__(self, fault: str, tmp_path: Path, sink: Smarthost) -> None:
        self.fault = fault
        self.tmp_path = tmp_path
        self.sink = sink
        self.server: FaultServer | None = None
        self.other: Smarthost | None = None
        self.held: socket.socket | None = None

    def __enter__(self) -> tuple[Path, Path, FaultServer | None]:
        tmp, healthy = self.tmp_path, config(self.tmp_path, self.sink.address)
        if self.fault == "refused":
            self.held = socket.socket()  # bound, never listening: connections are refused
            self.held.bind(("127.0.0.1", 0))
            return config(tmp, f"127.0.0.1:{self.held.getsockname()[1]}"), healthy, None
        if self.fault == "cert-mismatch":
            self.other, ca_file = wrong_name_smarthost(tmp)
            faulty = config(tmp, self.other.address, tls="starttls", ca_file=ca_file)
            return faulty, healthy, None
        self.server = FaultServer(Fault(self.fault), ("127.0.0.1", self.sink.port))
        tls = "starttls" if self.fault == "tls-broken" else "none"
        return config(tmp, self.server.address, tls=tls), healthy, self.server

    def __exit__(self, *exc: object) -> None:
        if self.held is not None:
            self.held.close()
        if self.other is not None:
            assert self.other.received == [] and self.other.data_sessions == 0
            self.other.stop()
        if self.server is not None:
            self.server.stop()


def test_after_a_fault_the_same_address_recovers(tmp_path: Path, sink_host: Smarthost) -> None:
    """421 in mid-session at one address, which then recovers (the fault server relays
    to the smarthost): the retry goes to the same place and delivers each recipient once."""
    qids = commit(tmp_path, [["a@dst.test", "b@dst.test", "c@dst.test"]])
    server = FaultServer(Fault.DROP_AT_RCPT, ("127.0.0.1", sink_host.port))
    try:
        path = config(tmp_path, server.address)
        assert flush(tmp_path, path).returncode == EX_TEMPFAIL
        server.fault = Fault.RELAY
        done = flush(tmp_path, path)
    finally:
        server.stop()
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"{qids[0]} delivered\n"
    assert delivery_counts(sink_host) == {"a@dst.test": 1, "b@dst.test": 1, "c@dst.test": 1}
    assert server.accepts == 2


# --- per-recipient replies ------------------------------------------------------------------


def test_mixed_replies_split_exactly_and_bounce_once(tmp_path: Path, sink_host: Smarthost) -> None:
    """250, 451, 550, 452 (too many recipients) and 553 in one transaction: the 2xx is
    delivered, the 4xx deferred, the 5xx bounced in one RFC 3464 report naming exactly
    them; the retry sends only the deferred ones, and no second report."""
    sink_host.behaviour.rcpt_replies.update(
        {
            "busy@dst.test": "451 4.2.1 mailbox busy",
            "gone@dst.test": "550 5.1.1 no such user",
            "many@dst.test": "452 4.5.3 too many recipients",
            "bad@dst.test": "553 5.1.3 bad address syntax",
        }
    )
    rcpts = ["ok@dst.test", "busy@dst.test", "gone@dst.test", "many@dst.test", "bad@dst.test"]
    (qid,) = commit(tmp_path, [rcpts])
    path = config(tmp_path, sink_host.address)

    done = flush(tmp_path, path)

    assert done.returncode == EX_TEMPFAIL, done.stderr
    first = status(tmp_path, qid)
    assert first is not None
    states = [r.state for r in first.recipients]
    assert states == [
        RcptState.DELIVERED,
        RcptState.DEFERRED,
        RcptState.FAILED,
        RcptState.DEFERRED,
        RcptState.FAILED,
    ]
    assert [r.reply for r in first.recipients][1:] == [
        "451 4.2.1 mailbox busy",
        "550 5.1.1 no such user",
        "452 4.5.3 too many recipients",
        "553 5.1.3 bad address syntax",
    ]
    blocks = dsn_blocks(sink_host)
    assert [(b["Final-Recipient"], b["Action"], b["Status"]) for b in blocks] == [
        ("rfc822; gone@dst.test", "failed", "5.1.1"),
        ("rfc822; bad@dst.test", "failed", "5.1.3"),
    ]
    assert [b["Diagnostic-Code"] for b in blocks] == [
        "smtp; 550 5.1.1 no such user",
        "smtp; 553 5.1.3 bad address syntax",
    ]
    # The smarthost is known by its address only: an address literal (RFC 3464 2.3.5).
    assert all(b["Remote-MTA"] == f"dns; [{sink_host.host}]" for b in blocks), [
        str(b) for b in blocks
    ]

    sink_host.behaviour.rcpt_replies.clear()
    again = flush(tmp_path, path)

    assert again.returncode == 0, again.stderr
    got = delivery_counts(sink_host)
    assert got == {"ok@dst.test": 1, "busy@dst.test": 1, "many@dst.test": 1, SENDER: 1}
    assert spool_ids(tmp_path) == []
    soak.record(
        "smarthost",
        "per-recipient 250/451/550/452/553",
        outcome="2 delivered at once, 2 deferred then delivered, 2 bounced in one DSN",
        delivered=3,
        bounced=2,
        dsns=got[SENDER],
        lost=0,
        duplicates=0,
    )


def test_552_to_rcpt_is_too_many_recipients_and_deferred(
    tmp_path: Path, sink_host: Smarthost
) -> None:
    """RFC 821 listed "too many recipients" as 552; RFC 5321 4.5.3.1.10 corrects it to
    452 and says clients SHOULD treat a 552 to RCPT as temporary, so that the rest of
    the recipients go in a later transaction instead of bouncing (Postfix does so)."""
    sink_host.behaviour.rcpt_replies["third@dst.test"] = "552 5.5.3 too many recipients"
    rcpts = ["first@dst.test", "second@dst.test", "third@dst.test"]
    (qid,) = commit(tmp_path, [rcpts])
    done = flush(tmp_path, config(tmp_path, sink_host.address))
    soak.record("smarthost", "552 to RCPT", exit=done.returncode, dsns=len(dsn_blocks(sink_host)))
    assert dsn_blocks(sink_host) == []
    third = status(tmp_path, qid)
    assert third is not None and third.recipients[2].state is RcptState.DEFERRED
