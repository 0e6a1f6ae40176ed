"""The reaper: delivered spool files are freed off the event loop, and nothing leaks.

Closing the last descriptor of an unlinked file frees its blocks, which on a file system
mounted with ``discard`` waits for the disk; the queue runner hands that close to the
reaper, which sends descriptors in batches to its threads. These tests check what the
hand-off must keep: every descriptor given is closed, a batch holds its files until a
thread frees them, the number waiting is bounded, no batch is stranded by a loop that
ended, a forked child has threads of its own, and no descriptor of a removed message
is left open once a flush has ended.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest
from conftest import FakeClock
from smarthost import Smarthost
from test_queue_runner import make_runner, put, spool_is_empty

from leafmail import reaper
from leafmail.reaper import Reaper
from leafmail.spool import Spool


def closed(read_end: int) -> bool:
    """True when the write end of this pipe is closed everywhere (the read sees EOF)."""
    os.set_blocking(read_end, False)
    try:
        return os.read(read_end, 1) == b""
    except BlockingIOError:
        return False


def hand_over(closer: Reaper, fds: list[int]) -> None:
    """Give `fds` to the reaper from a running event loop, as the queue runner does."""

    async def run() -> None:
        for fd in fds:
            closer.close(fd)

    asyncio.run(run())


def test_every_descriptor_handed_over_is_closed_by_stop() -> None:
    pipes = [os.pipe() for _ in range(50)]  # a full batch and a partial one
    closer = Reaper()
    hand_over(closer, [w for _r, w in pipes])
    closer.stop()
    assert all(closed(r) for r, _w in pipes)
    assert closer.closed_at_once == 0
    for r, _w in pipes:
        os.close(r)


def test_a_batch_in_flight_keeps_its_files_open_until_a_thread_frees_it() -> None:
    """The loop's own copy is closed at once; the file lives on in the batch."""
    closer = Reaper(batch=2)
    first, second = os.pipe(), os.pipe()
    hand_over(closer, [first[1], second[1]])  # a full batch: sent
    with pytest.raises(OSError):
        os.fstat(first[1])  # the caller's descriptor is gone
    closer.stop()
    assert closed(first[0]) and closed(second[0])
    os.close(first[0])
    os.close(second[0])


def test_past_the_limit_the_caller_closes_at_once() -> None:
    r, w = os.pipe()
    closer = Reaper(limit=0)
    hand_over(closer, [w])
    assert closed(r)  # no stop(): it was closed before close() returned
    assert closer.closed_at_once == 1
    closer.stop()
    os.close(r)


def test_without_an_event_loop_the_caller_closes_at_once() -> None:
    r, w = os.pipe()
    closer = Reaper()
    closer.close(w)
    assert closed(r)
    closer.stop()
    os.close(r)


def test_a_batch_left_by_an_ended_loop_goes_with_the_next_one() -> None:
    closer = Reaper()
    first = os.pipe()
    hand_over(closer, [first[1]])  # its loop ends before the batch's timer fires
    os.fstat(first[1])  # still pending: the caller's descriptor is open
    second = os.pipe()
    hand_over(closer, [second[1]])  # a new loop: the old batch is sent first
    with pytest.raises(OSError):
        os.fstat(first[1])  # sent: only the batch in flight holds the file now
    closer.stop()
    assert closed(first[0]) and closed(second[0])
    os.close(first[0])
    os.close(second[0])


def test_a_stopped_reaper_starts_again_on_use() -> None:
    closer = Reaper()
    first = os.pipe()
    hand_over(closer, [first[1]])
    closer.stop()
    second = os.pipe()
    hand_over(closer, [second[1]])
    closer.stop()
    assert closed(first[0]) and closed(second[0])
    os.close(first[0])
    os.close(second[0])


@pytest.mark.slow  # forks
def test_a_forked_child_closes_on_threads_of_its_own() -> None:
    closer = Reaper(batch=1)
    warm = os.pipe()
    hand_over(closer, [warm[1]])  # the parent's threads are running
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: the parent's threads do not exist here
        try:
            os.close(r)
            hand_over(closer, [w])
            closer.stop()
            os._exit(0)
        finally:
            os._exit(1)
    os.close(w)  # the parent's copy; EOF then depends on the child's threads
    _pid, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert closed(r)
    closer.stop()
    assert closed(warm[0])
    os.close(r)
    os.close(warm[0])


def open_removed_files(spool: Spool) -> list[str]:
    """This process's descriptors still open on a removed file of `spool`."""
    found = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith(str(spool.root)) and target.endswith("(deleted)"):
            found.append(target)
    return found


def test_a_flush_frees_what_it_removed_before_it_ends(sink: Smarthost, tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    for i in range(20):
        put(spool, [f"bob{i}@dst.test"], f"m{i}")
    runner = make_runner(spool, sink.port, FakeClock())
    assert spool.reaper is reaper.shared()  # the runner frees files off its loop

    summary = asyncio.run(runner.run_once(force=True))  # a flush

    assert summary.counts["delivered"] == 20
    assert spool_is_empty(spool)
    assert open_removed_files(spool) == []  # the flush ended once its batches were freed
