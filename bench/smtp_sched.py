"""Where leafmail's processes spend the wall time of a load: running, waiting for a CPU, asleep.

The question is why a load (s100-1K above all) does not keep both cores busy. Each
thread of each process is read from /proc/PID/task/TID/schedstat before and after one
smtp-source run: time on a CPU and time runnable but waiting for one, as fractions of
the run's wall time; the rest it slept (waiting for the client, the disk or another
thread). With it: the machine's idle share (/proc/stat) and samples of the listening
socket's accept queue (`ss`), which fills if the supervisor, the one process that
accepts, falls behind. Read on a quiet machine: a loop thread that sleeps while the
machine has idle cores and the accept queue is empty is waiting, not short of CPU.

    python -m bench.smtp_sched [--load s100-1K] [--messages 3000]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from .smtp_bench import LOADS, serving
from .smtp_idle import descendants

Sched = dict[tuple[int, int], tuple[float, float]]  # (pid, tid) -> (run s, wait s)


def schedstat(pids: list[int]) -> Sched:
    """Run and run-queue wait seconds of every thread of `pids`."""
    found: Sched = {}
    for pid in pids:
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for tid in tids:
            try:
                with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                    run, wait, _slices = f.read().split()
            except OSError:
                continue
            found[(pid, int(tid))] = (int(run) / 1e9, int(wait) / 1e9)
    return found


def machine() -> list[int]:
    """The first line of /proc/stat: user, nice, system, idle, iowait, irq, softirq..."""
    with open("/proc/stat") as f:
        return [int(x) for x in f.readline().split()[1:]]


def accept_queue(port: int, samples: list[int], stop: threading.Event) -> None:
    """Sample the listening socket's accept queue (Recv-Q of `ss -l`) every 50 ms."""
    while not stop.wait(0.05):
        out = subprocess.run(
            ["ss", "-Hltn", f"sport = :{port}"], capture_output=True, text=True, check=False
        ).stdout.split()
        if out:
            samples.append(int(out[1]))


def report(load: str, messages: int) -> list[str]:
    """Serve leafmail fresh, run the load once, and describe the wall time."""
    spec = LOADS[load]
    lines: list[str] = []
    tmpdir = tempfile.TemporaryDirectory(prefix="smtp-sched-")
    with tmpdir as tmp, serving("leafmail", Path(tmp)) as target:
        pids = descendants(target.pid)
        before, cpu0 = schedstat(pids), machine()
        samples: list[int] = []
        stop = threading.Event()
        sampler = threading.Thread(target=accept_queue, args=(target.port, samples, stop))
        sampler.start()
        start = time.perf_counter()
        subprocess.run(spec.argv(target.port, messages), check=True, capture_output=True)
        wall = time.perf_counter() - start
        stop.set()
        sampler.join()
        after, cpu1 = schedstat(pids), machine()
    lines.append(f"{load}: {messages / wall:,.0f} msg/s over {wall:.2f} s")
    for (pid, tid), (run1, wait1) in sorted(after.items()):
        run0, wait0 = before.get((pid, tid), (0.0, 0.0))
        run, wait = (run1 - run0) / wall, (wait1 - wait0) / wall
        if run < 0.005:
            continue
        who = "supervisor" if pid == target.pid else f"pid {pid}"
        thread = "loop" if tid == pid else f"thread {tid}"
        lines.append(
            f"  {who} {thread}: running {run:.2f}, waiting for a CPU {wait:.2f}, "
            f"asleep {max(0.0, 1 - run - wait):.2f}"
        )
    d = [b - a for a, b in zip(cpu0, cpu1, strict=True)]
    cores = (os.cpu_count() or 1) / sum(d)
    lines.append(
        f"  machine: idle {d[3] * cores:.2f} cores, iowait {d[4] * cores:.2f}, "
        f"user {(d[0] + d[1]) * cores:.2f}, system {d[2] * cores:.2f}, "
        f"softirq {d[6] * cores:.2f}"
    )
    mean = sum(samples) / len(samples) if samples else 0.0
    lines.append(f"  accept queue: max {max(samples, default=0)}, mean {mean:.1f}")
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.smtp_sched", description=__doc__)
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.add_argument("--load", default="s100-1K", choices=list(LOADS))
    p.add_argument("--messages", type=int, default=3000)
    args = p.parse_args(argv)
    for line in report(args.load, args.messages):
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
