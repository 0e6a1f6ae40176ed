"""Load: thousands of concurrent SMTP sessions delivering at once, nothing lost or leaked.

The issue asks for 5,000 concurrent sessions delivering for 60 seconds with no error,
bounded memory and every message accounted for, and for the peak RSS under load.
`make soak` runs exactly that; `make test` runs 300 sessions for 5 seconds.

The server is a real `leafmail serve` process; the load comes from a separate process
(load_client.py, uvloop) so it cannot share an interpreter lock with the server or with
this test, which only watches: at each progress line of the generator it reads the
server's /proc (VmRSS, VmHWM, descriptors), and at the end it reads the whole spool back
and rebuilds every acknowledged message from its numbers to compare it byte for byte.

Limits: leafmail's default `smtp.max_sessions` is 20,000 (set explicitly below, so a
lower default would not quietly queue sessions in the backlog), and each process needs
one descriptor per session; the test makes sure the soft RLIMIT_NOFILE it passes on
allows that.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import select
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import soak
from leafmail_fixtures import (
    Leafmail,
    LeafmailFactory,
    check_spooled,
    expect,
    leafmail_servers,
    smtp_client,
    smtplib_send,
    split_received,
)
from lifecycle_handlers import fd_count, socket_fds, status_field
from load_client import Plan, plan_for, source_for
from smarthost import Smarthost
from test_flush import wait_for

from leafmail.spool import SpooledMessage
from leafmail.states import QueueState

GENERATOR = Path(__file__).with_name("load_client.py")
SESSIONS = soak.scaled(300, 5000)
SECONDS = soak.scaled(5.0, 60.0)
TRANSACTION_TIMEOUT = soak.scaled(30.0, 120.0)  # one message; the generator counts a miss

# Peak RSS bound. Issue 3 holds 10,000 idle sessions in 90 MB, about 9 KiB each; a busy
# session also holds the message it is receiving (here at most ~6 KiB, stuffed and
# unstuffed) and its stream buffers, so 32 KiB per session. On top of the server's own
# size after one message: 64 MiB for group-commit batches, spool buffers and allocator
# slack. A leak of a few hundred bytes per message breaks it in the soak run.
PER_SESSION_KIB = 32
SLACK_KIB = 64 * 1024
# Between the middle and the end of the run RSS may move by allocator noise, not by
# message count: 8 MiB, plus 256 bytes per message acknowledged meanwhile.
GROWTH_NOISE_KIB = 8 * 1024
GROWTH_PER_MESSAGE = 256


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[LeafmailFactory]:
    yield from leafmail_servers(tmp_path)


# --- watching the server ---------------------------------------------------------------


@dataclass(frozen=True)
class Probe:
    """The server as /proc shows it at one moment (sizes in KiB), summed over its
    processes: the parent and the smtpd workers and qmgr it forked."""

    rss: int
    hwm: int
    fds: int
    sockets: int

    @classmethod
    def of(cls, pid: int) -> Probe:
        tree = process_tree(pid)
        return cls(
            rss=sum(status_field(p, "VmRSS") for p in tree),
            hwm=sum(status_field(p, "VmHWM") for p in tree),
            fds=sum(fd_count(p) for p in tree),
            sockets=sum(socket_fds(p) for p in tree),
        )


def process_tree(pid: int) -> list[int]:
    """`pid` and every process below it."""
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        with contextlib.suppress(OSError):
            for task in Path(f"/proc/{current}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
    return found


@dataclass
class LoadRun:
    """What the generator reported, and the server as it was at each of its lines."""

    summary: dict[str, Any]
    probes: dict[str, Probe] = field(default_factory=dict)
    acked_at: dict[str, int] = field(default_factory=dict)

    @property
    def acked(self) -> list[tuple[int, int, str]]:
        return [(s, n, q) for s, n, q in self.summary["acked"]]

    def qids(self) -> list[str]:
        return [qid for _, _, qid in self.acked]


def ensure_nofile(sessions: int) -> None:
    """Children inherit this process's soft limit: raise it to cover every session."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = sessions + 1024
    if soft < need:
        assert hard >= need, f"RLIMIT_NOFILE hard limit {hard} < {need}"
        resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))


