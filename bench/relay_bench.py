"""Relay drain (issue 4): leafmail emptying a full spool into a sink, against Postfix.

Issue 4 asks: drain 5,000 spooled messages to a sink smarthost and report msgs/s;
measure Postfix relaying the same messages to the same sink in the same run; leafmail
should reach at least 1.0x Postfix. Issue 12 (the process split) asks the daemon's drain
to stay at 1.2x or better.

The sink is Postfix's ``smtp-sink`` on 127.0.0.1 (it accepts everything and stores
nothing), started fresh for every run with ``-c``, so its running ``mesg=`` counter says
how many messages it took. Every side is filled the same way, untimed, with
``smtp-source -s 20 -m N -l SIZE -f a@src.test -t b@example.test``, and then timed while
it empties its queue into the sink:

* postfix: a private instance (set up as in ``shared/BENCH-NOTES.md`` and
  `smtp_peers`, but relaying instead of discarding): ``relayhost = [127.0.0.1]:SINK``,
  ``relay_domains = example.test``, no DNS, no chroot, and
  ``defer_transports = smtp, relay`` while it is filled, so every message waits in
  ``deferred/``. Then ``defer_transports`` is emptied and the instance reloaded; the
  clock starts at ``postqueue -f`` and stops when the sink has all N messages and the
  queue directories are empty. Everything else stays at Postfix's defaults, among them
  ``default_destination_concurrency_limit = 20`` (slow start from 5) and connection
  caching on demand.
* leafmail-flush: ``leafmail serve`` with ``[delivery] mode = "offline"`` is filled and
  stopped; the clock runs from the start of ``leafmail flush`` to its exit (status 0),
  after which the sink must have N messages and ``leafmail queue --json`` must be ``[]``.
* leafmail-daemon: a spool filled the same way (offline), then ``leafmail serve`` with
  ``mode = "smarthost"`` on it; the clock runs from its READY line until the sink has N
  messages and the spool's ``queue/`` and ``deferred/`` are empty.

Both leafmail variants deliver with ``tls = "none"`` and ``concurrency = 20`` (the
``--concurrency`` option; when it is not 20, Postfix's destination limit is set to it
too). ``sync`` runs before each clock starts, so no side pays for its fill's write-back.
Rounds interleave the sides with the order rotated each round, and medians are reported.

    python -m bench.relay_bench [--messages 5000] [--rounds 3] [--size 1024]
        [--concurrency 20] [--only postfix,leafmail-flush,leafmail-daemon]
        [--quiet-wait 120] [--results [bench/RESULTS.md]]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import resource
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from . import machine
from .cpu import machine_cpu, process_cpu
from .inodes import Cooldown
from .procs import ROOT, RunningServer, ServerSpec, start, stop
from .quiet import QuietGate
from .report import fmt_or_na, median_known, progress, unwind_on_sigterm, write_section
from .smtp_bench import _revision
from .smtp_idle import descendants
from .smtp_peers import (
    LEAFMAIL,
    POSTCONF,
    POSTFIX,
    SMTP_SOURCE,
    PostfixPeer,
    _main_cf,
    _trouble,
    ensure_postfix,
    free_port,
    leafmail_missing,
    port_open,
    postfix_instance,
)

SECTION = "## Relay drain (issue 4)"
SIDES = ("postfix", "leafmail-flush", "leafmail-daemon")
# Issue 4 asked for 1.0x; issue 12 asks the daemon's drain to stay at 1.2x or better.
TARGETS = {"leafmail-flush": 1.0, "leafmail-daemon": 1.2}
SMTP_SINK = Path("/usr/sbin/smtp-sink")
POSTQUEUE = "/usr/sbin/postqueue"
RESULTS = ROOT / "bench" / "RESULTS.md"
SESSIONS = 20
POSTFIX_CONCURRENCY = 20  # default_destination_concurrency_limit
POLL = 0.02
MAX_ROUNDS = 10
MAX_MESSAGES = 50000
NOISY_CORES = 0.3


@dataclass
class Sample:
    """One drain of one side: how long it took, what it cost, what its checks found."""

    side: str
    round: int
    messages: int
    seconds: float = 0.0
    fill_seconds: float = 0.0
    side_cpu: float | None = None
    sink_cpu: float | None = None
    busy: float = 0.0
    startup: float | None = None
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def rate(self) -> float | None:
        """msgs/s of the drain, or None when a check failed."""
        return None if self.problems or self.seconds <= 0 else self.messages / self.seconds

    @property
    def launch_rate(self) -> float | None:
        """msgs/s counting the daemon's start-up too (None for the other sides)."""
        if self.rate is None or self.startup is None:
            return None
        return self.messages / (self.seconds + self.startup)

    @property
    def fill_rate(self) -> float | None:
        """msgs/s of the untimed fill (smtp-source), for reference."""
        return self.messages / self.fill_seconds if self.fill_seconds > 0 else None

    @property
    def side_us(self) -> float | None:
        """CPU microseconds per message of the side's processes during the drain."""
        return None if self.side_cpu is None else self.side_cpu / self.messages * 1e6

    @property
    def side_cores(self) -> float | None:
        """Cores the side's processes used during the drain."""
        return None if self.side_cpu is None or self.seconds <= 0 else self.side_cpu / self.seconds

    @property
    def sink_cores(self) -> float | None:
        """Cores smtp-sink used during the drain."""
        return None if self.sink_cpu is None or self.seconds <= 0 else self.sink_cpu / self.seconds

    @property
    def others(self) -> float | None:
        """Cores everything else on the machine used during the drain (noise)."""
        if self.side_cpu is None or self.sink_cpu is None or self.seconds <= 0:
            return None
        return max(0.0, self.busy - self.side_cpu - self.sink_cpu) / self.seconds


