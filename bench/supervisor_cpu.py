"""leafmail's supervisor alone: its CPU per connection, to the nanosecond.

The supervisor (the root parent) accepts each connection, asks the gates, hands the
descriptor to a worker and writes the connection's log line when the worker reports
the end. `smtp_alone` splits the CPU of a whole SMTP load by process, but from
/proc/PID/stat's clock ticks and next to the spool's disk work; this drives sessions
that only read the greeting and say QUIT, so the supervisor's per-connection work is
most of what happens, and it reads the supervisor's own run time from
/proc/PID/schedstat (nanoseconds, the scheduler's account). Workers are excluded.

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


def measure(connections: int, clients: int) -> float:
    """One fresh `leafmail serve`: the supervisor's µs per connection."""
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
        before = run_time(target.pid)
        threads = [threading.Thread(target=client) for _ in range(clients)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        used = run_time(target.pid) - before
    if failures:  # a figure from sessions that failed would flatter the server
        raise RuntimeError(f"{len(failures)} clients failed: {failures[0]!r}")
    return used / (per_client * clients) / 1000


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.supervisor_cpu", description=__doc__)
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.add_argument("--connections", type=int, default=3000, choices=range(100, 100_001),
                   metavar="100..100000")  # fmt: skip
    p.add_argument("--clients", type=int, default=20, choices=range(1, 201), metavar="1..200")
    p.add_argument("--rounds", type=int, default=3, choices=range(1, 11), metavar="1..10")
    args = p.parse_args(argv)
    figures = []
    for round_ in range(1, args.rounds + 1):
        figures.append(measure(args.connections, args.clients))
        print(f"round {round_}: supervisor {figures[-1]:.1f} µs/connection", flush=True)
    print(f"median {statistics.median(figures):.1f} µs/connection")
    return 0


if __name__ == "__main__":
    sys.exit(main())
