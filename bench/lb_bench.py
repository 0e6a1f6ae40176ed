"""SMTP acceptance behind HAProxy (issue 15): through the balancer against direct, one run.

One `leafmail serve` node with ``[smtp] proxy_from = ["127.0.0.9"]`` takes the same
smtp-source loads two ways, alternately, in every round:

* direct: smtp-source -> the node (127.0.0.1 is not the balancer: no header asked);
* haproxy: smtp-source -> HAProxy (``mode tcp``, ``send-proxy-v2``, connecting from
  127.0.0.9) -> the node, which reads the PROXY v2 header, then serves the client as
  127.0.0.1.

The loads, the run and its checks are those of `smtp_bench` (smtp-source exits 0 and
silent; the spool's ``queue/`` grew by exactly -m files). HAProxy's own CPU is not in
the server column (it shows under "others"); its cost is in the msgs/s ratio, which is
the figure asked for. Readiness: HAProxy is ready when a connection through it is
greeted with 220, tried in a loop bounded in time.

    python -m bench.lb_bench [--loads s20-10K,s1-1K,s100-1K] [--rounds 3]
        [--messages N] [--quiet-wait 120] [--results bench/RESULTS.md]
"""

from __future__ import annotations

import argparse
import contextlib
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from .procs import RunningServer, ServerSpec, running
from .report import fmt_or_na, median_known, progress, unwind_on_sigterm, write_section
from .smtp_bench import (
    DEFAULT_LOADS,
    LOADS,
    Load,
    ProcessTarget,
    QuietGate,
    Sample,
    _line,
    machine_lines,
    run_load,
)
from .smtp_peers import HOSTNAME, LEAFMAIL

SECTION = "## SMTP acceptance through HAProxy (issue 15)"
WAYS = ("direct", "haproxy")
BALANCER_IP = "127.0.0.9"
READY_TIMEOUT = 20.0
HAPROXY = shutil.which("haproxy") or "/usr/sbin/haproxy"


def node_spec(scratch: Path) -> ServerSpec:
    """``leafmail serve`` trusting the balancer's address, spooling under `scratch`."""
    config = scratch / "leafmail.toml"
    config.write_text(f'[smtp]\nproxy_from = ["{BALANCER_IP}"]\n')
    return ServerSpec(
        "leafmail",
        lambda fd: [
            str(LEAFMAIL), "serve", "--listen", "127.0.0.1:0", "--spool", str(scratch / "spool"),
            "--hostname", HOSTNAME, "--config", str(config), "--ready-fd", str(fd),
        ],
    )  # fmt: skip


def haproxy_config(node_port: int, listen_fd: int) -> str:
    """One node behind HAProxy as contrib/haproxy/haproxy.cfg has it (no checks needed)."""
    return f"""\
global
    maxconn 4000
defaults
    mode tcp
    timeout connect 5s
    timeout client 10m
    timeout server 10m
frontend smtp
    bind fd@{listen_fd}
    default_backend nodes
backend nodes
    server node 127.0.0.1:{node_port} send-proxy-v2 source {BALANCER_IP}
"""


@contextlib.contextmanager
def haproxy(node_port: int, scratch: Path) -> Iterator[int]:
    """HAProxy on a socket we bound to port 0 (``bind fd@N``); yields that port."""
    listener = socket.create_server(("127.0.0.1", 0), backlog=1024)
    port = listener.getsockname()[1]
    config = scratch / "haproxy.cfg"
    config.write_text(haproxy_config(node_port, listener.fileno()))
    with open(scratch / "haproxy.log", "wb") as log:
        proc = subprocess.Popen(
            [HAPROXY, "-db", "-f", str(config)],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            pass_fds=(listener.fileno(),),
        )
    listener.close()
    try:
        _wait_greeting(port, proc, scratch / "haproxy.log")
        yield port
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _wait_greeting(port: int, proc: subprocess.Popen[bytes], log: Path) -> None:
    """Until a session through HAProxy is greeted with 220 (bounded in time)."""
    deadline = time.monotonic() + READY_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"haproxy exited {proc.returncode}: {log.read_text()[-500:]}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 2) as s:
            s.settimeout(2)
            if s.recv(4).startswith(b"220"):
                s.sendall(b"QUIT\r\n")
                return
        time.sleep(0.05)
    raise RuntimeError("no SMTP greeting through haproxy")


class ViaTarget(ProcessTarget):
    """The same node, reached through HAProxy's port."""

    def __init__(self, server: RunningServer, store: Path, port: int) -> None:
        super().__init__(server, store)
        self.name, self.port = "haproxy", port


def run_rounds(
    loads: Sequence[Load], rounds: int, messages: int | None, gate: QuietGate
) -> list[Sample]:
    """Each round: a fresh node and HAProxy; every load direct and through, order rotated.

    Each round's tree is kept until the end: deleting it would tax the next round's file
    creation on ext4 without a journal (`bench.inodes`). Both ways of a round share one
    spool and nothing is deleted between them, so they pay alike.
    """
    samples: list[Sample] = []
    with tempfile.TemporaryDirectory(prefix="lb-bench-") as top:
        for round_ in range(rounds):
            scratch = Path(tempfile.mkdtemp(prefix=f"round{round_ + 1}-", dir=top))
            with running(node_spec(scratch), scratch) as node:
                store = scratch / "spool" / "queue"
                direct = ProcessTarget(node, store)
                direct.name = "direct"
                with haproxy(node.port, scratch) as port:
                    via = ViaTarget(node, store, port)
                    order = [direct, via] if round_ % 2 == 0 else [via, direct]
                    for load in loads:
                        for target in order:
                            gate.wait()
                            n = messages or load.messages
                            sample = run_load(target, load, n, round_ + 1)
                            samples.append(sample)
                            progress(_line(sample))
    return samples


