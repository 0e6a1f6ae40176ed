"""Many messages at once: ALL, --from, --to, ages, ids on stdin; requeue; qshape.

The spool is filled through the Spool API, deferred mail by a real queue-runner pass
against the aiosmtpd smarthost, and the real `leafmail` CLI runs as a subprocess (the
helpers of test_queue_tools).
"""

from __future__ import annotations

import io
import json
import subprocess
from pathlib import Path

import pytest
from conftest import ROOT
from leafmail_fixtures import clean_env, leafmail_command
from smarthost import Smarthost, delivery_counts
from test_queue_tools import (
    CLI_TIMEOUT,
    HOUR,
    SENDER,
    body,
    cli,
    deliver_pass,
    no_traceback,
    put,
    spool_cli,
)

from leafmail import listing, qshape, tools
from leafmail.envelope import ClientInfo, Envelope, Recipient
from leafmail.message import load_status
from leafmail.selection import Selection, parse_age
from leafmail.spool import Spool
from leafmail.states import QueueState
from leafmail.status import RcptState
from netserver.errors import EX_USAGE

DAY = 86400.0


def put_from(spool: Spool, sender: str, rcpts: list[str], age: float = 0.0) -> str:
    """A message from `sender` (put() always uses SENDER) that arrived `age` s ago."""
    qid = put(spool, rcpts, "x", age)  # a fresh id of the right age
    spool.remove(qid)
    envelope = Envelope(sender, tuple(Recipient(r) for r in rcpts), ClientInfo("127.0.0.1"))
    return spool.commit(envelope, body("x"), qid)


def lines(proc: subprocess.CompletedProcess[bytes]) -> list[str]:
    return proc.stdout.decode().splitlines()


# --- parsing the filters -----------------------------------------------------------------


def test_ages_and_their_units() -> None:
    assert [parse_age(a) for a in ("90", "90s", "15m", "2h", "2d", "1w", "1.5h")] == [
        90,
        90,
        900,
        7200,
        2 * DAY,
        7 * DAY,
        5400,
    ]
    for bad in ("", "2x", "-1d", "d", "2 days"):
        with pytest.raises(Exception, match="bad age"):
            parse_age(bad)


def test_address_filters_match_addresses_domains_and_the_null_sender() -> None:
    sel = Selection.build(
        states=None, default_states=(QueueState.QUEUE,), senders=["<>", "Bob@Src.TEST"]
    )
    assert sel.envelope_matches("", [])
    assert sel.envelope_matches("bob@src.test", [])
    assert not sel.envelope_matches("alice@src.test", [])
    sel = Selection.build(
        states=None, default_states=(QueueState.QUEUE,), recipients=["@dead.example"]
    )
    assert sel.envelope_matches("x@y", ["a@live.example", "b@DEAD.example"])
    assert not sel.envelope_matches("x@y", ["a@live.example", "b@sub.dead.example"])
    assert not sel.envelope_matches("x@y", [])


# --- ALL and the filters on the command line ---------------------------------------------


def test_hold_all_then_release_all(tmp_path: Path, spool: Spool) -> None:
    qids = [put(spool, [f"u{i}@dst.test"]) for i in range(5)]
    proc = spool_cli(tmp_path, spool, "hold", "ALL")
    assert proc.returncode == 0, proc.stderr
    assert sorted(lines(proc)[:-1]) == sorted(f"{q}: held" for q in qids)
    assert lines(proc)[-1] == "-- 5 messages held"
    assert spool.ids(QueueState.HOLD) == sorted(qids)

    proc = spool_cli(tmp_path, spool, "release", "ALL")
    assert proc.returncode == 0, proc.stderr
    assert lines(proc)[-1] == "-- 5 messages released"
    assert spool.ids(QueueState.QUEUE) == sorted(qids) and spool.ids(QueueState.HOLD) == []

    proc = spool_cli(tmp_path, spool, "release", "ALL")  # nothing held: nothing to say
    assert (proc.returncode, lines(proc)) == (0, ["-- no messages selected"])


def test_delete_by_recipient_domain_spares_mail_that_waits_only_elsewhere(
    tmp_path: Path, spool: Spool, sink: Smarthost
) -> None:
    """--to looks at recipients still to deliver: one delivered there does not count."""
    sink.behaviour.rcpt_replies["wait@live.example"] = "451 4.2.1 try later"
    done_there = put(spool, ["ok@dead.example", "wait@live.example"])
    deliver_pass(spool, sink.port)
    assert spool.find(done_there) == "deferred"
    dead = put(spool, ["a@dead.example"])
    mixed = put(spool, ["b@live.example", "c@DEAD.example"])
    other = put(spool, ["d@live.example"])

    proc = spool_cli(tmp_path, spool, "delete", "--to", "@dead.example")
    assert proc.returncode == 0, proc.stderr
    assert sorted(lines(proc)[:-1]) == sorted([f"{dead}: deleted", f"{mixed}: deleted"])
    assert lines(proc)[-1] == "-- 2 messages deleted"
    assert (spool.find(dead), spool.find(mixed)) == (None, None)
    assert (spool.find(done_there), spool.find(other)) == ("deferred", "queue")


