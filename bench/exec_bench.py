"""Benchmark 2: connections per second running a command per connection.

``netserver serve --mode fork -- /bin/echo hi`` against ucspi-tcp's
``tcpserver ... /bin/echo hi``. The command is the same for both, a real exec of a tiny
program that writes one line and exits, so the figure is what a server adds around
process creation: accept, access check, spawn, reap, close, log.

Flags, chosen to give both servers the same job:

* tcpserver ``-1 -H -R -l 0 -c 1000``: print the bound port (readiness), no reverse DNS,
  no ident (RFC 1413) lookup, no local name lookup, up to 1000 children;
* netserver ``--max-conns 1000 --timeout 0 --quiet``: the same cap; no idle timeout,
  which tcpserver does not have either; no line per served connection, as tcpserver
  prints none without ``-v`` (netserver still logs refusals and errors; there are none
  here). Both servers' stderr goes to a file.

So both now do the same work per connection: accept, spawn, reap, close, and no log
line. (Until ``--quiet`` existed netserver could not turn its line off and did strictly
more; bench/RESULTS.md measures what the line costs.)

netserver starts its commands from a spawner process (see netserver.modes.spawner), whose
CPU, and that of the commands it reaped, the server CPU figures include (bench.cpu
counts the server's live children). ``python -m bench.exec_cpu`` splits it: server,
spawner, commands.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from .clients import Sample, combine, probe_read_all, run_load
from .echo_bench import Progress
from .procs import ServerSpec, python_module, running
from .quiet import QuietGate

NETSERVER = "netserver exec"
TCPSERVER = "tcpserver"
COMMAND = ("/bin/echo", "hi")
EXPECT = b"hi\n"


def ensure_tcpserver() -> str:
    """The path of tcpserver, installing Debian's ucspi-tcp if it is missing (as root)."""
    found = shutil.which("tcpserver")
    if found:
        return found
    install = ["apt-get", "install", "-y", "-q", "ucspi-tcp"]
    if subprocess.run(install, check=False, capture_output=True).returncode != 0:
        subprocess.run(["apt-get", "update", "-q"], check=False, capture_output=True)
        subprocess.run(install, check=True, capture_output=True)
    found = shutil.which("tcpserver")
    if not found:
        raise RuntimeError("tcpserver is not installed and apt-get could not install ucspi-tcp")
    return found


def exec_servers(tcpserver: str) -> list[ServerSpec]:
    """netserver and tcpserver, both running `COMMAND` per connection."""
    return [
        ServerSpec(
            NETSERVER,
            lambda fd: python_module(
                "netserver.cli",
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--mode",
                "fork",
                "--max-conns",
                "1000",
                "--timeout",
                "0",
                "--quiet",
                "--ready-fd",
                str(fd),
                "--",
                *COMMAND,
            ),
        ),
        ServerSpec(
            TCPSERVER,
            lambda _fd: [
                tcpserver,
                "-1",
                "-H",
                "-R",
                "-l",
                "0",
                "-c",
                "1000",
                "127.0.0.1",
                "0",
                *COMMAND,
            ],
            announce="stdout-port",
        ),
    ]


@dataclass(frozen=True)
class ConnLoad:
    """The load: concurrent connections, timing, and a cap on the total."""

    concurrency: int = 8
    warmup: float = 0.5
    seconds: float = 3.0
    total: int = 30_000

    def argv(self, port: int, server_pid: int) -> list[str]:
        """Command line of the load process."""
        return python_module(
            "bench.conn_load",
            "--port",
            str(port),
            "--concurrency",
            str(self.concurrency),
            "--expect",
            EXPECT.decode().rstrip("\n"),
            "--warmup",
            str(self.warmup),
            "--seconds",
            str(self.seconds),
            "--total",
            str(self.total),
            "--server-pid",
            str(server_pid),
        )


def run_exec(
    load: ConnLoad, rounds: int, log_dir: Path, progress: Progress, gate: QuietGate
) -> dict[str, list[Sample]]:
    """Both servers once per round, order alternating; samples by server name.

    Each round starts a fresh server on a fresh port, so the TIME_WAIT entries one run
    leaves behind never collide with the next run's connections. `gate` is asked before
    each measurement to wait (within its budget) for a quiet machine.
    """
    servers = exec_servers(ensure_tcpserver())
    samples: dict[str, list[Sample]] = {spec.name: [] for spec in servers}
    for r in range(rounds):
        order = servers if r % 2 == 0 else servers[::-1]
        for spec in order:
            busy = gate.wait()
            with running(spec, log_dir) as server:
                probe_read_all(server.port, EXPECT)
                results = run_load(
                    [load.argv(server.port, server.proc.pid)], load.warmup + load.seconds + 60
                )
            sample = combine(results)
            samples[spec.name].append(sample)
            progress(
                f"  round {r + 1}/{rounds} {spec.name:<16} {sample.rate:>10,.0f} conn/s"
                f"  (machine {busy:.0%} busy before, others {sample.other_util:.2f} cores during)"
            )
    return samples
