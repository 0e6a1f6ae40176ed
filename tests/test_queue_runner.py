"""The queue runner in-process: a real spool, a real aiosmtpd smarthost, and a fake clock.

`QueueRunner.run_once` is one pass, and time comes from the injected clock, so the retry
schedule, expiry, delay warnings and the link-down back-off are driven here without any
sleep: the tests set the clock and run a pass. Messages whose age matters are written
with a queue id from the past (the id encodes the arrival time), so DSNs spooled during
the test (with real-time ids) are young, as they would be in production.
"""

from __future__ import annotations

import asyncio
import errno
import io
import os
import random
import socket
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from conftest import FakeClock
from smarthost import Greeter, Smarthost

from leafmail import tools
from leafmail.delivery.smarthost import SmarthostAgent, SmarthostSettings
from leafmail.envelope import ClientInfo, Envelope, Recipient
from leafmail.message import Attempt, AttemptOutcome, Unrecorded
from leafmail.queue import SCAN_INTERVAL, PassSummary, QueueRunner
from leafmail.retry import RetryPolicy
from leafmail.spool import Spool, arrival_time
from leafmail.states import QueueState
from leafmail.status import MessageStatus, RcptState
from netserver.connlog import ServerLog

HELO = "leaf.test"
SENDER = "alice@src.test"
DAY = 86400.0
NULL = "<>"  # how aiosmtpd records MAIL FROM:<> (the null reverse path)
POLICY = RetryPolicy(initial=300.0, maximum=2400.0, lifetime=5 * DAY)


# --- helpers -------------------------------------------------------------------------------


def body(subject: str) -> bytes:
    return f"From: <{SENDER}>\r\nSubject: {subject}\r\n\r\nHello.\r\n".encode()


def envelope(rcpts: list[str], sender: str = SENDER) -> Envelope:
    return Envelope(
        sender=sender,
        recipients=tuple(Recipient(r) for r in rcpts),
        client=ClientInfo("127.0.0.1", 40000, "client.test"),
    )


def put(spool: Spool, rcpts: list[str], subject: str = "test", sender: str = SENDER) -> str:
    """Spool a message now (the sendmail path); returns its queue id."""
    return spool.commit(envelope(rcpts, sender), body(subject))


def put_old(spool: Spool, rcpts: list[str], age: float, subject: str = "old") -> str:
    """Spool a message that arrived `age` seconds ago (its id says so), committed properly."""
    arrival_ns = time.time_ns() - int(age * 1e9)
    qid = f"{arrival_ns:016X}{random.getrandbits(32):08X}"
    return spool.commit(envelope(rcpts), body(subject), qid)


def agent_for(port: int, *, connect_timeout: float = 5.0) -> SmarthostAgent:
    return SmarthostAgent(
        SmarthostSettings(
            host="127.0.0.1",
            port=port,
            helo=HELO,
            tls="none",
            connect_timeout=connect_timeout,
            command_timeout=5.0,
            deadline=8.0,
        )
    )


def make_runner(
    spool: Spool,
    port: int,
    clock: FakeClock,
    *,
    policy: RetryPolicy = POLICY,
    concurrency: int = 4,
) -> QueueRunner:
    return QueueRunner(
        spool, agent_for(port), policy, hostname=HELO, concurrency=concurrency, clock=clock
    )


def run(runner: QueueRunner, *, force: bool = False) -> PassSummary:
    return asyncio.run(runner.run_once(force=force))


def status_of(spool: Spool, qid: str) -> MessageStatus:
    blob = spool.read_status(qid)
    assert blob is not None, f"{qid} has no status record"
    return MessageStatus.from_bytes(blob, spool.get(qid).envelope)


def spool_is_empty(spool: Spool) -> bool:
    return not any(spool.ids(state) for state in QueueState) and not os.listdir(
        spool.root / "status"
    )


def counts(summary: PassSummary) -> dict[str, int]:
    return {k: v for k, v in summary.counts.items() if v}


# --- plain delivery ---------------------------------------------------------------------


def test_run_once_delivers_everything_and_empties_the_spool(sink: Smarthost, spool: Spool) -> None:
    qids = [put(spool, [f"bob{i}@dst.test"], f"m{i}") for i in range(5)]
    qids.append(put(spool, ["x@dst.test", "y@dst.test"], "two"))
    clock = FakeClock()
    runner = make_runner(spool, sink.port, clock)

    summary = run(runner)

    assert counts(summary) == {"delivered": 6}
    assert summary.deferred == 0
    assert summary.link_error == ""
    assert spool_is_empty(spool)
    got = {(r.sender, tuple(r.recipients), r.content) for r in sink.received}
    want: set[tuple[str, tuple[str, ...], bytes]] = {
        (SENDER, (f"bob{i}@dst.test",), body(f"m{i}")) for i in range(5)
    }
    want.add((SENDER, ("x@dst.test", "y@dst.test"), body("two")))
    assert got == want
    assert len(sink.received) == 6


