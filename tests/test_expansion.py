"""An alias's targets each get the message once: across retries and across crashes.

Issue 13.2: with ``team: alice, bob@far.example`` and alice's delivery deferring, every
later pass spooled a new copy for bob. Here the queue runner works on a real spool,
with real local delivery (Maildir files read back with `mailbox`) and bob's copy going
to an aiosmtpd smarthost on loopback; time comes from a fake clock.

A crash between spooling the forwarded copy and recording it is reproduced by leaving
the spool exactly as such a crash leaves it (the status record's marks, the copy in
hold/ or already gone), then running the runner on it.
"""

from __future__ import annotations

import asyncio
import mailbox
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import FakeClock
from localusers import ROOT, VIRTUAL, virtual_tmp
from smarthost import Smarthost, delivery_counts

from leafmail.config import Config, _build
from leafmail.delivery import Outcome, Result
from leafmail.delivery.router import build_agent
from leafmail.envelope import Envelope, Recipient
from leafmail.expansion import RecordedExpansions
from leafmail.message import Attempt, unfreeze
from leafmail.queue import QueueRunner
from leafmail.retry import RetryPolicy
from leafmail.spool import Spool, new_id
from leafmail.states import QueueState
from leafmail.status import MessageStatus, RcptState, TargetMark, TargetState

# As root, local delivery forks a child per mailbox write to take the user's ids.
pytestmark = pytest.mark.slow

HOST = "mx.test"
SENDER = "sender@src.example"
BOB = "bob@far.example"
MESSAGE = b"From: <sender@src.example>\r\nSubject: team news\r\n\r\nHello team.\r\n"
POLICY = RetryPolicy(initial=60.0, maximum=600.0, lifetime=5 * 86400.0)


def config_for(tmp_path: Path, sink: Smarthost, aliases: str) -> Config:
    (tmp_path / "aliases").write_text(aliases, encoding="utf-8")
    return _build(
        {
            "hostname": HOST,
            "relay": {"local_domains": [HOST]},
            "delivery": {"mode": "smarthost", "smarthost": sink.address, "tls": "none"},
            "local": {
                "path": f"{tmp_path}/{{user}}.maildir",
                "users": ["alice", "carol"],
                "aliases": str(tmp_path / "aliases"),
                **({"virtual_user": VIRTUAL} if ROOT else {}),
            },
        },
        "test",
    )


@pytest.fixture
def tmp_path(tmp_path: Path) -> Iterator[Path]:
    """As root, alice and carol (no accounts) are written by VIRTUAL, a real user (issue
    12.3): the directory is one that user owns, as pytest's is closed to others."""
    yield from virtual_tmp(tmp_path)


def runner_for(config: Config, spool: Spool, clock: FakeClock) -> QueueRunner:
    runner = QueueRunner(spool, None, POLICY, hostname=HOST, clock=clock)
    runner.agent = build_agent(config.queue, spool, notify=runner.notify)
    return runner