def generator_lines(proc: subprocess.Popen[bytes], deadline: float) -> Iterator[str]:
    """The generator's stdout, line by line, until EOF; a stall past `deadline` fails."""
    assert proc.stdout is not None
    fd, buf = proc.stdout.fileno(), b""
    while True:
        while b"\n" in buf:
            line, _, buf = buf.partition(b"\n")
            yield line.decode()
        left = deadline - time.monotonic()
        ready, _, _ = select.select([fd], [], [], max(0.0, left))
        if not ready:
            proc.kill()
            raise AssertionError(f"load generator still running at its deadline: {buf!r}")
        chunk = os.read(fd, 4096)
        if not chunk:
            return
        buf += chunk


def run_load(server: Leafmail, tmp_path: Path, sessions: int, seconds: float, run: str) -> LoadRun:
    """Run load_client.py against `server`; probe the server at each progress line."""
    out, errors = tmp_path / f"load-{run}.json", tmp_path / f"load-{run}.err"
    argv = [sys.executable, str(GENERATOR), "--port", str(server.port), "--run", run]
    argv += ["--sessions", str(sessions), "--seconds", str(seconds), "--out", str(out)]
    argv += ["--timeout", str(TRANSACTION_TIMEOUT)]
    deadline = time.monotonic() + 30 + sessions / 50 + seconds + TRANSACTION_TIMEOUT
    probes, acked_at = {}, {}
    with errors.open("wb") as err:
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=err)
    try:
        for line in generator_lines(proc, deadline):
            words = line.split()
            key = " ".join(words[:2]) if words[0] == "MARK" else words[0]
            probes[key] = Probe.of(server.proc.pid)
            if words[0] == "MARK":
                acked_at[key] = int(words[2])
        code = proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        assert proc.stdout is not None
        proc.stdout.close()
    assert code == 0, f"load generator exit {code}: {errors.read_text(errors='replace')}"
    summary = json.loads(out.read_text())
    return LoadRun(summary, probes, acked_at)


def warm_up(server: Leafmail) -> tuple[str, Probe]:
    """One message first, so what is created lazily exists when the baseline is taken.

    Returns its queue id and the baseline, taken once the server closed its socket.
    """
    pid = server.proc.pid
    sockets = Probe.of(pid).sockets
    # Sessions at once reach every smtpd worker (the least busy takes each), so what a
    # worker's loop opens on its first connection is in the baseline too.
    greeted = [smtp_client(server) for _ in range(2 * (os.cpu_count() or 1))]
    for client in greeted:
        client.quit()
    with smtp_client(server) as client:
        qid = smtplib_send(client, "warm@load.test", ["warm@dest.test"], b"Subject: warm\r\n\r\n")
    wait_for("the warm-up session to close", lambda: Probe.of(pid).sockets <= sockets)
    return qid, Probe.of(pid)


# --- checks ---------------------------------------------------------------------------


def check_clean_run(load: LoadRun, sessions: int) -> None:
    """No error of any kind, every session opened and quit, every message answered."""
    s = load.summary
    assert s["errors"] == {}, f"errors: {s['errors']}; first ones: {s['error_samples']}"
    expect("connect failures", s["connect_failures"], 0)
    expect("sessions opened", s["opened"], sessions)
    expect("sessions ended with 221", s["quits"], sessions)
    expect("messages sent vs 250 replies", len(load.acked), s["sent"])
    assert load.acked, "no message was acknowledged"
    assert s["aborted"] > 0, "no session hung up mid-data: the abort path went untested"
    qids = load.qids()
    expect("duplicate queue ids in 250 replies", len(qids) - len(set(qids)), 0)