# --- the retry schedule -------------------------------------------------------------------


def test_deferred_recipient_follows_the_backoff_schedule(sink: Smarthost, spool: Spool) -> None:
    sink.behaviour.rcpt_replies["busy@dst.test"] = "451 4.2.1 mailbox busy, try later"
    qid = put(spool, ["ok@dst.test", "busy@dst.test"])
    clock = FakeClock()
    runner = make_runner(spool, sink.port, clock)

    summary = run(runner)
    assert counts(summary) == {"deferred": 1}
    assert summary.deferred == 1
    assert spool.find(qid) == "deferred"
    status = status_of(spool, qid)
    assert [r.state for r in status.recipients] == [RcptState.DELIVERED, RcptState.DEFERRED]
    assert status.recipients[1].reply == "451 4.2.1 mailbox busy, try later"
    assert status.last_error == "451 4.2.1 mailbox busy, try later"
    assert status.attempts == 1
    assert status.next_attempt - clock.now == pytest.approx(300.0)
    assert [r.recipients for r in sink.received] == [["ok@dst.test"]]
    connections = sink.connections

    # Same time: not due, so no connection at all.
    assert counts(run(runner)) == {}
    assert sink.connections == connections
    assert status_of(spool, qid).attempts == 1
    assert runner.next_wakeup(clock.now) == pytest.approx(SCAN_INTERVAL)
    clock.advance(299.0)
    assert runner.next_wakeup(clock.now) == pytest.approx(1.0)
    assert counts(run(runner)) == {}
    assert sink.connections == connections

    # Each retry doubles the wait, up to retry_max (2400 s).
    for attempts, delay in enumerate([600.0, 1200.0, 2400.0, 2400.0, 2400.0], start=2):
        clock.now = status.next_attempt
        assert counts(run(runner)) == {"deferred": 1}
        status = status_of(spool, qid)
        assert status.attempts == attempts
        assert status.recipients[1].attempts == attempts
        assert status.recipients[0].attempts == 1  # delivered once, never tried again
        assert status.next_attempt - clock.now == pytest.approx(delay)
    assert [r.recipients for r in sink.received] == [["ok@dst.test"]]

    # The schedule is in the spool: a new runner (a restarted daemon) keeps it.
    fresh = make_runner(spool, sink.port, clock)
    clock.advance(2399.0)
    connections = sink.connections
    assert counts(run(fresh)) == {}
    assert sink.connections == connections
    assert fresh.next_wakeup(clock.now) == pytest.approx(1.0)
    clock.advance(1.0)
    sink.behaviour.rcpt_replies.clear()
    assert counts(run(fresh)) == {"delivered": 1}
    assert spool_is_empty(spool)
    assert [r.recipients for r in sink.received] == [["ok@dst.test"], ["busy@dst.test"]]


def test_forced_pass_ignores_the_retry_time(sink: Smarthost, spool: Spool) -> None:
    sink.behaviour.rcpt_replies["busy@dst.test"] = "451 4.2.1 mailbox busy"
    qid = put(spool, ["busy@dst.test"])
    clock = FakeClock()
    runner = make_runner(spool, sink.port, clock)
    assert counts(run(runner)) == {"deferred": 1}
    sink.behaviour.rcpt_replies.clear()
    assert counts(run(runner)) == {}
    assert counts(run(runner, force=True)) == {"delivered": 1}
    assert spool.find(qid) is None
    assert len(sink.received) == 1


# --- bounces -----------------------------------------------------------------------------


def test_permanent_failure_bounces_in_the_same_pass(sink: Smarthost, spool: Spool) -> None:
    sink.behaviour.rcpt_replies["nobody@dst.test"] = "550 5.1.1 no such user here"
    qid = put(spool, ["nobody@dst.test", "ok@dst.test"])
    runner = make_runner(spool, sink.port, FakeClock())

    summary = run(runner)

    assert counts(summary) == {"bounced": 1, "delivered": 1}  # the message, then its DSN
    assert spool_is_empty(spool)
    assert len(sink.received) == 2
    original, bounce = sink.received
    assert (original.sender, original.recipients) == (SENDER, ["ok@dst.test"])
    assert (bounce.sender, bounce.recipients) == (NULL, [SENDER])
    text = bounce.content.decode()
    assert "Subject: Undelivered Mail Returned to Sender" in text
    assert f"X-Leafmail-Queue-ID: {qid}" in text
    assert "Final-Recipient: rfc822; nobody@dst.test" in text
    assert "Action: failed" in text
    assert "Status: 5.1.1" in text
    assert "550 5.1.1 no such user here" in text
    assert "Final-Recipient: rfc822; ok@dst.test" not in text  # it was delivered


