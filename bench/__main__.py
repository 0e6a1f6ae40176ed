"""``python -m bench`` (``make bench``): netserver against other servers, in one run.

1. Echo requests per second in event-loop mode: netserver's handler forms (a coroutine
   reading lines, a coroutine echoing chunks, a callback object echoing chunks) against
   a bare asyncio Protocol echo server on the default loop and on uvloop, and the line
   handler also against a bare uvloop Protocol answering line by line; ping-pong, then
   pipelined.
2. Connections per second running a command per connection: netserver against
   ucspi-tcp's tcpserver, both running ``/bin/echo hi``.

Every server is its own process on 127.0.0.1 port 0 and is stopped when its
measurement ends, error or not (the echo servers when the echo benchmark ends: they are
measured in short interleaved turns, `--turn`, see `bench.echo_bench`). The output is
Markdown (progress goes to stderr), so a run can be pasted into bench/RESULTS.md as it is.

    python -m bench                      # everything, about 8 minutes
    python -m bench --only echo --rounds 1 --seconds 2     # a quick look
"""

from __future__ import annotations

import argparse
import shlex
import signal
import sys
import tempfile
import time
from pathlib import Path
from types import FrameType

from . import echo_bench, exec_bench, machine, report
from .echo_bench import EchoLoad, run_echo
from .exec_bench import ConnLoad, run_exec
from .quiet import QuietGate

ECHO_TARGET = 0.9
EXEC_TARGET = 1.0
MAX_ROUNDS = 20
MAX_SECONDS = 60.0