def block_alice(tmp_path: Path) -> Path:
    """alice's Maildir is a symbolic link, which local delivery refuses and defers."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(exist_ok=True)
    link = tmp_path / "alice.maildir"
    link.symlink_to(elsewhere)
    return link


def maildir_count(path: Path) -> int:
    return len(list(mailbox.Maildir(str(path), create=False).iterkeys())) if path.is_dir() else 0


def in_spool(spool: Spool) -> list[str]:
    return [q for state in QueueState for q in spool.ids(state)]


def test_forwarded_target_gets_one_copy_while_another_target_defers(
    sink: Smarthost, tmp_path: Path
) -> None:
    config = config_for(tmp_path, sink, f"team: alice, carol, {BOB}\n")
    spool = Spool(tmp_path / "spool")
    clock = FakeClock()
    runner = runner_for(config, spool, clock)
    link = block_alice(tmp_path)
    qid = spool.commit(Envelope(SENDER, (Recipient(f"team@{HOST}"),)), MESSAGE)

    for _ in range(6):  # the six passes
        asyncio.run(runner.run_once(force=True))
        clock.advance(3600)

    assert delivery_counts(sink) == {BOB: 1}
    assert maildir_count(tmp_path / "carol.maildir") == 1
    assert spool.find(qid) == "deferred"  # alice is still waiting
    link.unlink()
    asyncio.run(runner.run_once(force=True))
    assert maildir_count(tmp_path / "alice.maildir") == 1
    assert maildir_count(tmp_path / "carol.maildir") == 1  # not a second time
    assert delivery_counts(sink) == {BOB: 1}
    assert in_spool(spool) == []


def test_a_target_that_failed_is_not_tried_again_and_bounces_at_the_end(
    sink: Smarthost, tmp_path: Path
) -> None:
    sink.behaviour.rcpt_replies[BOB] = "550 5.1.1 no bob here"
    config = config_for(tmp_path, sink, f"team: alice, {BOB}\n")
    spool = Spool(tmp_path / "spool")
    clock = FakeClock()
    runner = runner_for(config, spool, clock)
    link = block_alice(tmp_path)
    qid = spool.commit(Envelope(SENDER, (Recipient(f"team@{HOST}"),)), MESSAGE)
    asyncio.run(runner.run_once(force=True))
    # The copy for bob bounced on its own (it is a message of its own); the alias did
    # its part: "forwarded" is final for that target.
    first_bounces = [r for r in sink.received if r.recipients == [SENDER]]
    assert len(first_bounces) == 1
    clock.advance(3600)
    asyncio.run(runner.run_once(force=True))
    assert [r for r in sink.received if r.recipients == [SENDER]] == first_bounces
    link.unlink()
    asyncio.run(runner.run_once(force=True))
    assert spool.find(qid) is None
    assert maildir_count(tmp_path / "alice.maildir") == 1


def marked(spool: Spool, qid: str, mark: TargetMark) -> None:
    """Write the status a crash leaves: the team recipient open, with this mark."""
    message = unfreeze(spool, qid)
    rcpt = message.status.recipients[0]
    status = message.status.with_recipient(0, type(rcpt)(targets=(mark,)))
    spool.write_status(qid, status.to_bytes())


def forwarded_copy(spool: Spool, copy: str, state: QueueState) -> None:
    """The forwarded copy as the crashed attempt committed it."""
    envelope = Envelope(SENDER, (Recipient(BOB, (), f"rfc822;team@{HOST}"),))
    spool.commit(envelope, b"Delivered-To: team@mx.test\r\n" + MESSAGE, copy, state=state)


def crash_case(
    sink: Smarthost, tmp_path: Path, mark_state: TargetState, copy_state: QueueState | None
) -> Spool:
    """A message to team (alias: bob only) after a crash mid-forward; one pass after it."""
    config = config_for(tmp_path, sink, f"team: {BOB}\n")
    spool = Spool(tmp_path / "spool")
    qid = spool.commit(Envelope(SENDER, (Recipient(f"team@{HOST}"),)), MESSAGE)
    copy = new_id()
    marked(spool, qid, TargetMark(f"forward:{BOB}", mark_state, qid=copy))
    if copy_state is not None:
        forwarded_copy(spool, copy, copy_state)
    asyncio.run(runner_for(config, spool, FakeClock()).run_once())
    return spool


def test_crash_after_the_copy_was_spooled_but_not_recorded(sink: Smarthost, tmp_path: Path) -> None:
    """STAGED, and the copy complete in hold/: it is released, and no second copy made."""
    spool = crash_case(sink, tmp_path, TargetState.STAGED, QueueState.HOLD)
    assert delivery_counts(sink) == {BOB: 1}
    assert in_spool(spool) == []


def test_crash_before_the_copy_was_spooled(sink: Smarthost, tmp_path: Path) -> None:
    """STAGED and no copy: the crash came before the commit; a copy is made now."""
    spool = crash_case(sink, tmp_path, TargetState.STAGED, None)
    assert delivery_counts(sink) == {BOB: 1}
    assert in_spool(spool) == []


def test_crash_after_release_when_the_copy_is_already_delivered(
    sink: Smarthost, tmp_path: Path
) -> None:
    """FORWARDED and the copy gone (released, then delivered before this retry): done,
    nothing spooled again."""
    spool = crash_case(sink, tmp_path, TargetState.FORWARDED, None)
    assert delivery_counts(sink) == {}
    assert in_spool(spool) == []


def test_crash_after_recording_but_before_release(sink: Smarthost, tmp_path: Path) -> None:
    spool = crash_case(sink, tmp_path, TargetState.FORWARDED, QueueState.HOLD)
    assert delivery_counts(sink) == {BOB: 1}
    assert in_spool(spool) == []


def test_status_records_of_version_1_are_still_read(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    qid = spool.commit(Envelope(SENDER, (Recipient(f"team@{HOST}"),)), MESSAGE)
    spool.write_status(
        qid,
        b'{"version":1,"arrival":1.0,"next_attempt":2.0,"last_attempt":1.0,"attempts":1,'
        b'"last_error":"451 x","warned":false,"recipients":[{"state":"deferred",'
        b'"attempts":1,"reply":"451 x","remote":""}]}\n',
    )
    status = unfreeze(spool, qid).status
    assert status.attempts == 1 and status.recipients[0].targets == ()


def test_a_double_bounce_forwarded_by_the_postmaster_alias_does_not_loop(
    sink: Smarthost, tmp_path: Path
) -> None:
    """postmaster is an alias to another domain, and that fails too: the copy of the
    report is dropped (logged), not reported to the postmaster again, and again."""
    sink.behaviour.rcpt_replies["nobody@far.example"] = "550 5.1.1 no such user"
    sink.behaviour.rcpt_replies[SENDER] = "550 5.1.1 the sender is gone"
    sink.behaviour.rcpt_replies["admin@far.example"] = "550 5.1.1 no admin either"
    config = config_for(tmp_path, sink, "postmaster: admin@far.example\n")
    spool = Spool(tmp_path / "spool")
    runner = runner_for(config, spool, FakeClock())
    seen: list[Attempt] = []

    def progress(done: Attempt) -> None:
        seen.append(done)
        assert len(seen) < 20, "the double bounce loops"

    spool.commit(Envelope(SENDER, (Recipient("nobody@far.example"),)), MESSAGE)
    asyncio.run(runner.run_once(progress=progress))

    # message, bounce, report to postmaster (forwarded), the forwarded copy (dropped)
    assert [a.verdict.value for a in seen] == ["bounced", "bounced", "delivered", "bounced"]
    assert [a.dropped_bounce for a in seen] == [False, False, False, True]
    assert sink.received == []
    assert in_spool(spool) == []


def test_settled_records_only_deliveries_that_owe_no_report(tmp_path: Path) -> None:
    """An early record (`settled`) is only for a plain delivery: a failure's bounce and
    a success report (NOTIFY=SUCCESS) are committed before the record that makes their
    recipient final, by the attempt's own record, or a crash could lose the report."""
    spool = Spool(tmp_path / "spool")
    rcpts = (
        Recipient("plain@dst.test"),
        Recipient("wants@dst.test", notify=("SUCCESS",)),
        Recipient("refused@dst.test"),
    )
    envelope = Envelope("alice@src.test", rcpts)
    qid = spool.commit(envelope, b"Subject: x\r\n\r\nbody\r\n")
    record = RecordedExpansions(spool, qid, MessageStatus.fresh(envelope, 0.0), envelope)
    ok = Result(Outcome.DELIVERED, 250, "2.0.0", "ok")
    refused = Result(Outcome.FAILED, 550, "5.1.1", "no such user")
    asyncio.run(record.settled({0: ok, 1: ok, 2: refused}))
    blob = spool.read_status(qid)
    assert blob is not None
    states = [r.state for r in MessageStatus.from_bytes(blob, envelope).recipients]
    assert states == [RcptState.DELIVERED, RcptState.PENDING, RcptState.PENDING]
