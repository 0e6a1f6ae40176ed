"""A worker pool's restart back-off, driven without processes or sleeping.

Workers that keep dying young (a crash at start, say) must not be restarted in a tight
loop: the first replacement is immediate, then each waits twice as long, up to a cap; a
worker that lived long resets the count. The pool's loop is replaced by a recorder of
`call_later`, and its clock is the `started` time each fake worker carries.
"""

from __future__ import annotations

import io
import socket
import time
from collections.abc import Callable

from netserver.connlog import ServerLog
from netserver.limits import Limits
from netserver.modes.workers import RESTART_FIRST, RESTART_MAX, WorkerPool, _Proc


class RecordingLoop:
    """Just what `WorkerPool._exited` uses of a loop; remembers each restart delay."""

    def __init__(self) -> None:
        self.delays: list[float] = []

    def call_later(self, delay: float, _callback: Callable[[], None]) -> None:
        self.delays.append(delay)

    def remove_reader(self, _fd: int) -> bool:
        return True


def dead_worker(pool: WorkerPool, pid: int, age: float) -> None:
    ours, theirs = socket.socketpair()
    theirs.close()
    proc = _Proc(pid, ours, 0, time.monotonic() - age)
    pool.procs[pid] = proc
    pool._exited(proc, -9)


def recorded_pool(limits: Limits) -> tuple[WorkerPool, RecordingLoop]:
    """A pool of one worker that forks nothing, its loop replaced by a recorder."""
    pool = WorkerPool(
        1,
        log=ServerLog(io.StringIO()),
        limits=limits,
        loop_factory=lambda: None,  # type: ignore[arg-type,return-value]
    )
    loop = RecordingLoop()
    pool._loop = loop  # type: ignore[assignment]
    return pool, loop


def test_young_deaths_back_off_and_an_old_one_resets() -> None:
    pool, loop = recorded_pool(Limits())
    for pid in range(1, 12):
        dead_worker(pool, pid, age=0.5)
    assert loop.delays[:4] == [0.0, RESTART_FIRST, 2 * RESTART_FIRST, 4 * RESTART_FIRST]
    assert loop.delays == sorted(loop.delays) and loop.delays[-1] == RESTART_MAX
    dead_worker(pool, 99, age=3600.0)  # it served an hour: a fresh start
    assert loop.delays[-1] == 0.0


def test_the_cap_comes_from_the_limits() -> None:
    """Limits.restart_max (netserver serve --restart-max) replaces RESTART_MAX."""
    pool, loop = recorded_pool(Limits(restart_max=0.25))
    for pid in range(1, 12):
        dead_worker(pool, pid, age=0.5)
    assert loop.delays[:3] == [0.0, RESTART_FIRST, 2 * RESTART_FIRST]  # as before
    assert max(loop.delays) == loop.delays[-1] == 0.25 < RESTART_MAX


def test_a_very_long_run_of_young_deaths_still_waits_the_cap() -> None:
    """A handler that crashes at start for hours: past 1,024 young deaths in a row,
    RESTART_FIRST * 2**n no longer fits a float, and the OverflowError left the pool
    without a restart scheduled, for good (30 s apart, that is 8.5 hours)."""
    pool, loop = recorded_pool(Limits())
    pool._young_deaths = 1100
    dead_worker(pool, 1, age=0.5)
    assert loop.delays == [RESTART_MAX]
