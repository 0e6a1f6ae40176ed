"""The spool: format, self-check, permissions, and group commit over a real directory."""

from __future__ import annotations

import asyncio
import errno
import fcntl
import os
import stat
import subprocess
import sys
import threading
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from leafmail import spool as spool_module
from leafmail.envelope import ClientInfo, Envelope, EnvelopeError, Recipient
from leafmail.spool import (
    LOOP_WRITE_MAX,
    CorruptMessage,
    GroupCommitter,
    Spool,
    SpoolError,
    decode,
    encode,
    new_id,
    valid_id,
)
from leafmail.states import QueueState

ENV = Envelope(
    sender="a@src.test",
    recipients=(Recipient("b@example.test", ("SUCCESS", "FAILURE"), "rfc822;b@example.test"),),
    client=ClientInfo("127.0.0.1", 40000, "client.test", "ESMTPS", "TLSv1.3", None),
    received="2026-11-25T21:00:00Z",
    body="8BITMIME",
)
DATA = b"Subject: hi\r\n\r\nbody \xc3\xa9\r\n"


def test_commit_and_get_round_trip(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    qid = spool.commit(ENV, DATA)
    msg = spool.get(qid)
    assert (msg.qid, msg.state, msg.envelope, msg.data) == (qid, "queue", ENV, DATA)
    assert spool.ids() == [qid]
    assert os.listdir(tmp_path / "tmp") == []


def test_files_are_private(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    qid = spool.commit(ENV, DATA)
    assert stat.S_IMODE(os.stat(tmp_path / "queue" / qid).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(tmp_path / "queue").st_mode) == 0o700


def test_write_tmp_never_follows_a_link(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    target = tmp_path / "victim"
    target.write_bytes(b"untouched")
    qid = new_id()
    os.symlink(target, tmp_path / "tmp" / qid)
    with pytest.raises(FileExistsError):
        spool.write_tmp(qid, b"x")
    assert target.read_bytes() == b"untouched"


def _damage(blob: bytes, how: str) -> bytes:
    if how == "truncated":
        return blob[:-5]
    if how == "padded":
        return blob + b"x"
    if how == "flipped":
        i = blob.index(b"body")
        return blob[:i] + b"B" + blob[i + 1 :]
    if how == "magic":
        return b"PICKLE" + blob[16:]
    if how == "empty":
        return b""
    raise AssertionError(how)


@pytest.mark.parametrize("how", ["truncated", "padded", "flipped", "magic", "empty"])
def test_damaged_file_moves_to_corrupt(tmp_path: Path, how: str) -> None:
    spool = Spool(tmp_path)
    qid = spool.commit(ENV, DATA)
    path = tmp_path / "queue" / qid
    path.write_bytes(_damage(path.read_bytes(), how))
    with pytest.raises(CorruptMessage):
        spool.get(qid)
    assert spool.ids(QueueState.QUEUE) == []
    assert spool.ids(QueueState.CORRUPT) == [qid]
    with pytest.raises(KeyError):
        spool.get(qid)


def test_messages_reports_corrupt_files_without_raising(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    good = spool.commit(ENV, DATA)
    bad = spool.commit(ENV, DATA)
    (tmp_path / "queue" / bad).write_bytes(b"garbage")
    results = list(spool.messages())
    assert [r.qid for r in results if not isinstance(r, CorruptMessage)] == [good]
    assert sum(isinstance(r, CorruptMessage) for r in results) == 1


def test_envelope_json_is_strict_about_what_it_knows() -> None:
    data = ENV.to_json()
    assert Envelope.from_json(data) == ENV
    with pytest.raises(EnvelopeError, match=r"envelope record .* \(no envid\)"):
        Envelope.from_json({k: v for k, v in data.items() if k != "envid"})
    with pytest.raises(EnvelopeError, match=r"client record .* \(no auth, protocol, tls\)"):
        Envelope.from_json({**data, "client": {"ip": None, "port": None, "helo": None}})
    with pytest.raises(EnvelopeError):
        Envelope.from_json({**data, "recipients": []})
    with pytest.raises(EnvelopeError):
        Envelope.from_json({**data, "smtputf8": "yes"})
    with pytest.raises(EnvelopeError):
        Envelope.from_json({**data, "forward_of": 7})


# What a newer leafmail may add (the compatibility rule in leafmail.envelope's docstring):
# a key in the envelope, in its client record and in a recipient's.
NEWER_KEYS = {"requeued_by": "ops"}
NEWER_CLIENT_KEYS = {"asn": 64496}
NEWER_RECIPIENT_KEYS = {"rrvs": "2026-12-01T00:00:00Z"}


def newer(data: dict[str, Any]) -> dict[str, Any]:
    """`data` (an envelope's JSON) with keys only a newer leafmail writes."""
    return {
        **data,
        **NEWER_KEYS,
        "client": {**data["client"], **NEWER_CLIENT_KEYS},
        "recipients": [{**r, **NEWER_RECIPIENT_KEYS} for r in data["recipients"]],
    }


class NewerEnvelope(Envelope):
    """An envelope as a newer leafmail would spool it (through the real commit)."""

    def to_json(self) -> dict[str, Any]:
        return newer(super().to_json())


def test_keys_a_newer_leafmail_added_are_passed_over() -> None:
    assert Envelope.from_json(newer(ENV.to_json())) == ENV
    copy = Envelope(ENV.sender, ENV.recipients, forward_of=new_id())
    assert Envelope.from_json(newer(copy.to_json())) == copy


def test_a_spool_file_from_a_newer_leafmail_is_delivered_not_corrupt(tmp_path: Path) -> None:
    """After a downgrade: the file a newer version committed (the same format, keys this
    version does not know) is read by the runner's scan, left in queue/, and its bytes
    stay as they were, so the newer version finds its keys again after an upgrade."""
    spool = Spool(tmp_path)
    qid = spool.commit(NewerEnvelope(ENV.sender, ENV.recipients, ENV.client, ENV.received), DATA)
    blob = (tmp_path / "queue" / qid).read_bytes()
    assert b'"requeued_by":"ops"' in blob and b'"rrvs"' in blob and b'"asn":64496' in blob
    (msg,) = list(spool.messages())
    assert not isinstance(msg, CorruptMessage), msg
    assert (msg.qid, msg.envelope, msg.data) == (qid, replace(ENV, body="7BIT"), DATA)
    assert spool.ids(QueueState.CORRUPT) == []
    assert (tmp_path / "queue" / qid).read_bytes() == blob


def test_an_unknown_key_does_not_weaken_the_checksum(tmp_path: Path) -> None:
    """A newer file whose unknown key was changed after the commit fails its checksum
    and goes to corrupt/, as any damaged file does."""
    spool = Spool(tmp_path)
    qid = spool.commit(NewerEnvelope(ENV.sender, ENV.recipients), DATA)
    path = tmp_path / "queue" / qid
    path.write_bytes(path.read_bytes().replace(b'"requeued_by":"ops"', b'"requeued_by":"xyz"'))
    with pytest.raises(CorruptMessage, match="checksum mismatch"):
        spool.get(qid)
    assert spool.ids(QueueState.CORRUPT) == [qid]


def test_a_newer_spool_format_is_refused(tmp_path: Path) -> None:
    """A key that must not be ignored comes with a new format; this reader refuses it."""
    spool = Spool(tmp_path)
    qid = spool.commit(ENV, DATA)
    path = tmp_path / "queue" / qid
    path.write_bytes(path.read_bytes().replace(b"LEAFMAIL-SPOOL/1 ", b"LEAFMAIL-SPOOL/2 ", 1))
    with pytest.raises(CorruptMessage, match="unknown version"):
        spool.get(qid)


def test_decode_rejects_bad_envelope_json() -> None:
    blob = encode(ENV, DATA)
    assert decode(blob) == (ENV, DATA)
    with pytest.raises(ValueError):
        decode(blob.replace(b'"sender"', b'"sendr!"'))


def test_ids_are_safe_names() -> None:
    assert valid_id(new_id())
    for bad in ("../etc/passwd", "", "x" * 24, new_id() + "/"):
        assert not valid_id(bad)


def test_clean_tmp_removes_crash_leftovers(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    os.close(spool.write_tmp(new_id(), b"half a message"))
    assert spool.clean_tmp() == 1
    assert os.listdir(tmp_path / "tmp") == []


def test_clean_tmp_leaves_a_commit_in_progress_alone(tmp_path: Path) -> None:
    """A daemon starting cleans tmp/ while another process may be committing there (a
    `leafmail sendmail` or `flush --no-daemon` that found no daemon, a moment before):
    its file, written and not yet renamed, is locked and must stay, or its rename fails
    and the mail it was spooling is refused (sendmail exits 75, its caller may drop it)."""
    spool = Spool(tmp_path)
    envelope = Envelope("a@b.test", (Recipient("c@d.test"),))
    qid = new_id()
    fd = spool.write_tmp(qid, encode(envelope, b"Subject: x\r\n\r\nbody\r\n"))
    try:
        assert spool.clean_tmp() == 0
        assert spool.tmp_leftovers() == []  # (not a name kept for e2fsck)
        os.rename(tmp_path / "tmp" / qid, spool.path(QueueState.QUEUE, qid))
    finally:
        os.close(fd)
    assert spool.get(qid).envelope == envelope
    os.close(spool.write_tmp(new_id(), b"half a message"))  # a writer that died
    assert spool.clean_tmp() == 1


def test_clean_tmp_leaves_a_file_just_created_and_not_yet_locked_alone(tmp_path: Path) -> None:
    """`write_tmp` creates its file, then locks it: a daemon starting between the two
    found it unlocked and removed it (or held its lock that moment, and the writer's
    LOCK_NB failed), and the commit failed. Still empty, it is a file being created:
    clean_tmp takes no lock on it and leaves it; the writer's lock then comes."""
    spool = Spool(tmp_path)
    qid = new_id()
    fd = os.open(tmp_path / "tmp" / qid, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        assert spool.clean_tmp() == 0
        assert os.listdir(tmp_path / "tmp") == [qid]
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # the writer's next step
    finally:
        os.close(fd)


def _commit_many(committer: GroupCommitter, count: int) -> list[str]:
    """Commit `count` different messages at once from one loop, then close the committer."""

    async def many() -> list[str]:
        return await asyncio.gather(
            *(committer.commit(ENV, DATA + b"%d" % i) for i in range(count))
        )

    try:
        return asyncio.run(many())
    finally:
        committer.close()


def test_group_commit_shares_syncs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Batches share their barriers, and `Spool.syncs` counts every barrier system call
    the commits made (fdatasync, fsync, syncfs: each a flush of the disk's cache), not
    one a batch whatever the file system needed."""
    spool = _WatchedSpool(tmp_path, slow=True)
    committer = GroupCommitter(spool)
    trail = _Trail(monkeypatch, tmp_path)

    qids = _commit_many(committer, 200)
    assert len(set(qids)) == 200
    assert sorted(qids) == spool.ids()
    assert committer.committed == 200
    assert committer.batches == len(spool.barriers) < 200
    made = [step for _, step in trail.steps if step != "rename"]
    assert made == [step for files in spool.barriers for step in _one_barrier(spool, files)]
    assert spool.syncs == len(made)
    if spool_module._SYNCFS_CHECKED:  # else each file's fdatasync, and the directory's
        assert len(made) <= 2 * committer.batches
    bodies = {spool.get(q).data for q in qids}
    assert bodies == {DATA + b"%d" % i for i in range(200)}


class _WatchedSpool(Spool):
    """Records which thread writes each file and the files each barrier covers.

    With `slow` each barrier lasts until two more files were written (or 0.2 s passed:
    the last ones), as a disk's flush outlasts the next messages' arrival under load.
    Whether batches form then does not depend on how fast the test's file system
    flushes: on an idle disk, with a lone message's one fsync, the thread could keep up
    with the loop, and every batch was a batch of one.
    """

    def __init__(self, root: Path, *, slow: bool = False) -> None:
        super().__init__(root)
        self.writers: set[str] = set()
        self.barriers: list[int] = []
        self._slow = slow
        self._written = 0
        self._wrote = threading.Condition()

    def write_tmp(self, qid: str, blob: bytes, tmp_dir: int | None = None) -> int:
        self.writers.add(threading.current_thread().name)
        with self._wrote:
            self._written += 1
            self._wrote.notify_all()
        return super().write_tmp(qid, blob, tmp_dir)

    def sync_renamed(self, fds: list[int], dir_fd: int) -> None:
        self.barriers.append(len(fds))  # a batch's one barrier (data and names)
        if self._slow:
            with self._wrote:
                target = self._written + 2
                self._wrote.wait_for(lambda: self._written >= target, timeout=0.2)
        super().sync_renamed(fds, dir_fd)


def test_group_commit_writes_in_the_loop_and_syncs_per_batch(tmp_path: Path) -> None:
    """The session's loop writes the file (its threads would take the interpreter lock
    once per message); the thread makes a whole batch durable with one call."""
    spool = _WatchedSpool(tmp_path, slow=True)
    committer = GroupCommitter(spool)

    qids = _commit_many(committer, 50)
    assert spool.writers == {threading.main_thread().name}
    assert sum(spool.barriers) == 50 and len(spool.barriers) == committer.batches < 50
    assert sorted(qids) == spool.ids() and os.listdir(tmp_path / "tmp") == []


def test_group_commit_writes_a_big_message_off_the_loop(tmp_path: Path) -> None:
    """Checksumming and writing grow with what the client sent: past LOOP_WRITE_MAX they
    run in a thread, so the loop's other sessions do not wait for them."""
    spool = _WatchedSpool(tmp_path)
    committer = GroupCommitter(spool)
    big = b"x" * (LOOP_WRITE_MAX + 1)
    try:
        qid = asyncio.run(committer.commit(ENV, big))
    finally:
        committer.close()
    assert threading.main_thread().name not in spool.writers and len(spool.writers) == 1
    assert spool.ids() == [qid] and spool.get(qid).data == big


def test_a_big_commit_whose_session_is_cancelled_is_still_released(tmp_path: Path) -> None:
    """A session cancelled while its big message is written off the loop: the message is
    still made durable and its lock released (answering nobody: a duplicate at worst,
    the client never heard 250), so no file stays locked in queue/, nothing stays in
    tmp/, and no descriptor stays open."""
    spool = Spool(tmp_path)
    runner = Spool(tmp_path, create=False)  # another process's view, with its own locks
    open_before = len(os.listdir("/proc/self/fd"))
    committer = GroupCommitter(spool)
    qid = new_id()

    async def cancelled() -> None:
        task = asyncio.ensure_future(committer.commit(ENV, b"x" * (LOOP_WRITE_MAX + 1), qid))
        await asyncio.sleep(0)  # the executor is writing it now
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        async with asyncio.timeout(10):
            while True:  # until a runner can take it (bounded by the timeout)
                with runner.locked(qid) as state:
                    if state is QueueState.QUEUE:
                        return
                await asyncio.sleep(0)

    try:
        asyncio.run(cancelled())
    finally:
        committer.close()
    assert spool.ids() == [qid] and os.listdir(tmp_path / "tmp") == []
    assert committer.committed == 1
    assert len(os.listdir("/proc/self/fd")) == open_before


class _FirstBarrierFile(Spool):
    """Records the descriptor each barrier is given first (the one syncfs(2) runs on)."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.first: list[int] = []

    def sync_renamed(self, fds: list[int], dir_fd: int) -> None:
        self.first.append(os.fstat(fds[0]).st_ino)
        super().sync_renamed(fds, dir_fd)


def test_a_batch_barrier_runs_on_the_file_opened_first(tmp_path: Path) -> None:
    """syncfs(2) reports a write-back error of the file system since its descriptor was
    opened: the batch's barrier is given the file opened first, so a failure to write
    any file of the batch is reported, whatever order the batch came in."""
    spool = _FirstBarrierFile(tmp_path)
    committer = GroupCommitter(spool)
    try:
        early = committer._place(new_id(), ENV, DATA)
        late = committer._place(new_id(), ENV, DATA + b"later")
        assert committer._barrier([late, early]) is None
        assert spool.first == [os.fstat(early.fd).st_ino]
        spool_module._release([late, early])
    finally:
        committer.close()
    assert sorted(spool.ids()) == sorted([early.qid, late.qid])


class _Trail:
    """Records, in order, which thread made each durability step of a commit (wrapping
    the real system calls, which still run) and how often a thread woke the loop."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, spool_dir: Path) -> None:
        self.steps: list[tuple[str, str]] = []
        self.wakeups = 0
        queue_dir = os.stat(spool_dir / "queue")
        real_rename, real_fsync, real_fdatasync = os.rename, os.fsync, os.fdatasync

        def rename(src: str, dst: str, **dir_fds: int) -> None:
            self._note("rename")
            real_rename(src, dst, **dir_fds)

        def fsync(fd: int) -> None:
            st = os.fstat(fd)
            same = (st.st_dev, st.st_ino) == (queue_dir.st_dev, queue_dir.st_ino)
            self._note("fsync queue/" if same else "fsync")
            real_fsync(fd)

        def fdatasync(fd: int) -> None:
            self._note("fdatasync")
            real_fdatasync(fd)

        monkeypatch.setattr(os, "rename", rename)
        monkeypatch.setattr(os, "fsync", fsync)
        monkeypatch.setattr(os, "fdatasync", fdatasync)
        real_syncfs = spool_module._SYNCFS_CHECKED
        if real_syncfs is not None:

            def syncfs(fd: int) -> int:
                self._note("syncfs")
                return real_syncfs(fd)

            monkeypatch.setattr(spool_module, "_SYNCFS_CHECKED", syncfs)

    def _note(self, step: str) -> None:
        self.steps.append((threading.current_thread().name, step))

    def watch(self, loop: asyncio.AbstractEventLoop) -> None:
        """Count the calls other threads schedule on `loop` (each one wakes it)."""
        real = loop.call_soon_threadsafe

        def counted(*args: Any, **kwargs: Any) -> asyncio.Handle:
            self.wakeups += 1
            return real(*args, **kwargs)

        loop.call_soon_threadsafe = counted  # type: ignore[method-assign,assignment]


def _one_barrier(spool: Spool, files: int = 1) -> list[str]:
    """The system calls of one barrier for `files` files on `spool`'s file system: a lone
    file's fsync where it carries the new name (ext4 without a journal); else syncfs,
    and where its flush comes before its last writes (ext4 without a journal) the
    directory's fsync after it (`Spool.sync_renamed`); fdatasync and fsync where syncfs
    cannot report."""
    if files == 1 and spool.fsync_carries_name:
        return ["fsync"]
    if not spool_module._SYNCFS_CHECKED:
        return ["fdatasync"] * files + ["fsync queue/"]
    return ["syncfs"] if spool.syncfs_complete else ["syncfs", "fsync queue/"]


def test_a_lone_commit_is_one_hop_with_the_same_barriers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One message with nothing else committing: one thread renames the file into queue/
    and makes data and name durable with one syncfs(2) (one flush of the disk's cache,
    where fdatasync + fsync of queue/ were two) before `commit` returns, and wakes the
    loop once (the pipeline would hand it to the loop for the rename and to a second
    thread). Where syncfs would not report a failed write (Linux < 5.8), the two
    barriers follow the rename."""
    spool = Spool(tmp_path)
    committer = GroupCommitter(spool)
    trail = _Trail(monkeypatch, tmp_path)

    async def one() -> tuple[str, list[tuple[str, str]]]:
        trail.watch(asyncio.get_running_loop())
        qid = await committer.commit(ENV, DATA)
        return qid, list(trail.steps)

    try:
        qid, steps_at_answer = asyncio.run(one())
    finally:
        committer.close()
    barriers = _one_barrier(spool)
    loop_thread = threading.main_thread().name
    assert steps_at_answer == [
        (loop_thread, "rename"),
        *(("leafmail-write", step) for step in barriers),
    ]
    assert trail.wakeups == 1
    assert spool.ids() == [qid] and os.listdir(tmp_path / "tmp") == []
    assert committer.committed == committer.batches == 1


def _one_session() -> int:
    """An owner's count of open sessions (`GroupCommitter(sessions=...)`): only the one
    that commits."""
    return 1


def _two_sessions() -> int:
    return 2


def test_the_only_session_commits_on_its_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The only session open in its owner, nothing else in flight: the lone path's steps
    (rename, one barrier) run on the session's loop, and no thread wakes the loop (the
    thread's path hands the message over twice, each a cross-CPU wake-up when the two
    threads are apart)."""
    spool = Spool(tmp_path)
    committer = GroupCommitter(spool, sessions=_one_session)
    trail = _Trail(monkeypatch, tmp_path)

    async def one() -> str:
        trail.watch(asyncio.get_running_loop())
        return await committer.commit(ENV, DATA)

    try:
        qid = asyncio.run(one())
    finally:
        committer.close()
    barriers = _one_barrier(spool)
    loop_thread = threading.main_thread().name
    assert trail.steps == [(loop_thread, step) for step in ["rename", *barriers]]
    assert trail.wakeups == 0
    assert spool.ids() == [qid] and os.listdir(tmp_path / "tmp") == []
    assert spool.get(qid).data == DATA
    assert committer.committed == committer.batches == 1


def test_a_session_among_others_hands_its_commit_to_the_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With another session open the barrier would block it: the commit goes to the
    thread, as without a count."""
    spool = Spool(tmp_path)
    committer = GroupCommitter(spool, sessions=_two_sessions)
    trail = _Trail(monkeypatch, tmp_path)
    try:
        qid = asyncio.run(committer.commit(ENV, DATA))
    finally:
        committer.close()
    loop_thread = threading.main_thread().name
    assert trail.steps[0] == (loop_thread, "rename")  # placed by the loop, then
    assert trail.steps[1:] and {thread for thread, _ in trail.steps[1:]} == {"leafmail-write"}
    assert spool.ids() == [qid]


def _twenty_sessions() -> int:
    return 20


def test_the_messages_of_one_loop_turn_share_one_barrier(tmp_path: Path) -> None:
    """Sessions of one loop whose messages end in the same turn of it are made durable
    together, with one barrier: the sync thread is woken at the end of the turn, not at
    the first message (it then took a batch of one as soon as the loop made a system
    call, and the others waited for that barrier and then for their own)."""
    spool = Spool(tmp_path)
    committer = GroupCommitter(spool, sessions=_twenty_sessions)

    async def together() -> list[str]:
        return await asyncio.gather(*(committer.commit(ENV, DATA) for _ in range(40)))

    try:
        qids = asyncio.run(together())
    finally:
        committer.close()
    assert sorted(qids) == spool.ids() and os.listdir(tmp_path / "tmp") == []
    assert committer.committed == 40
    assert committer.batches == 1


def test_a_commit_in_flight_keeps_the_next_one_off_the_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A session whose client left while its (big) message was being written is no
    longer counted open, but its commit is in flight: the next session's barrier is
    left to the threads, not run on the loop, and both messages are spooled."""
    spool = Spool(tmp_path)
    committer = GroupCommitter(spool, sessions=_one_session)
    trail = _Trail(monkeypatch, tmp_path)
    big = b"x" * (LOOP_WRITE_MAX + 1)

    async def both() -> list[str]:
        first = asyncio.ensure_future(committer.commit(ENV, big))
        await asyncio.sleep(0)  # the big one is now being written in a thread
        second = await committer.commit(ENV, DATA)
        return [await first, second]

    try:
        qids = asyncio.run(both())
    finally:
        committer.close()
    # The threads made them durable (the pipeline's renames may run on the loop: no wait).
    on_loop = {step for thread, step in trail.steps if thread == threading.main_thread().name}
    assert on_loop <= {"rename"} and len(trail.steps) > len(on_loop)
    assert sorted(qids) == spool.ids() and os.listdir(tmp_path / "tmp") == []
    assert [spool.get(q).data for q in qids] == [big, DATA]


class _LockCheckingSpool(Spool):
    """At the lone commit's barrier, asks another process's view of the spool for the
    file's lock, as a queue runner would."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.runner = Spool(root, create=False)  # its own descriptors, so its own locks
        self.seen: list[tuple[list[str], QueueState | None]] = []

    def sync_renamed(self, fds: list[int], dir_fd: int) -> None:
        names = self.runner.ids()
        with self.runner.locked(names[0]) as state:
            self.seen.append((names, state))
        super().sync_renamed(fds, dir_fd)


@pytest.mark.parametrize("sessions", [None, _one_session], ids=["thread", "loop"])
def test_a_lone_commit_is_locked_until_its_barrier_returned(
    tmp_path: Path, sessions: Callable[[], int] | None
) -> None:
    """The lone commit renames its file into queue/ before the barrier, under the file's
    lock: a queue runner that finds it there meanwhile is refused the lock (and skips
    it), and gets it once the commit has returned. On the loop as in the thread."""
    spool = _LockCheckingSpool(tmp_path)
    committer = GroupCommitter(spool, sessions=sessions)
    try:
        qid = asyncio.run(committer.commit(ENV, DATA))
    finally:
        committer.close()
    assert spool.seen == [([qid], None)]
    with spool.runner.locked(qid) as state:
        assert state is QueueState.QUEUE


@pytest.mark.parametrize(
    ("release", "reports"),
    [("6.18.44", True), ("5.8.0", True), ("5.7.19", False), ("4.19.0", False), ("x", False)],
)
def test_syncfs_is_the_only_barrier_where_it_reports_errors(release: str, reports: bool) -> None:
    """Before Linux 5.8 syncfs(2) returned 0 even when write-back failed, so there the
    lone commit keeps fdatasync + fsync of the directory."""
    assert spool_module._reports_errors(release) is reports


def test_a_crowd_shares_one_barrier_a_batch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Batches of many take the lone message's shape: each file is renamed into queue/
    by the loop as it is written (under its lock), and the thread makes the whole batch
    durable with one barrier (one syncfs: no fsync of queue/ after it, no second
    thread), then wakes the loop once for the batch."""
    spool = _WatchedSpool(tmp_path, slow=True)
    committer = GroupCommitter(spool)
    trail = _Trail(monkeypatch, tmp_path)

    async def many() -> list[str]:
        trail.watch(asyncio.get_running_loop())
        return await asyncio.gather(*(committer.commit(ENV, DATA + b"%d" % i) for i in range(50)))

    try:
        qids = asyncio.run(many())
    finally:
        committer.close()
    loop_thread = threading.main_thread().name
    renames = [thread for thread, step in trail.steps if step == "rename"]
    assert renames == [loop_thread] * 50
    barriers = [(thread, step) for thread, step in trail.steps if step != "rename"]
    assert {thread for thread, _ in barriers} == {"leafmail-write"}
    assert max(spool.barriers) > 1 and sum(spool.barriers) == 50
    if spool_module._SYNCFS_CHECKED:
        expected = [step for files in spool.barriers for step in _one_barrier(spool, files)]
        assert [step for _, step in barriers] == expected
    assert trail.wakeups == len(spool.barriers) == committer.batches
    assert sorted(qids) == spool.ids() and committer.committed == 50


@pytest.mark.parametrize("sessions", [None, _one_session], ids=["thread", "loop"])
def test_a_lone_commit_that_cannot_rename_is_refused(
    tmp_path: Path, sessions: Callable[[], int] | None
) -> None:
    """A failure on the lone path answers SpoolError (4xx) and leaves no file behind."""
    spool = Spool(tmp_path)
    committer = GroupCommitter(spool, sessions=sessions)
    qid = new_id()
    # The committer renames relative to the queue/ it opened, so the failure is put in
    # there: a non-empty directory under the message's name (rename(2): EISDIR).
    (tmp_path / "queue" / qid).mkdir()
    (tmp_path / "queue" / qid / "x").write_bytes(b"")
    try:
        with pytest.raises(SpoolError):
            asyncio.run(committer.commit(ENV, DATA, qid=qid))
    finally:
        committer.close()
    assert os.listdir(tmp_path / "tmp") == [] and os.listdir(tmp_path / "queue") == [qid]
    assert committer.committed == 0


@pytest.mark.parametrize("count", [1, 40])  # the lone path, and batches
def test_the_committer_works_in_the_directories_it_opened(tmp_path: Path, count: int) -> None:
    """Files are created and renamed relative to tmp/ and queue/ as opened when the
    committer started, not by walking the spool's path for each message (in the workers
    that path runs through /proc/self/fd): moving the spool away under a running
    committer does not stop it, and the messages are in the moved spool's queue/."""
    spool = Spool(tmp_path / "spool")
    committer = GroupCommitter(spool)
    os.rename(tmp_path / "spool", tmp_path / "moved")
    qids = _commit_many(committer, count)
    moved = Spool(tmp_path / "moved", create=False)
    assert sorted(moved.ids()) == sorted(qids) and len(qids) == count
    assert {moved.get(q).data for q in qids} == {DATA + b"%d" % i for i in range(count)}
    assert os.listdir(tmp_path / "moved" / "tmp") == []


def test_group_commit_reports_failure(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    committer = GroupCommitter(spool)
    os.rmdir(tmp_path / "tmp")  # the committer's tmp/ is gone: no file can be made in it
    (tmp_path / "tmp").write_bytes(b"not a directory")
    try:
        with pytest.raises(SpoolError):
            asyncio.run(committer.commit(ENV, DATA))
    finally:
        committer.close()
    assert spool.ids() == []


# A status write that fails at write(2): RLIMIT_FSIZE makes the kernel refuse the bytes
# past 64 (EFBIG, with SIGXFSZ ignored), after open(2) has created status/QID.new; a
# full disk does the same with ENOSPC, but not at a point a test can choose.
_FAILING_STATUS_WRITE = """
import resource, signal, sys
from leafmail.spool import Spool
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
spool = Spool(sys.argv[1], create=False)
resource.setrlimit(resource.RLIMIT_FSIZE, (64, 64))
try:
    spool.write_status(sys.argv[2], b"x" * 4096)
except OSError as exc:
    print(exc.errno)
"""


def test_a_status_write_that_fails_leaves_no_file(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    qid = spool.commit(Envelope("a@b.example", (Recipient("c@d.example"),)), b"x\r\n")
    done = subprocess.run(
        [sys.executable, "-c", _FAILING_STATUS_WRITE, str(spool.root), qid],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    assert done.stdout.strip() == str(errno.EFBIG), done.stderr
    assert sorted(os.listdir(spool.root / "status")) == []  # no half record, no QID.new
    assert spool.read_status(qid) is None


def test_a_locked_message_is_read_through_its_lock(tmp_path: Path) -> None:
    """What is delivered is the file that is locked, even if its name is taken meanwhile
    (no second open by name), and its size is known without asking the file system."""
    spool = Spool(tmp_path)
    qid = spool.commit(ENV, DATA)
    other = spool.commit(ENV, b"Subject: other\r\n\r\nanother\r\n")
    size = os.path.getsize(spool.path(QueueState.QUEUE, qid))
    with spool.locked(qid) as state:
        assert state == "queue"
        os.rename(spool.path(QueueState.QUEUE, other), spool.path(QueueState.QUEUE, qid))
        assert spool.size(qid, QueueState.QUEUE) == size
        assert spool.get(qid, state).data == DATA
    assert spool.get(qid).data == b"Subject: other\r\n\r\nanother\r\n"  # by name: the new file


def test_a_large_locked_message_is_read_whole(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    data = b"".join(b"line %07d\r\n" % i for i in range(200_000))  # 2.4 MB: several reads
    qid = spool.commit(ENV, data)
    with spool.locked(qid) as state:
        assert state is not None
        assert spool.get(qid, state).data == data


def test_a_status_written_under_the_lock_goes_with_the_message(tmp_path: Path) -> None:
    """Removal skips the status unlinks only for a message read with no status record
    and none written since: one written meanwhile is removed with the message."""
    spool = Spool(tmp_path)
    fresh, recorded = spool.commit(ENV, DATA), spool.commit(ENV, DATA)
    for qid in (fresh, recorded):
        with spool.locked(qid) as state:
            assert state == "queue"
            assert spool.read_status(qid) is None
            if qid == recorded:
                spool.write_status(qid, b"status")
            spool.discard_delivered(qid, state)
    assert spool.find(fresh) is None and spool.find(recorded) is None
    assert os.listdir(tmp_path / "status") == []
