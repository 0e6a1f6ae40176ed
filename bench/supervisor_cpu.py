"""leafmail's supervisor alone: its CPU per connection, to the nanosecond.

The supervisor (the root parent) accepts each connection, asks the gates, hands the
descriptor to a worker and writes the connection's log line when the worker reports
the end. `smtp_alone` splits the CPU of a whole SMTP load by process, but from
/proc/PID/stat's clock ticks and next to the spool's disk work; this drives sessions
that only read the greeting and say QUIT, so the supervisor's per-connection work is
most of what happens, and it reads the supervisor's own run time from
/proc/PID/schedstat (nanoseconds, the scheduler's account), and the same for every
process below it (the smtpd workers; the queue manager is idle here) as "workers": when
the workers accept themselves (netserver.modes.direct) the supervisor does nothing per
connection, so only the sum of the two compares the two accept paths.

    python -m bench.supervisor_cpu [--connections 3000] [--clients 20] [--rounds 3]

Compare two trees by running each tree's venv alternately (A/B); the figure moves with
other load on the machine much less than throughput does, but it still moves.
"""

from __future__ import annotations

import argparse
import socket
import statistics
import sys
import tempfile
import threading
from pathlib import Path

from .smtp_bench import serving

IO_TIMEOUT = 10.0
WARM_UP = 50  # connections before the measurement: the workers are up, the memos warm


def run_time(pid: int) -> int:
    """Nanoseconds `pid` (its main thread) has run on a CPU."""
    with open(f"/proc/{pid}/schedstat", "rb") as f:
        return int(f.read().split()[0])


def tree_run_time(pid: int) -> int:
    """Nanoseconds every thread of every process below `pid` has run on a CPU."""
    total = 0
    todo = [pid]
    while todo:
        parent = todo.pop()
        for task in Path(f"/proc/{parent}/task").iterdir():
            for child in (task / "children").read_text().split():
                todo.append(int(child))
                for thread in Path(f"/proc/{child}/task").iterdir():
                    total += int((thread / "schedstat").read_text().split()[0])
    return total


def sessions(port: int, count: int) -> None:
    """`count` SMTP sessions one after the other: greeting, QUIT, its reply, close."""
    for _ in range(count):
        with socket.create_connection(("127.0.0.1", port), timeout=IO_TIMEOUT) as sock:
            replies = sock.makefile("rb")
            line = replies.readline()
            while line[3:4] == b"-":
                line = replies.readline()
            if not line.startswith(b"220"):
                raise RuntimeError(f"greeting {line!r}")
            sock.sendall(b"QUIT\r\n")
            if not replies.readline().startswith(b"221"):
                raise RuntimeError("no 221 after QUIT")


def measure(connections: int, clients: int) -> tuple[float, float]:
    """One fresh `leafmail serve`: the supervisor's and the workers' µs per connection."""
    per_client = max(1, connections // clients)
    failures: list[BaseException] = []

    def client() -> None:
        try:
            sessions(target.port, per_client)
        except (OSError, RuntimeError) as exc:
            failures.append(exc)

    with (
        tempfile.TemporaryDirectory(prefix="supervisor-cpu-") as tmp,
        serving("leafmail", Path(tmp)) as target,
    ):
        sessions(target.port, WARM_UP)
        before, below = run_time(target.pid), tree_run_time(target.pid)
        threads = [threading.Thread(target=client) for _ in range(clients)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        used = run_time(target.pid) - before
        used_below = tree_run_time(target.pid) - below
    if failures:  # a figure from sessions that failed would flatter the server
        raise RuntimeError(f"{len(failures)} clients failed: {failures[0]!r}")
    count = per_client * clients
    return used / count / 1000, used_below / count / 1000


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.supervisor_cpu", description=__doc__)
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.add_argument("--connections", type=int, default=3000, choices=range(100, 100_001),
                   metavar="100..100000")  # fmt: skip
    p.add_argument("--clients", type=int, default=20, choices=range(1, 201), metavar="1..200")
    p.add_argument("--rounds", type=int, default=3, choices=range(1, 11), metavar="1..10")
    args = p.parse_args(argv)
    figures: list[tuple[float, float]] = []
    for round_ in range(1, args.rounds + 1):
        figures.append(measure(args.connections, args.clients))
        sup, below = figures[-1]
        print(
            f"round {round_}: supervisor {sup:.1f} + workers {below:.1f} = "
            f"{sup + below:.1f} µs/connection",
            flush=True,
        )
    sup = statistics.median(f[0] for f in figures)
    below = statistics.median(f[1] for f in figures)
    both = statistics.median(f[0] + f[1] for f in figures)
    print(f"median supervisor {sup:.1f}, workers {below:.1f}, together {both:.1f} µs/connection")
    return 0


if __name__ == "__main__":
    sys.exit(main())
