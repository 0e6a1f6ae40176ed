"""A directory sync that fails after the rename into the queue: no duplicate, no loss.

The commit renames tmp/QID into queue/ and then fsyncs queue/; only then is the message
durable and answered 250. When that fsync fails, the sender hears a temporary failure
and sends the message again, so the file the rename put in queue/ must go, or the queue
runner delivers it and then the resent one: a duplicate. It is taken back under its
lock (`Spool.take_back`), which every commit (direct, lone or batched) holds from before
the rename to the end of its barrier, so no runner can have the file meanwhile. A file
whose unlink fails too stays, and the failure is still reported, naming the file: a
possible duplicate, never a loss.

The failure is injected where the spool syncs its directories (`Spool.fsync_dir`, and
`Spool.sync_renamed`, the commit's one barrier for the data and the name), as a failing
disk would make fsync(2) or syncfs(2) fail (EIO); the rename before it really happened.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import errno
import fcntl
import io
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from leafmail.config import Config
from leafmail.envelope import Envelope, Recipient
from leafmail.pickup import PickupServer
from leafmail.sendmail import spooling
from leafmail.sendmail.errors import TryLater
from leafmail.sendmail.spooling import Submission
from leafmail.spool import GroupCommitter, Spool, SpoolError, new_id
from leafmail.states import QueueState
from leafmail.submitrate import SubmitRate
from leafmail.submitwire import Refused, socket_path, submit
from netserver.connlog import ServerLog
from netserver.errors import EX_TEMPFAIL

ENV = Envelope(sender="a@src.test", recipients=(Recipient("b@example.test"),))
DATA = b"Subject: hi\r\n\r\nbody\r\n"


class FailingDirSpool(Spool):
    """A real spool whose next fsync of one state directory fails with EIO.

    Only one fsync fails (`Spool.take_back`'s own sync of the directory afterwards
    works); `before_failing` runs just before it fails, with the directory's entries,
    to let a queue runner try the file first.
    """

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.failing: QueueState | None = None
        self.failures = 0
        self.before_failing: Callable[[list[str]], None] | None = None

    def fsync_dir(self, fd: int) -> None:
        self._maybe_fail(fd)
        super().fsync_dir(fd)

    def sync_renamed(self, fds: list[int], dir_fd: int) -> None:
        self._maybe_fail(dir_fd)
        super().sync_renamed(fds, dir_fd)

    def _maybe_fail(self, dir_fd: int) -> None:
        if self.failing is not None and _same_file(dir_fd, self.root / self.failing):
            names = sorted(os.listdir(self.root / self.failing))
            self.failing = None
            self.failures += 1
            if self.before_failing is not None:
                self.before_failing(names)
            raise OSError(errno.EIO, os.strerror(errno.EIO))


def _same_file(fd: int, path: Path) -> bool:
    mine, there = os.fstat(fd), os.stat(path)
    return (mine.st_dev, mine.st_ino) == (there.st_dev, there.st_ino)


def leftovers(spool: Spool) -> dict[str, list[str]]:
    """What each of tmp/ and the state directories holds."""
    return {
        name: sorted(os.listdir(spool.root / name)) for name in ("tmp", *(s for s in QueueState))
    }


def nothing_but(spool: Spool, state: QueueState, qids: list[str]) -> dict[str, list[str]]:
    want: dict[str, list[str]] = {name: [] for name in leftovers(spool)}
    want[state] = sorted(qids)
    return want


@contextlib.contextmanager
def immutable(directory: Path) -> Iterator[None]:
    """Make `directory` immutable (chattr +i, FS_IOC_SETFLAGS) while the block runs: the
    kernel then refuses to unlink anything in it (EPERM), even for root, as a failing or
    read-only file system refuses a removal."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        flags = array.array("l", [0])
        try:
            fcntl.ioctl(fd, _FS_IOC_GETFLAGS, flags, True)
            fcntl.ioctl(fd, _FS_IOC_SETFLAGS, array.array("l", [flags[0] | _IMMUTABLE]), True)
        except OSError as exc:  # tmpfs before Linux 6.0, or no CAP_LINUX_IMMUTABLE
            pytest.skip(f"cannot make {directory} immutable here: {exc.strerror}")
        try:
            yield
        finally:
            fcntl.ioctl(fd, _FS_IOC_SETFLAGS, flags, True)
    finally:
        os.close(fd)