def test_a_bounce_that_fails_goes_to_the_postmaster(sink: Smarthost, spool: Spool) -> None:
    """Issue 13.4: a double bounce is reported to the postmaster and logged, not dropped.

    (Before, this test asserted that the failed bounce simply vanished.)
    """
    sink.behaviour.rcpt_replies["nobody@dst.test"] = "550 5.1.1 no such user"
    sink.behaviour.rcpt_replies[SENDER] = "550 5.1.1 the sender is gone too"
    qid = put(spool, ["nobody@dst.test"])
    stream = io.StringIO()
    runner = make_runner(spool, sink.port, FakeClock())
    runner.log = ServerLog(stream)
    seen: list[Attempt] = []

    summary = asyncio.run(runner.run_once(progress=seen.append))

    # the message, its bounce (refused), and the postmaster's copy (delivered)
    assert counts(summary) == {"bounced": 2, "delivered": 1}
    assert seen[0].qid == qid
    bounce = seen[1]
    assert bounce.double_bounce == f"postmaster@{HELO}" and not bounce.dropped_bounce
    (notice,) = sink.received
    assert (notice.sender, notice.recipients) == (NULL, [f"postmaster@{HELO}"])
    text = notice.content.decode()
    assert "Subject: Postmaster Copy: Undeliverable Bounce" in text
    assert f"Final-Recipient: rfc822; {SENDER}" in text
    assert "550 5.1.1 the sender is gone too" in text
    assert "Action: failed" in text
    assert spool_is_empty(spool)
    assert "undeliverable bounce reported to the postmaster" in stream.getvalue()


def test_a_double_bounce_that_fails_is_dropped_loudly(sink: Smarthost, spool: Spool) -> None:
    """No loop: when the postmaster cannot be reached either, the report is dropped and
    an error line says so (Postfix does the same)."""
    sink.behaviour.rcpt_replies["nobody@dst.test"] = "550 5.1.1 no such user"
    sink.behaviour.rcpt_replies[SENDER] = "550 5.1.1 the sender is gone too"
    sink.behaviour.rcpt_replies[f"postmaster@{HELO}"] = "550 5.1.1 no postmaster either"
    put(spool, ["nobody@dst.test"])
    stream = io.StringIO()
    runner = make_runner(spool, sink.port, FakeClock())
    runner.log = ServerLog(stream)
    seen: list[Attempt] = []

    summary = asyncio.run(runner.run_once(progress=seen.append))

    assert counts(summary) == {"bounced": 3}  # message, bounce, postmaster copy; no more
    assert [a.dropped_bounce for a in seen] == [False, False, True]
    assert sink.received == []
    assert spool_is_empty(spool)
    log = stream.getvalue()
    assert "undeliverable bounce DROPPED" in log and "no postmaster either" in log


def test_mail_from_the_null_sender_gets_no_bounce(sink: Smarthost, spool: Spool) -> None:
    """Nothing goes back to <>; the postmaster is told instead (issue 13.4)."""
    sink.behaviour.rcpt_replies["nobody@dst.test"] = "550 5.1.1 no such user"
    put(spool, ["nobody@dst.test"], sender="")
    summary = run(make_runner(spool, sink.port, FakeClock()))
    assert counts(summary) == {"bounced": 1, "delivered": 1}
    assert [r.recipients for r in sink.received] == [[f"postmaster@{HELO}"]]
    assert spool_is_empty(spool)


# --- expiry ------------------------------------------------------------------------------


def test_expired_message_bounces_with_the_last_error(sink: Smarthost, spool: Spool) -> None:
    policy = RetryPolicy(initial=300.0, maximum=3600.0, lifetime=1 * DAY)
    sink.behaviour.rcpt_replies["busy@dst.test"] = "451 4.2.1 mailbox busy"
    qid = put_old(spool, ["busy@dst.test"], age=DAY - 100.0)
    clock = FakeClock()
    runner = make_runner(spool, sink.port, clock, policy=policy)

    assert counts(run(runner)) == {"deferred": 1}
    status = status_of(spool, qid)
    assert status.next_attempt == pytest.approx(status.arrival + DAY)  # never past expiry
    clock.now = status.next_attempt
    connections = sink.connections

    summary = run(runner)

    assert counts(summary) == {"bounced": 1, "delivered": 1}
    assert spool.find(qid) is None
    assert spool_is_empty(spool)
    assert sink.connections == connections + 1  # one connection: for the DSN only
    (bounce,) = sink.received
    assert (bounce.sender, bounce.recipients) == (NULL, [SENDER])
    text = bounce.content.decode()
    assert "Action: failed" in text
    assert "Status: 4.4.7" in text
    assert "Final-Recipient: rfc822; busy@dst.test" in text
    assert "expired after 1 day in the queue; last error: 451 4.2.1 mailbox busy" in text


