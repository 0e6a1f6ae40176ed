"""Listing streams in bounded memory, on several workers too; junk and symlinks in the
spool are listed and deleted without a traceback and are never followed.

Real spools on disk (thousands of files written with the Spool API), real symlinks to a
file outside the spool, and the real `leafmail` CLI as a subprocess.
"""

from __future__ import annotations

import json
import os
import tracemalloc
from pathlib import Path
from typing import TextIO, cast

import pytest
from smarthost import Smarthost
from test_queue_tools import deliver_pass, envelope, no_traceback, put, spool_cli

from leafmail import fanout, listing
from leafmail.selection import Selection
from leafmail.spool import Spool, encode, new_id
from leafmail.states import QueueState
from netserver.errors import EX_CANTCREAT, EX_DATAERR


def fill(spool: Spool, count: int, state: QueueState = QueueState.QUEUE) -> list[str]:
    """`count` real messages, written and renamed into `state` in batches (one directory
    sync a batch: a fixture, not a commit)."""
    qids: list[str] = []
    blob = encode(envelope(["bob@dst.test", "carol@dst.test"]), b"Subject: s\r\n\r\nhi\r\n")
    while len(qids) < count:
        batch = [new_id() for _ in range(min(500, count - len(qids)))]
        for qid in batch:
            os.close(spool.write_tmp(qid, blob))
            os.rename(spool.root / "tmp" / qid, spool.path(state, qid))
        spool.sync_dir(state)
        qids += batch
    return qids


class Sink:
    """A text stream that keeps only a count of what it was given (and a hook)."""

    def __init__(self, on_first_write: object = None) -> None:
        self.chars = 0
        self.writes = 0
        self.on_first_write = on_first_write

    def write(self, text: str) -> int:
        if not self.writes and callable(self.on_first_write):
            self.on_first_write()
        self.writes += 1
        self.chars += len(text)
        return len(text)

    def flush(self) -> None:
        pass


def peak_listing_memory(spool: Spool) -> int:
    tracemalloc.start()
    try:
        listing.write_json(listing.iter_queue(spool), cast(TextIO, Sink()))
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


# --- streaming -------------------------------------------------------------------------------


def test_listing_memory_does_not_grow_with_the_queue(tmp_path: Path) -> None:
    small, big = Spool(tmp_path / "small"), Spool(tmp_path / "big")
    fill(small, 300)
    fill(big, 2400)
    small_peak, big_peak = peak_listing_memory(small), peak_listing_memory(big)
    # Eight times the messages: the peak is that of one batch of output either way
    # (a listing that kept its entries would need about a kilobyte more per message).
    assert big_peak < small_peak * 1.25 + 64 * 1024, (small_peak, big_peak)
    assert big_peak < 1024 * 1024


@pytest.mark.parametrize("workers", [1, 2])
def test_output_starts_before_the_last_file_is_read(tmp_path: Path, workers: int) -> None:
    """At the first write every message file is deleted: a listing that had read them all
    before printing would still list them all."""
    spool = Spool(tmp_path / "spool")
    qids = fill(spool, 3000)

    def delete_everything() -> None:
        for qid in qids:
            spool.path(QueueState.QUEUE, qid).unlink()

    sink = Sink(on_first_write=delete_everything)
    count = fanout.write_listing(
        spool, Selection(), cast(TextIO, sink), as_json=True, workers=workers
    )
    assert 0 < count < len(qids) * 0.75, count
    assert spool.ids(QueueState.QUEUE) == []


def test_workers_list_exactly_what_one_process_lists(tmp_path: Path, spool: Spool) -> None:
    qids = (
        fill(spool, 700) + fill(spool, 300, QueueState.DEFERRED) + fill(spool, 50, QueueState.HOLD)
    )
    outputs = []
    for jobs in ("1", "3"):
        proc = spool_cli(tmp_path, spool, "queue", "--json", "--jobs", jobs)
        assert proc.returncode == 0, proc.stderr
        outputs.append(sorted(json.dumps(m, sort_keys=True) for m in json.loads(proc.stdout)))
    assert outputs[0] == outputs[1]
    assert sorted(json.loads(m)["id"] for m in outputs[1]) == sorted(qids)
    text = spool_cli(tmp_path, spool, "queue", "--jobs", "2").stdout.decode()
    assert text.splitlines()[-1].endswith(" bytes in 1050 messages")
    assert text.startswith("Queue ID ") and text.count("Queue ID") == 1