class Failed(Exception):
    """A run could not go on; the message says why (it becomes a failed check)."""


# --- the sink -----------------------------------------------------------------------------


class Sink:
    """``smtp-sink -c`` on 127.0.0.1:PORT; a thread follows its ``mesg=`` counter.

    With ``-c`` smtp-sink rewrites ``sess=S quit=Q mesg=M`` followed by a carriage return
    whenever a session ends, QUIT comes or a message's "." is received, so the last
    ``mesg=`` is the number of messages it has taken.
    """

    _COUNTER = re.compile(rb"mesg=(\d+)\r")

    def __init__(self, log_dir: Path) -> None:
        self.port = free_port()
        self.count = 0
        self._changed = threading.Condition()
        user = ["-u", "nobody"] if os.geteuid() == 0 else []
        with open(log_dir / "smtp-sink.err", "ab") as err:
            self.proc = subprocess.Popen(
                [str(SMTP_SINK), "-c", *user, f"127.0.0.1:{self.port}", "1000"],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=err,
            )
        self._reader = threading.Thread(target=self._follow, daemon=True)
        self._reader.start()
        deadline = time.monotonic() + 10.0
        # Poll until it listens, and make sure the listener is smtp-sink's: the port was
        # free a moment ago, but another process may have taken it meanwhile.
        while not port_open(self.port) or self.proc.poll() is not None:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.close()
                raise Failed(f"smtp-sink did not listen on 127.0.0.1:{self.port}")
            time.sleep(0.02)

    def _follow(self) -> None:
        assert self.proc.stdout is not None
        fd, tail = self.proc.stdout.fileno(), b""
        while chunk := os.read(fd, 65536):
            tail += chunk
            found = self._COUNTER.findall(tail)
            tail = tail[tail.rfind(b"\r") + 1 :]
            if found:
                with self._changed:
                    self.count = int(found[-1])
                    self._changed.notify_all()

    def wait_for(self, messages: int, deadline: float) -> bool:
        """Block until the sink has taken `messages` (True) or `deadline` passed (False)."""
        with self._changed:
            return self._changed.wait_for(
                lambda: self.count >= messages, max(0.0, deadline - time.monotonic())
            )

    def cpu(self) -> float | None:
        """smtp-sink's CPU seconds so far."""
        return process_cpu(self.proc.pid)

    def close(self) -> int:
        """Stop smtp-sink; return how many messages it took in all."""
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            self.proc.wait(10.0)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10.0)
        self._reader.join(10.0)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        return self.count


@contextlib.contextmanager
def sink(log_dir: Path) -> Iterator[Sink]:
    """A fresh sink for the block; stopped however the block ends."""
    s = Sink(log_dir)
    try:
        yield s
    finally:
        s.close()


# --- filling a queue ------------------------------------------------------------------


