"""The commit's barrier: where one syncfs(2) is not enough, a flush follows it; where a
lone file's fsync carries its new name, that fsync is the barrier.

On ext4 without a journal, syncfs writes the new file's inode block after its flush of
the disk's cache (traced: bench/RESULTS.md, "syncfs on ext4 without a journal"), so a
250 answered on its return could name a file whose inode a power cut loses. There a
file's fsync writes its data, its inode and its new entry's directory block before its
one flush ("A batch of one on ext4 without a journal"): one flush where syncfs and the
directory's fsync are two.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from leafmail import spool as spool_module
from leafmail.envelope import Envelope, Recipient
from leafmail.spool import (
    GroupCommitter,
    Spool,
    fsync_carries_new_name,
    new_id,
    syncfs_is_a_barrier,
)
from leafmail.states import QueueState

ENV = Envelope(sender="a@src.test", recipients=(Recipient("b@example.test"),))


def _fake_system(root: Path, target: Path, fstype: str, journal: str | None) -> tuple[str, str]:
    """A /proc and /sys that say `target`'s file system is `fstype` on device "vdz",
    with `journal` as its ext4 journal_task (None: no such entry)."""
    dev = os.stat(target).st_dev
    number = f"{os.major(dev)}:{os.minor(dev)}"
    proc, sys_root = root / "proc", root / "sys"
    (proc / "self").mkdir(parents=True)
    (proc / "self" / "mountinfo").write_text(
        f"22 1 0:5 / /dev rw shared:2 - devtmpfs udev rw\n"
        f"36 25 {number} / /spool rw,relatime shared:1 - {fstype} /dev/vdz rw\n"
    )
    (sys_root / "dev" / "block").mkdir(parents=True)
    (sys_root / "dev" / "block" / number).symlink_to("../../devices/virtual/block/vdz")
    if journal is not None:
        (sys_root / "fs" / "ext4" / "vdz").mkdir(parents=True)
        (sys_root / "fs" / "ext4" / "vdz" / "journal_task").write_text(journal + "\n")
    return str(proc), str(sys_root)


@pytest.mark.parametrize(
    ("fstype", "journal", "trusted", "carries"),
    [
        ("ext4", "jbd2/vdz-8", True, False),
        ("ext4", "<none>", False, True),
        ("ext4", "", False, True),
        ("ext4", None, False, False),  # no journal_task entry: cannot tell
        ("xfs", None, True, False),
        ("btrfs", None, True, False),
        ("ext2", None, False, False),
        ("tmpfs", None, False, False),
    ],
)
def test_syncfs_alone_is_trusted_only_where_its_flush_comes_last(
    tmp_path: Path, fstype: str, journal: str | None, trusted: bool, carries: bool
) -> None:
    """... and a lone file's fsync carries its new name only on ext4 without a journal."""
    proc, sys_root = _fake_system(tmp_path / "system", tmp_path, fstype, journal)
    assert syncfs_is_a_barrier(tmp_path, proc, sys_root) is trusted
    assert fsync_carries_new_name(tmp_path, proc, sys_root) is carries


def test_an_unreadable_mount_table_means_one_flush_more(tmp_path: Path) -> None:
    """Neither shortcut is taken where the file system cannot be told."""
    proc, sys_root = str(tmp_path / "no-proc"), str(tmp_path)
    assert syncfs_is_a_barrier(tmp_path, proc, sys_root) is False
    assert fsync_carries_new_name(tmp_path, proc, sys_root) is False


