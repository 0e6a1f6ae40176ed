"""System calls per connection of netserver's exec spawners, counted by the kernel.

`strace -c` stops the spawner at every system call, which slows it enough that its
epoll waits see many events each: the counts it gives are not those of a free-running
spawner (main's pidfd per command showed 17 calls per connection under strace and
27-34 without it). This counts with `perf stat`'s syscall tracepoints instead (no
stop; ``-i``: the spawners alone, not the commands they start), over a fixed number of
connections of `exec_bench`'s load (8 clients of ``/bin/echo hi``, `--quiet`,
`--timeout 0`), after a warm-up. Needs root (or a low perf_event_paranoid) and tracefs.
perf attaches while the first connections run, so the counts are ~1 % low (a call made
once per connection reads 0.99).

    python -m bench.exec_syscalls --connections 3000
    PYTHONPATH=/work/main/src python -m bench.exec_syscalls   # the same for another tree

Counts of system calls do not depend on the machine's load, as CPU time does; how
often epoll_wait returns does, a little (more clients waiting: more events per wait).
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import subprocess
import tempfile
from pathlib import Path

from .conn_load import Counter, worker
from .cpu import children_of
from .exec_bench import EXPECT, exec_servers
from .procs import running

CALLS = (
    "epoll_wait", "accept4", "close", "clone3", "mmap", "munmap", "prlimit64", "fcntl",
    "rt_sigprocmask", "pidfd_open", "epoll_ctl", "wait4", "waitid", "read", "write",
)  # fmt: skip
WARM_UP = 300
CONCURRENCY = 8


async def connections(port: int, total: int) -> int:
    """Run `total` connections with CONCURRENCY clients; how many went right."""
    counter = Counter(total)
    await asyncio.gather(*(worker(port, EXPECT, counter) for _ in range(CONCURRENCY)))
    return counter.ok


def count(port: int, spawners: list[int], total: int, out: Path) -> tuple[int, dict[str, float]]:
    """`perf stat` on the spawners while `total` connections run; (served, counts)."""
    events = ["raw_syscalls:sys_enter", *(f"syscalls:sys_enter_{c}" for c in CALLS)]
    argv = ["perf", "stat", "-i", "-x,", "-o", str(out), "-e", ",".join(events)]
    perf = subprocess.Popen([*argv, "-p", ",".join(map(str, spawners))])
    try:
        served = asyncio.run(connections(port, total))
    finally:
        perf.send_signal(signal.SIGINT)  # perf stat writes its counts on SIGINT
        perf.wait(10)
    counts: dict[str, float] = {}
    for line in out.read_text().splitlines():
        fields = line.split(",")
        if len(fields) > 2 and fields[0].isdigit():
            name = fields[2].removeprefix("syscalls:sys_enter_")
            counts["all" if name.startswith("raw_") else name] = float(fields[0])
    return served, counts


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.exec_syscalls", description=__doc__)
    p.add_argument("--connections", type=int, default=3000)
    p.add_argument("--rounds", type=int, default=1)
    args = p.parse_args()
    if not (100 <= args.connections <= 100_000 and 1 <= args.rounds <= 10):
        p.error("--connections 100..100000, --rounds 1..10")
    spec = exec_servers("tcpserver")[0]  # netserver's; the tcpserver path is not used
    with tempfile.TemporaryDirectory(prefix="netserver-bench-") as tmp:
        for r in range(args.rounds):
            with running(spec, Path(tmp)) as server:
                asyncio.run(connections(server.port, WARM_UP))
                spawners = children_of(server.proc.pid)
                served, counts = count(server.port, spawners, args.connections, Path(tmp) / "perf")
            per = {k: v / max(1, served) for k, v in counts.items() if v}
            text = "  ".join(f"{k} {v:.2f}" for k, v in sorted(per.items(), key=lambda kv: -kv[1]))
            print(f"round {r + 1}: {served} connections, per connection: {text}", flush=True)


if __name__ == "__main__":
    main()
