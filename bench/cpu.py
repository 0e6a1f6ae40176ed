"""CPU seconds a process (and its reaped children) used, read from /proc/PID/stat.

Throughput alone is ambiguous on a 2-core machine shared by server and client: a lower
req/s can mean a slower server or a busier client. CPU seconds the server burned per
request or per connection separate the two, so the load generators sample them at the
start and end of their measuring window, along with the whole machine's CPU time.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

_TICK = float(os.sysconf("SC_CLK_TCK"))


def process_cpu(pid: int) -> float | None:
    """utime + stime + cutime + cstime of `pid`, in seconds; None if it is gone.

    The children's share (cutime, cstime) counts only children already waited for,
    which is what a forking server's per-connection processes are once they end.
    """
    split = process_times(pid)
    return None if split is None else split[0] + split[1]


def process_times(pid: int) -> tuple[float, float] | None:
    """(user, system) seconds of `pid` with its reaped children's; None if it is gone.

    The split says where a change of CPU per message comes from: the server's own code
    (user) or the kernel working for it (system: sockets, files, the disk's requests).
    """
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: split after the last ")".
    fields = raw[raw.rindex(b")") + 2 :].split()
    utime, stime, cutime, cstime = (int(x) for x in fields[11:15])
    return (utime + cutime) / _TICK, (stime + cstime) / _TICK


def per_task(pid: int, name: str) -> list[bytes] | None:
    """/proc/PID/task/*/NAME of every thread of `pid` still there; None if `pid` is gone."""
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return None
    found: list[bytes] = []
    for task in tasks:
        try:
            with open(f"/proc/{pid}/task/{task}/{name}", "rb") as f:
                found.append(f.read())
        except OSError:
            continue
    return found


def children_of(pid: int) -> list[int]:
    """The live child processes of `pid` (from /proc/PID/task/*/children)."""
    return [int(child) for raw in per_task(pid, "children") or [] for child in raw.split()]


def tree_cpu(pid: int) -> float | None:
    """`process_cpu` of `pid` plus that of its live children.

    A server whose long-lived helper (netserver's spawner) starts and reaps the
    per-connection processes has their time in the helper's cutime, not its own.
    """
    own = process_cpu(pid)
    if own is None:
        return None
    return own + sum(t for t in map(process_cpu, children_of(pid)) if t is not None)


def run_time(pid: int) -> float | None:
    """CPU seconds the live threads of `pid` have run, to the nanosecond; None if gone.

    From /proc/PID/task/*/schedstat: `process_cpu` counts in clock ticks (10 ms), too
    coarse for windows of a tenth of a second (`bench.echo_load`'s turns). Only for a
    server whose threads live as long as it does and that reaps no children: a thread
    that ends takes its time with it.
    """
    stats = per_task(pid, "schedstat")
    if stats is None:
        return None
    return sum(int(raw.split()[0]) for raw in stats if raw) / 1e9


def machine_cpu() -> tuple[float, float]:
    """(busy, steal): CPU seconds, summed over all CPUs, since boot, from /proc/stat.

    Busy is user + nice + system + irq + softirq: everything any process on this machine
    (or VM) ran. Subtracting the server's and the client's share leaves what *other*
    processes took during a measurement, which on a shared machine says how much to
    trust it. Steal is time the hypervisor gave our virtual CPUs to someone else.
    """
    with open("/proc/stat", "rb") as f:
        fields = f.readline().split()
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[1:9])
    return (user + nice + system + irq + softirq) / _TICK, steal / _TICK


@dataclass(frozen=True)
class Snapshot:
    """Clocks read at one instant: wall, this process, the server, the whole machine."""

    wall: float
    client: float
    server: float | None
    busy: float
    steal: float


def snapshot(server_pid: int | None, *, precise: bool = False) -> Snapshot:
    """Read every clock now (the server's only if `server_pid` is given; with `precise`,
    by `run_time` instead of `tree_cpu`)."""
    busy, steal = machine_cpu()
    server = None
    if server_pid:
        server = run_time(server_pid) if precise else tree_cpu(server_pid)
    return Snapshot(time.perf_counter(), time.process_time(), server, busy, steal)


@dataclass(frozen=True)
class Measured:
    """What a load generator reports: operations done in a window and what it cost.

    CPU figures are seconds over the window; `machine_busy` is all CPUs together.
    """

    ops: int
    errors: int
    elapsed: float
    client_cpu: float
    server_cpu: float | None
    machine_busy: float
    steal: float


def measured(ops: int, errors: int, start: Snapshot, end: Snapshot) -> Measured:
    """The window between two snapshots, with `ops` done and `errors` seen in it."""
    server = None if start.server is None or end.server is None else end.server - start.server
    return Measured(
        ops,
        errors,
        end.wall - start.wall,
        end.client - start.client,
        server,
        end.busy - start.busy,
        end.steal - start.steal,
    )
