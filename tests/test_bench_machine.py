"""bench.machine.disk_flushes and disk_writes: what the benchmarks count per message on the
disk; bench.cpu.process_times: the user and system split of a process's CPU."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.cpu import process_cpu, process_times
from bench.machine import disk_flushes, disk_writes


def _write_back_cache(path: Path) -> bool:
    """True if the disk under `path` says it has a volatile (write-back) cache, the only
    kind on which the kernel sends flush requests."""
    dev = os.stat(path).st_dev
    try:
        mode = Path(f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}/queue/write_cache")
        return mode.read_text().strip() == "write back"
    except OSError:
        return False


def test_an_fsync_is_counted_as_a_flush(tmp_path: Path) -> None:
    """An fsync of a new file on a disk with a write-back cache completes at least one
    flush request, and `disk_flushes` sees it (field 16 of the disk's stat)."""
    before = disk_flushes(tmp_path)
    if before is None or not _write_back_cache(tmp_path):
        pytest.skip("no flush count, or no write-back cache, for the disk under tmp_path")
    fd = os.open(tmp_path / "f", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, b"x" * 4096)
        os.fsync(fd)
    finally:
        os.close(fd)
    after = disk_flushes(tmp_path)
    assert after is not None and after >= before + 1


def test_a_synced_write_is_counted_as_write_requests_and_sectors(tmp_path: Path) -> None:
    """64 KiB written and fsync'ed reach the disk as at least one write request of at
    least 128 sectors, and `disk_writes` sees them (fields 5 and 7 of the disk's stat)."""
    before = disk_writes(tmp_path)
    if before is None:
        pytest.skip("no write counts for the disk under tmp_path")
    fd = os.open(tmp_path / "f", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, os.urandom(65536))
        os.fsync(fd)
    finally:
        os.close(fd)
    after = disk_writes(tmp_path)
    assert after is not None
    assert after[0] >= before[0] + 1 and after[1] >= before[1] + 128


def test_a_process_cpu_time_splits_into_user_and_system() -> None:
    """The split of an ended (not yet reaped) process adds up to its `process_cpu`, and a
    reaped one has none."""
    work = "import os\nfor _ in range(20000): os.getppid()\nsum(range(10**6))"
    child = subprocess.Popen([sys.executable, "-c", work])
    try:
        os.waitid(os.P_PID, child.pid, os.WEXITED | os.WNOWAIT)  # a zombie: its times stay
        split = process_times(child.pid)
        assert split is not None and process_cpu(child.pid) == split[0] + split[1]
        assert split[0] > 0  # the Python interpreter's start alone is user time
    finally:
        child.wait()
    assert process_times(child.pid) is None