def test_a_state_directory_with_its_entries_inline_keeps_the_directory_fsync(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ext4's inline_data keeps a small directory's entries in its inode, which a file's
    fsync writes only if it is marked dirty: a spool with such a state directory (or one
    it cannot ask) does not trust the file's fsync with the name."""
    monkeypatch.setattr(spool_module, "fsync_carries_new_name", lambda path: True)
    asked: list[str] = []

    def inline_hold(directory: str) -> bool:
        asked.append(os.path.basename(directory))
        return directory.endswith("/hold")

    monkeypatch.setattr(spool_module, "_entries_inline", inline_hold)
    assert Spool(tmp_path / "a").fsync_carries_name is False
    assert "queue" in asked and "hold" in asked
    monkeypatch.setattr(spool_module, "_entries_inline", lambda directory: False)
    assert Spool(tmp_path / "b").fsync_carries_name is True


def test_a_directory_that_cannot_be_asked_counts_as_inline(tmp_path: Path) -> None:
    assert spool_module._entries_inline(str(tmp_path / "absent")) is True
    (tmp_path / "link").symlink_to(tmp_path)
    assert spool_module._entries_inline(str(tmp_path / "link")) is True


class _Recorded(Spool):
    """A real spool that notes each directory fsync, in order with the syncfs calls."""

    def __init__(self, root: Path, calls: list[str]) -> None:
        super().__init__(root)
        self.calls = calls

    def fsync_dir(self, fd: int) -> None:
        self.calls.append("fsync_dir")
        super().fsync_dir(fd)


@pytest.mark.parametrize(
    ("complete", "expected"), [(False, ["syncfs", "fsync_dir"]), (True, ["syncfs"])]
)
def test_a_commit_flushes_again_after_a_syncfs_that_is_no_barrier(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, complete: bool, expected: list[str]
) -> None:
    real = spool_module._SYNCFS_CHECKED
    if real is None:
        pytest.skip("this kernel's syncfs does not report errors: every commit fsyncs")
    calls: list[str] = []

    def syncfs(fd: int) -> int:
        calls.append("syncfs")
        return real(fd)

    monkeypatch.setattr(spool_module, "_SYNCFS_CHECKED", syncfs)
    spool = _Recorded(tmp_path / "spool", calls)
    spool.syncfs_complete = complete
    spool.fsync_carries_name = False  # the syncfs barrier, whatever this disk is
    qid = spool.commit(ENV, b"Subject: hi\r\n\r\nbody\r\n")
    assert calls == expected
    assert spool.get(qid).envelope == ENV


def _record_barriers(monkeypatch: pytest.MonkeyPatch, spool_root: Path) -> list[str]:
    """Every barrier system call from now on, in order, naming what it was given (a
    file, or which state directory); the real calls still run."""
    calls: list[str] = []
    real_fsync, real_fdatasync = os.fsync, os.fdatasync
    real_syncfs = spool_module._SYNCFS_CHECKED

    def named(fd: int) -> str:
        st = os.fstat(fd)
        for name in ("queue", "hold"):
            there = os.stat(spool_root / name)
            if (st.st_dev, st.st_ino) == (there.st_dev, there.st_ino):
                return f"{name}/"
        return "file"

    def fsync(fd: int) -> None:
        calls.append(f"fsync {named(fd)}")
        real_fsync(fd)

    def fdatasync(fd: int) -> None:
        calls.append(f"fdatasync {named(fd)}")
        real_fdatasync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "fdatasync", fdatasync)
    if real_syncfs is not None:

        def syncfs(fd: int) -> int:
            calls.append("syncfs")
            return real_syncfs(fd)

        monkeypatch.setattr(spool_module, "_SYNCFS_CHECKED", syncfs)
    return calls


def test_a_lone_file_whose_fsync_carries_its_name_takes_that_one_barrier(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where a file's fsync carries its new name (ext4 without a journal), a direct
    commit is renamed first and then fsync'ed, once: no syncfs, no fsync of queue/. A
    batch of two keeps the syncfs barrier and the directory's fsync after it."""
    spool = Spool(tmp_path / "spool")
    spool.fsync_carries_name, spool.syncfs_complete = True, False
    calls = _record_barriers(monkeypatch, spool.root)
    qid = spool.commit(ENV, b"Subject: hi\r\n\r\nbody\r\n")
    assert calls == ["fsync file"]
    assert spool.ids() == [qid] and spool.get(qid).envelope == ENV
    assert spool.syncs == 1

    calls.clear()
    committer = GroupCommitter(spool)
    try:
        placed = [committer._place(qid, ENV, b"x") for qid in (new_id(), new_id())]
        assert committer._barrier(placed) is None
        spool_module._release(placed)
    finally:
        committer.close()
    batch = ["syncfs", "fsync queue/"] if spool_module._SYNCFS_CHECKED else None
    assert calls == (batch or ["fdatasync file", "fdatasync file", "fsync queue/"])
    assert sorted(spool.ids()) == sorted([qid, *(p.qid for p in placed)])


def _one_session() -> int:
    return 1


@pytest.mark.parametrize("sessions", [None, _one_session], ids=["thread", "loop"])
def test_a_lone_session_commit_takes_the_files_fsync_where_it_carries_the_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, sessions: Callable[[], int] | None
) -> None:
    """The group commit's batch of one (in its thread, or on the only session's loop)
    takes the same one barrier as a direct commit where the file's fsync carries its
    new name."""
    spool = Spool(tmp_path / "spool")
    spool.fsync_carries_name, spool.syncfs_complete = True, False
    calls = _record_barriers(monkeypatch, spool.root)
    committer = GroupCommitter(spool, sessions=sessions)
    try:
        qid = asyncio.run(committer.commit(ENV, b"Subject: hi\r\n\r\nbody\r\n"))
    finally:
        committer.close()
    assert calls == ["fsync file"] and spool.syncs == 1
    assert spool.ids() == [qid] and spool.get(qid).envelope == ENV