_FS_IOC_GETFLAGS = 0x80086601  # linux/fs.h, for a 64-bit long
_FS_IOC_SETFLAGS = 0x40086602
_IMMUTABLE = 0x10  # FS_IMMUTABLE_FL


def unlink_refused(spool: FailingDirSpool, state: QueueState, stack: contextlib.ExitStack) -> None:
    """Have the next barrier's failure find `state` immutable (until `stack` closes), so
    that the file renamed there cannot be taken back."""

    def freeze(names: list[str]) -> None:
        assert names
        stack.enter_context(immutable(spool.root / state))

    spool.before_failing = freeze


def group_commit(spool: Spool, count: int, *, on_loop: bool = False) -> list[str | BaseException]:
    """`count` sessions committing at once through one GroupCommitter; `on_loop`: its
    owner says one session is open (each commit then runs on the loop)."""
    committer = GroupCommitter(spool, sessions=(lambda: 1) if on_loop else None)

    async def sessions() -> list[str | BaseException]:
        return await asyncio.gather(
            *(committer.commit(ENV, DATA + b"%d\r\n" % i) for i in range(count)),
            return_exceptions=True,
        )

    try:
        return asyncio.run(sessions())
    finally:
        committer.close()


@pytest.mark.parametrize("on_loop", [False, True], ids=["thread", "loop"])
def test_a_lone_commit_whose_queue_sync_fails_is_taken_back(tmp_path: Path, on_loop: bool) -> None:
    """A lone message (lock, rename, one barrier for data and name, in the thread or on
    the loop of a worker's only session): the barrier fails, the session gets SpoolError
    (452), and queue/ holds nothing; the client's resend is then the only copy."""
    spool = FailingDirSpool(tmp_path)
    spool.failing = QueueState.QUEUE
    (failed,) = group_commit(spool, 1, on_loop=on_loop)
    assert isinstance(failed, SpoolError), failed
    assert failed.kept is None and failed.errno == errno.EIO
    assert spool.failures == 1
    assert leftovers(spool) == nothing_but(spool, QueueState.QUEUE, [])

    (resent,) = group_commit(spool, 1, on_loop=on_loop)
    assert isinstance(resent, str)
    assert leftovers(spool) == nothing_but(spool, QueueState.QUEUE, [resent])


def test_a_batch_whose_queue_sync_fails_is_taken_back(tmp_path: Path) -> None:
    """Batches (each file renamed into queue/ under its lock, one barrier a batch):
    every session of the batch whose barrier failed hears SpoolError and has no file in
    queue/; every session that got its queue id has its file there."""
    spool = FailingDirSpool(tmp_path)
    spool.failing = QueueState.QUEUE
    results = group_commit(spool, 30)
    answered = [r for r in results if isinstance(r, str)]
    refused = [r for r in results if isinstance(r, BaseException)]
    assert spool.failures == 1 and refused, results
    assert all(isinstance(r, SpoolError) and r.kept is None for r in refused), refused
    assert leftovers(spool) == nothing_but(spool, QueueState.QUEUE, answered)


@pytest.mark.parametrize("state", [QueueState.QUEUE, QueueState.HOLD])
def test_a_direct_commit_whose_sync_fails_is_taken_back(tmp_path: Path, state: QueueState) -> None:
    """`Spool.commit` (sendmail, bounces, and forwarded copies into hold/) the same way:
    SpoolError (an OSError: exit 75), and no file in `state`."""
    spool = FailingDirSpool(tmp_path)
    spool.failing = state
    with pytest.raises(SpoolError) as raised:
        spool.commit(ENV, DATA, state=state)
    assert raised.value.kept is None and spool.failures == 1
    assert leftovers(spool) == nothing_but(spool, state, [])


