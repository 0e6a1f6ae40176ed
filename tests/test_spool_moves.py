"""Moves between state directories: a crash's second name, and look-ups racing a move.

A message is moved by rename(2) and only the destination directory is fsynced
(`Spool.move`). A crash on a filesystem that writes the two directory changes apart can
leave the file named in both; `settle_duplicates`, run at every start, keeps one, so
it is delivered once (tests/reliability/test_crash_delivery.py proves that with a real
delivery). A look-up (`find`, the queue tools) racing a move by another thread or
process must still find the message: it is in exactly one directory at every instant.
"""

from __future__ import annotations

import fcntl
import os
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
from lifecycle_handlers import wait_for_flock_waiter

from leafmail import tools
from leafmail.envelope import Envelope, Recipient
from leafmail.forwards import settle_parent
from leafmail.message import unfreeze
from leafmail.spool import CorruptMessage, Spool, new_id
from leafmail.states import QueueState
from leafmail.status import TargetMark, TargetState

ENV = Envelope(sender="a@src.test", recipients=(Recipient("b@example.test"),))
DATA = b"Subject: hi\r\n\r\nbody\r\n"
MOVES = 400  # moves of one message per race test; each waits for a directory fsync


def names(spool: Spool, qid: str) -> list[QueueState]:
    """Every state directory that names `qid`."""
    return [state for state in QueueState if spool.path(state, qid).exists()]


def crash_mid_move(spool: Spool, qid: str, src: QueueState, dst: QueueState) -> None:
    """What a crash can leave of rename(src, dst): the file named in both (one inode)."""
    os.link(spool.path(src, qid), spool.path(dst, qid))


@pytest.mark.parametrize(
    ("first", "second", "kept"),
    [
        (QueueState.QUEUE, QueueState.DEFERRED, QueueState.DEFERRED),
        (QueueState.DEFERRED, QueueState.QUEUE, QueueState.DEFERRED),
        (QueueState.HOLD, QueueState.QUEUE, QueueState.HOLD),
        (QueueState.DEFERRED, QueueState.HOLD, QueueState.HOLD),
        (QueueState.QUEUE, QueueState.CORRUPT, QueueState.CORRUPT),
    ],
)
def test_a_message_named_in_two_states_keeps_one(
    tmp_path: Path, first: QueueState, second: QueueState, kept: QueueState
) -> None:
    spool = Spool(tmp_path)
    qid = spool.commit(ENV, DATA, state=first)
    other = spool.commit(ENV, DATA)  # a message alone is left alone
    crash_mid_move(spool, qid, first, second)
    spool.write_status(qid, b"record")  # one status per message, whichever name stays
    assert set(names(spool, qid)) == {first, second}

    lost = QueueState(({first, second} - {kept}).pop())
    assert spool.settle_duplicates() == [(qid, lost)]
    assert names(spool, qid) == [kept]
    assert names(spool, other) == [QueueState.QUEUE]
    assert spool.read_status(qid) == b"record"
    assert spool.settle_duplicates() == []  # nothing left to settle


def test_separate_copies_in_three_states_keep_the_last(tmp_path: Path) -> None:
    """Copies that are different files (restored by hand, say) are settled alike."""
    spool = Spool(tmp_path)
    qid = spool.commit(ENV, DATA)
    blob = spool.path(QueueState.QUEUE, qid).read_bytes()
    for state in (QueueState.DEFERRED, QueueState.HOLD):
        spool.path(state, qid).write_bytes(blob)
    removed = spool.settle_duplicates()
    assert set(removed) == {(qid, QueueState.QUEUE), (qid, QueueState.DEFERRED)}
    assert names(spool, qid) == [QueueState.HOLD]
    assert spool.get(qid).data == DATA


def test_a_locked_duplicate_is_left_for_the_next_start(tmp_path: Path) -> None:
    """Never remove a name from under a runner or tool that holds the message."""
    spool = Spool(tmp_path)
    qid = spool.commit(ENV, DATA)
    spool.path(QueueState.DEFERRED, qid).write_bytes(spool.path(QueueState.QUEUE, qid).read_bytes())
    other = Spool(tmp_path, create=False)  # another process's view, with its own lock
    with other.locked(qid) as state:
        assert state is QueueState.QUEUE
        assert spool.settle_duplicates() == []
    assert set(names(spool, qid)) == {QueueState.QUEUE, QueueState.DEFERRED}
    assert spool.settle_duplicates() == [(qid, QueueState.QUEUE)]


class Mover(threading.Thread):
    """Moves one message around the states, as the runner and the tools do (under its
    lock, with Spool.move), `MOVES` times, then puts it back in hold/."""

    ROUND = (QueueState.QUEUE, QueueState.DEFERRED, QueueState.HOLD)

    def __init__(self, root: Path, qid: str) -> None:
        super().__init__(daemon=True)
        self.spool = Spool(root, create=False)
        self.qid = qid
        self.moves = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            while self.moves < MOVES:
                with self.spool.locked(self.qid, wait=True) as state:
                    assert state is not None, "the mover lost its message"
                    target = self.ROUND[(self.ROUND.index(state) + 1) % len(self.ROUND)]
                    self.spool.move(self.qid, state, target)
                    self.moves += 1
        except BaseException as exc:
            self.error = exc