def test_expiry_happens_while_the_link_is_down(spool: Spool) -> None:
    policy = RetryPolicy(initial=300.0, maximum=3600.0, lifetime=1 * DAY)
    down = Greeter("127.0.0.1", 0, b"")
    try:
        qid = put_old(spool, ["bob@dst.test"], age=DAY - 30.0)
        clock = FakeClock()
        runner = make_runner(spool, down.port, clock, policy=policy)

        first = run(runner)
        assert counts(first) == {"deferred": 1}
        assert first.link_error
        assert down.accepts == 1
        assert runner.link_down_until == pytest.approx(clock.now + 60.0)
        assert status_of(spool, qid).recipients[0].reply.startswith("451 4.4.1 ")

        clock.advance(31.0)  # expired, and still inside the link wait
        assert clock.now < runner.link_down_until
        summary = run(runner)

        assert down.accepts == 1  # no connection: the link is resting
        assert counts(summary) == {"bounced": 1, "waiting": 1}  # the DSN waits for the link
        assert spool.find(qid) is None
        (dsn_id,) = spool.ids(QueueState.QUEUE)
        dsn = spool.get(dsn_id)
        assert (dsn.envelope.sender, [r.address for r in dsn.envelope.recipients]) == (
            "",
            [SENDER],
        )
        text = dsn.data.decode()
        assert "Status: 4.4.7" in text
        assert "last error: 451 4.4.1 " in text
    finally:
        down.stop()


# --- delay warnings -----------------------------------------------------------------------


def delayed_dsns(sink: Smarthost) -> list[str]:
    return [
        r.content.decode()
        for r in sink.received
        if r.sender == NULL and b"Subject: Delayed Mail" in r.content
    ]


def test_one_delay_warning_per_message(sink: Smarthost, spool: Spool) -> None:
    policy = RetryPolicy(initial=300.0, maximum=1200.0, lifetime=5 * DAY, delay_warning=3600.0)
    sink.behaviour.rcpt_replies["busy@dst.test"] = "451 4.2.1 mailbox busy"
    qid = put(spool, ["busy@dst.test"])
    other = put(spool, ["busy@dst.test"], "second")
    clock = FakeClock()
    runner = make_runner(spool, sink.port, clock, policy=policy)

    assert counts(run(runner)) == {"deferred": 2}
    assert delayed_dsns(sink) == []
    for _ in range(8):  # about 2.5 hours of retries, every 20 minutes
        clock.advance(1200.0)
        run(runner)
    warnings = delayed_dsns(sink)
    assert len(warnings) == 2  # one per message, not one per attempt
    assert {qid, other} == {
        line.split(": ", 1)[1]
        for text in warnings
        for line in text.split("\r\n")
        if line.startswith("X-Leafmail-Queue-ID:")
    }
    for text in warnings:
        assert "Action: delayed" in text
        assert "Status: 4.2.1" in text
        assert "Will-Retry-Until: " in text
    assert spool.ids(QueueState.DEFERRED) == sorted([qid, other])
    assert status_of(spool, qid).warned
    assert all(r.recipients == [SENDER] for r in sink.received)


def test_no_delay_warning_when_disabled(sink: Smarthost, spool: Spool) -> None:
    sink.behaviour.rcpt_replies["busy@dst.test"] = "451 4.2.1 mailbox busy"
    qid = put_old(spool, ["busy@dst.test"], age=3 * DAY)
    clock = FakeClock()
    policy = RetryPolicy(initial=300.0, maximum=1200.0, lifetime=5 * DAY, delay_warning=0.0)
    runner = make_runner(spool, sink.port, clock, policy=policy)
    for _ in range(4):
        assert counts(run(runner)) == {"deferred": 1}
        clock.advance(1200.0)
    assert sink.received == []
    assert not status_of(spool, qid).warned


# --- the link is down -----------------------------------------------------------------------