def fill(port: int, messages: int, size: int) -> float:
    """smtp-source into 127.0.0.1:`port`, as BENCH-NOTES gives it; its wall time."""
    argv = [
        str(SMTP_SOURCE),
        *("-s", str(SESSIONS), "-m", str(messages), "-l", str(size)),
        *("-f", "a@src.test", "-t", "b@example.test", f"127.0.0.1:{port}"),
    ]
    start_ = time.perf_counter()
    try:
        done = subprocess.run(
            argv, capture_output=True, text=True, timeout=max(120.0, messages / 10), check=False
        )
    except subprocess.TimeoutExpired:
        raise Failed("smtp-source (fill) timed out") from None
    if done.returncode != 0 or done.stderr.strip():
        lines = (done.stderr.strip() or done.stdout.strip()).splitlines()
        raise Failed(f"smtp-source (fill) exited {done.returncode}: {' | '.join(lines[:3])}")
    return time.perf_counter() - start_


def count_files(*dirs: Path) -> int:
    """Regular files under `dirs` (missing directories count as empty)."""
    return sum(len(files) for d in dirs for _, _, files in os.walk(d))


def poll_until(check: Callable[[], bool], deadline: float) -> bool:
    """Call `check` every POLL seconds until it is true (True) or `deadline` (False)."""
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(POLL)
    return True


# --- Postfix --------------------------------------------------------------------------


def _relay_main_cf(root: Path, sink_port: int, concurrency: int) -> str:
    """`smtp_peers`' main.cf without the discard transport, relaying to the sink."""
    lines = [ln for ln in _main_cf(root).splitlines() if not ln.startswith("transport_maps")]
    lines += [f"relayhost = [127.0.0.1]:{sink_port}", "defer_transports = smtp, relay"]
    if concurrency != POSTFIX_CONCURRENCY:
        lines.append(f"default_destination_concurrency_limit = {concurrency}")
    return "\n".join(lines) + "\n"


@contextlib.contextmanager
def postfix_relay(scratch: Path, sink_port: int, concurrency: int) -> Iterator[PostfixPeer]:
    """A private Postfix relaying example.test to the sink, deliveries deferred for now."""
    with postfix_instance(
        scratch, lambda root: _relay_main_cf(root, sink_port, concurrency)
    ) as peer:
        yield peer


def _qmgr_pids(peer: PostfixPeer) -> set[int]:
    found = set()
    for pid in descendants(peer.master_pid()):
        with contextlib.suppress(OSError), open(f"/proc/{pid}/comm") as f:
            if f.read().strip() == "qmgr":
                found.add(pid)
    return found


def _tree_cpu(pid: int) -> float | None:
    """CPU seconds of `pid` and everything below it (reaped ones through cutime)."""
    known = [t for t in (process_cpu(p) for p in descendants(pid)) if t is not None]
    return sum(known) if known else None


def run_postfix(s: Sample, scratch: Path, size: int, concurrency: int, timeout: float) -> None:
    """Fill a deferring Postfix, let it go, and time its drain into the sink."""
    with sink(scratch) as snk, postfix_relay(scratch, snk.port, concurrency) as peer:
        q = peer.queue_dir
        s.fill_seconds = fill(peer.port, s.messages, size)
        deadline = time.monotonic() + timeout
        loaded = poll_until(
            lambda: (
                count_files(q / "deferred") == s.messages
                and count_files(q / "maildrop", q / "incoming", q / "active") == 0
            ),
            deadline,
        )
        if not loaded:
            raise Failed(f"{count_files(q / 'deferred')} of {s.messages} messages deferred")
        old_qmgr = _qmgr_pids(peer)
        etc = str(peer.config_dir)
        subprocess.run([POSTCONF, "-c", etc, "-e", "defer_transports ="], check=True)
        subprocess.run([POSTFIX, "-c", etc, "reload"], capture_output=True, check=True)
        # A qmgr still running with the old settings would defer the flushed mail again.
        if not poll_until(lambda: bool(_qmgr_pids(peer) - old_qmgr), time.monotonic() + 20):
            raise Failed("no new qmgr after postfix reload")
        if snk.count:
            raise Failed(f"the sink got {snk.count} messages before the flush")
        os.sync()
        mark = peer.log_size()
        cpu0, sink0, busy0 = _tree_cpu(peer.master_pid()), snk.cpu(), machine_cpu()[0]
        start_ = time.perf_counter()
        deadline = time.monotonic() + timeout
        subprocess.run([POSTQUEUE, "-c", etc, "-f"], check=True, timeout=30)
        drained = snk.wait_for(s.messages, deadline) and poll_until(
            lambda: peer.queued() == 0, deadline
        )
        s.seconds = time.perf_counter() - start_
        cpu1, sink1, busy1 = _tree_cpu(peer.master_pid()), snk.cpu(), machine_cpu()[0]
        s.side_cpu = None if cpu0 is None or cpu1 is None else cpu1 - cpu0
        s.sink_cpu = None if sink0 is None or sink1 is None else sink1 - sink0
        s.busy = busy1 - busy0
        if not drained:
            s.problems.append(f"timed out: sink has {snk.count}, queue holds {peer.queued()} files")
        lines = peer.log_since(mark)
        sent = sum("status=sent" in line for line in lines)
        if sent != s.messages:
            s.problems.append(f"postfix logged {sent} of {s.messages} sent")
        trouble = [line for line in lines if _trouble(line)]
        s.problems += [line for line in trouble if "warning:" not in line][:5]
        s.warnings += [
            line.partition("warning:")[2].strip()
            for line in trouble
            if "warning:" in line and "NIS domain name not set" not in line
        ]
        received = snk.close()
    if received != s.messages:
        s.problems.append(f"the sink received {received} of {s.messages} messages")


