"""Delivery under SIGKILL: a kill mid-send may repeat a delivery, never lose one (issue 7).

Messages with one to three recipients at different domains are spooled, and a real
delivery process (`leafmail serve` in smarthost mode, or `leafmail flush --no-daemon`)
sends them to the aiosmtpd smarthost. The test kills it once deterministically while
the smarthost holds a transaction in DATA, then at random moments (seeded,
the seed is printed), restarting it each time until the queue is empty.

Then every recipient must have got every message at least once, byte for byte the
spooled data; the spool must be empty in every directory, status/ included; and copies
beyond the first may only come from a kill: each kill can cut at most `concurrency`
transactions between the smarthost's 250 and the status record, so there can be no
more duplicates than that.

A message that was partly delivered keeps its status across a kill: the recipients
that got it are never sent it again (README, "Delivered recipients are never sent
again by a retry").
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path

import pytest
import soak
from crash_support import audit, message_bytes, seeded_rng, sequence_number, sigkill
from leafmail_fixtures import (
    run_flush,
    spawn_leafmail,
    start_flush_alone,
    toml_string,
    write_config,
)
from smarthost import Smarthost
from test_flush import wait_for

from leafmail.envelope import Envelope, Recipient
from leafmail.spool import Spool
from leafmail.states import QueueState
from leafmail.status import MessageStatus, RcptState
from netserver.errors import EX_TEMPFAIL

SENDER = "sender@client.test"
MESSAGES = soak.scaled(60, 1500)
MAX_KILLS = soak.scaled(8, 200)
CONCURRENCY = 2
RUN_TIMEOUT = 60.0
Spooled = dict[int, tuple[str, bytes, tuple[str, ...]]]  # number -> qid, data, recipients


def config_for(tmp_path: Path, sink: Smarthost, mode: str) -> Path:
    """A config delivering everything to the test smarthost, plain SMTP."""
    return write_config(
        tmp_path,
        f'hostname = "leaf.test"\nspool = {toml_string(tmp_path / "spool")}\n\n'
        f'[delivery]\nmode = "{mode}"\nsmarthost = "{sink.address}"\ntls = "none"\n'
        f"concurrency = {CONCURRENCY}\nretry_initial = 300\n",
    )


def spool_messages(spool: Path, count: int, rng: random.Random) -> Spooled:
    """Commit `count` numbered messages, each to 1-3 recipients at a.test, b.test, c.test."""
    store = Spool(spool)
    spooled: Spooled = {}
    for number in range(1, count + 1):
        rcpts = tuple(f"rcpt@{d}.test" for d in "abc"[: rng.choice((1, 2, 3, 3))])
        data = message_bytes(number, rng.choice((400, 4_000, 60_000)), to=rcpts[0])
        envelope = Envelope(SENDER, tuple(Recipient(r) for r in rcpts))
        spooled[number] = (store.commit(envelope, data), data, rcpts)
    return spooled


def pending(spool: Path) -> list[str]:
    """Messages still in the spool, in any state."""
    result = audit(spool)
    assert result.damaged == [] and result.corrupt == [], result
    return [m.qid for m in result.messages]


# --- the delivery processes ---------------------------------------------------------------


class Deliverer:
    """Starts the delivery process of one kind; `kill` SIGKILLs it."""

    def __init__(self, kind: str, tmp_path: Path, config: Path) -> None:
        self.kind = kind
        self.tmp_path = tmp_path
        self.config = config
        self.proc: subprocess.Popen[bytes] | None = None
        self.kills = 0

    def start(self) -> None:
        if self.kind == "serve":
            argv = ["--config", str(self.config), "--listen", "127.0.0.1:0"]
            spool = self.tmp_path / "spool"
            self.proc = spawn_leafmail(self.tmp_path, argv, spool_path=spool).proc
        else:
            self.proc = start_flush_alone(self.tmp_path, self.config)

    def kill(self) -> int | None:
        """SIGKILL it (a flush may have finished by itself: 0, or 75)."""
        assert self.proc is not None
        code = sigkill(self.proc)
        self.kills += code == -signal.SIGKILL
        assert code in (0, EX_TEMPFAIL, -signal.SIGKILL), code
        return code

    def finish(self, spool: Path) -> None:
        """Run it to the end without a kill: a flush until it exits 0, a daemon until the
        spool is empty (then SIGTERM, exit 0)."""
        self.start()
        assert self.proc is not None
        if self.kind == "flush":
            assert self.proc.wait(RUN_TIMEOUT) == 0
            return
        try:
            wait_for("the daemon to empty the spool", lambda: not pending(spool), RUN_TIMEOUT)
        finally:
            self.proc.send_signal(signal.SIGTERM)
            assert self.proc.wait(RUN_TIMEOUT) == 0


def kill_mid_data(deliverer: Deliverer, sink: Smarthost) -> int:
    """Kill while the smarthost holds transactions in DATA; returns how many it held.

    Every transaction the killed process began keeps hanging, even one whose data the
    smarthost reads only after the flag is cleared (tests/smarthost.py), so nothing of
    these reaches it: they must all be delivered again after the restart.
    """
    before = sink.data_sessions
    sink.behaviour.hang_at_data = True
    deliverer.start()
    try:
        wait_for("a delivery to reach DATA", lambda: sink.data_sessions > before, RUN_TIMEOUT)
    finally:
        assert deliverer.kill() == -signal.SIGKILL
        sink.behaviour.hang_at_data = False
    return sink.data_sessions - before


def check_deliveries(sink: Smarthost, spooled: Spooled) -> Counter[int]:
    """Every recipient got every message, exactly; returns the copies of each message."""
    copies: Counter[int] = Counter()
    per_rcpt: Counter[tuple[int, str]] = Counter()
    for got in sink.received:
        number = sequence_number(got.content)
        qid, data, rcpts = spooled[number]
        assert got.content == data, f"message {number} ({qid}) arrived altered or partial"
        assert got.sender == SENDER
        assert set(got.recipients) <= set(rcpts), (number, got.recipients, rcpts)
        copies[number] += 1
        per_rcpt.update((number, r) for r in got.recipients)
    missing = [(n, r) for n, (_q, _d, rs) in spooled.items() for r in rs if not per_rcpt[n, r]]
    assert missing == [], f"recipients that never got their message: {missing[:10]}"
    return copies


@pytest.mark.timeout(soak.scaled(120, 1200))
@pytest.mark.parametrize("kind", ["serve", "flush"])
def test_every_recipient_gets_every_message_despite_sigkills(
    kind: str, sink: Smarthost, tmp_path: Path
) -> None:
    rng, seed = seeded_rng(f"crash-delivery-{kind}")
    spool = tmp_path / "spool"
    spooled = spool_messages(spool, MESSAGES, rng)
    deliverer = Deliverer(kind, tmp_path, config_for(tmp_path, sink, "smarthost"))
    orphans = kill_mid_data(deliverer, sink)
    lifetime = (0.0, 0.25) if kind == "serve" else (0.1, 0.6)  # flush has no READY line
    while pending(spool) and deliverer.kills < MAX_KILLS:
        deliverer.start()
        time.sleep(rng.uniform(*lifetime))  # the random moment is the test
        deliverer.kill()
    deliverer.finish(spool)

    result = audit(spool)
    assert result.empty(), f"the spool is not empty after delivery: {result}"
    copies = check_deliveries(sink, spooled)
    duplicates = sum(copies.values()) - len(spooled)
    soak.record(
        "crash",
        f"delivery under SIGKILL ({kind})",
        seed=seed,
        messages=len(spooled),
        recipients=sum(len(r) for _q, _d, r in spooled.values()),
        delivered=len(copies),
        duplicates=duplicates,
        orphans_at_kill_mid_data=orphans,
        kills=deliverer.kills,
    )
    assert duplicates <= deliverer.kills * CONCURRENCY, (duplicates, deliverer.kills)
    assert deliverer.kills >= (2 if kind == "serve" else 1)  # a flush may finish by itself


# --- partial delivery and the status record ----------------------------------------------


def flush(tmp_path: Path, config: Path) -> int:
    return run_flush(tmp_path, config, "--no-daemon", timeout=RUN_TIMEOUT).returncode


def recipient_states(spool: Path, qid: str) -> list[RcptState]:
    store = Spool(spool, create=False)
    blob = store.read_status(qid)
    assert blob is not None, f"no status for {qid}"
    status = MessageStatus.from_bytes(blob, store.get(qid).envelope)
    return [r.state for r in status.recipients]


@pytest.mark.timeout(180)  # four delivery processes: they took 8-21 s under load
def test_kill_mid_retry_never_resends_to_delivered_recipients(
    sink: Smarthost, tmp_path: Path
) -> None:
    spool = tmp_path / "spool"
    store = Spool(spool)
    rcpts = ("rcpt@a.test", "rcpt@b.test", "rcpt@c.test")
    envelope = Envelope(SENDER, tuple(Recipient(r) for r in rcpts))
    data = {n: message_bytes(n, 5_000) for n in range(1, 4)}
    qids = {n: store.commit(envelope, body) for n, body in data.items()}
    config = config_for(tmp_path, sink, "offline")
    sink.behaviour.rcpt_replies["rcpt@b.test"] = "451 4.2.1 mailbox busy"
    assert flush(tmp_path, config) == EX_TEMPFAIL
    want = [RcptState.DELIVERED, RcptState.DEFERRED, RcptState.DELIVERED]
    assert all(recipient_states(spool, q) == want for q in qids.values())

    sink.behaviour.rcpt_replies.clear()
    deliverer = Deliverer("flush", tmp_path, config)
    orphans = kill_mid_data(deliverer, sink)
    assert all(recipient_states(spool, q) == want for q in qids.values())  # unchanged

    assert flush(tmp_path, config) == 0
    assert audit(spool).empty(), audit(spool)
    per_rcpt = Counter((sequence_number(g.content), r) for g in sink.received for r in g.recipients)
    assert all(g.content == data[sequence_number(g.content)] for g in sink.received)
    for n in data:
        assert per_rcpt[n, "rcpt@a.test"] == per_rcpt[n, "rcpt@c.test"] == 1, per_rcpt
        assert per_rcpt[n, "rcpt@b.test"] == 1, per_rcpt  # the killed try never finished
    soak.record(
        "crash",
        "kill mid-retry of a partly delivered message",
        messages=len(data),
        resent_to_delivered=0,
        duplicates=sum(per_rcpt.values()) - 3 * len(data),
        orphans_at_kill_mid_data=orphans,
        kills=deliverer.kills,
    )


def test_status_write_cut_by_a_kill_leaves_nothing_behind(sink: Smarthost, tmp_path: Path) -> None:
    """SIGKILL between write_status's open and its rename leaves status/QID.new: the
    state is made here by hand, since no signal shows when a process is in that window.
    Once the message is delivered nothing of it may remain in the spool."""
    spool = tmp_path / "spool"
    rcpts = ("rcpt@a.test", "rcpt@b.test")
    qid = Spool(spool).commit(
        Envelope(SENDER, tuple(Recipient(r) for r in rcpts)), message_bytes(1, 500)
    )
    config = config_for(tmp_path, sink, "offline")
    sink.behaviour.rcpt_replies["rcpt@b.test"] = "451 4.2.1 mailbox busy"
    assert flush(tmp_path, config) == EX_TEMPFAIL
    status = spool / "status" / qid
    status.with_name(qid + ".new").write_bytes(status.read_bytes()[:20])  # half written

    sink.behaviour.rcpt_replies.clear()
    assert flush(tmp_path, config) == 0
    daemon = spawn_leafmail(
        tmp_path, ["--config", str(config), "--listen", "127.0.0.1:0"], spool_path=spool
    )  # a restart cleans up what crashes left
    assert daemon.stop() == 0, daemon.log()
    assert [g.recipients for g in sink.received] == [["rcpt@a.test"], ["rcpt@b.test"]]
    result = audit(spool)
    assert result.empty(), f"left in the spool after delivery: {result}"


@pytest.mark.parametrize("kind", ["serve", "flush"])
def test_a_message_a_crash_named_in_two_states_is_delivered_once(
    kind: str, sink: Smarthost, tmp_path: Path
) -> None:
    """A crash in the middle of Spool.move, on a filesystem that writes the rename's two
    directory changes apart, can leave the file named in queue/ and in deferred/. No
    signal shows when a process is in that window, so the state is made here by hand (a
    second link: one file, two names, as the crash leaves it). The next start keeps one
    name, and the message is delivered once, by the daemon as by `flush --no-daemon`."""
    spool = tmp_path / "spool"
    store = Spool(spool)
    data = message_bytes(1, 2_000)
    qid = store.commit(Envelope(SENDER, (Recipient("rcpt@a.test"),)), data)
    os.link(store.path(QueueState.QUEUE, qid), store.path(QueueState.DEFERRED, qid))
    Deliverer(kind, tmp_path, config_for(tmp_path, sink, "smarthost")).finish(spool)
    assert audit(spool).empty(), audit(spool)
    assert [(g.content, g.recipients) for g in sink.received] == [(data, ["rcpt@a.test"])]
