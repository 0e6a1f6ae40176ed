"""Shared plumbing of the crash tests: a leafmail process that is SIGKILLed and restarted,
and an audit of every spool file left behind.

A crash test must not trust the code it tests to read its own spool back, so `audit`
checks each file with `leafmail.spool.decode` (the self-check: lengths, end marker,
sha256) without `Spool.get`, which would quietly move a damaged file to corrupt/ and so
hide it. The test then compares the message bytes with what was really sent.
"""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from leafmail_fixtures import Leafmail, spawn_leafmail

from leafmail.envelope import Envelope
from leafmail.spool import decode, valid_id
from leafmail.states import QueueState

SEQ_HEADER = re.compile(rb"\r\nX-Crash-Seq: (\d+)\r\n")
KILL_WAIT = 10.0  # seconds for a SIGKILLed process to be reaped (it is immediate)


def seeded_rng(name: str) -> tuple[random.Random, int]:
    """A RNG whose seed is printed (pytest shows it on failure) so a run can be replayed.

    ``CRASH_SEED`` in the environment replays a given seed.
    """
    seed = int(os.environ.get("CRASH_SEED", "0")) or random.SystemRandom().randrange(1, 2**32)
    print(f"{name}: seed {seed} (replay with CRASH_SEED={seed})")
    return random.Random(seed), seed


def message_bytes(number: int, size: int, *, to: str = "rcpt@a.test") -> bytes:
    """A uniquely numbered message of about `size` octets, CRLF lines of at most 78 octets.

    It carries a body line that starts with a dot, so DATA's dot-stuffing is on the path
    that has to come back byte for byte.
    """
    head = (
        f"From: <sender@client.test>\r\nTo: <{to}>\r\nSubject: crash test {number}\r\n"
        f"Date: Mon, 02 Feb 2026 10:00:00 +0000\r\n"
        f"Message-ID: <{number}.crash@client.test>\r\nX-Crash-Seq: {number}\r\n\r\n"
        f".leading dot of message {number}\r\n"
    ).encode()
    line = f"{number:08d} " + "abcdefghijklmnopqrstuvwxyz0123456789" * 2 + "\r\n"
    lines = max(0, (size - len(head)) // len(line))
    return head + line.encode() * lines + b"..\r\nend\r\n"


def sequence_number(data: bytes) -> int:
    """The X-Crash-Seq of a spooled or delivered message."""
    match = SEQ_HEADER.search(data)
    assert match is not None, f"no X-Crash-Seq header: {data[:300]!r}"
    return int(match[1])


@dataclass(frozen=True)
class SpoolFile:
    """One message file found in a spool state directory, checked and parsed."""

    state: QueueState
    qid: str
    envelope: Envelope
    data: bytes


@dataclass
class SpoolAudit:
    """Everything in a spool: parsed messages, and the raw names in the other directories."""

    messages: list[SpoolFile]
    tmp: list[str]
    status: list[str]
    corrupt: list[str]
    damaged: list[str] = field(default_factory=list)  # "state/name: why"

    def empty(self) -> bool:
        return not (self.messages or self.tmp or self.status or self.corrupt or self.damaged)


def audit(root: Path) -> SpoolAudit:
    """Read every file of every state of the spool at `root` without changing anything."""
    messages: list[SpoolFile] = []
    damaged: list[str] = []
    for state in QueueState:
        if state == "corrupt":
            continue
        for name in sorted(os.listdir(root / state)):
            blob = (root / state / name).read_bytes()
            try:
                envelope, data = decode(blob)
            except ValueError as exc:
                damaged.append(f"{state}/{name}: {exc} ({len(blob)} octets)")
                continue
            if not valid_id(name):
                damaged.append(f"{state}/{name}: not a queue id")
                continue
            messages.append(SpoolFile(state, name, envelope, data))
    return SpoolAudit(
        messages,
        sorted(os.listdir(root / "tmp")),
        sorted(os.listdir(root / "status")),
        sorted(os.listdir(root / "corrupt")),
        damaged,
    )


def sigkill(proc: subprocess.Popen[bytes]) -> int | None:
    """SIGKILL `proc` unless it already ended; reap it and return its exit status."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
    return proc.wait(KILL_WAIT)


class Restartable:
    """A `leafmail serve` on one spool that the test kills and restarts again and again.

    Clients ask `address` for where it listens now and `wait_newer` to block until the
    server has been restarted (the READY line of the next process), instead of sleeping.
    """

    def __init__(self, tmp_path: Path, argv: Sequence[str], spool: Path) -> None:
        self.tmp_path = tmp_path
        self.argv = list(argv)
        self.spool = spool
        self.generation = 0
        self.kills = 0
        self.server: Leafmail | None = None
        self._changed = threading.Condition()

    def start(self) -> Leafmail:
        """Start the next process (READY read), and tell waiting clients."""
        server = spawn_leafmail(self.tmp_path, self.argv, spool_path=self.spool)
        with self._changed:
            self.server = server
            self.generation += 1
            self._changed.notify_all()
        return server

    def current(self) -> tuple[int, tuple[str, int] | None]:
        """The generation and the address of the running process (None while it is down)."""
        with self._changed:
            server = self.server
            return self.generation, None if server is None else server.address()

    def wait_newer(self, generation: int, timeout: float) -> None:
        """Block until a process newer than `generation` is up, or `timeout` passes."""
        with self._changed:
            self._changed.wait_for(lambda: self.generation > generation, timeout)

    def kill(self) -> None:
        """SIGKILL the running process; it must not have exited by itself before."""
        with self._changed:
            server, self.server = self.server, None
        assert server is not None, "no server to kill"
        assert server.proc.poll() is None, f"leafmail died by itself:\n{server.log()}"
        assert sigkill(server.proc) == -signal.SIGKILL
        self.kills += 1

    def stop(self) -> int | None:
        """SIGTERM the running process (a graceful stop must exit 0); None if none runs."""
        with self._changed:
            server, self.server = self.server, None
            self.generation += 1
            self._changed.notify_all()
        return None if server is None else server.stop()

    def log(self) -> str:
        """The logs of every process so far, for failure messages."""
        logs = sorted(self.tmp_path.glob("leafmail-*.log"))
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')}" for p in logs)