def test_hold_by_sender_and_age(tmp_path: Path, spool: Spool) -> None:
    old_bounce = put_from(spool, "", ["x@dst.test"], age=3 * DAY)
    new_bounce = put_from(spool, "", ["x@dst.test"])
    old_alice = put(spool, ["y@dst.test"], age=3 * DAY)
    young = put(spool, ["z@dst.test"], age=10 * 60)

    proc = spool_cli(tmp_path, spool, "hold", "--from", "<>", "--older-than", "2d")
    assert proc.returncode == 0, proc.stderr
    assert lines(proc) == [f"{old_bounce}: held", "-- 1 message held"]

    proc = spool_cli(tmp_path, spool, "hold", "--from", SENDER, "--younger-than", "1h")
    assert lines(proc) == [f"{young}: held", "-- 1 message held"]
    assert spool.ids(QueueState.HOLD) == sorted([old_bounce, young])
    assert spool.ids(QueueState.QUEUE) == sorted([new_bounce, old_alice])

    # Ids and filters: the filters narrow the ids.
    proc = spool_cli(tmp_path, spool, "delete", new_bounce, old_alice, "--older-than", "1d")
    assert lines(proc) == [f"{old_alice}: deleted", "-- 1 message deleted"]
    assert spool.find(new_bounce) == "queue"