# --- junk and symlinks -------------------------------------------------------------------------


@pytest.fixture
def secret(tmp_path: Path) -> Path:
    """A file outside the spool that a symlink in the spool points to."""
    path = tmp_path / "outside" / "secret"
    path.parent.mkdir()
    path.write_bytes(b"not for the spool\n")
    return path


def plant(spool: Spool, secret: Path) -> dict[str, str]:
    """Junk of every kind in the state directories; returns ref -> expected reason word."""
    link_id = new_id()
    (spool.root / "queue" / link_id).symlink_to(secret)
    (spool.root / "deferred" / "evil-link").symlink_to(secret)
    (spool.root / "queue" / "garbage.txt").write_bytes(b"junk")
    (spool.root / "hold" / "adir").mkdir()
    (spool.root / "queue" / "bad\x1b[31mname").write_bytes(b"x")
    undecodable = os.path.join(os.fsencode(spool.root / "queue"), b"\xff\xfe")
    os.close(os.open(undecodable, os.O_CREAT | os.O_WRONLY, 0o600))
    return {
        f"queue/{link_id}": "symbolic link",
        "deferred/evil-link": "symbolic link",
        "queue/garbage.txt": "not a queue file name",
        "hold/adir": "directory",
        "queue/bad\x1b[31mname": "not a queue file name",
        "queue/\udcff\udcfe": "not a queue file name",
    }


def test_spool_never_takes_a_symlink_for_a_message(spool: Spool, secret: Path) -> None:
    good = put(spool, ["bob@dst.test"])
    link = next(ref for ref in plant(spool, secret) if ref.startswith("queue/1"))
    link_id = link.partition("/")[2]
    assert spool.ids(QueueState.QUEUE) == [good]
    assert spool.find(link_id) is None
    junk = spool.junk(QueueState.QUEUE, link_id)
    assert junk is not None and "symbolic link" in junk.why
    assert junk.size == len(str(secret))  # the link's own size, not the target's


def test_queue_lists_junk_without_following_it(tmp_path: Path, spool: Spool, secret: Path) -> None:
    good = put(spool, ["bob@dst.test"])
    planted = plant(spool, secret)
    proc = spool_cli(tmp_path, spool, "queue", "--json")
    assert proc.returncode == 0, proc.stderr
    no_traceback(proc)
    listed = {m["id"]: m for m in json.loads(proc.stdout)}
    assert set(listed) == {good, *planted}
    for ref, why in planted.items():
        assert listed[ref]["state"] == "junk"
        assert why in listed[ref]["last_error"]
    assert listed[good]["state"] == "active"

    # The footer counts one message and its bytes; the junk apart, as what it is (before,
    # "in 7 messages", the six stray entries and their sizes included). One process and
    # forked workers alike (junk is worker 0's share).
    footer = (
        f"-- {listed[good]['size']} bytes in 1 message, {len(planted)} junk entries"
        " (not messages; `leafmail delete --junk` removes them)"
    )
    for jobs in ("1", "2"):
        proc = spool_cli(tmp_path, spool, "queue", "--jobs", jobs)
        assert proc.returncode == 0, proc.stderr
        text = proc.stdout.decode()
        assert "\x1b" not in text and "queue/bad\\x1b[31mname" in text
        assert "queue/\\udcff\\udcfe" in text
        *entries, last = text.splitlines()
        assert sum(" junk " in line for line in entries) == len(planted)
        assert last == footer, jobs
    assert secret.read_bytes() == b"not for the spool\n"