def test_link_down_defers_one_and_rests(spool: Spool) -> None:
    down = Greeter("127.0.0.1", 0, b"")
    port = down.port
    back: Smarthost | None = None
    try:
        qids = [put(spool, [f"bob{i}@dst.test"], f"m{i}") for i in range(3)]
        clock = FakeClock()
        t0 = clock.now
        runner = make_runner(spool, port, clock, concurrency=1)
        seen: list[Attempt] = []

        summary = asyncio.run(runner.run_once(progress=seen.append))

        assert [(a.qid, a.verdict) for a in seen] == [
            (qids[0], AttemptOutcome.DEFERRED),
            (qids[1], AttemptOutcome.WAITING),
            (qids[2], AttemptOutcome.WAITING),
        ]
        assert summary.deferred == 3
        assert summary.link_error
        assert down.accepts == 1
        assert runner.link_wait == 60.0
        assert runner.link_down_until == pytest.approx(t0 + 60.0)
        assert spool.find(qids[0]) == "deferred"
        first = status_of(spool, qids[0])
        assert first.recipients[0].state is RcptState.DEFERRED
        assert first.recipients[0].reply.startswith("451 4.4.1 ")
        assert spool.ids(QueueState.QUEUE) == qids[1:]
        assert spool.read_status(qids[1]) is None  # never tried
        assert runner.next_wakeup(clock.now) == pytest.approx(60.0)

        # Before link_down_until a normal pass does not even connect.
        clock.advance(30.0)
        assert counts(run(runner)) == {}
        assert down.accepts == 1

        # After it, one try; still down, so the wait doubles.
        clock.now = t0 + 61.0
        second = run(runner)
        assert second.counts[AttemptOutcome.DEFERRED.value] == 1
        assert down.accepts == 2
        assert runner.link_wait == 120.0
        assert runner.link_down_until == pytest.approx(clock.now + 120.0)

        # A forced pass (flush, a network-up hook) ignores the wait.
        forced = run(runner, force=True)
        assert forced.counts[AttemptOutcome.DEFERRED.value] == 1
        assert down.accepts == 3
        assert runner.link_wait == 240.0

        # The smarthost comes back on the same port.
        down.stop()
        back = Smarthost(port=port).start()
        assert counts(run(runner)) == {}  # still resting
        assert back.connections == 0
        summary = run(runner, force=True)
        assert counts(summary) == {"delivered": 3}
        assert runner.link_wait == 0.0
        assert spool_is_empty(spool)
        assert sorted(r.recipients[0] for r in back.received) == [
            f"bob{i}@dst.test" for i in range(3)
        ]
    finally:
        down.stop()
        if back is not None:
            back.stop()


def test_link_wait_after_a_scheduled_pass_lets_mail_go(spool: Spool) -> None:
    """Once link_down_until has passed, a plain (not forced) pass delivers again."""
    down = Greeter("127.0.0.1", 0, b"")
    port = down.port
    back: Smarthost | None = None
    try:
        qid = put(spool, ["bob@dst.test"])
        clock = FakeClock()
        runner = make_runner(spool, port, clock, policy=RetryPolicy(initial=30.0, maximum=600.0))
        assert counts(run(runner)) == {"deferred": 1}
        assert runner.link_wait == 30.0  # min(60 s, retry_initial)
        down.stop()
        back = Smarthost(port=port).start()
        clock.advance(30.0)
        assert counts(run(runner)) == {"delivered": 1}
        assert spool.find(qid) is None
        assert runner.link_wait == 0.0
    finally:
        down.stop()
        if back is not None:
            back.stop()


def test_link_down_with_concurrency_stops_taking_new_messages(spool: Spool) -> None:
    """Workers already connecting find out too; nobody takes a new message after that."""
    down = Greeter("127.0.0.1", 0, b"")
    try:
        for i in range(8):
            put(spool, [f"bob{i}@dst.test"])
        runner = make_runner(spool, down.port, FakeClock(), concurrency=4)
        seen: list[Attempt] = []
        summary = asyncio.run(runner.run_once(progress=seen.append))
        verdicts = Counter(a.verdict for a in seen)
        assert set(verdicts) == {AttemptOutcome.DEFERRED, AttemptOutcome.WAITING}
        assert 1 <= verdicts[AttemptOutcome.DEFERRED] <= 4  # only those in flight at the time
        assert verdicts[AttemptOutcome.WAITING] == 8 - verdicts[AttemptOutcome.DEFERRED]
        assert down.accepts == verdicts[AttemptOutcome.DEFERRED]
        assert summary.deferred == 8
        assert len(spool.ids(QueueState.QUEUE)) + len(spool.ids(QueueState.DEFERRED)) == 8
    finally:
        down.stop()


def test_link_wait_doubles_once_per_pass_with_concurrency(spool: Spool) -> None:
    """Four workers that all find the link down in the same pass are one finding.

    The next hop accepts TCP but never greets (a listener that never calls accept), so
    all four workers are surely in flight when they time out together.
    """
    silent = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        for i in range(8):
            put(spool, [f"bob{i}@dst.test"])
        clock = FakeClock()
        runner = QueueRunner(
            spool,
            agent_for(silent.getsockname()[1], connect_timeout=0.5),
            POLICY,
            hostname=HELO,
            concurrency=4,
            clock=clock,
        )
        seen: list[Attempt] = []
        summary = asyncio.run(runner.run_once(progress=seen.append))
        assert "no answer within 0.5s" in summary.link_error
        assert Counter(a.verdict for a in seen) == {
            AttemptOutcome.DEFERRED: 4,
            AttemptOutcome.WAITING: 4,
        }
        assert runner.link_wait == 60.0  # the first wait, as with one worker
        assert runner.link_down_until == pytest.approx(clock.now + 60.0)
    finally:
        silent.close()


# --- hold, concurrency, corrupt files, arrivals ----------------------------------------------


