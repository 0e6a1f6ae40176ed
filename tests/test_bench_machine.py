"""bench.machine.disk_flushes: the flush requests the benchmarks count per message."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from bench.machine import disk_flushes


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