def test_ids_from_stdin_as_postsuper_reads_them(tmp_path: Path, spool: Spool) -> None:
    qids = [put(spool, [f"u{i}@dst.test"]) for i in range(3)]
    proc = subprocess.run(
        leafmail_command("delete", "--spool", str(spool.root), "-"),
        input=f"{qids[0]}\n\n  {qids[2]}  \n".encode(),
        cwd=ROOT,
        env=clean_env(tmp_path),
        capture_output=True,
        timeout=CLI_TIMEOUT,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert lines(proc) == [f"{qids[0]}: deleted", f"{qids[2]}: deleted", "-- 2 messages deleted"]
    assert spool.ids(QueueState.QUEUE) == [qids[1]]


def test_queue_listing_takes_the_same_filters(tmp_path: Path, spool: Spool) -> None:
    wanted = put(spool, ["a@far.example"], age=2 * HOUR)
    put(spool, ["b@near.example"], age=2 * HOUR)
    put(spool, ["c@far.example"])
    held = put(spool, ["d@far.example"], age=2 * HOUR)
    spool.move(held, QueueState.QUEUE, QueueState.HOLD)
    proc = spool_cli(
        tmp_path, spool, "queue", "--json", "--to", "@far.example", "--older-than", "1h"
    )
    assert proc.returncode == 0, proc.stderr
    assert sorted(m["id"] for m in json.loads(proc.stdout)) == sorted([wanted, held])
    proc = spool_cli(tmp_path, spool, "queue", "--json", "--state", "held")
    assert [m["id"] for m in json.loads(proc.stdout)] == [held]


@pytest.mark.parametrize(
    "args",
    [
        ["delete"],  # nothing named: never "everything" by accident
        ["hold", "ALL", "0" * 24],
        ["delete", "--older-than", "soon"],
        ["queue", "--state", "frozen"],
        ["qshape", "--buckets", "0"],
    ],
)
def test_usage_errors_exit_64(tmp_path: Path, spool: Spool, args: list[str]) -> None:
    qid = put(spool, ["bob@dst.test"])
    proc = spool_cli(tmp_path, spool, *args)
    assert proc.returncode == EX_USAGE, proc
    no_traceback(proc)
    assert spool.find(qid) == "queue"


def test_change_help_explains_the_selection(tmp_path: Path) -> None:
    for command in ("delete", "hold", "release", "requeue"):
        proc = cli(tmp_path, command, "--help")
        assert proc.returncode == 0
        text = " ".join(proc.stdout.decode().split())
        for phrase in ("ALL", "--from", "--to", "--older-than", "--younger-than", "--state"):
            assert phrase in text, (command, phrase)
        assert "summary" in text


# --- requeue -------------------------------------------------------------------------------


def test_requeue_makes_it_due_now_and_keeps_delivered_marks(
    tmp_path: Path, spool: Spool, sink: Smarthost
) -> None:
    sink.behaviour.rcpt_replies["busy@dst.test"] = "451 4.2.1 mailbox busy"
    qid = put(spool, ["ok@dst.test", "busy@dst.test"])
    deliver_pass(spool, sink.port)
    deliver_pass(spool, sink.port)  # not due: nothing happens
    before = load_status(spool, spool.get(qid))
    assert spool.find(qid) == "deferred" and before.attempts == 1
    assert before.next_attempt > before.last_attempt

    proc = spool_cli(tmp_path, spool, "requeue", qid)
    assert proc.returncode == 0, proc.stderr
    assert lines(proc) == [f"{qid}: requeued", "-- 1 message requeued"]
    assert spool.find(qid) == "queue"
    after = load_status(spool, spool.get(qid))
    assert (after.attempts, after.next_attempt) == (0, 0.0)
    assert after.recipients == before.recipients  # delivered stays delivered
    assert after.arrival == before.arrival  # the lifetime still counts from arrival

    del sink.behaviour.rcpt_replies["busy@dst.test"]
    deliver_pass(spool, sink.port)
    assert spool.find(qid) is None
    assert delivery_counts(sink) == {"ok@dst.test": 1, "busy@dst.test": 1}


def test_requeue_all_takes_held_mail_back_like_postsuper_r(tmp_path: Path, spool: Spool) -> None:
    held = put(spool, ["a@dst.test"])
    spool.move(held, QueueState.QUEUE, QueueState.HOLD)
    active = put(spool, ["b@dst.test"])
    proc = spool_cli(tmp_path, spool, "requeue", "ALL")
    assert proc.returncode == 0, proc.stderr
    assert sorted(lines(proc)[:-1]) == sorted([f"{held}: requeued", f"{active}: requeued"])
    assert lines(proc)[-1] == "-- 2 messages requeued"
    assert spool.ids(QueueState.QUEUE) == sorted([held, active])


def test_requeue_after_a_backoff_retries_from_the_first_interval(
    spool: Spool, sink: Smarthost
) -> None:
    """The reset schedule: the next failure waits the initial interval again."""
    sink.behaviour.rcpt_replies["busy@dst.test"] = "451 4.2.1 mailbox busy"
    qid = put(spool, ["busy@dst.test"])
    deliver_pass(spool, sink.port)
    first = load_status(spool, spool.get(qid))
    assert tools.requeue(spool, qid)
    deliver_pass(spool, sink.port)
    second = load_status(spool, spool.get(qid))
    assert second.attempts == 1
    assert second.recipients[0].state is RcptState.DEFERRED
    assert second.next_attempt - second.last_attempt == pytest.approx(
        first.next_attempt - first.last_attempt, abs=1
    )


# --- qshape --------------------------------------------------------------------------------


def test_qshape_counts_open_recipients_by_domain_and_age(spool: Spool) -> None:
    now = 1_000_000_000.0
    entries = [
        entry("A", "active", now - 60, "s@src.test", _r("a@x.test", "b@x.test")),
        entry("B", "deferred", now - 7 * 60, "", _r("c@Y.test")),
        entry("C", "deferred", now - 3 * DAY, "s@src.test", _r("d@x.test")),
        entry("D", "deferred", now - 60, "s@src.test", _r("e@y.test", state="delivered")),
    ]
    shape = qshape.shape(entries, now=now)
    rows = dict(shape.ordered())
    columns = ["T", "5", "10", "20", "40", "80", "160", "320", "640", "1280", "1280+"]
    assert shape.headings() == columns
    assert rows["TOTAL"] == [2, 1, 0, 0, 0, 0, 0, 0, 0, 1]
    assert rows["x.test"] == [2, 0, 0, 0, 0, 0, 0, 0, 0, 1]
    assert rows["y.test"] == [0, 1, 0, 0, 0, 0, 0, 0, 0, 0]
    out = io.StringIO()
    qshape.write_text(shape, out)
    table = [line.split() for line in out.getvalue().splitlines()]
    assert table[0] == columns
    assert table[1] == ["TOTAL", "4", "2", "1", "0", "0", "0", "0", "0", "0", "0", "1"]
    assert table[2][:2] == ["x.test", "3"] and table[3][:2] == ["y.test", "1"]

    by_sender = dict(qshape.shape(entries, now=now, by_sender=True).ordered())
    assert by_sender["src.test"][0] == 2 and by_sender["MAILER-DAEMON"] == [0, 1] + [0] * 8


def _r(*addresses: str, state: str = "pending") -> list[dict[str, str]]:
    return [{"address": a, "state": state, "reply": ""} for a in addresses]


def entry(
    letter: str, state: str, arrival: float, sender: str, rcpts: list[dict[str, str]]
) -> listing.QueueEntry:
    return listing.QueueEntry(letter * 24, state, 1, arrival, sender, rcpts, "", 0)


def test_cli_qshape(tmp_path: Path, spool: Spool) -> None:
    for _ in range(3):
        put(spool, ["a@far.example", "b@far.example"], age=2 * HOUR)
    put(spool, ["c@near.example"])
    held = put(spool, ["d@far.example"])
    spool.move(held, QueueState.QUEUE, QueueState.HOLD)  # not counted by default
    proc = spool_cli(tmp_path, spool, "qshape")
    assert proc.returncode == 0, proc.stderr
    table = {row[0]: row[1:] for row in (line.split() for line in lines(proc)[1:])}
    # columns: T, 5, 10, 20, 40, 80, 160, ...: two hours old is the 80-160 bucket
    assert table["TOTAL"][:8] == ["7", "1", "0", "0", "0", "0", "6", "0"]
    assert table["far.example"][:8] == ["6", "0", "0", "0", "0", "0", "6", "0"]
    assert table["near.example"][:2] == ["1", "1"]
    proc = spool_cli(tmp_path, spool, "qshape", "--json", "--state", "held", "--buckets", "2")
    data = json.loads(proc.stdout)
    assert data["buckets"] == [5, None]
    assert data["domains"] == {"far.example": {"total": 1, "counts": [1, 0]}}
