"""Memory held by idle SMTP sessions: PSS of a server with 10,000 sessions open after EHLO.

Issue 12's target is leafmail at 10,000 idle sessions in at most 90 MB of PSS summed over
every process (issue 3's was RSS, when leafmail was one process); the
reference is aiosmtpd, which held 5,000 in 79 MB (23 MB of that its base). So the server
is measured fresh, then with 5,000 and with 10,000 sessions that each connected, read
the greeting, sent EHLO and read the whole reply, and then stay silent.

PSS is the Pss line of /proc/PID/smaps_rollup, summed over the server process and its
descendants: pages forked processes share count once in total, not once per process,
as VmRSS would (VmRSS is used where smaps_rollup cannot be read).
Postfix is not measured: its default limit of 100 smtpd processes serves only 100
sessions (BENCH-NOTES), and a process per session is a different design anyway.

The client is one asyncio process. 10,000 sockets need the descriptor limit raised in
the client and in the server (the server inherits the limit this process sets before
starting it). Connections come from 127.0.0.1..127.0.0.5 round robin, with
IP_BIND_ADDRESS_NO_PORT so the kernel picks ports per 4-tuple, so ephemeral ports cannot
run out whatever earlier benchmark runs left in TIME_WAIT. They open in bounded batches
(a listen backlog overflows otherwise), and everything is bounded in time and closed at
the end.

    python -m bench.smtp_idle [--sessions 10000] [--only leafmail,aiosmtpd]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import resource
import socket
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .procs import ServerSpec, running
from .smtp_peers import aiosmtpd_spec, leafmail_missing, leafmail_spec

NOFILE = 30000
SOURCES = tuple(f"127.0.0.{i}" for i in range(1, 6))
BATCH = 100
SESSION_TIMEOUT = 30.0
PHASE_TIMEOUT = 180.0
SETTLE = 2.0
TARGET_SESSIONS = 10000
TARGET_MB = 90  # issue 12: 10,000 idle sessions in at most 90 MB (10^6 bytes) of PSS
IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)


@dataclass
class IdleResult:
    """PSS (KiB) of one server, fresh and at each number of idle sessions reached."""

    server: str
    base_kib: int
    at: list[tuple[int, int]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def per_session(self) -> float | None:
        """KiB per session over the base, at the largest count reached."""
        if not self.at or not self.at[-1][0]:
            return None
        sessions, rss = self.at[-1]
        return (rss - self.base_kib) / sessions


def raise_nofile(limit: int = NOFILE) -> int:
    """Raise this process's descriptor limit (children inherit it); returns the new one."""
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, max(limit, hard)))
    except (ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def descendants(pid: int) -> list[int]:
    """`pid` and every process below it, from the ppid field of /proc/*/stat."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                raw = f.read()
        except OSError:
            continue
        ppid = int(raw[raw.rindex(b")") + 2 :].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        todo.extend(children.get(current, []))
    return found


def rss_kib(pid: int) -> int:
    """PSS in KiB summed over `pid` and its descendants (VmRSS where PSS is unreadable)."""
    return sum(_one_kib(proc) for proc in descendants(pid))


def _one_kib(pid: int) -> int:
    for name, key in ((f"/proc/{pid}/smaps_rollup", "Pss:"), (f"/proc/{pid}/status", "VmRSS:")):
        with contextlib.suppress(OSError), open(name) as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1])
    return 0


async def _reply(reader: asyncio.StreamReader) -> bytes:
    """One whole SMTP reply (continuation lines have '-' after the code)."""
    while True:
        line = await reader.readline()
        if len(line) < 4:
            raise ConnectionError(f"bad reply line {line!r}")
        if line[3:4] != b"-":
            return line


async def open_session(port: int, source: str) -> asyncio.StreamWriter:
    """Connect from `source`, read the greeting, EHLO, read the reply; leave it open."""
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
        sock.bind((source, 0))
        sock.setblocking(False)
        async with asyncio.timeout(SESSION_TIMEOUT):
            await loop.sock_connect(sock, ("127.0.0.1", port))
            reader, writer = await asyncio.open_connection(sock=sock)
    except BaseException:
        sock.close()
        raise
    try:
        async with asyncio.timeout(SESSION_TIMEOUT):
            greeting = await _reply(reader)
            if not greeting.startswith(b"220"):
                raise ConnectionError(f"greeting {greeting!r}")
            writer.write(b"EHLO idle.test\r\n")
            ehlo = await _reply(reader)
            if not ehlo.startswith(b"250"):
                raise ConnectionError(f"EHLO reply {ehlo!r}")
    except BaseException:
        writer.transport.abort()
        raise
    return writer


async def open_many(port: int, count: int, open_now: list[asyncio.StreamWriter]) -> list[str]:
    """Open sessions until `open_now` holds `count`, in batches; returns the errors seen."""
    errors: list[str] = []
    async with asyncio.timeout(PHASE_TIMEOUT):
        while len(open_now) < count and len(errors) < 100:
            size = min(BATCH, count - len(open_now))
            start = len(open_now)
            results = await asyncio.gather(
                *(open_session(port, SOURCES[(start + i) % len(SOURCES)]) for i in range(size)),
                return_exceptions=True,
            )
            for result in results:
                if isinstance(result, asyncio.StreamWriter):
                    open_now.append(result)
                else:
                    errors.append(f"{type(result).__name__}: {result}")
    return errors


async def measure(spec: ServerSpec, port: int, pid: int, counts: Sequence[int]) -> IdleResult:
    """Base PSS, then PSS at each count of idle sessions; closes every session at the end."""
    result = IdleResult(spec.name, rss_kib(pid))
    sessions: list[asyncio.StreamWriter] = []
    try:
        for count in counts:
            started = time.monotonic()
            try:
                result.errors += await open_many(port, count, sessions)
            except TimeoutError:
                result.errors.append(f"timed out opening {count} sessions")
            await asyncio.sleep(SETTLE)  # let the server finish whatever each EHLO started
            result.at.append((len(sessions), rss_kib(pid)))
            took = time.monotonic() - started
            _progress(
                f"  {spec.name}: {len(sessions)} idle sessions in {took:.1f}s, "
                f"PSS {result.at[-1][1] / 1024:.1f} MiB"
            )
            if len(sessions) < count:
                break
    finally:
        for writer in sessions:
            writer.transport.abort()
        await asyncio.sleep(0)
    return result


def idle_specs(names: Sequence[str], scratch: Path) -> list[ServerSpec]:
    """The servers to measure: leafmail (if it can run here) and durable aiosmtpd."""
    specs = []
    for name in names:
        if name == "leafmail":
            missing = leafmail_missing()
            if missing:
                _progress(f"skipping leafmail idle sessions: {missing}")
                continue
            specs.append(leafmail_spec(scratch / "leafmail-spool"))
        elif name == "aiosmtpd":
            specs.append(aiosmtpd_spec("aiosmtpd", scratch / "aiosmtpd-store"))
    return specs


def run_idle(names: Sequence[str], sessions: int) -> list[IdleResult]:
    """Measure each server in turn, each started fresh and stopped afterwards."""
    limit = raise_nofile()
    if limit < sessions + 100:
        raise RuntimeError(f"descriptor limit {limit} is too low for {sessions} sessions")
    counts = sorted({min(5000, sessions), sessions})
    results = []
    with tempfile.TemporaryDirectory(prefix="smtp-idle-") as tmp:
        scratch = Path(tmp)
        for spec in idle_specs(names, scratch):
            _progress(f"idle sessions, {spec.name}:")
            with running(spec, scratch) as server:
                results.append(asyncio.run(measure(spec, server.port, server.proc.pid, counts)))
    return results


def markdown(results: Sequence[IdleResult]) -> list[str]:
    """A Markdown table of the PSS figures."""
    counts = sorted({n for r in results for n, _ in r.at})
    head = ["server", "PSS fresh", *(f"PSS, {n:,} sessions" for n in counts), "KiB/session"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        cells = [r.server, f"{r.base_kib / 1024:.1f} MiB"]
        reached = dict(r.at)
        cells += [f"{reached[n] / 1024:.1f} MiB" if n in reached else "-" for n in counts]
        per = r.per_session()
        cells.append("n/a" if per is None else f"{per:.1f}")
        lines.append("| " + " | ".join(cells) + " |")
    for r in results:
        if r.server == "leafmail" and r.at and r.at[-1][0] >= TARGET_SESSIONS:
            mb = r.at[-1][1] * 1024 / 1e6
            verdict = "meets" if mb <= TARGET_MB else "BELOW"
            lines.append(
                f"\n- leafmail at {r.at[-1][0]:,} sessions: {mb:.1f} MB "
                f"({r.at[-1][1] / 1024:.1f} MiB); target ≤ {TARGET_MB} MB: {verdict}"
            )
    for r in results:
        if r.errors:
            lines.append(f"\n{r.server}: {len(r.errors)} session errors, first: {r.errors[0]}")
    return lines


def _progress(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> None:
    """``python -m bench.smtp_idle``: print the PSS table."""
    parser = argparse.ArgumentParser(prog="python -m bench.smtp_idle")
    parser.add_argument("--sessions", type=int, default=10000)
    parser.add_argument("--only", default="leafmail,aiosmtpd")
    args = parser.parse_args(argv)
    if not 1 <= args.sessions <= 20000:
        parser.error("--sessions must be 1..20000")
    print("\n".join(markdown(run_idle(args.only.split(","), args.sessions))))


if __name__ == "__main__":
    main()
