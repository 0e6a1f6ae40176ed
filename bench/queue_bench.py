"""Queue listing (issue 13 item 13): `leafmail queue` beside Postfix's `postqueue`, 50,000 queued.

Issue 13 measured `leafmail queue --json` at 3.9 s and 214 MB and the text form at 2.9 s
and 91 MB with 50,000 messages queued, where `postqueue -j` took 1.2 s and 7 MB, and asks
for constant memory and at least Postfix's speed. This bench measures both sides in one
run, on the same machine, with the same number of messages:

* postfix: a private instance (`smtp_peers.postfix_instance`, set up as in
  ``shared/BENCH-NOTES.md``) with ``defer_transports = discard`` and the retry timers
  set to a day, filled, untimed, with ``smtp-source -s 20 -m N -l SIZE -f a@src.test -t
  b@example.test``; every message then waits in ``deferred/`` with its defer log ("deferred
  transport"), and nothing retries while the clock runs. Timed: ``postqueue -c DIR -j``
  and ``postqueue -c DIR -p``. postqueue asks the ``showq`` daemon, which reads the
  queue, so the showq process's peak RSS (VmHWM, read from /proc while it lingers idle
  after the request) is reported beside postqueue's own.
* leafmail: a spool of N messages of the same size, sender and recipient, each in
  ``deferred/`` with a status record saying its recipient was deferred, written with
  the Spool API (``write_tmp``, a rename and one ``sync_dir`` a batch; the status files in
  the runner's format).
  Timed: ``leafmail queue --json`` and ``leafmail queue``, the installed command.

Every command's output goes to /dev/null; an untimed run first checks that each side
lists all N messages. Rounds interleave the commands, with the order rotated each round;
the time is wall-clock from spawn to exit and the memory is the command's peak RSS
as GNU time reports it. Medians are reported, and the ratios postfix/leafmail (above 1.0: leafmail
faster) are medians of the per-round ratios.

    python -m bench.queue_bench [--messages 50000] [--rounds 5] [--size 1024]
        [--results [bench/RESULTS.md]]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from leafmail.envelope import ClientInfo, Envelope, Recipient
from leafmail.spool import Spool, encode, new_id
from leafmail.states import QueueState
from leafmail.status import MessageStatus, RcptState, RcptStatus

from . import machine
from .relay_bench import fill
from .report import progress, unwind_on_sigterm, write_section
from .smtp_bench import _revision
from .smtp_peers import LEAFMAIL, PostfixPeer, _main_cf, ensure_postfix, postfix_instance

POSTQUEUE = "/usr/sbin/postqueue"
TIME = "/usr/bin/time"
SECTION = "## Queue listing: leafmail queue against postqueue (issue 13 item 13)"
FILL_TIMEOUT = 900.0
SENDER, RCPT = "a@src.test", "b@example.test"


@dataclass(frozen=True)
class Run:
    """One timed command: wall seconds and peak RSS (KiB) of the process itself."""

    seconds: float
    max_rss_kib: int
    cpu: float  # user + system seconds, with the workers (leafmail) or showq (postfix)


# --- the two queues --------------------------------------------------------------------


def build_spool(root: Path, messages: int, size: int, batch: int = 500) -> Spool:
    """N deferred messages, each with a status record, as a runner pass would leave them."""
    spool = Spool(root)
    envelope = Envelope(SENDER, (Recipient(RCPT),), ClientInfo("127.0.0.1", 40000, "src.test"))
    body = _body(size)
    status_dir = root / "status"
    for start in range(0, messages, batch):
        qids = [new_id() for _ in range(min(batch, messages - start))]
        for qid in qids:
            os.close(spool.write_tmp(qid, encode(envelope, body)))
            status = MessageStatus(
                arrival=time.time(),
                recipients=(RcptStatus(RcptState.DEFERRED, 1, "451 4.3.2 try later"),),
                next_attempt=time.time() + 86400,
                last_attempt=time.time(),
                attempts=1,
                last_error="451 4.3.2 try later",
            )
            (status_dir / qid).write_bytes(status.to_bytes())
        for qid in qids:
            os.rename(spool.root / "tmp" / qid, spool.path(QueueState.DEFERRED, qid))
        spool.sync_dir(QueueState.DEFERRED)
    return spool


def _body(size: int) -> bytes:
    head = f"From: <{SENDER}>\r\nTo: <{RCPT}>\r\nSubject: queue bench\r\n\r\n".encode()
    line = b"x" * 70 + b"\r\n"
    return head + line * max(1, (size - len(head)) // len(line))


def _held_main_cf(root: Path) -> str:
    """BENCH-NOTES' instance, with the discard transport deferred and retries a day off."""
    extra = [
        "defer_transports = discard",
        "queue_run_delay = 1d",
        "minimal_backoff_time = 1d",
        "maximal_backoff_time = 1d",
    ]
    return _main_cf(root) + "\n".join(extra) + "\n"