def test_held_message_is_not_delivered_until_released(sink: Smarthost, spool: Spool) -> None:
    held = put(spool, ["held@dst.test"], "held")
    free = put(spool, ["free@dst.test"], "free")
    assert tools.hold(spool, held)
    clock = FakeClock()
    runner = make_runner(spool, sink.port, clock)

    assert counts(run(runner)) == {"delivered": 1}
    assert counts(run(runner, force=True)) == {}
    clock.advance(10 * DAY)
    assert counts(run(runner)) == {}  # held mail does not expire either
    assert spool.find(held) == "hold"
    assert spool.find(free) is None
    assert [r.recipients for r in sink.received] == [["free@dst.test"]]

    assert tools.release(spool, held)
    clock.now = time.time()
    assert counts(run(runner)) == {"delivered": 1}
    assert spool_is_empty(spool)
    assert [r.recipients for r in sink.received] == [["free@dst.test"], ["held@dst.test"]]


def test_concurrency_bounds_the_connections(sink: Smarthost, spool: Spool) -> None:
    for i in range(20):
        put(spool, [f"bob{i}@dst.test"], f"m{i}")
    runner = make_runner(spool, sink.port, FakeClock(), concurrency=4)
    summary = run(runner)
    assert counts(summary) == {"delivered": 20}
    assert len(sink.received) == 20
    assert 1 <= sink.connections <= 4
    assert spool_is_empty(spool)


def test_corrupt_file_is_set_aside_and_the_rest_delivered(sink: Smarthost, spool: Spool) -> None:
    qids = [put(spool, [f"bob{i}@dst.test"], f"m{i}") for i in range(3)]
    path = spool.root / "queue" / qids[1]
    blob = bytearray(path.read_bytes())
    where = blob.index(b"Hello.")
    blob[where] ^= 0x20  # "hello.": same length, wrong checksum
    path.write_bytes(bytes(blob))
    seen: list[Attempt] = []

    summary = asyncio.run(make_runner(spool, sink.port, FakeClock()).run_once(progress=seen.append))

    assert counts(summary) == {"delivered": 2, "corrupt": 1}
    assert {a.qid: a.verdict for a in seen}[qids[1]] is AttemptOutcome.CORRUPT
    assert spool.ids(QueueState.CORRUPT) == [qids[1]]
    assert (spool.root / "corrupt" / qids[1]).read_bytes() == bytes(blob)
    assert spool.ids(QueueState.QUEUE) == [] and spool.ids(QueueState.DEFERRED) == []
    assert sorted(r.recipients[0] for r in sink.received) == ["bob0@dst.test", "bob2@dst.test"]


def test_mail_spooled_during_a_pass_joins_it(sink: Smarthost, spool: Spool) -> None:
    first = put(spool, ["first@dst.test"], "first")
    runner = make_runner(spool, sink.port, FakeClock(), concurrency=1)
    late: list[str] = []
    seen: list[str] = []

    def progress(done: Attempt) -> None:
        seen.append(done.qid)
        if not late:  # the first message is done: new mail arrives, as from SMTP
            late.append(put(spool, ["late@dst.test"], "late"))
            runner.notify(late[0])

    summary = asyncio.run(runner.run_once(progress=progress))

    assert counts(summary) == {"delivered": 2}
    assert seen == [first, late[0]]
    assert [r.recipients for r in sink.received] == [["first@dst.test"], ["late@dst.test"]]
    assert spool_is_empty(spool)


def test_a_status_that_cannot_be_written_does_not_stop_the_pass(
    sink: Smarthost, spool: Spool
) -> None:
    """A write error for one message (here a directory in the way of its new status
    record) leaves it as it was, and the pass goes on with the others; once the spool is
    whole again it is tried as usual, after the wait of a first deferral (not at the very
    next pass: see test_an_attempt_that_cannot_be_recorded_is_not_retried_at_once)."""
    sink.behaviour.rcpt_replies["later@dst.test"] = "451 4.3.0 try later"
    stuck = put(spool, ["later@dst.test"], "stuck")
    fine = put(spool, ["bob@dst.test"], "fine")
    in_the_way = spool.root / "status" / f"{stuck}.new"
    in_the_way.mkdir()
    clock = FakeClock(1_000_000.0)
    runner = make_runner(spool, sink.port, clock, concurrency=1)

    summary = run(runner)

    assert counts(summary) == {"deferred": 1, "delivered": 1}
    assert spool.ids(QueueState.QUEUE) == [stuck]  # untouched: no status, not moved
    assert spool.find(fine) is None
    in_the_way.rmdir()
    sink.behaviour.rcpt_replies.clear()
    assert counts(run(runner)) == {}
    clock.advance(POLICY.initial)
    assert counts(run(runner)) == {"delivered": 1}
    assert spool_is_empty(spool)


# --- the wall clock steps back -------------------------------------------------------------


