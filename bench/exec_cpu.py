"""Where a fork-exec server's CPU goes per connection: server, helpers, commands.

Throughput on a machine shared with other work moves with the other work; CPU time
per connection does not, so this is what to compare when changing netserver's exec
path (A/B). For netserver and tcpserver in the same run, with the load of the exec
benchmark (`exec_bench`), it reports per connection:

* **server**: the server process's own CPU (utime + stime), its children excluded;
* **helpers**: that of its long-lived children (netserver's spawner), their children
  excluded;
* **commands**: the commands reaped during the window (cutime + cstime of the server
  and of its helpers).

    python -m bench.exec_cpu --rounds 4 --seconds 3
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from .clients import probe_read_all
from .conn_load import Counter, worker
from .cpu import children_of
from .exec_bench import EXPECT, ensure_tcpserver, exec_servers
from .loops import loop_factory
from .procs import running

_TICK = float(os.sysconf("SC_CLK_TCK"))


def own_and_reaped(pid: int) -> tuple[float, float]:
    """(utime + stime, cutime + cstime) of `pid` in seconds; zeros if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read()
    except OSError:
        return 0.0, 0.0
    fields = raw[raw.rindex(b")") + 2 :].split()
    utime, stime, cutime, cstime = (int(x) for x in fields[11:15])
    return (utime + stime) / _TICK, (cutime + cstime) / _TICK


@dataclass(frozen=True)
class Split:
    """One measurement: connections per second and CPU µs per connection by part."""

    rate: float
    server_us: float
    helpers_us: float
    commands_us: float


async def measure(port: int, pid: int, concurrency: int, seconds: float) -> Split:
    """Run the exec load for `seconds` after 0.5 s of warm-up; split the server's CPU."""
    counter = Counter(10**6)
    tasks = [asyncio.create_task(worker(port, EXPECT, counter)) for _ in range(concurrency)]
    try:
        await asyncio.sleep(0.5)
        helpers = children_of(pid)  # at the start: the long-lived ones and some commands
        before = {p: own_and_reaped(p) for p in (pid, *helpers)}
        n0, t0 = counter.ok, time.perf_counter()
        await asyncio.sleep(seconds)
        n1, t1 = counter.ok, time.perf_counter()
        lasting = set(children_of(pid))
        after = {p: own_and_reaped(p) for p in before if p == pid or p in lasting}
    finally:
        counter.running = False
        await asyncio.gather(*tasks)
    done = max(1, n1 - n0)
    own = {p: (after[p][0] - before[p][0]) * 1e6 / done for p in after}
    reaped = sum(after[p][1] - before[p][1] for p in after) * 1e6 / done
    helpers_us = sum(v for p, v in own.items() if p != pid)
    return Split(done / (t1 - t0), own[pid], helpers_us, reaped)


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.exec_cpu", description=__doc__)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--seconds", type=float, default=3.0)
    p.add_argument("--concurrency", type=int, default=8)
    args = p.parse_args()
    if not (1 <= args.rounds <= 20 and 0 < args.seconds <= 60 and 1 <= args.concurrency <= 64):
        p.error("--rounds 1..20, --seconds (0, 60], --concurrency 1..64")
    servers = exec_servers(ensure_tcpserver())
    splits: dict[str, list[Split]] = {spec.name: [] for spec in servers}
    with tempfile.TemporaryDirectory(prefix="netserver-bench-") as tmp:
        for r in range(args.rounds):
            for spec in servers if r % 2 == 0 else servers[::-1]:
                with running(spec, Path(tmp)) as server:
                    probe_read_all(server.port, EXPECT)
                    with asyncio.Runner(loop_factory=loop_factory("uvloop")) as runner:
                        split = runner.run(
                            measure(server.port, server.proc.pid, args.concurrency, args.seconds)
                        )
                splits[spec.name].append(split)
                print(
                    f"round {r + 1} {spec.name:<15} {split.rate:>7,.0f} conn/s  server "
                    f"{split.server_us:6.1f}  helpers {split.helpers_us:6.1f}  commands "
                    f"{split.commands_us:6.0f} µs/conn  (load {os.getloadavg()[0]:.1f})",
                    flush=True,
                )
    print("\n| server | median conn/s | server µs/conn | helpers µs/conn | commands µs/conn |")
    print("|---|---|---|---|---|")
    for name, rows in splits.items():
        cells = [statistics.median(getattr(s, f) for s in rows) for f in Split.__annotations__]
        print(f"| {name} | {cells[0]:,.0f} | {cells[1]:.1f} | {cells[2]:.1f} | {cells[3]:.0f} |")


if __name__ == "__main__":
    main()