def wait_deferred(peer: PostfixPeer, messages: int) -> None:
    """Until every message sits in deferred/ (qmgr has moved them all there)."""
    deadline = time.monotonic() + FILL_TIMEOUT
    while True:
        deferred = sum(len(f) for _, _, f in os.walk(peer.queue_dir / "deferred"))
        if deferred >= messages and peer.queued() == deferred:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"postfix: only {deferred} of {messages} deferred in time")
        time.sleep(1.0)


# --- timing ----------------------------------------------------------------------------


def timed(argv: Sequence[str], helper_cpu: Callable[[], float] = lambda: 0.0) -> Run:
    """Run `argv` with stdout to /dev/null: wall time, and peak RSS and CPU time as GNU
    time reports them (CPU includes the workers a command waits for); `helper_cpu` adds
    the CPU of a daemon that does part of the work (Postfix's showq).

    The peak is taken by /usr/bin/time, not by wait4 here: Linux carries a process's
    peak RSS across exec, so a child forked from this (large) Python process would
    report this process's size, not its own.
    """
    with tempfile.NamedTemporaryFile("r") as report, open(os.devnull, "wb") as sink:
        helper_before = helper_cpu()
        start = time.perf_counter()
        done = subprocess.run(
            [TIME, "-f", "%M %U %S", "-o", report.name, *argv],
            stdout=sink,
            stderr=subprocess.PIPE,
            check=False,
        )
        seconds = time.perf_counter() - start
        helper = helper_cpu() - helper_before
        fields = report.read().split()
    if done.returncode != 0:
        err = done.stderr.decode(errors="replace").strip()
        raise RuntimeError(f"{shlex.join(argv)} exited {done.returncode}: {err}")
    peak, user, system = int(fields[-3]), float(fields[-2]), float(fields[-1])
    return Run(seconds, peak, user + system + helper)


def ensure_time() -> None:
    """GNU time (Debian package `time`) measures each command's peak RSS."""
    if not Path(TIME).exists():
        progress("installing time (GNU time, for peak RSS) ...")
        subprocess.run(["apt-get", "install", "-y", "-qq", "time"], check=True)


def showq_hwm_kib(peer: PostfixPeer) -> int | None:
    """The peak RSS of the instance's showq daemon, which lingers after a request."""
    best = None
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            if not cmdline or not cmdline[0].endswith(b"showq"):
                continue
            if str(peer.config_dir).encode() not in b" ".join(cmdline) and not _same_instance(
                pid, peer
            ):
                continue
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        found = re.search(r"VmHWM:\s+(\d+) kB", status)
        if found:
            best = max(best or 0, int(found[1]))
    return best


def showq_cpu(peer: PostfixPeer) -> float:
    """CPU seconds used so far by the instance's showq processes (they linger idle)."""
    total = 0.0
    ticks = os.sysconf("SC_CLK_TCK")
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            if not Path(f"/proc/{pid}/cmdline").read_bytes().startswith(b"showq"):
                continue
            if not _same_instance(pid, peer):
                continue
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / ticks
    return total


