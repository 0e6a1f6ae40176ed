"""Benchmark 1: echo requests per second, netserver's event-loop mode against bare protocols.

Six servers, each its own process on 127.0.0.1 port 0:

* netserver async: ``netserver serve --mode async --handler examples.echo:async_main``
  (the coroutine form, line by line) with its defaults (uvloop, 300 s idle timeout,
  64 KiB line limit, a log line per connection);
* netserver async chunks: the same with ``--handler examples.echo:async_chunks`` (the
  coroutine form echoing each read as it came, the work the bare servers do: pipelined,
  the line-by-line handler answers 8 lines where they answer one chunk);
* netserver callback: the same with ``--handler examples.echo:Echo`` (the callback form,
  chunks back as they arrive, as the bare servers do);
* bare asyncio: `bench.echo_server` on the default asyncio loop;
* bare uvloop: the same protocol on uvloop;
* bare uvloop lines: `bench.echo_server --lines` on uvloop, a bare protocol answering
  line by line (each line its own bytes, a read's answers in one send): the like-with-like
  baseline of the line-by-line coroutine handler.

The same load generator (`bench.echo_load`) drives them all, and the report takes
medians over rounds. By default (`EchoLoad.turn` > 0) every server runs for the whole
benchmark and each round is one load process that measures them all in short turns, one
server at a time, cycling until each has had `seconds` (`bench.echo_load.run_sliced`).
Why: a single window per server per round, the old way (``turn`` 0, still there to
compare with), put whatever else happened in those seconds (another process's burst, the
scheduler putting client and server on one core) on one server only; quiet runs gave
rounds from 0.69x to 0.98x for one ratio. Turns of a tenth of a second spread it over
every server alike, and with the servers already running a round costs no start-up. In the
old way the server order rotates each round for the same reason.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .clients import Sample, combine, probe_echo, run_load
from .procs import ServerSpec, python_module, running
from .quiet import QuietGate

NETSERVER = "netserver async"
NETSERVER_CHUNKS = "netserver async chunks"
NETSERVER_CALLBACK = "netserver callback"
BARE_ASYNCIO = "bare asyncio"
BARE_UVLOOP = "bare uvloop"
BARE_UVLOOP_LINES = "bare uvloop lines"


def netserver_argv(handler: str, fd: int) -> list[str]:
    """``netserver serve`` in event-loop mode with `handler`, its defaults otherwise."""
    return python_module(
        "netserver.cli",
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--mode",
        "async",
        "--handler",
        handler,
        "--ready-fd",
        str(fd),
    )


def echo_servers() -> list[ServerSpec]:
    """The six servers, in the order of the first round."""
    return [
        ServerSpec(NETSERVER, lambda fd: netserver_argv("examples.echo:async_main", fd)),
        ServerSpec(NETSERVER_CHUNKS, lambda fd: netserver_argv("examples.echo:async_chunks", fd)),
        ServerSpec(NETSERVER_CALLBACK, lambda fd: netserver_argv("examples.echo:Echo", fd)),
        ServerSpec(
            BARE_ASYNCIO,
            lambda fd: python_module(
                "bench.echo_server", "--loop", "asyncio", "--ready-fd", str(fd)
            ),
        ),
        ServerSpec(
            BARE_UVLOOP,
            lambda fd: python_module(
                "bench.echo_server", "--loop", "uvloop", "--ready-fd", str(fd)
            ),
        ),
        ServerSpec(
            BARE_UVLOOP_LINES,
            lambda fd: python_module(
                "bench.echo_server", "--loop", "uvloop", "--lines", "--ready-fd", str(fd)
            ),
        ),
    ]


@dataclass(frozen=True)
class EchoLoad:
    """The load: connections, requests in flight per connection, timing, client processes."""

    conns: int = 50
    depth: int = 1
    warmup: float = 1.0
    seconds: float = 5.0
    clients: int = 1
    turn: float = 0.1

    def sliced_argv(self, servers: list[tuple[int, int]]) -> list[str]:
        """The one load process of a round measuring every (port, pid) in turns."""
        targets = [
            arg for port, pid in servers for arg in ("--port", str(port), "--server-pid", str(pid))
        ]
        return self._argv(self.conns, "--slice", str(self.turn), *targets)

    def argvs(self, port: int, server_pid: int) -> list[list[str]]:
        """Command lines of the load processes, the connections split between them."""
        shares = [
            self.conns // self.clients + (i < self.conns % self.clients)
            for i in range(self.clients)
        ]
        target = ("--port", str(port), "--server-pid", str(server_pid))
        return [self._argv(share, *target) for share in shares]

    def _argv(self, conns: int, *more: str) -> list[str]:
        """``python -m bench.echo_load`` with this load's settings and `more`."""
        return python_module(
            "bench.echo_load",
            "--conns",
            str(conns),
            "--depth",
            str(self.depth),
            "--warmup",
            str(self.warmup),
            "--seconds",
            str(self.seconds),
            *more,
        )


Progress = Callable[[str], None]


def run_echo(
    load: EchoLoad, rounds: int, log_dir: Path, progress: Progress, gate: QuietGate
) -> dict[str, list[Sample]]:
    """Every server once per round; samples by server name.

    `gate` is asked before each measurement (each round, when sliced) to wait (within
    its budget) for a quiet machine.
    """
    if load.turn > 0:
        return _run_sliced(load, rounds, log_dir, progress, gate)
    servers = echo_servers()
    samples: dict[str, list[Sample]] = {spec.name: [] for spec in servers}
    for r in range(rounds):
        order = servers[r % len(servers) :] + servers[: r % len(servers)]
        for spec in order:
            busy = gate.wait()
            with running(spec, log_dir) as server:
                probe_echo(server.port)
                results = run_load(
                    load.argvs(server.port, server.proc.pid), load.warmup + load.seconds + 30
                )
            sample = combine(results)
            samples[spec.name].append(sample)
            progress(
                f"  round {r + 1}/{rounds} {spec.name:<16} {sample.rate:>10,.0f} req/s"
                f"  (machine {busy:.0%} busy before, others {sample.other_util:.2f} cores during)"
            )
    return samples


def _run_sliced(
    load: EchoLoad, rounds: int, log_dir: Path, progress: Progress, gate: QuietGate
) -> dict[str, list[Sample]]:
    """Every server running at once; each round one load process measures all in turns."""
    specs = echo_servers()
    samples: dict[str, list[Sample]] = {spec.name: [] for spec in specs}
    with contextlib.ExitStack() as stack:
        servers = [stack.enter_context(running(spec, log_dir)) for spec in specs]
        for server in servers:
            probe_echo(server.port)
        argv = load.sliced_argv([(s.port, s.proc.pid) for s in servers])
        turns = max(1, round(load.seconds / load.turn))  # as `bench.echo_load` counts them
        budget = len(servers) * (load.warmup + turns * (load.turn + 0.5)) + 30
        for r in range(rounds):
            busy = gate.wait()
            (result,) = run_load([argv], budget)
            for server, measured in zip(servers, result["servers"], strict=True):
                sample = combine([measured])
                samples[server.name].append(sample)
                progress(
                    f"  round {r + 1}/{rounds} {server.name:<18} {sample.rate:>10,.0f} req/s"
                    f"  (machine {busy:.0%} busy before, others {sample.other_util:.2f} cores)"
                )
    return samples