def check_spooled_plan(msg: SpooledMessage, plan: Plan, qid: str) -> None:
    """The spooled message is the planned one, byte for byte, with its envelope."""
    check_spooled(
        msg,
        plan.body,
        qid=qid,
        protocol="UTF8SMTP" if plan.smtputf8 else "ESMTP",
        recipients=list(plan.recipients),
        sender=plan.sender,
        ip=source_for(plan.session),
    )
    expect("BODY", msg.envelope.body, "8BITMIME" if plan.eightbit else "7BIT")
    expect("SMTPUTF8", msg.envelope.smtputf8, plan.smtputf8)


def memory_bound_kib(base: Probe, sessions: int) -> int:
    return base.rss + sessions * PER_SESSION_KIB + SLACK_KIB


def check_memory(load: LoadRun, base: Probe, sessions: int, peak: int) -> int:
    """Peak within the bound; RSS not growing with messages in the second half.

    Returns how much RSS grew (KiB) from the middle to the end of the run.
    """
    bound = memory_bound_kib(base, sessions)
    assert peak <= bound, f"peak RSS {peak} KiB over the bound {bound} KiB"
    middle, end = load.probes["MARK 2"], load.probes["MARK 4"]
    messages = load.acked_at["MARK 4"] - load.acked_at["MARK 2"]
    allowed = GROWTH_NOISE_KIB + messages * GROWTH_PER_MESSAGE // 1024
    growth = end.rss - middle.rss
    assert growth <= allowed, (
        f"RSS grew {growth} KiB over {messages} messages in the second half "
        f"(allowed {allowed}); probes: {load.probes}"
    )
    return growth


def record(name: str, load: LoadRun, sessions: int, seconds: float, **figures: object) -> None:
    acked = len(load.acked)
    soak.record(
        "load",
        name,
        sessions=sessions,
        seconds=seconds,
        sent=load.summary["sent"],
        acknowledged=acked,
        errors=sum(load.summary["errors"].values()),
        aborted_mid_data=load.summary["aborted"],
        connect_failures=load.summary["connect_failures"],
        msgs_per_s=round(acked / seconds, 1),
        **figures,
    )


# --- the tests -------------------------------------------------------------------------


@pytest.mark.timeout(soak.scaled(90, 900))
def test_concurrent_sessions_spool_every_message(servers: LeafmailFactory, tmp_path: Path) -> None:
    """N sessions at once for T seconds into an offline server: all 250s in queue/, exact.

    Offline, nothing leaves the queue, so the spool after the run must hold exactly the
    acknowledged messages (and the warm-up one): none lost, none extra (2% of messages
    are cut off mid-data by a client hanging up, which RFC 5321 4.1.1.4 says aborts
    them), each one's bytes and envelope as sent. While the sessions are open the server
    holds a socket for each (proof they were concurrent); after they close its
    descriptors are back at baseline and tmp/ holds nothing of the aborted ones.
    """
    ensure_nofile(SESSIONS)
    server = servers("[smtp]\nmax_sessions = 20000\n")
    warm, base = warm_up(server)
    load = run_load(server, tmp_path, SESSIONS, SECONDS, "spool")
    check_clean_run(load, SESSIONS)
    connected = load.probes["CONNECTED"]
    assert connected.sockets >= base.sockets + SESSIONS, (base, connected)
    wait_for(
        "server descriptors back at baseline", lambda: Probe.of(server.proc.pid).fds <= base.fds
    )
    leftovers = os.listdir(server.spool_path / "tmp")
    assert not leftovers, f"aborted transactions left {len(leftovers)} files in tmp/"
    peak = Probe.of(server.proc.pid).hwm
    growth = check_memory(load, base, SESSIONS, peak)

    spooled = server.queue_ids()
    wanted = {*load.qids(), warm}
    lost = wanted - set(spooled)
    extra = set(spooled) - wanted
    assert not lost and not extra, f"{len(lost)} lost, {len(extra)} extra: {sorted(lost)[:5]}"
    expect("messages in queue/", len(spooled), len(load.acked) + 1)
    spool = server.spool()
    for session, number, qid in load.acked:
        check_spooled_plan(
            spool.get(qid, QueueState.QUEUE), plan_for("spool", session, number), qid
        )
    record(
        "offline spool",
        load,
        SESSIONS,
        SECONDS,
        spooled=len(spooled) - 1,
        lost=len(lost),
        extra=len(extra),
        peak_rss_mb=round(peak / 1024, 1),
        base_rss_mb=round(base.rss / 1024, 1),
        rss_growth_second_half_mb=round(growth / 1024, 1),
        fds_base=base.fds,
        sockets_at_connected=connected.sockets,
    )