def _same_instance(pid: str, peer: PostfixPeer) -> bool:
    """showq's cmdline does not name the config dir; its parent is the instance's master."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return False
    return int(fields[1]) == peer.master_pid()


def check_counts(commands: dict[str, list[str]], messages: int) -> None:
    """Untimed: each side lists every message (and the output parses)."""
    for name, argv in commands.items():
        out = subprocess.run(argv, capture_output=True, check=True).stdout
        if name == "leafmail-json":
            count = len(json.loads(out))
        elif name == "postqueue-j":
            count = sum(1 for line in out.splitlines() if line.strip())
        elif name == "leafmail-text":
            count = int(out.splitlines()[-1].split()[-2])
        else:
            count = int(re.findall(rb"in (\d+) Requests?", out)[-1])
        if count != messages:
            raise RuntimeError(f"{name} listed {count} messages, expected {messages}")


def run_rounds(
    commands: dict[str, list[str]], rounds: int, peer: PostfixPeer
) -> dict[str, list[Run]]:
    names = list(commands)
    runs: dict[str, list[Run]] = {name: [] for name in names}
    for r in range(rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            helper = (lambda: showq_cpu(peer)) if name.startswith("postqueue") else (lambda: 0.0)
            runs[name].append(timed(commands[name], helper))
            progress(f"round {r + 1} {name}: {runs[name][-1]}")
    return runs


# --- the report ------------------------------------------------------------------------


def report(
    runs: dict[str, list[Run]],
    showq: int | None,
    commands: dict[str, list[str]],
    args: argparse.Namespace,
    fill_seconds: float,
    scratch: Path,
) -> list[str]:
    def med(name: str) -> tuple[float, float, float]:
        return (
            statistics.median(r.seconds for r in runs[name]),
            statistics.median(r.cpu for r in runs[name]),
            statistics.median(r.max_rss_kib for r in runs[name]) / 1024,
        )

    def ratio(num: str, den: str, cpu: bool = False) -> float:
        return statistics.median(
            (a.cpu / b.cpu) if cpu else (a.seconds / b.seconds)
            for a, b in zip(runs[num], runs[den], strict=True)
        )

    lines = [
        SECTION,
        "",
        f"Run on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, revision {_revision()}: "
        f"`{shlex.join(['python', '-m', 'bench.queue_bench', *sys.argv[1:]])}`.",
        "",
        *(f"- {label}: {value}" for label, value in machine.describe()),
        "",
        f"{args.messages:,} messages of {args.size} bytes, all deferred, on each side "
        f"(Postfix filled by smtp-source in {fill_seconds:.0f} s). {args.rounds} interleaved "
        "rounds; medians; peak RSS by GNU time; output to /dev/null.",
        "",
        "| command | wall s | CPU s | peak RSS MB |",
        "|---|---:|---:|---:|",
    ]
    for name, argv in commands.items():
        seconds, cpu, rss = med(name)
        shown = shlex.join(argv).replace(str(Path(argv[0]).parent) + "/", "")
        shown = shown.replace(str(scratch), "SCRATCH")
        lines.append(f"| `{shown}` | {seconds:.2f} | {cpu:.2f} | {rss:.1f} |")
    if showq is not None:
        lines.append(f"| (Postfix's showq daemon, which postqueue asks) | | | {showq / 1024:.1f} |")
    lines += [
        "",
        f"- **JSON: leafmail is {ratio('postqueue-j', 'leafmail-json'):.2f}x postqueue -j's "
        "speed** (postqueue time / leafmail time, median of rounds; target >= 1.0); by CPU "
        f"time {ratio('postqueue-j', 'leafmail-json', cpu=True):.2f}x",
        f"- **text: leafmail is {ratio('postqueue-p', 'leafmail-text'):.2f}x postqueue -p's "
        f"speed**; by CPU time {ratio('postqueue-p', 'leafmail-text', cpu=True):.2f}x",
        "- CPU is user + system time: leafmail's with its worker processes, postqueue's "
        "with the CPU its showq daemon used meanwhile (from /proc). On a busy machine the "
        "wall times follow the CPU times.",
        "- Memory does not grow with the queue: see "
        "tests/test_queue_listing.py::test_listing_memory_does_not_grow_with_the_queue. "
        "leafmail's peak is the Python interpreter with its imports (an empty queue "
        "costs the same); the listing itself holds one batch of output.",
    ]
    return lines


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.queue_bench", description=__doc__)
    p.add_argument("--messages", type=int, default=50_000)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--size", type=int, default=1024, help="message size (smtp-source -l)")
    p.add_argument(
        "--results",
        nargs="?",
        const="bench/RESULTS.md",
        help="write the section into this file (default bench/RESULTS.md)",
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, unwind_on_sigterm)  # stop the Postfix instance on kill
    ensure_postfix()
    ensure_time()
    with tempfile.TemporaryDirectory(prefix="queue-bench-") as scratch_name:
        scratch = Path(scratch_name)
        progress(f"building a leafmail spool of {args.messages} messages ...")
        build_spool(scratch / "spool", args.messages, args.size)
        with postfix_instance(scratch, _held_main_cf) as peer:
            progress(f"filling postfix with {args.messages} messages (smtp-source) ...")
            fill_seconds = fill(peer.port, args.messages, args.size)
            wait_deferred(peer, args.messages)
            subprocess.run(["sync"], check=True)
            etc = str(peer.config_dir)
            spool = str(scratch / "spool")
            commands = {
                "leafmail-json": [str(LEAFMAIL), "queue", "--spool", spool, "--json"],
                "postqueue-j": [POSTQUEUE, "-c", etc, "-j"],
                "leafmail-text": [str(LEAFMAIL), "queue", "--spool", spool],
                "postqueue-p": [POSTQUEUE, "-c", etc, "-p"],
            }
            check_counts(commands, args.messages)
            runs = run_rounds(commands, args.rounds, peer)
            showq = showq_hwm_kib(peer)
            lines = report(runs, showq, commands, args, fill_seconds, scratch)
            print("\n".join(lines), flush=True)  # before the long clean-up of 100,000 files
            if args.results:
                write_section(Path(args.results), SECTION, lines)
            progress("removing the two queues ...")
    return 0


if __name__ == "__main__":
    sys.exit(main())