# --- leafmail -------------------------------------------------------------------------


def write_config(path: Path, spool: Path, port: int, sink_port: int, mode: str, conc: int) -> None:
    """leafmail's TOML config: listen on `port`, deliver to the sink in `mode`."""
    path.write_text(
        "\n".join(
            [
                'hostname = "bench.test"',
                f"spool = {json.dumps(str(spool))}",
                "[smtp]",
                f'listen = ["127.0.0.1:{port}"]',
                "max_sessions = 1000",
                "[relay]",
                'relay_networks = ["127.0.0.0/8"]',
                'local_domains = ["bench.test"]',
                "[delivery]",
                f'mode = "{mode}"',
                f'smarthost = "127.0.0.1:{sink_port}"',
                'tls = "none"',
                f"concurrency = {conc}",
                "",
            ]
        )
    )


def serve_spec(config: Path) -> ServerSpec:
    """``leafmail serve --config CFG --ready-fd N``."""
    return ServerSpec(
        "leafmail",
        lambda fd: [str(LEAFMAIL), "serve", "--config", str(config), "--ready-fd", str(fd)],
    )


def _start(spec: ServerSpec, log_dir: Path) -> RunningServer:
    try:
        return start(spec, log_dir)
    except RuntimeError as exc:
        raise Failed(" | ".join(ln for ln in str(exc).splitlines() if ln.strip())) from None


def fill_leafmail(
    s: Sample, scratch: Path, spool: Path, sink_port: int, size: int, conc: int
) -> None:
    """Fill `spool` through ``leafmail serve`` in offline mode, then stop it."""
    config = scratch / "offline.toml"
    write_config(config, spool, free_port(), sink_port, "offline", conc)
    server = _start(serve_spec(config), scratch)
    try:
        s.fill_seconds = fill(server.port, s.messages, size)
        if server.proc.poll() is not None:
            raise Failed(f"leafmail serve exited {server.proc.returncode}: {server.log_tail(3)}")
    finally:
        stop(server)
    if server.proc.returncode not in (0, -signal.SIGTERM):
        s.warnings.append(f"leafmail serve (fill) exited {server.proc.returncode} on SIGTERM")
    queued = count_files(spool / "queue")
    if queued != s.messages:
        raise Failed(f"{queued} of {s.messages} messages in the spool's queue/ after the fill")