def test_tools_refuse_a_symlink_and_delete_removes_only_the_link(
    tmp_path: Path, spool: Spool, secret: Path
) -> None:
    planted = plant(spool, secret)
    link_ref = next(ref for ref in planted if ref.startswith("queue/1"))
    link_id = link_ref.partition("/")[2]
    for command in ("show", "hold", "release", "requeue"):
        proc = spool_cli(tmp_path, spool, command, link_id)
        assert proc.returncode == EX_DATAERR, (command, proc)
        no_traceback(proc)
        assert "symbolic link" in proc.stderr.decode()
        assert f"leafmail delete {link_ref}" in proc.stderr.decode()
    assert (spool.root / "queue" / link_id).is_symlink()

    proc = spool_cli(tmp_path, spool, "delete", link_id, "deferred/evil-link")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.decode().splitlines() == [
        f"{link_ref}: deleted",
        "deferred/evil-link: deleted",
        "-- 0 messages deleted, 2 junk entries deleted",  # not "2 messages": none was one
    ]
    assert not os.path.lexists(spool.root / "queue" / link_id)
    assert not os.path.lexists(spool.root / "deferred" / "evil-link")
    assert secret.read_bytes() == b"not for the spool\n"


def test_delete_junk_removes_every_junk_entry(tmp_path: Path, spool: Spool, secret: Path) -> None:
    good = put(spool, ["bob@dst.test"])
    planted = plant(spool, secret)
    proc = spool_cli(tmp_path, spool, "delete", "--junk")
    assert proc.returncode == 0, proc.stderr
    no_traceback(proc)
    last = f"-- 0 messages deleted, {len(planted)} junk entries deleted"
    assert proc.stdout.decode().splitlines()[-1] == last
    for state in ("queue", "deferred", "hold", "corrupt"):
        assert [n for n in os.listdir(spool.root / state) if n != good] == []
    assert spool.find(good) == "queue"
    assert secret.read_bytes() == b"not for the spool\n"


def test_delete_counts_messages_and_junk_apart(tmp_path: Path, spool: Spool, secret: Path) -> None:
    good = put(spool, ["bob@dst.test"])
    plant(spool, secret)
    proc = spool_cli(tmp_path, spool, "delete", good, "deferred/evil-link")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.decode().splitlines() == [
        f"{good}: deleted",
        "deferred/evil-link: deleted",
        "-- 1 message deleted, 1 junk entry deleted",
    ]
    assert spool.find(good) is None


def test_a_junk_directory_that_is_not_empty_is_reported(tmp_path: Path, spool: Spool) -> None:
    (spool.root / "queue" / "full").mkdir()
    (spool.root / "queue" / "full" / "inside").write_bytes(b"kept")
    proc = spool_cli(tmp_path, spool, "delete", "queue/full")
    assert proc.returncode == EX_CANTCREAT
    no_traceback(proc)
    assert proc.stderr.decode() == "leafmail: queue/full: cannot delete: Directory not empty\n"
    assert (spool.root / "queue" / "full" / "inside").read_bytes() == b"kept"


def test_the_runner_passes_over_a_symlink(spool: Spool, sink: Smarthost, secret: Path) -> None:
    good = put(spool, ["bob@dst.test"])
    plant(spool, secret)
    deliver_pass(spool, sink.port)
    assert spool.find(good) is None
    assert [got.recipients for got in sink.received] == [["bob@dst.test"]]
    assert secret.read_bytes() == b"not for the spool\n"


def test_json_lines_are_exact_json() -> None:
    """The hand-written JSON line is what json.dumps writes, odd characters included."""
    odd = 'q"uote\\back\x1b[31m\u00e9\u2028\udcff'
    rcpts = [{"address": f"{odd}@dst.test", "state": "deferred", "reply": odd}]
    for entry, expected in (
        (
            listing.QueueEntry("A" * 24, "deferred", 12, 1.5, odd, rcpts, odd, 2.25),
            {
                "id": "A" * 24,
                "state": "deferred",
                "size": 12,
                "arrival": 1.5,
                "sender": odd,
                "recipients": rcpts,
                "last_error": odd,
                "next_attempt": 2.25,
            },
        ),
        (
            listing.QueueEntry("queue/x", "junk", 0, 1e9, "", [], "", 0),
            {
                "id": "queue/x",
                "state": "junk",
                "size": 0,
                "arrival": 1e9,
                "sender": "",
                "recipients": [],
                "last_error": "",
                "next_attempt": None,
            },
        ),
    ):
        assert entry.json() == json.dumps(expected)
        assert json.loads(entry.json()) == expected