def test_a_file_whose_unlink_fails_too_stays_and_the_failure_says_so(tmp_path: Path) -> None:
    """The barrier failed and the unlink that would take the file back fails too: the
    file stays, and the sender still hears 4xx (a 250 for a name the disk did not make
    durable could lose the message; a 4xx can at worst duplicate it). The error names
    the file that stays, for the log."""
    spool = FailingDirSpool(tmp_path)
    spool.failing = QueueState.QUEUE
    with contextlib.ExitStack() as frozen:
        unlink_refused(spool, QueueState.QUEUE, frozen)
        with pytest.raises(SpoolError) as raised:
            spool.commit(ENV, DATA)
    failed = raised.value
    (qid,) = spool.ids()
    assert failed.kept == f"queue/{qid} stays: cannot remove it: Operation not permitted"
    assert failed.strerror is not None and f"queue/{qid} stays" in failed.strerror
    assert "may also be delivered" in failed.strerror
    assert spool.get(qid, QueueState.QUEUE).data.startswith(DATA)  # whole
    assert leftovers(spool) == nothing_but(spool, QueueState.QUEUE, [qid])


@pytest.mark.parametrize("state", [QueueState.QUEUE, QueueState.HOLD])
def test_a_runner_cannot_take_a_direct_commit_before_its_barrier(
    tmp_path: Path, state: QueueState
) -> None:
    """`Spool.commit` locks its file before the rename and keeps the lock until its one
    barrier returned, as the group commit does: a queue runner (or a release from hold/)
    that finds the file meanwhile is refused its lock, so when the barrier fails the
    file is always taken back, and the resend is the only copy."""
    spool = FailingDirSpool(tmp_path)
    runner = Spool(tmp_path, create=False)  # another process's view, with its own locks
    seen: list[QueueState | None] = []

    def runner_tries(names: list[str]) -> None:
        (qid,) = names  # renamed already, not yet durable
        with runner.locked(qid) as where:
            seen.append(where)

    spool.failing = state
    spool.before_failing = runner_tries
    with pytest.raises(SpoolError) as raised:
        spool.commit(ENV, DATA, state=state)
    assert seen == [None]  # the runner skipped it
    assert raised.value.kept is None and spool.failures == 1
    assert leftovers(spool) == nothing_but(spool, state, [])


@pytest.mark.parametrize(
    ("count", "on_loop"), [(1, False), (1, True), (8, False)], ids=["thread", "loop", "batch"]
)
def test_a_runner_cannot_take_a_group_commit_before_its_barrier(
    tmp_path: Path, count: int, on_loop: bool
) -> None:
    """The committer locks each file before the rename into queue/ and keeps the lock
    until its barrier returned: a queue runner that finds the files meanwhile is refused
    their locks (it skips them), so when the barrier fails each file is always taken
    back, and the resend is the only copy. Alone or in a batch."""
    spool = FailingDirSpool(tmp_path)
    runner = Spool(tmp_path, create=False)  # another process's view, with its own locks
    seen: list[QueueState | None] = []

    def runner_tries(names: list[str]) -> None:
        assert names  # renamed already, not yet durable
        for qid in names:
            with runner.locked(qid) as state:
                seen.append(state)

    spool.failing = QueueState.QUEUE
    spool.before_failing = runner_tries
    results = group_commit(spool, count, on_loop=on_loop)
    assert seen and set(seen) == {None}  # the runner skipped every one
    refused = [r for r in results if isinstance(r, SpoolError)]
    assert refused and all(r.kept is None for r in refused), results
    answered = [r for r in results if isinstance(r, str)]
    assert len(answered) + len(refused) == count
    assert leftovers(spool) == nothing_but(spool, QueueState.QUEUE, answered)


