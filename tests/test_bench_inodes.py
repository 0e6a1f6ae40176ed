"""bench.inodes: the SMTP benchmark lets the window after deletions pass before a server starts.

Time is injected (a fake clock whose sleep advances it), so nothing here sleeps.
"""

from __future__ import annotations

import os
from pathlib import Path

from bench.inodes import WINDOW, Cooldown, journal_less_ext4


class FakeTime:
    """A monotonic clock that `sleep` advances, recording each sleep."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.slept: list[float] = []

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


def test_wait_sleeps_out_the_window_after_a_deletion() -> None:
    t = FakeTime()
    cooldown = Cooldown(WINDOW, t.clock, t.sleep)
    cooldown.deleted()
    t.now += 20.0  # the deleting server stopped 20 s ago
    cooldown.wait()
    assert t.slept == [WINDOW - 20.0]
    assert cooldown.waited == WINDOW - 20.0


def test_wait_returns_at_once_without_deletions_or_once_the_window_passed() -> None:
    t = FakeTime()
    cooldown = Cooldown(WINDOW, t.clock, t.sleep)
    cooldown.wait()  # nothing deleted yet
    cooldown.deleted()
    t.now += WINDOW + 1
    cooldown.wait()  # already past
    cooldown.wait()  # and each deletion is waited for once
    assert t.slept == []


def test_no_window_where_the_file_system_does_not_need_it() -> None:
    t = FakeTime()
    cooldown = Cooldown(0.0, t.clock, t.sleep)
    cooldown.deleted()
    cooldown.wait()
    assert t.slept == []


def test_journal_less_ext4_reads_the_kernels_answer(tmp_path: Path) -> None:
    dev = os.stat(tmp_path).st_dev
    device = Path(f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}").resolve().name
    task = Path(f"/sys/fs/ext4/{device}/journal_task")
    expected = task.exists() and task.read_text().strip() == "<none>"
    assert journal_less_ext4(tmp_path) is expected
    assert journal_less_ext4(Path("/proc")) is False  # not ext4 at all
    assert Cooldown.for_path(tmp_path).window == (WINDOW if expected else 0.0)
