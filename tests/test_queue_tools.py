"""The queue tools: `leafmail.tools` in-process, and the real `leafmail` CLI as a subprocess.

The spool is filled with the public Spool API and, for deferred mail, by a real queue
runner pass against the aiosmtpd smarthost, so the status records the tools read are
the ones the runner writes. The CLI runs with a scrubbed environment (`clean_env`) and
``--spool``, so nothing of the machine's own leafmail setup leaks in.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import re
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import ROOT
from leafmail_fixtures import clean_env, leafmail_command, run_leafmail
from lifecycle_handlers import wait_for_flock_waiter
from smarthost import Smarthost

from leafmail import listing, tools
from leafmail.delivery.smarthost import SmarthostAgent, SmarthostSettings
from leafmail.envelope import ClientInfo, Envelope, Recipient
from leafmail.queue import QueueRunner
from leafmail.retry import RetryPolicy
from leafmail.spool import Spool
from leafmail.states import QueueState
from netserver.errors import EX_DATAERR, EX_NOUSER

SENDER = "alice@src.test"
HOUR = 3600.0
CLI_TIMEOUT = 20.0
UNKNOWN_ID = "0" * 23 + "A"  # well-formed, never spooled


def body(subject: str) -> bytes:
    return f"From: <{SENDER}>\r\nSubject: {subject}\r\n\r\nHello, {subject}.\r\n".encode()


def envelope(rcpts: list[str]) -> Envelope:
    return Envelope(
        sender=SENDER,
        recipients=tuple(Recipient(r) for r in rcpts),
        client=ClientInfo("127.0.0.1", 40000, "client.test"),
    )


def put(spool: Spool, rcpts: list[str], subject: str = "test", age: float = 0.0) -> str:
    """Spool a message that arrived `age` seconds ago (the queue id encodes the arrival)."""
    if not age:
        return spool.commit(envelope(rcpts), body(subject))
    qid = f"{time.time_ns() - int(age * 1e9):016X}{random.getrandbits(32):08X}"
    return spool.commit(envelope(rcpts), body(subject), qid)


def deliver_pass(spool: Spool, port: int) -> None:
    """One real queue-runner pass to the smarthost (to make deferred mail and status)."""
    agent = SmarthostAgent(
        SmarthostSettings(host="127.0.0.1", port=port, helo="leaf.test", tls="none")
    )
    runner = QueueRunner(spool, agent, RetryPolicy(), hostname="leaf.test")
    asyncio.run(runner.run_once())


@dataclass(frozen=True)
class Populated:
    deferred: str
    held: str
    active: str


def populate(spool: Spool, sink: Smarthost) -> Populated:
    """A deferred message (one recipient delivered, one 451), a held one and a new one."""
    sink.behaviour.rcpt_replies["busy@dst.test"] = "451 4.2.1 mailbox busy"
    deferred = put(spool, ["ok@dst.test", "busy@dst.test"], "deferred", age=2 * HOUR + 300)
    deliver_pass(spool, sink.port)
    assert spool.find(deferred) == "deferred"
    held = put(spool, ["held@dst.test"], "held")
    assert tools.hold(spool, held)
    active = put(spool, ["new@dst.test", "other@dst.test"], "active")
    return Populated(deferred, held, active)


def cli(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[bytes]:
    """Run `leafmail ARGS` to completion (bounded) and return what it did."""
    return run_leafmail(tmp_path, *args, timeout=CLI_TIMEOUT)


def spool_cli(tmp_path: Path, spool: Spool, *args: str) -> subprocess.CompletedProcess[bytes]:
    command, *rest = args
    return cli(tmp_path, command, "--spool", str(spool.root), *rest)


def no_traceback(proc: subprocess.CompletedProcess[bytes]) -> None:
    assert b"Traceback" not in proc.stderr, proc.stderr.decode()


# --- the functions ------------------------------------------------------------------------


def test_list_queue_on_an_empty_spool(spool: Spool) -> None:
    assert list(listing.iter_queue(spool)) == []
    assert listing.format_queue([]) == "Mail queue is empty\n"


def test_list_queue_reports_every_fact(spool: Spool, sink: Smarthost) -> None:
    msgs = populate(spool, sink)
    entries = {e.qid: e for e in listing.iter_queue(spool)}
    assert sorted(entries) == sorted([msgs.deferred, msgs.held, msgs.active])

    deferred = entries[msgs.deferred]
    assert deferred.state == "deferred"
    assert deferred.size == len(body("deferred"))
    assert deferred.sender == SENDER
    assert deferred.recipients == [
        {"address": "ok@dst.test", "state": "delivered", "reply": "250 2.0.0 accepted"},
        {"address": "busy@dst.test", "state": "deferred", "reply": "451 4.2.1 mailbox busy"},
    ]
    assert deferred.last_error == "451 4.2.1 mailbox busy"
    assert deferred.next_attempt > time.time()
    assert time.time() - deferred.arrival == pytest.approx(2 * HOUR + 300, abs=60)

    held = entries[msgs.held]
    assert (held.state, held.last_error, held.next_attempt) == ("held", "", 0.0)
    assert held.recipients == [{"address": "held@dst.test", "state": "pending", "reply": ""}]

    active = entries[msgs.active]
    assert active.state == "active"
    assert [r["address"] for r in active.recipients] == ["new@dst.test", "other@dst.test"]

    text = listing.format_queue(list(entries.values()), now=deferred.arrival + 2 * HOUR + 301)
    assert f"{msgs.deferred} deferred {len(body('deferred')):>8}     2h  <{SENDER}>" in text
    assert "    (451 4.2.1 mailbox busy)\n" in text
    assert "    delivered <ok@dst.test>  250 2.0.0 accepted\n" in text
    assert "    deferred  <busy@dst.test>  451 4.2.1 mailbox busy\n" in text
    total = len(body("deferred")) + len(body("held")) + len(body("active"))
    assert text.endswith(f"-- {total} bytes in 3 messages\n")


def test_show_function(spool: Spool) -> None:
    qid = put(spool, ["bob@dst.test"], "show")
    info, data = tools.show(spool, qid)
    assert data == body("show")
    assert info["id"] == qid
    assert info["state"] == "active"
    assert info["envelope"] == envelope(["bob@dst.test"]).to_json()
    assert info["status"]["attempts"] == 0
    assert info["status"]["recipients"][0]["state"] == "pending"


def test_change_functions_and_their_errors(spool: Spool) -> None:
    qid = put(spool, ["bob@dst.test"])
    assert tools.hold(spool, qid) is True
    assert tools.hold(spool, qid) is False
    assert spool.find(qid) == "hold"
    assert tools.release(spool, qid) is True
    assert tools.release(spool, qid) is False
    assert spool.find(qid) == "queue"
    tools.delete(spool, qid)
    assert spool.find(qid) is None
    for action in (tools.delete, tools.hold, tools.release, tools.show):
        with pytest.raises(tools.NoSuchMessage) as unknown:
            action(spool, qid)
        assert unknown.value.exit_code == EX_NOUSER
        with pytest.raises(tools.BadQueueId) as bad:
            action(spool, "../queue/x")
        assert bad.value.exit_code == EX_DATAERR


# --- leafmail queue ------------------------------------------------------------------------

_LINE = re.compile(
    r"(?P<qid>[0-9A-F]{24}) +(?P<state>\w+) +(?P<size>\d+) +(?P<age>\d+[smhd])  <(?P<sender>[^>]*)>"
)
_RCPT = re.compile(r"    (?P<state>\w+) +<(?P<address>[^>]*)>(?:  (?P<reply>.*))?")


def parse_queue(text: str) -> dict[str, dict[str, object]]:
    """The CLI listing back as data: per message its fields, error and recipients."""
    lines = text.splitlines()
    assert lines[0].split() == ["Queue", "ID", "State", "Size", "Age", "Sender"]
    assert re.fullmatch(r"-- \d+ bytes in \d+ messages?", lines[-1]), lines[-1]
    found: dict[str, dict[str, object]] = {}
    current: dict[str, object] = {}
    for line in lines[1:-1]:
        head = _LINE.fullmatch(line)
        if head:
            current = {**head.groupdict(), "error": "", "recipients": []}
            found[head["qid"]] = current
        elif line.startswith("    (") and line.endswith(")"):
            current["error"] = line[5:-1]
        else:
            rcpt = _RCPT.fullmatch(line)
            assert rcpt is not None, f"unexpected line {line!r}"
            recipients = current["recipients"]
            assert isinstance(recipients, list)
            recipients.append((rcpt["state"], rcpt["address"], rcpt["reply"] or ""))
    return found


def test_cli_queue_on_an_empty_spool(tmp_path: Path, spool: Spool) -> None:
    proc = spool_cli(tmp_path, spool, "queue")
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, b"Mail queue is empty\n", b"")
    proc = spool_cli(tmp_path, spool, "queue", "--json")
    assert proc.returncode == 0
    assert json.loads(proc.stdout) == []


def test_cli_queue_lists_states_recipients_and_errors(
    tmp_path: Path, spool: Spool, sink: Smarthost
) -> None:
    msgs = populate(spool, sink)
    proc = spool_cli(tmp_path, spool, "queue")
    assert proc.returncode == 0, proc.stderr
    listing = parse_queue(proc.stdout.decode())
    assert sorted(listing) == sorted([msgs.deferred, msgs.held, msgs.active])

    deferred = listing[msgs.deferred]
    assert deferred["state"] == "deferred"
    assert deferred["size"] == str(len(body("deferred")))
    assert deferred["age"] == "2h"
    assert deferred["sender"] == SENDER
    assert deferred["error"] == "451 4.2.1 mailbox busy"
    assert deferred["recipients"] == [
        ("delivered", "ok@dst.test", "250 2.0.0 accepted"),
        ("deferred", "busy@dst.test", "451 4.2.1 mailbox busy"),
    ]
    held = listing[msgs.held]
    assert (held["state"], held["error"]) == ("held", "")
    assert held["recipients"] == [("pending", "held@dst.test", "")]
    active = listing[msgs.active]
    assert active["state"] == "active"
    assert re.fullmatch(r"\d+s", str(active["age"]))
    assert active["recipients"] == [
        ("pending", "new@dst.test", ""),
        ("pending", "other@dst.test", ""),
    ]
    assert proc.stdout.decode().splitlines()[-1] == (
        f"-- {sum(int(str(m['size'])) for m in listing.values())} bytes in 3 messages"
    )

    # --json says the same things, as data.
    proc = spool_cli(tmp_path, spool, "queue", "--json")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert sorted(m["id"] for m in data) == sorted(listing)
    for item in data:
        text = listing[item["id"]]
        assert item["state"] == text["state"]
        assert item["size"] == int(str(text["size"]))
        assert item["sender"] == text["sender"]
        assert item["last_error"] == text["error"]
        assert [(r["state"], r["address"], r["reply"]) for r in item["recipients"]] == text[
            "recipients"
        ]
        assert isinstance(item["arrival"], float)
    by_id = {m["id"]: m for m in data}
    assert by_id[msgs.deferred]["next_attempt"] > time.time()
    assert by_id[msgs.held]["next_attempt"] is None
    assert time.time() - by_id[msgs.deferred]["arrival"] == pytest.approx(2 * HOUR + 300, abs=60)


def test_cli_queue_without_a_spool(tmp_path: Path) -> None:
    proc = cli(tmp_path, "queue", "--spool", str(tmp_path / "nowhere"))
    assert proc.returncode == 73
    assert proc.stderr.decode().startswith("leafmail: no leafmail spool at ")
    no_traceback(proc)


# --- leafmail show ---------------------------------------------------------------------------


def test_cli_show_prints_json_a_blank_line_and_the_exact_bytes(
    tmp_path: Path, spool: Spool
) -> None:
    data = b"Subject: exact\r\nX-Odd: \xc3\xa9 trailing space \r\n\r\nline\r\n.dot\r\n\r\n"
    qid = spool.commit(envelope(["bob@dst.test", "carol@dst.test"]), data)
    proc = spool_cli(tmp_path, spool, "show", qid)
    assert proc.returncode == 0, proc.stderr
    head, sep, rest = proc.stdout.partition(b"\n\n")
    assert sep and rest == data
    info = json.loads(head)
    assert info["id"] == qid
    assert info["state"] == "active"
    assert info["envelope"] == envelope(["bob@dst.test", "carol@dst.test"]).to_json()
    assert info["status"]["attempts"] == 0
    assert [r["state"] for r in info["status"]["recipients"]] == ["pending", "pending"]

    proc = spool_cli(tmp_path, spool, "show", qid, "--envelope")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == info
    assert data not in proc.stdout


def test_cli_show_a_deferred_message_has_its_status(
    tmp_path: Path, spool: Spool, sink: Smarthost
) -> None:
    msgs = populate(spool, sink)
    proc = spool_cli(tmp_path, spool, "show", msgs.deferred, "--envelope")
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert info["state"] == "deferred"
    status = info["status"]
    assert status["attempts"] == 1
    assert status["last_error"] == "451 4.2.1 mailbox busy"
    assert status["next_attempt"] > time.time()
    assert [(r["state"], r["reply"]) for r in status["recipients"]] == [
        ("delivered", "250 2.0.0 accepted"),
        ("deferred", "451 4.2.1 mailbox busy"),
    ]


def test_cli_show_unknown_and_malformed_ids(tmp_path: Path, spool: Spool) -> None:
    proc = spool_cli(tmp_path, spool, "show", UNKNOWN_ID)
    assert proc.returncode == EX_NOUSER
    assert proc.stdout == b""
    assert proc.stderr.decode().count("\n") == 1
    assert UNKNOWN_ID in proc.stderr.decode() and "no such message" in proc.stderr.decode()
    no_traceback(proc)
    proc = spool_cli(tmp_path, spool, "show", "nonsense")
    assert proc.returncode == EX_DATAERR
    assert "is not a queue id" in proc.stderr.decode()
    no_traceback(proc)


# --- delete, hold, release -------------------------------------------------------------------


def test_cli_delete_hold_release_several_ids(tmp_path: Path, spool: Spool) -> None:
    a, b, c = (put(spool, [f"{n}@dst.test"], n) for n in ("a", "b", "c"))

    proc = spool_cli(tmp_path, spool, "hold", a, b)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.decode().splitlines() == [f"{a}: held", f"{b}: held", "-- 2 messages held"]
    assert (spool.find(a), spool.find(b), spool.find(c)) == ("hold", "hold", "queue")

    proc = spool_cli(tmp_path, spool, "hold", a)
    assert proc.returncode == 0
    assert proc.stdout.decode().splitlines() == [
        f"{a}: already held",
        "-- 0 messages held, 1 already held",
    ]
    assert spool.find(a) == "hold"

    proc = spool_cli(tmp_path, spool, "release", a, c)
    assert proc.returncode == 0
    out = proc.stdout.decode().splitlines()
    assert out[0] == f"{a}: released"
    assert out[1].startswith(f"{c}: ") and "not held" in out[1]
    assert out[2] == "-- 1 message released, 1 not held"
    assert (spool.find(a), spool.find(b), spool.find(c)) == ("queue", "hold", "queue")

    proc = spool_cli(tmp_path, spool, "delete", a, b)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.decode().splitlines() == [
        f"{a}: deleted",
        f"{b}: deleted",
        "-- 2 messages deleted",
    ]
    assert (spool.find(a), spool.find(b), spool.find(c)) == (None, None, "queue")
    assert spool.ids(QueueState.QUEUE) == [c]


@pytest.mark.parametrize("command", ["delete", "hold", "release"])
def test_cli_unknown_id_exits_67_after_doing_the_rest(
    tmp_path: Path, spool: Spool, command: str
) -> None:
    qid = put(spool, ["bob@dst.test"])
    if command == "release":
        assert tools.hold(spool, qid)
    proc = spool_cli(tmp_path, spool, command, UNKNOWN_ID, qid)
    assert proc.returncode == EX_NOUSER
    stderr = proc.stderr.decode()
    assert stderr.count("\n") == 1, stderr
    assert stderr.startswith(f"leafmail: {UNKNOWN_ID}: no such message")
    no_traceback(proc)
    done = {"delete": "deleted", "hold": "held", "release": "released"}[command]
    # the good id was still acted on, and the summary counts the failure
    assert proc.stdout.decode() == f"{qid}: {done}\n-- 1 message {done}, 1 failed\n"
    assert spool.find(qid) == {"delete": None, "hold": "hold", "release": "queue"}[command]


@pytest.mark.parametrize("command", ["delete", "hold", "release", "show"])
@pytest.mark.parametrize("bad", ["nonsense", "../../etc/passwd", "18eb6baa28d19f5a105f36dd"])
def test_cli_malformed_id_exits_65(tmp_path: Path, spool: Spool, command: str, bad: str) -> None:
    qid = put(spool, ["bob@dst.test"])
    proc = spool_cli(tmp_path, spool, command, bad)
    assert proc.returncode == EX_DATAERR
    stderr = proc.stderr.decode()
    assert stderr.count("\n") == 1, stderr
    assert "is not a queue id" in stderr
    no_traceback(proc)
    assert spool.find(qid) == "queue"


def test_cli_tools_wait_for_the_message_lock(tmp_path: Path, spool: Spool) -> None:
    """`leafmail delete` blocks on a message someone is delivering, then deletes it."""
    qid = put(spool, ["bob@dst.test"])
    inode = os.stat(spool.path(QueueState.QUEUE, qid)).st_ino
    with spool.locked(qid) as state:
        assert state == "queue"
        proc = subprocess.Popen(
            leafmail_command("delete", "--spool", str(spool.root), qid),
            cwd=ROOT,
            env=clean_env(tmp_path),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        try:
            wait_blocked_on_flock(proc, inode)
            assert proc.poll() is None
            assert spool.find(qid) == "queue"
        except BaseException:
            proc.kill()
            proc.communicate()
            raise
    out, err = proc.communicate(timeout=CLI_TIMEOUT)
    assert proc.returncode == 0, err
    assert out.decode() == f"{qid}: deleted\n-- 1 message deleted\n"
    assert spool.find(qid) is None


def wait_blocked_on_flock(proc: subprocess.Popen[bytes], inode: int) -> None:
    """Wait (bounded) until the kernel lists `proc` as waiting for a flock on `inode`."""

    def alive() -> None:
        assert proc.poll() is None, f"exited early: {proc.communicate()}"

    wait_for_flock_waiter(proc.pid, inode, alive)


# --- corrupt files -------------------------------------------------------------------------


def corrupt(spool: Spool, qid: str) -> None:
    path = spool.path(QueueState.QUEUE, qid)
    blob = bytearray(path.read_bytes())
    blob[blob.index(b"Hello")] ^= 0x20
    path.write_bytes(bytes(blob))


def test_cli_queue_lists_a_corrupt_file_and_delete_removes_it(tmp_path: Path, spool: Spool) -> None:
    good = put(spool, ["bob@dst.test"], "good")
    bad = put(spool, ["carol@dst.test"], "bad")
    corrupt(spool, bad)
    proc = spool_cli(tmp_path, spool, "queue", "--json")  # finds out; sets it aside
    assert proc.returncode == 0, proc.stderr
    assert {m["state"] for m in json.loads(proc.stdout) if m["id"] == bad} == {"corrupt"}
    assert spool.find(bad) == "corrupt"
    assert (spool.root / "corrupt" / bad).is_file()

    proc = spool_cli(tmp_path, spool, "queue", "--json")
    assert proc.returncode == 0, proc.stderr
    listed = {m["id"]: m for m in json.loads(proc.stdout)}  # in no particular order
    assert {qid: m["state"] for qid, m in listed.items()} == {good: "active", bad: "corrupt"}
    assert listed[bad]["last_error"]
    assert listed[bad]["size"] == (spool.root / "corrupt" / bad).stat().st_size

    proc = spool_cli(tmp_path, spool, "hold", bad)
    assert proc.returncode == EX_DATAERR
    assert "corrupt" in proc.stderr.decode()
    no_traceback(proc)

    proc = spool_cli(tmp_path, spool, "delete", bad)
    assert proc.returncode == 0, proc.stderr
    assert spool.find(bad) is None
    assert spool.find(good) == "queue"


def test_cli_queue_lists_a_newly_corrupt_file_once(tmp_path: Path, spool: Spool) -> None:
    good = put(spool, ["bob@dst.test"], "good")
    bad = put(spool, ["carol@dst.test"], "bad")
    corrupt(spool, bad)
    proc = spool_cli(tmp_path, spool, "queue")
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout.decode()
    assert text.count(bad) == 1 + text.count(f"({bad}: ")  # once, maybe in its error too
    assert text.count(good) == 1
    assert text.splitlines()[-1].endswith(" bytes in 2 messages")


def test_cli_show_of_a_corrupt_message_says_it_is_corrupt(tmp_path: Path, spool: Spool) -> None:
    qid = put(spool, ["bob@dst.test"])
    corrupt(spool, qid)
    first = spool_cli(tmp_path, spool, "show", qid)  # finds out; moves it to corrupt/
    assert first.returncode == EX_DATAERR
    assert "corrupt/" in first.stderr.decode()
    assert spool.find(qid) == "corrupt"
    again = spool_cli(tmp_path, spool, "show", qid)
    no_traceback(again)
    assert again.returncode == EX_DATAERR, again.stderr
    assert "corrupt" in again.stderr.decode()


# --- help ------------------------------------------------------------------------------------


def test_cli_help(tmp_path: Path) -> None:
    top = cli(tmp_path, "--help")
    assert top.returncode == 0
    text = top.stdout.decode()
    for word in ("serve", "flush", "queue", "show", "delete", "hold", "release", "Exit codes"):
        assert word in text
    assert "67 no" in text.replace("\n", " ")

    flush = cli(tmp_path, "flush", "--help")
    assert flush.returncode == 0
    text = " ".join(flush.stdout.decode().split())
    for phrase in ("--smarthost", "--tls", "--ca-file", "--no-daemon", "daemon", "75"):
        assert phrase in text

    queue = cli(tmp_path, "queue", "--help")
    assert queue.returncode == 0
    text = " ".join(queue.stdout.decode().split())
    for phrase in ("--json", "deferred", "held", "last error"):
        assert phrase in text


def test_cli_spool_states_are_untouched_by_listing(tmp_path: Path, spool: Spool) -> None:
    """Listing and showing never change the spool (only corrupt files are set aside)."""
    qids = [put(spool, [f"u{i}@dst.test"]) for i in range(3)]
    before = {state: spool.ids(state) for state in QueueState}
    assert spool_cli(tmp_path, spool, "queue").returncode == 0
    assert spool_cli(tmp_path, spool, "show", qids[0]).returncode == 0
    assert {state: spool.ids(state) for state in QueueState} == before
    assert os.listdir(spool.root / "status") == []