def _progress(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _terminate(signum: int, frame: FrameType | None) -> None:
    """SIGTERM unwinds like Ctrl-C, so every `finally` stops its server."""
    raise KeyboardInterrupt


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line, with bounds so no run can go on for hours by mistake."""
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--only", choices=("echo", "exec"), help="run one benchmark only")
    p.add_argument("--seconds", type=float, default=4.0, help="measuring window (default 4)")
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds (default 5)")
    p.add_argument("--conns", type=int, default=50, help="echo connections (default 50)")
    p.add_argument(
        "--depth",
        type=int,
        default=8,
        help="requests in flight per connection in the pipelined echo run (0 skips it)",
    )
    p.add_argument(
        "--clients", type=int, default=1, help="echo load processes (default 1; needs --turn 0)"
    )
    p.add_argument(
        "--turn",
        type=float,
        default=0.1,
        metavar="SECONDS",
        help="echo: measure the servers, all running, in turns this long, cycling until each "
        "has had --seconds per round (default 0.1); 0: one window per server per round, each "
        "server started for its own",
    )
    p.add_argument(
        "--concurrency", type=int, default=8, help="exec: connections at once (default 8)"
    )
    p.add_argument(
        "--quiet-wait",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="total time the run may wait for the machine to be quiet before its "
        "measurements (default 30; 0 never waits)",
    )
    args = p.parse_args(argv)
    if not (1 <= args.rounds <= MAX_ROUNDS and 0 < args.seconds <= MAX_SECONDS):
        p.error(f"--rounds must be 1..{MAX_ROUNDS} and --seconds in (0, {MAX_SECONDS:g}]")
    if not 0 <= args.quiet_wait <= 1800:
        p.error("--quiet-wait must be 0..1800 seconds")
    if not (1 <= args.clients <= 4 and args.clients <= args.conns and 0 <= args.depth <= 64):
        p.error("--clients must be 1..4 (at most --conns) and --depth 0..64")
    if not (args.turn == 0 or 0.05 <= args.turn <= args.seconds):
        p.error("--turn must be 0, or 0.05 to --seconds")
    if args.clients > 1 and args.turn:
        p.error("more than one --clients needs --turn 0")
    return args


def header(argv: list[str]) -> list[str]:
    """The machine and the exact command, first in every report."""
    lines = ["## Machine", ""]
    lines += [f"- {label}: {value}" for label, value in machine.describe()]
    command = shlex.join(["python", "-m", "bench", *argv])
    return [*lines, "", f"Command: `{command}` (cwd: the repository root)", ""]


def echo_section(args: argparse.Namespace, log_dir: Path, gate: QuietGate) -> list[str]:
    """Benchmark 1, ping-pong and (unless --depth 0) pipelined."""
    out = ["## 1. Echo requests per second, event-loop mode", ""]
    depths = [1] if args.depth <= 1 else [1, args.depth]
    for depth in depths:
        load = EchoLoad(
            conns=args.conns,
            depth=depth,
            warmup=1.0,
            seconds=args.seconds,
            clients=args.clients,
            turn=args.turn,
        )
        kind = "ping-pong" if depth == 1 else f"pipelined, {depth} requests in flight"
        _progress(f"echo, {kind}:")
        samples = run_echo(load, args.rounds, log_dir, _progress, gate)
        out += [
            f"### {kind.capitalize()}: {load.conns} connections, {load.clients} load process(es), "
            f"{load.seconds:g} s after {load.warmup:g} s warm-up, {args.rounds} rounds"
            + (f", in turns of {load.turn:g} s" if load.turn else ""),
            "",
            *report.table("req/s", samples),
            "",
            *report.ratio(samples, echo_bench.NETSERVER, echo_bench.BARE_UVLOOP, ECHO_TARGET),
            *report.ratio(samples, echo_bench.NETSERVER, echo_bench.BARE_UVLOOP_LINES, ECHO_TARGET),
            *report.ratio(samples, echo_bench.NETSERVER, echo_bench.BARE_ASYNCIO, ECHO_TARGET),
            *report.ratio(
                samples, echo_bench.NETSERVER_CHUNKS, echo_bench.BARE_UVLOOP, ECHO_TARGET
            ),
            *report.ratio(
                samples, echo_bench.NETSERVER_CALLBACK, echo_bench.BARE_UVLOOP, ECHO_TARGET
            ),
            "",
        ]
    return out


def exec_section(args: argparse.Namespace, log_dir: Path, gate: QuietGate) -> list[str]:
    """Benchmark 2."""
    load = ConnLoad(concurrency=args.concurrency, warmup=0.5, seconds=args.seconds)
    _progress("exec:")
    samples = run_exec(load, args.rounds, log_dir, _progress, gate)
    command = " ".join(exec_bench.COMMAND)
    return [
        "## 2. Connections per second, a command per connection",
        "",
        f"Command per connection: `{command}`. {load.concurrency} connections at once, each "
        f"connect, read to EOF, close; {load.seconds:g} s after {load.warmup:g} s warm-up, "
        f"{args.rounds} rounds. Server CPU includes the commands it ran.",
        "",
        *report.table("conn/s", samples),
        "",
        *report.ratio(samples, exec_bench.NETSERVER, exec_bench.TCPSERVER, EXEC_TARGET),
        "",
    ]


def main(argv: list[str] | None = None) -> int:
    """Run the chosen benchmarks and print the report."""
    raw = sys.argv[1:] if argv is None else argv
    args = parse_args(raw)
    signal.signal(signal.SIGTERM, _terminate)
    started = time.monotonic()
    print("\n".join(header(raw)), flush=True)
    gate = QuietGate(args.quiet_wait)
    with tempfile.TemporaryDirectory(prefix="netserver-bench-") as tmp:
        log_dir = Path(tmp)
        if args.only in (None, "echo"):
            print("\n".join(echo_section(args, log_dir, gate)), flush=True)
        if args.only in (None, "exec"):
            print("\n".join(exec_section(args, log_dir, gate)), flush=True)
    print(gate.summary())
    print(f"Total time: {time.monotonic() - started:.0f} s")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("bench: interrupted; every server it started has been stopped", file=sys.stderr)
        sys.exit(130)