def leafmail_queue(config: Path) -> list[object] | str:
    """``leafmail queue --json``: the list, or why it could not be read."""
    done = subprocess.run(
        [str(LEAFMAIL), "queue", "--json", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if done.returncode != 0:
        return f"leafmail queue --json exited {done.returncode}: {done.stderr.strip()[-200:]}"
    try:
        listed = json.loads(done.stdout)
    except ValueError:
        return f"leafmail queue --json printed no JSON: {done.stdout[:200]!r}"
    return listed if isinstance(listed, list) else f"not a list: {done.stdout[:200]!r}"


def _check_queue(s: Sample, config: Path) -> None:
    listed = leafmail_queue(config)
    if isinstance(listed, str):
        s.problems.append(listed)
    elif listed:
        s.problems.append(f"leafmail queue --json lists {len(listed)} messages, not []")


def run_flush(s: Sample, scratch: Path, size: int, conc: int, timeout: float) -> None:
    """Fill an offline leafmail, stop it, and time ``leafmail flush``."""
    spool = scratch / "spool"
    with sink(scratch) as snk:
        fill_leafmail(s, scratch, spool, snk.port, size, conc)
        config = scratch / "offline.toml"
        os.sync()
        out, err = scratch / "flush.out", scratch / "flush.err"
        sink0, busy0 = snk.cpu(), machine_cpu()[0]
        child0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        start_ = time.perf_counter()
        with open(out, "wb") as stdout, open(err, "wb") as stderr:
            proc = subprocess.Popen(
                [str(LEAFMAIL), "flush", "--config", str(config)],
                stdin=subprocess.DEVNULL,
                stdout=stdout,
                stderr=stderr,
                cwd=ROOT,
            )
            try:
                rc = proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                rc = None
        s.seconds = time.perf_counter() - start_
        child1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        sink1, busy1 = snk.cpu(), machine_cpu()[0]
        s.side_cpu = (child1.ru_utime + child1.ru_stime) - (child0.ru_utime + child0.ru_stime)
        s.sink_cpu = None if sink0 is None or sink1 is None else sink1 - sink0
        s.busy = busy1 - busy0
        if rc != 0:
            tail = " | ".join(err.read_text(errors="replace").strip().splitlines()[-3:])
            s.problems.append(
                "leafmail flush timed out" if rc is None else f"leafmail flush exited {rc}: {tail}"
            )
        lines = out.read_text(errors="replace").splitlines()
        if len(lines) != s.messages:
            s.warnings.append(f"leafmail flush printed {len(lines)} lines for {s.messages}")
        # "." reaches the sink before its 250, so the count is complete once flush exits;
        # the reader thread may just not have seen the last update yet.
        snk.wait_for(s.messages, time.monotonic() + 5)
        received = snk.close()
    if received != s.messages:
        s.problems.append(f"the sink received {received} of {s.messages} messages")
    _check_queue(s, config)


def run_daemon(s: Sample, scratch: Path, size: int, conc: int, timeout: float) -> None:
    """Fill a spool offline, then time ``leafmail serve`` in smarthost mode draining it."""
    spool = scratch / "spool"
    with sink(scratch) as snk:
        fill_leafmail(s, scratch, spool, snk.port, size, conc)
        config = scratch / "smarthost.toml"
        write_config(config, spool, free_port(), snk.port, "smarthost", conc)
        os.sync()
        launched = time.perf_counter()
        server = _start(serve_spec(config), scratch)
        try:
            start_ = time.perf_counter()
            s.startup = start_ - launched
            cpu0, sink0, busy0 = _tree_cpu(server.proc.pid), snk.cpu(), machine_cpu()[0]
            if early := snk.count:
                s.warnings.append(f"{early} messages reached the sink before READY was read")
            deadline = time.monotonic() + timeout
            drained = snk.wait_for(s.messages, deadline) and poll_until(
                lambda: count_files(spool / "queue", spool / "deferred") == 0, deadline
            )
            s.seconds = time.perf_counter() - start_
            cpu1, sink1, busy1 = _tree_cpu(server.proc.pid), snk.cpu(), machine_cpu()[0]
            s.busy = busy1 - busy0
            s.side_cpu = None if cpu0 is None or cpu1 is None else cpu1 - cpu0
            s.sink_cpu = None if sink0 is None or sink1 is None else sink1 - sink0
            if server.proc.poll() is not None:
                s.problems.append(
                    f"leafmail serve exited {server.proc.returncode}: {server.log_tail(3)}"
                )
            if not drained:
                left = count_files(spool / "queue", spool / "deferred")
                s.problems.append(
                    f"timed out: sink has {snk.count}, spool holds {left} messages; "
                    f"its log ends: {server.log_tail(3)}"
                )
        finally:
            stop(server)
        received = snk.close()
    if received != s.messages:
        s.problems.append(f"the sink received {received} of {s.messages} messages")
    _check_queue(s, config)


RUNNERS: dict[str, Callable[[Sample, Path, int, int, float], None]] = {
    "postfix": run_postfix,
    "leafmail-flush": run_flush,
    "leafmail-daemon": run_daemon,
}


def run_rounds(
    sides: Sequence[str], args: argparse.Namespace, gate: QuietGate, scratch: Path
) -> list[Sample]:
    """Every side `args.rounds` times, the order rotated each round.

    Every side deletes what it delivers, so each run starts only once the previous
    run's deletions no longer tax file creation (`bench.inodes`), and each run's tree
    stays under `scratch` until the benchmark ends: deleting it would tax the next side.
    """
    samples: list[Sample] = []
    timeout = args.timeout or max(120.0, args.messages / 25)
    cooldown = Cooldown.for_path(scratch) if args.cooldown else Cooldown(0.0)
    for round_ in range(1, args.rounds + 1):
        k = (round_ - 1) % len(sides)
        for side in [*sides[k:], *sides[:k]]:
            s = Sample(side, round_, args.messages)
            cooldown.wait()
            tmp = Path(tempfile.mkdtemp(prefix=f"{side}-{round_}-", dir=scratch))
            gate.wait()
            try:
                RUNNERS[side](s, tmp, args.size, args.concurrency, timeout)
            except (Failed, subprocess.SubprocessError, OSError) as exc:
                s.problems.append(f"{type(exc).__name__}: {exc}")
            finally:
                cooldown.deleted()
            samples.append(s)
            progress(_line(s))
    if cooldown.waited:
        progress(f"waited {cooldown.waited:.0f} s in all for deletions to stop costing")
    return samples


def _line(s: Sample) -> str:
    rate = "FAILED" if s.rate is None else f"{s.rate:7.1f} msg/s"
    cpu = "" if s.side_us is None else f", {s.side_us:,.0f} µs/msg"
    problems = f"  !! {'; '.join(s.problems)}" if s.problems else ""
    return (
        f"round {s.round} {s.side:15} {s.messages} msgs drained in {s.seconds:6.2f}s: {rate}"
        f"{cpu}, {fmt_or_na(s.side_cores, '.2f')} cores, "
        f"sink {fmt_or_na(s.sink_cores, '.2f')} cores, "
        f"others {fmt_or_na(s.others, '.2f')} cores (fill {fmt_or_na(s.fill_rate, '.0f')} msg/s)"
        f"{problems}"
    )


# --- the report ----------------------------------------------------------------------


def table(samples: Sequence[Sample], sides: Sequence[str]) -> list[str]:
    """A row per side: the median, every round, then CPU, noise and the fill rate."""
    rows = {side: [s for s in samples if s.side == side] for side in sides}
    rounds = max((len(r) for r in rows.values()), default=0)
    head = ["side", "median msg/s", *(f"round {i + 1}" for i in range(rounds))]
    head += ["CPU µs/msg", "side cores", "sink cores", "other procs' cores"]
    head += ["fill msg/s (untimed)", "failed runs"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for side, runs in rows.items():
        if not runs:
            continue
        cells = [side, fmt_or_na(median_known([s.rate for s in runs]), ",.0f")]
        cells += [
            fmt_or_na(s.rate, ",.0f") + ("*" if (s.others or 0) > NOISY_CORES else "") for s in runs
        ]
        cells += [""] * (rounds - len(runs))
        cells += [
            fmt_or_na(median_known([s.side_us for s in runs]), ",.0f"),
            fmt_or_na(median_known([s.side_cores for s in runs]), ".2f"),
            fmt_or_na(median_known([s.sink_cores for s in runs]), ".2f"),
            fmt_or_na(median_known([s.others for s in runs]), ".2f"),
            fmt_or_na(median_known([s.fill_rate for s in runs]), ",.0f"),
            str(sum(bool(s.problems) for s in runs)),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def ratio_lines(samples: Sequence[Sample], sides: Sequence[str]) -> list[str]:
    """Each leafmail side against Postfix: ratio of medians, per round, by CPU."""
    if "postfix" not in sides:
        return []
    base = [s for s in samples if s.side == "postfix"]
    base_rate = median_known([s.rate for s in base])
    base_us = median_known([s.side_us for s in base])
    lines = []
    for side in sides:
        if side == "postfix":
            continue
        runs = [s for s in samples if s.side == side]
        rate = median_known([s.rate for s in runs])
        headline = None if rate is None or not base_rate else rate / base_rate
        target = TARGETS[side]
        verdict = "n/a" if headline is None else ("meets" if headline >= target else "BELOW")
        paired = [
            fmt_or_na(None if x.rate is None or not y.rate else x.rate / y.rate, ".2f")
            for x in runs
            for y in base
            if x.round == y.round
        ]
        us = median_known([s.side_us for s in runs])
        by_cpu = None if us is None or base_us is None or not us else base_us / us
        lines.append(
            f"- {side} / postfix: **{fmt_or_na(headline, '.2f')}x** (target ≥ {target:.1f}x: "
            f"{verdict}); per round {', '.join(paired) or 'n/a'}; "
            f"by CPU per message {fmt_or_na(by_cpu, '.2f')}x"
        )
    return lines


def machine_lines() -> list[str]:
    """What the figures depend on: cores, CPU, kernel, versions, disk, load, revision."""
    facts = dict(machine.describe())
    postfix = subprocess.run(
        [POSTCONF, "-h", "mail_version"], capture_output=True, text=True, check=False
    ).stdout.strip()
    fs = subprocess.run(
        ["df", "--output=source,fstype", tempfile.gettempdir()],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.split()[-2:]
    return [
        f"- {facts['cpus']} CPUs, {facts['cpu model']}; {facts['kernel']}",
        f"- Python {platform.python_version()}; uvloop {facts['uvloop']}; "
        f"Postfix {postfix or '?'} (also smtp-source and smtp-sink)",
        f"- scratch directories (spools, Postfix queue) under {tempfile.gettempdir()}, "
        f"on {' '.join(fs)}",
        f"- load average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}",
        f"- leafmail from the work tree at {_revision()}",
    ]


def method(args: argparse.Namespace) -> list[str]:
    """How the figures were taken, in the report."""
    conc = args.concurrency
    postfix_conc = (
        "all else at Postfix's defaults, among them `default_destination_concurrency_limit "
        "= 20` (slow start from 5) and SMTP connection caching on demand"
        if conc == POSTFIX_CONCURRENCY
        else f"`default_destination_concurrency_limit = {conc}`, all else at its defaults"
    )
    return [
        f"How: each side's queue is filled, untimed, with `smtp-source -s {SESSIONS} "
        f"-m {args.messages} -l {args.size} -f a@src.test -t b@example.test 127.0.0.1:PORT`, "
        "then timed while it drains to a fresh `smtp-sink -c 127.0.0.1:PORT 1000` (stores "
        "nothing; its `mesg=` counter counts the messages). msg/s = messages / drain time. "
        "`sync` before each clock starts; rounds interleave with the order rotated.",
        "",
        "- postfix: a private instance as in BENCH-NOTES (no chroot, no DNS, postlogd to a "
        "file) with `relay_domains = example.test`, `relayhost = [127.0.0.1]:SINK` and "
        f"{postfix_conc}. Filled with `defer_transports = smtp, relay`; then that is "
        "emptied and the instance reloaded (the clock waits for the new qmgr). Clock: from "
        "`postqueue -f` until the sink has every message and the queue directories are "
        "empty (polled every 20 ms once the sink count is reached).",
        "- leafmail-flush: `leafmail serve --config CFG` with `[delivery] mode = "
        f'"offline"`, `smarthost = "127.0.0.1:SINK"`, `tls = "none"`, `concurrency = {conc}` '
        "is filled and stopped (SIGTERM). Clock: the whole `leafmail flush --config CFG` "
        "process (stdout to a file), which must exit 0.",
        "- leafmail-daemon: a spool filled the same way, then `leafmail serve` with "
        '`mode = "smarthost"` on it. Clock: from its READY line until the sink has every '
        "message and the spool's `queue/` and `deferred/` are empty (the start-up time to "
        "READY is reported separately).",
        "",
        "Checked after every run: the sink received exactly M messages; Postfix logged M "
        "`status=sent` after the flush and no deferral, bounce or fatal error; leafmail "
        "`flush` exited 0 and `leafmail queue --json` printed `[]`. CPU: Postfix's master and "
        "all its children; `leafmail flush` through its rusage; the daemon's process tree.",
    ]


def report(
    samples: Sequence[Sample],
    sides: Sequence[str],
    args: argparse.Namespace,
    gate: QuietGate,
    notes: Sequence[str],
) -> list[str]:
    """The whole section as Markdown."""
    command = shlex.join([".venv/bin/python", "-m", "bench.relay_bench", *sys.argv[1:]])
    out = [SECTION, "", f"Command: `{command}` (from the repository root), run on "
           f"{time.strftime('%Y-%m-%d %H:%M %Z')}.", "", *machine_lines(), ""]  # fmt: skip
    out += [f"Note: {note}" for note in notes] + ([""] if notes else [])
    out += [*method(args), ""]
    out += [
        f"### Drain of {args.messages} messages x {args.size} bytes, {args.rounds} rounds",
        "",
        f"A `*` marks a run during which other processes used more than {NOISY_CORES} cores "
        "(the machine is shared); `n/a` a run that failed a check (see below).",
        "",
        *table(samples, sides),
        "",
        *ratio_lines(samples, sides),
        "",
    ]
    daemon = [s for s in samples if s.side == "leafmail-daemon"]
    startup = median_known([s.startup for s in daemon])
    if startup is not None:
        launch = median_known([s.launch_rate for s in daemon])
        base = median_known([s.rate for s in samples if s.side == "postfix"])
        vs = "" if launch is None or not base else f", {launch / base:.2f}x postfix"
        out += [
            f"leafmail-daemon start-up (launch to READY, not in the clock): median {startup:.2f} s;"
            f" counted from launch instead: median {fmt_or_na(launch, ',.0f')} msg/s{vs}.",
            "",
        ]
    out += [gate.summary(), ""]
    failures = [
        f"- round {s.round} {s.side}: {'; '.join(s.problems)}" for s in samples if s.problems
    ]
    out += ["### Failed checks", "", *(failures or ["None: every run delivered every message."])]
    warnings = sorted({f"- {s.side}: `{w}`" for s in samples for w in s.warnings})
    if warnings:
        out += ["", "### Warnings (the runs still passed their checks)", "", *warnings]
    return [*out, ""]


# --- command line --------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line, bounded so that no run goes on for hours by mistake."""
    p = argparse.ArgumentParser(prog="python -m bench.relay_bench", description=__doc__)
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.add_argument("--messages", type=int, default=5000)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--size", type=int, default=1024, help="message size (smtp-source -l)")
    p.add_argument("--concurrency", type=int, default=20, help="leafmail delivery.concurrency")
    p.add_argument("--only", default=",".join(SIDES), help="sides, comma-separated")
    p.add_argument("--timeout", type=float, help="seconds allowed per drain (default scales)")
    p.add_argument("--quiet-wait", type=float, default=120.0, help="seconds to wait, in all, "
                   "for a quiet machine before runs")  # fmt: skip
    p.add_argument(
        "--no-cooldown",
        dest="cooldown",
        action="store_false",
        help="start each run at once, even on ext4 without a journal, where the previous "
        "run's deletions then tax its file creation (bench/inodes.py)",
    )
    p.add_argument(
        "--results",
        type=Path,
        nargs="?",
        const=RESULTS,
        help=f"write the section into this Markdown file (no value: {RESULTS.relative_to(ROOT)})",
    )
    args = p.parse_args(argv)
    if not 1 <= args.rounds <= MAX_ROUNDS:
        p.error(f"--rounds must be 1..{MAX_ROUNDS}")
    if not 1 <= args.messages <= MAX_MESSAGES:
        p.error(f"--messages must be 1..{MAX_MESSAGES}")
    if not 1 <= args.size <= 1 << 20:
        p.error("--size must be 1..1048576")
    if not 1 <= args.concurrency <= 100:
        p.error("--concurrency must be 1..100")
    if args.timeout is not None and not 1 <= args.timeout <= 3600:
        p.error("--timeout must be 1..3600")
    if not 0 <= args.quiet_wait <= 600:
        p.error("--quiet-wait must be 0..600")
    sides = [n.strip() for n in args.only.split(",") if n.strip()]
    if not sides or any(n not in SIDES for n in sides):
        p.error(f"--only: choose from {', '.join(SIDES)}")
    args.sides = sides
    return args


def main(argv: list[str] | None = None) -> int:
    """Run, print the Markdown section, optionally write it; exit 1 if any check failed."""
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, unwind_on_sigterm)
    sides: list[str] = args.sides
    notes = []
    if any(side.startswith("leafmail") for side in sides) and (
        missing := leafmail_missing("flush", ())
    ):
        notes.append(f"leafmail skipped: {missing}")
        progress(f"skipping leafmail: {missing}")
        sides = [side for side in sides if not side.startswith("leafmail")]
    ensure_postfix()
    if not SMTP_SINK.exists():
        raise SystemExit(f"{SMTP_SINK} is missing (Debian package postfix)")
    gate = QuietGate(args.quiet_wait)
    samples: list[Sample] = []
    if sides:
        with tempfile.TemporaryDirectory(prefix="relay-bench-") as tmp:
            os.chmod(tmp, 0o711)  # noqa: S103 - search only, for the postfix user
            samples = run_rounds(sides, args, gate, Path(tmp))
    lines = report(samples, sides, args, gate, notes)
    print("\n".join(lines))
    if args.results:
        write_section(args.results, SECTION, lines)
    return 1 if any(s.problems for s in samples) else 0


if __name__ == "__main__":
    sys.exit(main())