def table(samples: Sequence[Sample], load: str) -> list[str]:
    """Per way: the median msgs/s, each round's, server µs/msg; then the ratio."""
    lines = [
        "| way | msgs/s (median) | rounds | node µs/msg | others' cores | failed |",
        "|---|---:|---|---:|---:|---:|",
    ]
    med: dict[str, float | None] = {}
    for way in WAYS:
        runs = [s for s in samples if s.load == load and s.server == way]
        med[way] = median_known([s.rate for s in runs])
        cells = [
            way,
            fmt_or_na(med[way], ",.0f"),
            ", ".join(fmt_or_na(s.rate, ",.0f") for s in runs),
            fmt_or_na(median_known([s.server_us for s in runs]), ",.0f"),
            fmt_or_na(median_known([s.others for s in runs]), ".2f"),
            str(sum(bool(s.problems) for s in runs)),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    a, b = med["haproxy"], med["direct"]
    if a is not None and b:
        paired = [
            fmt_or_na(None if x.rate is None or not y.rate else x.rate / y.rate, ".2f")
            for x in samples
            for y in samples
            if (x.server, y.server, x.load, y.load) == ("haproxy", "direct", load, load)
            and x.round == y.round
        ]
        lines += ["", f"- haproxy / direct: **{a / b:.2f}x**; per round {', '.join(paired)}"]
    cpu = {w: median_known([s.server_us for s in samples if (s.load, s.server) == (load, w)])
           for w in WAYS}  # fmt: skip
    if cpu["haproxy"] is not None and cpu["direct"]:
        lines.append(
            f"- node CPU per message, haproxy / direct: {cpu['haproxy'] / cpu['direct']:.2f}x "
            "(the PROXY header's cost on the node; steadier than msgs/s on a busy machine)"
        )
    return lines


def report(samples: Sequence[Sample], loads: Sequence[Load]) -> list[str]:
    command = shlex.join([".venv/bin/python", "-m", "bench.lb_bench", *sys.argv[1:]])
    version = subprocess.run([HAPROXY, "-v"], capture_output=True, text=True, check=False)
    haproxy_line = version.stdout.splitlines()[0] if version.stdout else "haproxy ?"
    out = [SECTION, "", f"Command: `{command}` (from the repository root), run on "
           f"{time.strftime('%Y-%m-%d %H:%M %Z')}.", "", *machine_lines(),
           f"- {haproxy_line}", ""]  # fmt: skip
    out += [
        "How: as in the SMTP acceptance section (smtp-source, a connection per message, "
        "the spool counted after every run), against one `leafmail serve` node with "
        f'`proxy_from = ["{BALANCER_IP}"]`: direct from 127.0.0.1, and through HAProxy '
        f"(`mode tcp`, `send-proxy-v2`, `source {BALANCER_IP}`), alternately in each round "
        "on the same node. Node µs/msg counts leafmail's CPU only; HAProxy's is in "
        "'others'. On a shared machine msgs/s follow the other processes' load (the "
        "'others' column): read the ratios with it.",
        "",
    ]
    for load in loads:
        runs = [s for s in samples if s.load == load.name]
        out += [
            f"### {load.name}: {load.sessions} session(s) x {load.size // 1024} KiB, "
            f"-m {max((s.messages for s in runs), default=load.messages)}, "
            f"{max((s.round for s in runs), default=0)} rounds",
            "",
            *table(samples, load.name),
            "",
        ]
    failed = [f"- round {s.round} {s.server} {s.load}: {'; '.join(s.problems)}"
              for s in samples if s.problems]  # fmt: skip
    out += ["### Failed checks", "", *(failed or ["None: every run stored every message."]), ""]
    return out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.lb_bench", description=__doc__)
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.add_argument("--loads", default=",".join(DEFAULT_LOADS), help=f"of {', '.join(LOADS)}")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--messages", type=int, help="-m for every load (default: per load)")
    p.add_argument("--quiet-wait", type=float, default=120.0)
    p.add_argument("--results", type=Path, help="write the section into this Markdown file")
    args = p.parse_args(argv)
    if not 1 <= args.rounds <= 10:
        p.error("--rounds must be 1..10")
    if args.messages is not None and not 1 <= args.messages <= 50000:
        p.error("--messages must be 1..50000")
    unknown = [n for n in args.loads.split(",") if n not in LOADS]
    if unknown:
        p.error(f"unknown loads {unknown}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, unwind_on_sigterm)
    if not Path(HAPROXY).exists():
        print("haproxy is not installed (apt-get install haproxy)", file=sys.stderr)
        return 69
    loads = [LOADS[n] for n in args.loads.split(",")]
    samples = run_rounds(loads, args.rounds, args.messages, QuietGate(args.quiet_wait))
    lines = report(samples, loads)
    print("\n".join(lines))
    if args.results:
        write_section(args.results, SECTION, lines)
    return 1 if any(s.problems for s in samples) else 0


if __name__ == "__main__":
    sys.exit(main())