def race(tmp_path: Path, look: Callable[[Spool, str], bool]) -> tuple[int, int]:
    """Run `look(spool, qid)` while a mover moves the message; (looks, misses)."""
    spool = Spool(tmp_path)
    qid = spool.commit(ENV, DATA, state=QueueState.HOLD)
    mover = Mover(tmp_path, qid)
    looks = misses = 0
    mover.start()
    while mover.is_alive():
        looks += 1
        misses += not look(spool, qid)
    mover.join()
    assert mover.error is None, mover.error
    assert mover.moves == MOVES and looks >= 20  # the looks overlapped the moves
    return looks, misses


def test_find_never_misses_a_message_that_moves(tmp_path: Path) -> None:
    looks, misses = race(tmp_path, lambda spool, qid: spool.find(qid) is not None)
    assert misses == 0, f"{misses} of {looks} look-ups missed the moving message"


def test_the_queue_tools_find_a_message_that_moves(tmp_path: Path) -> None:
    """show, hold and release each find it, wherever the mover has put it."""

    def use(spool: Spool, qid: str) -> bool:
        try:
            info, data = tools.show(spool, qid)
            assert data == DATA and info["id"] == qid
            tools.hold(spool, qid)
            tools.release(spool, qid)
        except tools.NoSuchMessage:
            return False
        return True

    looks, misses = race(tmp_path, use)
    assert misses == 0, f"{misses} of {looks} tool runs missed the moving message"


# --- every mover holds the message's lock ------------------------------------------------
# `settle_duplicates` unlinks a crash's second name only after it has locked both names and
# checked that each still names the locked file, and `locked` trusts that a file does not
# move while its lock is held: both rest on every move or removal of a committed file
# taking that lock. The commit's renames out of tmp/ need none (a new id, known to nobody
# and under no other name); these are the movers that did not take it.


def damage(spool: Spool, qid: str, state: QueueState) -> None:
    path = spool.path(state, qid)
    path.write_bytes(path.read_bytes().replace(b"body", b"BODY"))


@pytest.mark.parametrize("reader", ["get", "summary"])
def test_a_damaged_file_someone_holds_is_left_to_them(tmp_path: Path, reader: str) -> None:
    """`leafmail show` or a listing that finds a file damaged moves it to corrupt/ only
    under its lock: not from under a tool or `settle_duplicates` holding it (the holder
    would then act on a name that is gone); the next reader moves it."""
    spool = Spool(tmp_path)
    qid = spool.commit(ENV, DATA)
    damage(spool, qid, QueueState.QUEUE)
    holder = Spool(tmp_path, create=False)  # another process's view, with its own lock

    def read() -> None:
        if reader == "get":
            spool.get(qid)
        else:
            spool.summary(qid, QueueState.QUEUE)

    with holder.locked(qid) as state:
        assert state is QueueState.QUEUE
        with pytest.raises(CorruptMessage):
            read()
        assert names(spool, qid) == [QueueState.QUEUE]
    with pytest.raises(CorruptMessage):
        read()
    assert names(spool, qid) == [QueueState.CORRUPT]


def forwarded_to_hold(spool: Spool) -> tuple[str, str]:
    """A message whose alias expansion forwarded a copy: the copy complete in hold/ and
    recorded FORWARDED, not yet released (a crash between steps 3 and 4 of
    leafmail.expansion). Returns (parent, copy)."""
    parent = spool.commit(ENV, DATA)
    copy = new_id()
    status = unfreeze(spool, parent).status
    rcpt = status.recipients[0]
    mark = TargetMark("forward:c@far.test", TargetState.FORWARDED, qid=copy)
    status = status.with_recipient(0, type(rcpt)(targets=(mark,)))
    spool.write_status(parent, status.to_bytes())
    copy_env = Envelope(ENV.sender, (Recipient("c@far.test"),), forward_of=parent)
    spool.commit(copy_env, DATA, copy, state=QueueState.HOLD)
    return parent, copy


def test_releasing_a_forwarded_copy_waits_for_the_copy_lock(tmp_path: Path) -> None:
    """The release of a forwarded copy from hold/ (its parent's record settled, here by
    the queue manager's start) holds the parent's lock, and now the copy's too: while
    another process holds the copy, the release waits in flock(2), then moves it."""
    spool = Spool(tmp_path)
    parent, copy = forwarded_to_hold(spool)
    holder = Spool(tmp_path, create=False)
    released: list[list[str]] = []
    settler = threading.Thread(target=lambda: released.append(settle_parent(spool, parent)))
    with holder.locked(copy) as state:
        assert state is QueueState.HOLD
        settler.start()
        inode = spool.path(QueueState.HOLD, copy).stat().st_ino
        wait_for_flock_waiter(os.getpid(), inode)
        assert names(spool, copy) == [QueueState.HOLD]
    settler.join(10)
    assert not settler.is_alive() and released == [[copy]]
    assert names(spool, copy) == [QueueState.QUEUE]


def test_deleting_a_corrupt_file_waits_for_its_lock(tmp_path: Path) -> None:
    """`leafmail delete` of a file in corrupt/ (which `locked` never yields) takes the
    file's lock itself, so it does not unlink it from under `settle_duplicates`."""
    spool = Spool(tmp_path)
    qid = spool.commit(ENV, DATA, state=QueueState.CORRUPT)
    path = spool.path(QueueState.CORRUPT, qid)
    deleter = threading.Thread(target=tools.delete, args=(spool, qid))
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # as `settle_duplicates` locks both names
        deleter.start()
        wait_for_flock_waiter(os.getpid(), path.stat().st_ino)
        assert names(spool, qid) == [QueueState.CORRUPT]
    finally:
        os.close(fd)
    deleter.join(10)
    assert not deleter.is_alive() and names(spool, qid) == []