@pytest.mark.parametrize("copy_stays", [False, True])
def test_sendmail_says_whether_a_copy_stayed(tmp_path: Path, copy_stays: bool) -> None:
    """`leafmail sendmail` spooling directly exits 75 either way; its line says
    "nothing was queued" only when that is true, else to look at the queue first."""
    spool = FailingDirSpool(tmp_path)
    spool.failing = QueueState.QUEUE
    item = Submission(new_id(), ENV, DATA)
    with contextlib.ExitStack() as frozen, pytest.raises(TryLater) as raised:
        if copy_stays:
            unlink_refused(spool, QueueState.QUEUE, frozen)
        spooling.commit(spool, item)
    text = str(raised.value)
    assert raised.value.exit_code == EX_TEMPFAIL
    if copy_stays:
        assert f"queue/{item.qid} stays" in text and "see `leafmail queue`" in text, text
        assert spool.ids() == [item.qid]
    else:
        assert text.endswith("(nothing was queued; try again later)"), text
        assert spool.ids() == []


def test_the_local_submission_socket_logs_a_spool_failure(tmp_path: Path) -> None:
    """A message handed to the daemon's local submission socket (leafmail.pickup) whose
    commit fails: the submitter hears 75 and "cannot spool", and the operator reads one
    error line with the queue id, the uid and the reason, as the SMTP service writes
    one (tests/reliability/test_disk_full.py); the resend is then the one copy queued."""
    spool = FailingDirSpool(tmp_path / "spool")
    config = Config(hostname="mx.test", spool=str(spool.root)).submit
    log = io.StringIO()
    path = socket_path(spool.root)

    async def submissions() -> tuple[Refused, str]:
        committer = GroupCommitter(spool)
        server = PickupServer(
            config, committer, ServerLog(log, program="leafmail"), rate=SubmitRate(0, 1.0)
        )
        try:
            assert await server.start()
            spool.failing = QueueState.QUEUE
            with pytest.raises(Refused) as refused:
                await asyncio.to_thread(submit_one, path)
            assert spool.failures == 1
            return refused.value, await asyncio.to_thread(submit_one, path)
        finally:
            await server.close()
            committer.close()

    refused, qid = asyncio.run(submissions())
    assert refused.status == EX_TEMPFAIL and "cannot spool" in str(refused), refused
    assert leftovers(spool) == nothing_but(spool, QueueState.QUEUE, [qid])
    (line,) = [line for line in log.getvalue().splitlines() if "the spool failed" in line]
    assert line.startswith("leafmail: error ") and "Input/output error" in line, line
    assert f"uid={os.getuid()}" in line and "qid=" in line and f"qid={qid}" not in line, line


def submit_one(path: Path) -> str:
    """`leafmail sendmail`'s own client: one message through the socket at `path`."""
    return submit(path, ENV, DATA, full_name=None, protocol=None)


class DataFlushWatch(Spool):
    """A real spool that notes, at each flush of a file's data before its rename, which
    state directories hold a name already, and can make that flush fail (EIO)."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.seen: list[dict[str, list[str]]] = []
        self.fail = False

    def make_durable(self, fd: int) -> None:
        self.seen.append(leftovers(self))
        if self.fail:
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        super().make_durable(fd)


def test_a_forwarded_copy_reaches_hold_only_with_its_data_durable(tmp_path: Path) -> None:
    """expansion's recovery takes a copy found in hold/ for a complete one, so a commit
    into hold/ flushes the data while the file is still only in tmp/; when that flush
    fails, nothing is left anywhere. A commit into queue/ has no such flush: its one
    barrier covers data and name (a damaged name there goes to corrupt/ when read)."""
    spool = DataFlushWatch(tmp_path)
    copy = spool.commit(ENV, DATA, new_id(), state=QueueState.HOLD)
    (before,) = spool.seen
    assert before["tmp"] == [copy] and before[QueueState.HOLD] == []
    spool.commit(ENV, DATA)
    assert len(spool.seen) == 1
    spool.fail = True
    with pytest.raises(OSError):
        spool.commit(ENV, DATA, state=QueueState.HOLD)
    assert leftovers(spool)["tmp"] == [] and spool.ids(QueueState.HOLD) == [copy]