def test_a_clock_set_back_does_not_strand_deferred_mail(sink: Smarthost, spool: Spool) -> None:
    """A message deferred while the clock ran a day fast (then corrected by NTP or the
    operator) has a next attempt a day ahead of the corrected clock: no schedule of the
    policy waits longer than retry_max, so it is due again within that, not a day later."""
    sink.behaviour.rcpt_replies["busy@dst.test"] = "451 4.2.1 mailbox busy"
    qid = put(spool, ["busy@dst.test"])
    clock = FakeClock()
    runner = make_runner(spool, sink.port, clock)
    assert counts(run(runner)) == {"deferred": 1}
    assert status_of(spool, qid).next_attempt == pytest.approx(clock.now + 300.0)

    clock.advance(-DAY)  # the clock is stepped back a day
    sink.behaviour.rcpt_replies.clear()
    assert runner.next_wakeup(clock.now) == 0.0
    assert counts(run(runner)) == {"delivered": 1}
    assert spool_is_empty(spool)
    assert [r.recipients for r in sink.received] == [["busy@dst.test"]]


def test_a_clock_set_back_does_not_extend_the_link_rest(spool: Spool) -> None:
    """The link-down rest is at most retry_max long, whatever the clock did meanwhile."""
    down = Greeter("127.0.0.1", 0, b"")
    port = down.port
    back: Smarthost | None = None
    try:
        put(spool, ["bob@dst.test"])
        clock = FakeClock()
        runner = make_runner(spool, port, clock)
        assert counts(run(runner)) == {"deferred": 1}
        assert runner.link_wait == 60.0
        down.stop()
        back = Smarthost(port=port).start()
        clock.advance(-DAY)
        clock.advance(POLICY.maximum + 1.0)  # longer than any rest, on the new clock
        assert counts(run(runner)) == {"delivered": 1}
        assert spool_is_empty(spool)
    finally:
        down.stop()
        if back is not None:
            back.stop()


# --- a status record that cannot be written (a full disk) -----------------------------------


class NoRoomForStatus(Spool):
    """A spool whose status records cannot be written while `full` (ENOSPC), as on a
    disk filled to the last block: message files can still be read and unlinked."""

    full = True

    def write_status(self, qid: str, blob: bytes) -> None:
        if self.full:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        super().write_status(qid, blob)


def test_a_delivery_that_cannot_be_recorded_is_not_sent_again(
    sink: Smarthost, tmp_path: Path
) -> None:
    """ok@ is accepted but the status saying so cannot be written, and busy@ keeps the
    message queued. The runner remembers ok@'s result: pass after pass on the full disk
    it is not sent again (before, one more copy per pass, for as long as the disk stayed
    full: in the daemon every minute), and once there is room the result is recorded."""
    sink.behaviour.rcpt_replies["busy@dst.test"] = "451 4.2.1 mailbox busy"
    spool = NoRoomForStatus(tmp_path / "spool")
    qid = put(spool, ["ok@dst.test", "busy@dst.test"])
    clock = FakeClock()
    runner = make_runner(spool, sink.port, clock)
    for _ in range(3):
        assert counts(run(runner)) == {"deferred": 1}
        assert spool.ids(QueueState.QUEUE) == [qid]  # nothing recorded
        clock.advance(POLICY.initial)
    spool.full = False
    assert counts(run(runner)) == {"deferred": 1}
    status = status_of(spool, qid)
    assert [r.state for r in status.recipients] == [RcptState.DELIVERED, RcptState.DEFERRED]
    sink.behaviour.rcpt_replies.clear()
    assert counts(run(runner, force=True)) == {"delivered": 1}
    assert spool_is_empty(spool)
    got = Counter(r for m in sink.received for r in m.recipients)
    assert got == {"ok@dst.test": 1, "busy@dst.test": 1}


def test_an_attempt_that_cannot_be_recorded_is_not_retried_at_once(
    sink: Smarthost, tmp_path: Path
) -> None:
    """A deferred message whose next attempt has come keeps its old schedule when the
    new one cannot be written: the daemon's loop (`serve`) must not take it for due
    again at once (next_wakeup 0: pass after pass with no pause, each one a connection
    to the next hop) but wait as it would after a recorded deferral."""
    sink.behaviour.rcpt_replies["busy@dst.test"] = "451 4.2.1 mailbox busy"
    spool = NoRoomForStatus(tmp_path / "spool")
    spool.full = False
    qid = put(spool, ["busy@dst.test"])
    clock = FakeClock()
    runner = make_runner(spool, sink.port, clock)
    assert counts(run(runner)) == {"deferred": 1}
    clock.now = status_of(spool, qid).next_attempt
    spool.full = True
    assert counts(run(runner)) == {"deferred": 1}
    connections = sink.connections
    assert runner.next_wakeup(clock.now) > 0.0
    assert counts(run(runner)) == {}
    assert sink.connections == connections
    clock.advance(POLICY.initial)
    spool.full = False
    sink.behaviour.rcpt_replies.clear()
    assert runner.next_wakeup(clock.now) == 0.0
    assert counts(run(runner)) == {"delivered": 1}
    assert spool_is_empty(spool)


