"""leafmail alone for several rounds: CPU per message, process by process, user and system.

`smtp_bench` gives one CPU figure per server; finding where a change in it comes from
needs the split: which process (supervisor, smtpd workers, queue manager), and user or
system time. Each round starts a fresh `leafmail serve` under a scratch directory and
drives it with smtp-source, as `smtp_bench` does. With ``--delete`` each round's
scratch tree is deleted as soon as the round ends (what `smtp_bench` did before
`bench.inodes`), which reproduces the rise of system time on ext4 without a journal;
without it, the trees are kept until the end.

Whether the rate is bounded by CPU or by waiting shows in two more figures: the cores
the whole machine was busy during the run (out of `os.cpu_count()`), and the share of
the run each process's main thread (an smtpd worker's event loop) spent on a CPU, waiting
for one (runnable, from /proc/PID/schedstat) and asleep (nothing to do: its sessions wait
for the client or for a commit). Loops that wait for a CPU on a machine near all its cores
are CPU-bound; loops asleep with cores idle wait on latency.

Each line also gives the voluntary context switches per message of the server's
threads (every thread of every process that is alive at both ends of the run; a process
forked and reaped within it is not counted), the hand-overs between threads and
processes, each a wake-up, and the disk's flush requests per message (field 16 of
/sys/block/DEV/stat for the disk under the scratch tree; anything else writing to that
disk adds to it): on a disk with a write-back cache a flush is what a barrier costs.
``--servers postfix,leafmail`` runs Postfix (smtp_bench's private instance, its
processes being the master's descendants) in the same rounds, one after the other.

    python -m bench.smtp_alone [--rounds 4] [--loads s20-10K] [--servers leafmail] [--delete]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .cpu import machine_cpu, per_task
from .machine import disk_flushes
from .smtp_bench import LOADS, Load, serving
from .smtp_idle import descendants

_TICK = float(os.sysconf("SC_CLK_TCK"))
Times = dict[int, tuple[str, float, float]]  # pid -> (name, user, system) in seconds


def times(root: int) -> Times:
    """User and system seconds (with reaped children's) of `root` and its descendants."""
    found: Times = {}
    for pid in descendants(root):
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                raw = f.read()
        except OSError:
            continue
        fields = raw[raw.rindex(b")") + 2 :].split()
        utime, stime, cutime, cstime = (int(x) / _TICK for x in fields[11:15])
        found[pid] = (_role(pid, root), utime + cutime, stime + cstime)
    return found


def switches(root: int) -> int:
    """Voluntary context switches so far of every thread of `root` and its descendants."""
    total = 0
    for pid in descendants(root):
        for status in per_task(pid, "status") or []:
            at = status.find(b"\nvoluntary_ctxt_switches:")
            if at >= 0:
                total += int(status[at:].split(None, 2)[1])
    return total


def _role(pid: int, root: int) -> str:
    """ "parent" for the server itself, else its pid (the workers share one command line)."""
    return "parent" if pid == root else f"pid {pid}"


def main_threads(root: int) -> dict[int, tuple[int, int]]:
    """pid -> (ns on a CPU, ns runnable but waiting for one) of the main thread of
    `root` and of each descendant (/proc/PID/schedstat is the thread group leader's)."""
    found = {}
    for pid in descendants(root):
        try:
            with open(f"/proc/{pid}/schedstat", "rb") as f:
                on_cpu, waiting = f.read().split()[:2]
        except (OSError, ValueError):
            continue
        found[pid] = (int(on_cpu), int(waiting))
    return found


def loop_shares(
    before: dict[int, tuple[int, int]], after: dict[int, tuple[int, int]], wall: float
) -> str:
    """ "on a CPU/waiting for one/asleep" percentages of the run for each main thread
    that was on a CPU for at least a tenth of it (the workers' loops)."""
    shares = []
    for pid, (on_cpu, waiting) in after.items():
        on0, wait0 = before.get(pid, (0, 0))
        ran, queued = (on_cpu - on0) / 1e9 / wall, (waiting - wait0) / 1e9 / wall
        if ran >= 0.1:
            shares.append(f"{ran:.0%}/{queued:.0%}/{max(1.0 - ran - queued, 0.0):.0%}")
    return " ".join(shares)


PerProcess = dict[str, tuple[float, float]]  # name -> (user, system) µs/msg


def run(load: Load, port: int, root: int) -> tuple[float, float, PerProcess, str]:
    """One smtp-source run: msgs/s, voluntary switches/msg, (user, system) µs/msg of each
    process that ran, and where the time went (machine busy, loops' shares)."""
    before, switched = times(root), switches(root)
    sched, busy = main_threads(root), machine_cpu()[0]
    start = time.perf_counter()
    subprocess.run(load.argv(port, load.messages), check=True, capture_output=True)
    wall = time.perf_counter() - start
    rate = load.messages / wall
    cores = (machine_cpu()[0] - busy) / wall
    where = f"machine {cores:.2f} of {os.cpu_count()} cores busy; loops on a CPU/waiting/asleep "
    where += loop_shares(sched, main_threads(root), wall)
    per_switch = (switches(root) - switched) / load.messages
    per_message: PerProcess = {}
    for pid, (name, user, system) in times(root).items():
        _, user0, system0 = before.get(pid, (name, 0.0, 0.0))
        used = ((user - user0) / load.messages * 1e6, (system - system0) / load.messages * 1e6)
        if sum(used) > 0:
            per_message[name] = used
    return rate, per_switch, per_message, where


def main(argv: list[str] | None = None) -> int:
    """Run the rounds and print one line per load and round."""
    p = argparse.ArgumentParser(prog="python -m bench.smtp_alone", description=__doc__)
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.add_argument("--rounds", type=int, default=4, choices=range(1, 11), metavar="1..10")
    p.add_argument("--loads", default="s20-10K", help=f"comma-separated, of {', '.join(LOADS)}")
    p.add_argument("--servers", default="leafmail", help="comma-separated: leafmail, postfix")
    p.add_argument("--delete", action="store_true", help="delete each round's tree at once")
    args = p.parse_args(argv)
    servers = args.servers.split(",")
    if not servers or not set(servers) <= {"leafmail", "postfix"}:
        p.error(f"--servers takes leafmail and postfix, not {args.servers!r}")
    loads = [LOADS[name] for name in args.loads.split(",") if name in LOADS]
    if not loads:
        p.error(f"no known load in {args.loads!r}")
    with tempfile.TemporaryDirectory(prefix="smtp-alone-") as tmp:
        os.chmod(tmp, 0o711)  # noqa: S103 - search only, for Postfix's own user
        for round_ in range(1, args.rounds + 1):
            for server in servers:
                scratch = Path(tempfile.mkdtemp(dir=tmp))
                with serving(server, scratch) as target:
                    for load in loads:
                        os.sync()
                        flushed = disk_flushes(scratch) or 0
                        rate, switched, used, where = run(load, target.port, target.pid)
                        per_flush = ((disk_flushes(scratch) or 0) - flushed) / load.messages
                        total = sum(user + system for user, system in used.values())
                        split = "; ".join(
                            f"{name}: user {user:,.0f} sys {system:,.0f}"
                            for name, (user, system) in used.items()
                        )
                        print(
                            f"round {round_} {server} {load.name}: {rate:,.0f} msg/s, "
                            f"{switched:.1f} switches/msg, {per_flush:.2f} flushes/msg, "
                            f"{total:,.0f} µs/msg ({split}); {where}",
                            flush=True,
                        )
                if args.delete:
                    shutil.rmtree(scratch)
    return 0


if __name__ == "__main__":
    sys.exit(main())