DELIVERY_SESSIONS = soak.scaled(100, 1000)
DELIVERY_SECONDS = soak.scaled(3.0, 30.0)
DRAIN_TIMEOUT = soak.scaled(30.0, 300.0)


def delivered_ids(sink: Smarthost) -> list[str]:
    """The queue id in the Received header of every message the smarthost accepted."""
    return [split_received(got.content)[0].qid for got in list(sink.received)]


def queued_anywhere(server: Leafmail) -> set[str]:
    """Every id still in the spool, whatever its state."""
    spool = server.spool()
    return {qid for state in QueueState for qid in spool.ids(state)}


def check_delivered(sink: Smarthost, load: LoadRun, run: str) -> None:
    """Each acknowledged message reached the smarthost once, as it was sent."""
    by_qid = {split_received(got.content)[0].qid: got for got in sink.received}
    for session, number, qid in load.acked:
        plan, got = plan_for(run, session, number), by_qid[qid]
        expect("delivered bytes", split_received(got.content)[1], plan.body)
        expect("delivered sender", got.sender, plan.sender)
        expect("delivered recipients", got.recipients, list(plan.recipients))


@pytest.mark.timeout(soak.scaled(90, 900))
def test_concurrent_sessions_while_delivering(
    servers: LeafmailFactory, sink: Smarthost, tmp_path: Path
) -> None:
    """The same load while the daemon delivers to a real smarthost: delivered or queued.

    At the end of the load every acknowledged id must be in the spool or at the
    smarthost (the spool is read first: a message moving between the two reads is then
    seen at the smarthost). Then, once the queue drained, each was delivered exactly
    once, byte for byte: nothing lost, nothing sent twice without a fault to excuse it.
    """
    ensure_nofile(DELIVERY_SESSIONS)
    config = (
        "[smtp]\nmax_sessions = 20000\n\n[delivery]\n"
        f'mode = "smarthost"\nsmarthost = "{sink.address}"\ntls = "none"\nconcurrency = 8\n'
    )
    server = servers(config)
    load = run_load(server, tmp_path, DELIVERY_SESSIONS, DELIVERY_SECONDS, "relay")
    check_clean_run(load, DELIVERY_SESSIONS)
    queued = queued_anywhere(server)
    at_end = set(delivered_ids(sink))
    unaccounted = set(load.qids()) - queued - at_end
    assert not unaccounted, f"{len(unaccounted)} acknowledged but neither queued nor delivered"
    in_queue_at_end = len((set(load.qids()) & queued) - at_end)

    drain_started = time.monotonic()
    wait_for(
        "the queue to drain",
        lambda: len(sink.received) >= len(load.acked) and not queued_anywhere(server),
        DRAIN_TIMEOUT,
    )
    drain_seconds = time.monotonic() - drain_started
    delivered = delivered_ids(sink)
    expect("messages delivered twice", len(delivered) - len(set(delivered)), 0)
    expect("delivered ids", sorted(delivered), sorted(load.qids()))
    check_delivered(sink, load, "relay")
    record(
        "delivering to a smarthost",
        load,
        DELIVERY_SESSIONS,
        DELIVERY_SECONDS,
        delivered=len(delivered),
        queued_at_end_of_load=in_queue_at_end,
        # Issue 12's target: at least half leave while the load runs (the qmgr is a
        # process of its own, so sessions cannot starve it).
        left_during_load_pct=round(100 * len(at_end & set(load.qids())) / len(load.acked), 1),
        drain_seconds=round(drain_seconds, 1),
        lost=len(set(load.qids()) - set(delivered)),
        peak_rss_mb=round(Probe.of(server.proc.pid).hwm / 1024, 1),
    )