class NoRoomForBounces(Spool):
    """A spool that cannot take a new message while `full` (ENOSPC): a bounce's commit
    fails, as it does on a disk filled to the last block."""

    full = False

    def commit(self, *args: Any, **kwargs: Any) -> str:
        if self.full:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return super().commit(*args, **kwargs)


def test_an_expired_message_whose_bounce_cannot_be_spooled_is_not_retried_at_once(
    sink: Smarthost, tmp_path: Path
) -> None:
    """The first retry wait after an attempt that could not be recorded is capped by the
    expiry like any schedule; for a message past it that cap is in the past, and the
    daemon's loop (`serve`) found it due again at once: pass after pass with no pause,
    each one building its bounce and failing to spool it, while the disk stayed full."""
    spool = NoRoomForBounces(tmp_path / "spool")
    qid = put(spool, ["late@dst.test"])
    clock = FakeClock()
    runner = make_runner(spool, sink.port, clock)
    clock.now = arrival_time(qid) + POLICY.lifetime + 1.0
    spool.full = True
    assert counts(run(runner)) == {"deferred": 1}
    assert runner.next_wakeup(clock.now) > 0.0
    assert counts(run(runner)) == {}
    clock.advance(POLICY.initial)
    spool.full = False
    assert "bounced" in counts(run(runner))  # (its bounce, spooled at once, has expired too)
    assert qid not in spool.ids(QueueState.QUEUE)


class StatusSyncFails(Spool):
    """A spool whose next fsync of status/ fails with EIO (a dying disk), after the
    rename that put the new record in place: the record is there, not known durable."""

    fail_next = False

    def fsync_dir(self, fd: int) -> None:
        if self.fail_next and os.fstat(fd).st_ino == os.stat(self.root / "status").st_ino:
            self.fail_next = False
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        super().fsync_dir(fd)


def test_a_bounce_is_kept_when_its_record_is_in_place_but_not_synced(
    sink: Smarthost, tmp_path: Path
) -> None:
    """bad@ is refused for good, busy@ deferred: the DSN for bad@ is committed, then the
    status saying bad@ failed is renamed into place and the fsync of status/ fails. The
    record is what the next attempt reads (bad@ final: no new DSN), so the DSN already
    committed must stay, or the sender never hears that bad@ failed."""
    sink.behaviour.rcpt_replies["bad@dst.test"] = "550 5.1.1 no such user"
    sink.behaviour.rcpt_replies["busy@dst.test"] = "451 4.2.1 mailbox busy"
    spool = StatusSyncFails(tmp_path / "spool")
    qid = put(spool, ["bad@dst.test", "busy@dst.test"])
    clock = FakeClock()
    runner = make_runner(spool, sink.port, clock)
    spool.fail_next = True
    run(runner)
    assert not spool.fail_next  # the failure did happen
    sink.behaviour.rcpt_replies.clear()
    clock.advance(DAY)
    run(runner, force=True)
    assert spool.find(qid) is None
    bounces = [m for m in sink.received if m.sender == NULL]
    assert len(bounces) == 1, [m.recipients for m in sink.received]
    assert b"Final-Recipient: rfc822; bad@dst.test" in bounces[0].content
    assert spool_is_empty(spool)


def test_a_message_that_cannot_be_read_is_not_retried_at_once(
    sink: Smarthost, spool: Spool
) -> None:
    """An attempt that fails before anything is sent (its status record cannot be read:
    a directory in its way here, EIO on a dying disk) must not leave the daemon's loop
    due again at once either (next_wakeup 0: a pass after pass with no pause)."""
    sink.behaviour.rcpt_replies["busy@dst.test"] = "451 4.2.1 mailbox busy"
    qid = put(spool, ["busy@dst.test"])
    clock = FakeClock()
    runner = make_runner(spool, sink.port, clock)
    assert counts(run(runner)) == {"deferred": 1}
    clock.now = status_of(spool, qid).next_attempt
    record = spool.root / "status" / qid
    saved = record.read_bytes()
    record.unlink()
    record.mkdir()
    assert counts(run(runner)) == {"deferred": 1}  # (not recorded: an error)
    assert runner.next_wakeup(clock.now) > 0.0
    record.rmdir()
    record.write_bytes(saved)
    sink.behaviour.rcpt_replies.clear()
    clock.advance(POLICY.initial)
    assert counts(run(runner)) == {"delivered": 1}


def test_unrecorded_memory_forgets_the_oldest_past_its_limit() -> None:
    """Past its limit the runner's memory of unrecorded attempts forgets the message
    remembered longest ago; one that fails again counts as the newest."""
    memo = Unrecorded(limit=3)
    for qid in ("a", "b", "c"):
        memo.wait(qid, 1.0)
    memo.wait("a", 2.0)  # a again: now the newest
    memo.wait("d", 3.0)
    assert list(memo.retry_at) == ["c", "a", "d"]
    assert memo.retry_at["a"] == 2.0