@pytest.mark.parametrize("carries", [True, False])
def test_syncs_counts_every_barrier_a_direct_commit_makes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, carries: bool
) -> None:
    """`Spool.syncs` is the number of barrier system calls (each a flush of the disk's
    cache): a commit into hold/ makes its data durable before the rename, and that
    fdatasync counts too."""
    spool = Spool(tmp_path / "spool")
    spool.fsync_carries_name = carries
    calls = _record_barriers(monkeypatch, spool.root)
    for state in (QueueState.QUEUE, QueueState.HOLD):
        spool.commit(ENV, b"Subject: hi\r\n\r\nbody\r\n", state=state)
    assert spool.syncs == len(calls)
    if carries:
        assert calls == ["fsync file", "fdatasync file", "fsync file"]
    elif spool_module._SYNCFS_CHECKED:
        after = [] if spool.syncfs_complete else ["fsync {}/"]
        queue, hold = (["syncfs", *(step.format(s) for step in after)] for s in ("queue", "hold"))
        assert calls == [*queue, "fdatasync file", *hold]


_TRACING = Path("/sys/kernel/tracing")


def _extents(path: Path) -> set[int]:
    """The 512-byte sectors (as the block layer numbers them on the whole disk) of the
    4 KiB blocks `filefrag` reports for `path` (a file or a directory)."""
    out = subprocess.run(
        ["filefrag", "-v", "-b4096", str(path)], capture_output=True, text=True, check=True
    ).stdout
    dev = os.stat(path).st_dev
    start = Path(f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}/start")
    offset = int(start.read_text()) if start.exists() else 0  # a partition's first sector
    sectors: set[int] = set()
    for line in out.splitlines():
        match = re.match(r"\s*\d+:\s*\d+\.\.\s*\d+:\s*(\d+)\.\.\s*(\d+):", line)
        if match:
            first, last = int(match.group(1)), int(match.group(2))
            sectors.update(offset + block * 8 for block in range(first, last + 1))
    return sectors


@contextlib.contextmanager
def _block_trace(path: Path) -> Iterator[list[tuple[int, str, int]]]:
    """The block requests queued for the disk under `path` while the block runs, in
    order, as (pid, rwbs, sector), from a tracefs instance of its own
    (`block_bio_queue`): this process's, and the kernel's write-back threads' (which
    may write a file's data before its fsync does)."""
    instance = _TRACING / "instances" / f"leafmail-test-{os.getpid()}"
    try:
        instance.mkdir()
    except OSError as exc:
        pytest.skip(f"no tracefs instance here: {exc.strerror}")
    dev = os.stat(path).st_dev
    events: list[tuple[int, str, int]] = []
    try:
        event = instance / "events" / "block" / "block_bio_queue"
        whole = Path(f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}/partition")
        if not whole.exists():  # a partition's requests are the disk's, on the disk's number
            (event / "filter").write_text(f"dev == {os.major(dev) << 20 | os.minor(dev)}\n")
        (event / "enable").write_text("1\n")
        yield events
        (event / "enable").write_text("0\n")
        for line in (instance / "trace").read_text().splitlines():
            match = re.search(r"-(\d+)\s+\[\d+\].*block_bio_queue: \S+ (\w+) (\d+) \+", line)
            if match:
                events.append((int(match.group(1)), match.group(2), int(match.group(3))))
    finally:
        instance.rmdir()


def test_the_disk_gets_the_lone_files_data_and_name_before_its_one_flush(
    tmp_path: Path,
) -> None:
    """On a real disk where a lone file's fsync carries its name (ext4 without a
    journal): during one commit the disk is sent the file's data, its inode block and
    queue/'s entry block, then one flush, and nothing after it (the incomplete
    syncfs wrote the inode block after its flush: bench/RESULTS.md)."""
    spool = Spool(tmp_path / "spool")
    if not spool.fsync_carries_name or shutil.which("filefrag") is None:
        pytest.skip("needs ext4 without a journal and filefrag")
    for _ in range(3):  # queue/ and tmp/ past their first entries, as in service
        spool.commit(ENV, b"Subject: warm\r\n\r\n" + b"w" * 3000)
    with _block_trace(spool.root) as events:
        qid = spool.commit(ENV, b"Subject: hi\r\n\r\n" + b"y" * 3000)
    mine = [(i, rwbs, sector) for i, (pid, rwbs, sector) in enumerate(events) if pid == os.getpid()]
    flushes = [i for i, rwbs, _ in mine if rwbs.startswith("F")]
    assert len(flushes) == 1, mine
    assert [event for event in mine if event[0] > flushes[0]] == []
    written = {sector for _, rwbs, sector in events[: flushes[0]] if "W" in rwbs}
    mine_written = {sector for i, rwbs, sector in mine if i < flushes[0] and "W" in rwbs}
    data = _extents(spool.path(QueueState.QUEUE, qid))
    directory = _extents(spool.root / "queue")
    assert data and data <= written  # by the fsync, or by write-back just before it
    assert directory & mine_written
    assert mine_written - data - directory  # the inode block
