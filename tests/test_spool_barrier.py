"""The commit's barrier: where one syncfs(2) is not enough, a flush follows it.

On ext4 without a journal, syncfs writes the new file's inode block after its flush of
the disk's cache (traced: bench/RESULTS.md, "syncfs on ext4 without a journal"), so a
250 answered on its return could name a file whose inode a power cut loses.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from leafmail import spool as spool_module
from leafmail.envelope import Envelope, Recipient
from leafmail.spool import Spool, syncfs_is_a_barrier

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
    ("fstype", "journal", "trusted"),
    [
        ("ext4", "jbd2/vdz-8", True),
        ("ext4", "<none>", False),
        ("ext4", None, False),
        ("xfs", None, True),
        ("btrfs", None, True),
        ("ext2", None, False),
        ("tmpfs", None, False),
    ],
)
def test_syncfs_alone_is_trusted_only_where_its_flush_comes_last(
    tmp_path: Path, fstype: str, journal: str | None, trusted: bool
) -> None:
    proc, sys_root = _fake_system(tmp_path / "system", tmp_path, fstype, journal)
    assert syncfs_is_a_barrier(tmp_path, proc, sys_root) is trusted


def test_an_unreadable_mount_table_means_one_flush_more(tmp_path: Path) -> None:
    assert syncfs_is_a_barrier(tmp_path, str(tmp_path / "no-proc"), str(tmp_path)) is False


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
    qid = spool.commit(ENV, b"Subject: hi\r\n\r\nbody\r\n")
    assert calls == expected
    assert spool.get(qid).envelope == ENV
