"""`leafmail flush` and delivery by the daemon, with real processes and a real smarthost.

Every `leafmail serve` here is a real process that said READY on its --ready-fd; mail
goes in with smtplib and comes out at the aiosmtpd smarthost. `leafmail flush` runs as
a subprocess with its stdout a pipe (not a TTY), so it prints one line per message.
Where the product gives no signal (the daemon delivering by itself, a session reaching
DATA at the smarthost) the tests poll the condition with a bounded deadline.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import ROOT
from leafmail_fixtures import (
    Leafmail,
    LeafmailFactory,
    clean_env,
    leafmail_command,
    leafmail_servers,
    run_flush,
    run_on_terminal,
    smtp_client,
    smtplib_send,
    spawn_leafmail,
    start_flush_alone,
    toml_string,
    write_config,
)
from smarthost import Smarthost

from leafmail.envelope import Envelope, Recipient
from leafmail.queue import SCAN_INTERVAL
from leafmail.spool import Spool
from leafmail.states import QueueState
from leafmail.status import MessageStatus, RcptState
from netserver.errors import EX_CONFIG, EX_TEMPFAIL

SENDER = "alice@src.test"
FLUSH_TIMEOUT = 20.0


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[LeafmailFactory]:
    yield from leafmail_servers(tmp_path)


def config_text(spool: Path, *, smarthost: str | None, mode: str = "offline") -> str:
    delivery = f'[delivery]\nmode = "{mode}"\ntls = "none"\nretry_initial = 300\n'
    if smarthost is not None:
        delivery += f'smarthost = "{smarthost}"\n'
    return f'hostname = "leaf.test"\nspool = {toml_string(spool)}\n\n{delivery}'


def make_config(tmp_path: Path, *, smarthost: str | None, mode: str = "offline") -> Path:
    return write_config(tmp_path, config_text(tmp_path / "spool", smarthost=smarthost, mode=mode))


def start_daemon(servers: LeafmailFactory, tmp_path: Path, config: Path) -> Leafmail:
    return servers.spawn(
        ["--config", str(config), "--listen", "127.0.0.1:0"], spool_path=tmp_path / "spool"
    )


def message(n: int) -> bytes:
    return f"From: <{SENDER}>\r\nSubject: flush test {n}\r\n\r\nBody {n}.\r\n".encode()


def send(server: Leafmail, count: int, rcpt: str = "bob@dst.test") -> list[str]:
    """Send `count` messages in one SMTP session; returns their queue ids."""
    with smtp_client(server) as client:
        return [smtplib_send(client, SENDER, [rcpt], message(n)) for n in range(count)]


def flush(tmp_path: Path, config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return run_flush(tmp_path, config, *args, timeout=FLUSH_TIMEOUT)


def queued(spool: Path) -> list[str]:
    s = Spool(spool, create=False)
    return sorted(q for state in QueueState for q in s.ids(state))


def wait_for(what: str, condition: Callable[[], bool], timeout: float = 20.0) -> None:
    """Poll a condition the product gives no signal for, within a deadline."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def free_port() -> socket.socket:
    """A bound, not listening socket: its port refuses connections while it is held."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    return sock


def received_bodies(sink: Smarthost) -> list[bytes]:
    """What the smarthost got, without the Received header leafmail prepended."""
    bodies = []
    for got in sink.received:
        assert got.content.startswith(b"Received: from client.test ([127.0.0.1])")
        bodies.append(got.content[got.content.index(b"\r\nFrom: ") + 2 :])
    return bodies


def spool_commit(spool: Path, count: int, rcpt: str = "bob@dst.test") -> list[str]:
    s = Spool(spool)
    env = Envelope(SENDER, (Recipient(rcpt),))
    return [s.commit(env, message(n)) for n in range(count)]


# --- flush through the daemon -----------------------------------------------------------


def test_offline_daemon_spools_and_flush_makes_it_deliver(
    servers: LeafmailFactory, sink: Smarthost, tmp_path: Path
) -> None:
    config = make_config(tmp_path, smarthost=sink.address)
    daemon = start_daemon(servers, tmp_path, config)
    qids = send(daemon, 3)

    assert daemon.queue_ids() == sorted(qids)  # spooled, and left alone: offline
    assert sink.connections == 0

    done = flush(tmp_path, config)

    assert done.returncode == 0, done.stderr
    assert sorted(done.stdout.splitlines()) == sorted(f"{q} delivered" for q in qids)
    assert "flush: 3 delivered" in done.stderr
    assert queued(tmp_path / "spool") == []
    assert sorted(received_bodies(sink)) == sorted(message(n) for n in range(3))
    assert all((r.sender, r.recipients) == (SENDER, ["bob@dst.test"]) for r in sink.received)
    log = daemon.log()  # the daemon did the work, not the flush process
    assert all(f"delivery qid={q} result=delivered" in log for q in qids), log


def test_flush_through_the_daemon_exits_75_when_mail_stays(
    servers: LeafmailFactory, sink: Smarthost, tmp_path: Path
) -> None:
    sink.behaviour.rcpt_replies["busy@dst.test"] = "451 4.2.1 mailbox busy"
    config = make_config(tmp_path, smarthost=sink.address)
    daemon = start_daemon(servers, tmp_path, config)
    (busy,) = send(daemon, 1, rcpt="busy@dst.test")
    (ok,) = send(daemon, 1)

    done = flush(tmp_path, config)

    assert done.returncode == EX_TEMPFAIL, done.stderr
    assert sorted(done.stdout.splitlines()) == sorted(
        [f"{ok} delivered", f"{busy} deferred: 451 4.2.1 mailbox busy"]
    )
    assert daemon.spool().ids(QueueState.DEFERRED) == [busy]
    assert queued(tmp_path / "spool") == [busy]


# --- flush by itself -----------------------------------------------------------------------


def test_flush_without_a_daemon_delivers_in_process(sink: Smarthost, tmp_path: Path) -> None:
    config = make_config(tmp_path, smarthost=sink.address)
    qids = spool_commit(tmp_path / "spool", 4)

    done = flush(tmp_path, config)

    assert done.returncode == 0, done.stderr
    assert sorted(done.stdout.splitlines()) == sorted(f"{q} delivered" for q in qids)
    assert queued(tmp_path / "spool") == []
    assert sorted(r.content for r in sink.received) == sorted(message(n) for n in range(4))


def test_flush_no_daemon_bypasses_a_running_daemon(
    servers: LeafmailFactory, sink: Smarthost, tmp_path: Path
) -> None:
    config = make_config(tmp_path, smarthost=sink.address)
    daemon = start_daemon(servers, tmp_path, config)
    qids = send(daemon, 2)

    done = flush(tmp_path, config, "--no-daemon")

    assert done.returncode == 0, done.stderr
    assert sorted(done.stdout.splitlines()) == sorted(f"{q} delivered" for q in qids)
    assert queued(tmp_path / "spool") == []
    assert len(sink.received) == 2
    assert "leafmail: delivery " not in daemon.log()  # the daemon was not asked


def test_flush_with_a_451_recipient_exits_75_and_keeps_the_message(
    sink: Smarthost, tmp_path: Path
) -> None:
    sink.behaviour.rcpt_replies["busy@dst.test"] = "451 4.2.1 mailbox busy"
    spool = tmp_path / "spool"
    (qid,) = spool_commit(spool, 1, rcpt="busy@dst.test")
    config = make_config(tmp_path, smarthost=sink.address)

    done = flush(tmp_path, config)

    assert done.returncode == EX_TEMPFAIL, done.stderr
    assert done.stdout == f"{qid} deferred: 451 4.2.1 mailbox busy\n"
    assert "flush: 1 deferred" in done.stderr
    s = Spool(spool, create=False)
    assert s.ids(QueueState.DEFERRED) == [qid]
    blob = s.read_status(qid)
    assert blob is not None
    status = MessageStatus.from_bytes(blob, s.get(qid).envelope)
    assert status.recipients[0].state is RcptState.DEFERRED
    assert s.get(qid).data == message(0)

    # flush ignores the retry time: the next one tries again at once.
    sink.behaviour.rcpt_replies.clear()
    again = flush(tmp_path, config)
    assert again.returncode == 0, again.stderr
    assert again.stdout == f"{qid} delivered\n"
    assert queued(spool) == []


def test_flush_with_the_smarthost_down_exits_75_and_loses_nothing(tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    qids = spool_commit(spool, 3)
    with free_port() as down:
        config = make_config(tmp_path, smarthost=f"127.0.0.1:{down.getsockname()[1]}")
        done = flush(tmp_path, config)

    assert done.returncode == EX_TEMPFAIL, done.stderr
    assert "next hop unreachable" in done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == 3
    assert {line.split(" ", 1)[0] for line in lines} == set(qids)
    assert all(line.split(" ")[1].rstrip(":") in ("deferred", "waiting") for line in lines)
    assert queued(spool) == sorted(qids)
    s = Spool(spool, create=False)
    assert [s.get(q).data for q in qids] == [message(n) for n in range(3)]


def test_flush_without_a_smarthost_exits_78(tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    (qid,) = spool_commit(spool, 1)
    config = make_config(tmp_path, smarthost=None)

    done = flush(tmp_path, config)

    assert done.returncode == EX_CONFIG, done.stderr
    assert "no smarthost configured" in done.stderr
    assert "Traceback" not in done.stderr
    assert done.stdout == ""
    assert queued(spool) == [qid]


def test_flush_without_a_smarthost_does_not_claim_the_queue_is_empty(tmp_path: Path) -> None:
    spool_commit(tmp_path / "spool", 1)
    done = flush(tmp_path, make_config(tmp_path, smarthost=None))
    assert done.returncode == EX_CONFIG
    assert "nothing to deliver" not in done.stderr


def test_flush_without_a_smarthost_exits_78_with_a_daemon_too(
    servers: LeafmailFactory, tmp_path: Path
) -> None:
    config = make_config(tmp_path, smarthost=None)
    daemon = start_daemon(servers, tmp_path, config)
    (qid,) = send(daemon, 1)
    done = flush(tmp_path, config)
    assert "no smarthost configured" in done.stderr
    assert queued(tmp_path / "spool") == [qid]
    assert done.returncode == EX_CONFIG, done.stderr


def test_flush_with_no_spool_yet_has_nothing_to_do(sink: Smarthost, tmp_path: Path) -> None:
    done = flush(tmp_path, make_config(tmp_path, smarthost=sink.address))
    assert done.returncode == 0, done.stderr
    assert "nothing to deliver" in done.stderr
    assert sink.connections == 0


# --- the daemon delivers by itself -------------------------------------------------------------


def test_smarthost_mode_daemon_delivers_by_itself(
    servers: LeafmailFactory, sink: Smarthost, tmp_path: Path
) -> None:
    config = make_config(tmp_path, smarthost=sink.address, mode="smarthost")
    daemon = start_daemon(servers, tmp_path, config)
    qids = send(daemon, 2)
    lines = [f"delivery qid={q} result=delivered" for q in qids]
    # The daemon logs a delivery once the message is recorded and removed.
    wait_for("both deliveries", lambda: all(line in daemon.log() for line in lines))
    assert queued(tmp_path / "spool") == []
    assert sorted(received_bodies(sink)) == sorted([message(0), message(1)])
    assert all(r.recipients == ["bob@dst.test"] for r in sink.received)


# --- crashes ---------------------------------------------------------------------------------


def test_flush_killed_mid_delivery_then_flushed_again(sink: Smarthost, tmp_path: Path) -> None:
    sink.behaviour.hang_at_data = True
    spool = tmp_path / "spool"
    (qid,) = spool_commit(spool, 1)
    config = make_config(tmp_path, smarthost=sink.address)
    proc = start_flush_alone(tmp_path, config, subprocess.PIPE)
    try:
        wait_for("the message to reach DATA", lambda: sink.data_sessions == 1)
        assert proc.poll() is None
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=FLUSH_TIMEOUT)
    assert proc.returncode == -signal.SIGKILL
    assert queued(spool) == [qid]  # nothing recorded: it will be tried again

    sink.behaviour.hang_at_data = False
    sink.release_hung()  # the orphaned session may finish too: at most twice
    done = flush(tmp_path, config)

    assert done.returncode == 0, done.stderr
    assert done.stdout == f"{qid} delivered\n"
    assert queued(spool) == []
    assert 1 <= len(sink.received) <= 2
    assert all(r.content == message(0) for r in sink.received)


def test_daemon_killed_mid_delivery_delivers_after_restart(
    servers: LeafmailFactory, sink: Smarthost, tmp_path: Path
) -> None:
    sink.behaviour.hang_at_data = True
    config = make_config(tmp_path, smarthost=sink.address, mode="smarthost")
    argv = ["--config", str(config), "--listen", "127.0.0.1:0"]
    first = spawn_leafmail(tmp_path, argv, spool_path=tmp_path / "spool")
    try:
        (qid,) = send(first, 1)
        wait_for("the daemon's delivery to reach DATA", lambda: sink.data_sessions == 1)
    finally:
        first.proc.send_signal(signal.SIGKILL)
        first.proc.wait(FLUSH_TIMEOUT)
    assert queued(tmp_path / "spool") == [qid]

    sink.behaviour.hang_at_data = False
    sink.release_hung()
    second = start_daemon(servers, tmp_path, config)  # same spool: picks the message up
    line = f"delivery qid={qid} result=delivered"
    wait_for("the restarted daemon to deliver", lambda: line in second.log())
    assert queued(tmp_path / "spool") == []
    assert 1 <= len(sink.received) <= 2
    assert all(body == message(0) for body in received_bodies(sink))


def test_released_mail_goes_at_once_with_a_running_daemon(
    servers: LeafmailFactory, sink: Smarthost, tmp_path: Path
) -> None:
    spool = tmp_path / "spool"
    (held,) = spool_commit(spool, 1, rcpt="held@dst.test")
    hold = subprocess.run(
        leafmail_command("hold", "--spool", str(spool), held),
        cwd=ROOT,
        env=clean_env(tmp_path),
        capture_output=True,
        timeout=FLUSH_TIMEOUT,
        check=True,
    )
    assert hold.stdout == f"{held}: held\n-- 1 message held\n".encode()
    config = make_config(tmp_path, smarthost=sink.address, mode="smarthost")
    started = time.monotonic()  # the runner's first scan is later, its second 60 s after
    daemon = start_daemon(servers, tmp_path, config)
    (marker,) = send(daemon, 1)  # once this is delivered, the daemon's pass has run
    line = f"delivery qid={marker} result=delivered"
    wait_for("the daemon's first delivery", lambda: line in daemon.log())
    assert Spool(spool, create=False).ids(QueueState.HOLD) == [held]

    release = subprocess.run(
        leafmail_command("release", "--spool", str(spool), held),
        cwd=ROOT,
        env=clean_env(tmp_path),
        capture_output=True,
        timeout=FLUSH_TIMEOUT,
        check=True,
    )
    assert release.stdout == f"{held}: released\n-- 1 message released\n".encode()

    # "release held messages for delivery now": before the runner's next scan could come
    # (not a fixed 3 s, which a loaded machine can take to deliver, and which proves no more).
    before_the_rescan = started + SCAN_INTERVAL - 1.0 - time.monotonic()
    wait_for("the released message", lambda: len(sink.received) == 2, before_the_rescan)
    assert sink.received[1].recipients == ["held@dst.test"]


def test_control_socket_reports_json_lines(
    servers: LeafmailFactory, sink: Smarthost, tmp_path: Path
) -> None:
    """The protocol flush speaks to the daemon: total, one line per message, then done."""
    config = make_config(tmp_path, smarthost=sink.address)
    daemon = start_daemon(servers, tmp_path, config)
    qids = send(daemon, 2)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(FLUSH_TIMEOUT)
        sock.connect(str(daemon.spool().control_path))
        sock.sendall(b'{"command": "flush"}\n')
        with sock.makefile("rb") as lines:
            replies = [json.loads(line) for line in lines]
    assert replies[0] == {"total": 2}
    assert sorted((r["qid"], r["verdict"]) for r in replies[1:3]) == sorted(
        (q, "delivered") for q in qids
    )
    assert replies[3]["done"] is True
    assert replies[3]["deferred"] == 0
    assert replies[3]["counts"] == {"delivered": 2}
    assert len(replies) == 4


def test_flush_on_a_terminal_shows_a_progress_bar(sink: Smarthost, tmp_path: Path) -> None:
    """On a terminal flush draws rich's bar (N/N done) instead of one line per message."""
    config = make_config(tmp_path, smarthost=sink.address)
    qids = spool_commit(tmp_path / "spool", 3)
    argv = leafmail_command("flush", "--config", str(config))
    status, text, summary = run_on_terminal(tmp_path, argv, timeout=FLUSH_TIMEOUT)
    assert status == 0
    assert "flushing" in text and "3/3" in text, text
    assert not any(qid in text for qid in qids)  # no per-message lines on a terminal
    assert "3 delivered" in summary
    assert queued(tmp_path / "spool") == []
