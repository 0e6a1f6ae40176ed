"""SMTP load generator: N concurrent sessions sending numbered messages for T seconds.

It runs as its own process (uvloop), so the server under test and the generator share
the machine's two cores the way a server and its clients would, and the test process
only watches. Every session connects (from 127.0.0.1..4 round robin, so ephemeral ports
never run short), reads the greeting, sends EHLO, and waits until *all* N sessions got
that far: only then do they all start sending at once, back to back, until T seconds
have passed. Each finishes the transaction it is in, sends QUIT, expects 221 and EOF.
Pipelining (RFC 2920) goes across transactions too: the next message's MAIL, RCPT and
DATA, or the final QUIT, ride in the same write as the end of the previous data. Two in
a hundred messages are cut off half-way through their data by the client hanging up
(FIN or RST), after which the session reconnects and goes on: those must never appear
in the spool.

What a message looks like is a pure function of (run, session, number): `plan_for`
decides DATA or BDAT, pipelined or lock-step, 1-3 recipients, 8-bit or SMTPUTF8, and
the body, so the test regenerates each message byte for byte from the ids in the
summary instead of the generator shipping every body back.

Progress lines on stdout (the test samples the server at each): ``CONNECTED n failed``
once every session connected or failed, ``MARK k acked`` at k quarters of T, ``CLOSED``
when every session ended, ``DONE`` after the JSON summary (--out) is written. There is
no sleeping anywhere: sessions are paced only by the server's replies.

    python tests/reliability/load_client.py --port P --sessions 300 --seconds 5 --out s.json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import random
import re
import resource
import socket
import struct
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

CLIENT = "client.test"
SOURCES = ("127.0.0.1", "127.0.0.2", "127.0.0.3", "127.0.0.4")
CONNECT_AT_ONCE = 200  # connects in flight: more would overflow the listen backlog
IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)
QUEUED = re.compile(rb"^250 2\.0\.0 OK queued as ([0-9A-F]{24})\r\n\Z")
MAX_SAMPLES = 20
ABORT_RATE = 0.02  # messages whose client hangs up mid-data, then reconnects
DATE = "Thu, 01 Jan 2026 00:00:00 +0000"
WORDS = ("alpha", "bravo", "charlie", "delta", "echo", "fox", "golf", "hotel", "-", "0123")


# --- what each message is (shared with the test) ---------------------------------------


@dataclass(frozen=True)
class Plan:
    """One transaction: its envelope, its bytes and how they go over the wire."""

    session: int
    number: int
    sender: str
    recipients: tuple[str, ...]
    body: bytes  # the message as the server must store it (CRLF lines, unstuffed)
    bdat: bool
    pipelined: bool
    chunks: tuple[int, ...]  # BDAT split points (lock-step BDAT only)
    eightbit: bool
    smtputf8: bool
    abort: bool  # the client hangs up in the middle of the data: must never be spooled

    @property
    def mail_params(self) -> str:
        params = f" SIZE={len(self.body)}" if self.number % 3 == 0 else ""
        if self.eightbit:
            params += " BODY=8BITMIME"
        if self.smtputf8:
            params += " SMTPUTF8"
        return params


def source_for(session: int) -> str:
    """The loopback address session `session` connects from."""
    return SOURCES[session % len(SOURCES)]


def plan_for(run: str, session: int, number: int) -> Plan:
    """The `number`th message of `session`: deterministic, so the test can rebuild it."""
    rng = random.Random(f"{run}/{session}/{number}")
    smtputf8 = rng.random() < 0.125
    eightbit = smtputf8 or rng.random() < 0.25
    local = "rü" if smtputf8 else "r"
    recipients = tuple(f"{local}{session}-{k}@dest{k}.test" for k in range(rng.randint(1, 3)))
    sender = f"s{session}@load.test"
    body = _body(rng, run, session, number, sender, recipients, eightbit=eightbit)
    bdat = rng.random() < 0.5
    pipelined = rng.random() < 0.5
    chunks: tuple[int, ...] = ()
    if bdat and not pipelined:  # split anywhere, even between CR and LF; maybe BDAT 0 LAST
        chunks = tuple(sorted(rng.sample(range(1, len(body)), rng.randint(0, 2))))
    abort = rng.random() < ABORT_RATE  # drawn last: the rest does not depend on it
    return Plan(
        session,
        number,
        sender,
        recipients,
        body,
        bdat,
        pipelined,
        chunks,
        eightbit,
        smtputf8,
        abort,
    )


def _body(
    rng: random.Random,
    run: str,
    session: int,
    number: int,
    sender: str,
    recipients: Sequence[str],
    *,
    eightbit: bool,
) -> bytes:
    """Headers naming the message uniquely, then 3-80 lines, some starting with a dot."""
    lines = [
        f"From: <{sender}>",
        f"To: {', '.join(f'<{r}>' for r in recipients)}",
        f"Subject: load {run} session {session} message {number}",
        f"Message-ID: <{run}.{session}.{number}@load.test>",
        f"Date: {DATE}",
        "",
    ]
    for _ in range(rng.randint(3, 80)):
        text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(0, 16)))
        pick = rng.random()
        if pick < 0.08:
            text = "." + text  # DATA must stuff it, BDAT must not
        elif pick < 0.1:
            text = "."
        elif eightbit and pick < 0.3:
            text = "Grüße, ✓ " + text
        lines.append(text)
    return "\r\n".join(lines).encode() + b"\r\n"


def dot_stuffed(body: bytes) -> bytes:
    """RFC 5321 4.5.2: a line starting with '.' gets one more."""
    stuffed = body.replace(b"\r\n.", b"\r\n..")
    return b"." + stuffed if stuffed.startswith(b".") else stuffed


def envelope(plan: Plan) -> list[bytes]:
    """MAIL FROM and one RCPT TO per recipient, each a line."""
    commands = [f"MAIL FROM:<{plan.sender}>{plan.mail_params}\r\n".encode()]
    return commands + [f"RCPT TO:<{r}>\r\n".encode() for r in plan.recipients]


def pipelined_opening(plan: Plan) -> bytes:
    """A pipelined transaction's first write: the envelope, then DATA or BDAT LAST."""
    if plan.bdat:
        return b"".join(envelope(plan)) + b"BDAT %d LAST\r\n" % len(plan.body) + plan.body
    return b"".join(envelope(plan)) + b"DATA\r\n"


# --- the sessions -------------------------------------------------------------------


class Failure(Exception):
    """A session ended wrongly; `kind` is what the summary counts."""

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(f"{kind}: {detail}")
        self.kind = kind


@dataclass
class Tally:
    """Everything the summary reports, shared by all sessions."""

    sessions: int
    opened: int = 0
    connect_failures: int = 0
    sent: int = 0
    quits: int = 0
    aborted: int = 0
    acked: list[tuple[int, int, str]] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)
    samples: list[str] = field(default_factory=list)

    def fail(self, kind: str, detail: str) -> None:
        self.errors[kind] += 1
        if len(self.samples) < MAX_SAMPLES:
            self.samples.append(f"{kind}: {detail}")


class Session:
    """One SMTP connection of the load."""

    def __init__(self, number: int, run: str, tally: Tally, timeout: float) -> None:
        self.number = number
        self.run_id = run
        self.tally = tally
        self.timeout = timeout
        self.stage = "connect"
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.until = 0.0  # monotonic time to stop starting messages
        self.ahead = False  # the next message's pipelined group has been sent
        self.quit_sent = False
        self.address = ("", 0)

    async def open(self, host: str, port: int) -> None:
        """Connect from this session's source address, read the greeting, EHLO."""
        self.address = (host, port)
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
            sock.bind((source_for(self.number), 0))
            sock.setblocking(False)
            async with asyncio.timeout(self.timeout):
                await asyncio.get_running_loop().sock_connect(sock, (host, port))
        except BaseException:
            sock.close()
            raise
        self.reader, self.writer = await asyncio.open_connection(sock=sock, limit=1 << 16)
        async with asyncio.timeout(self.timeout):
            await self.expect(220, "greeting")
            self.send(f"EHLO {CLIENT}\r\n".encode())
            keywords = {line[4:].split(b" ")[0].strip() for line in await self.reply("ehlo")}
        if not {b"PIPELINING", b"CHUNKING", b"8BITMIME", b"SMTPUTF8"} <= keywords:
            raise Failure("ehlo keywords", repr(sorted(keywords)))

    def send(self, data: bytes) -> None:
        assert self.writer is not None
        self.writer.write(data)

    async def reply(self, stage: str) -> list[bytes]:
        """One whole reply (all its lines); EOF or garbage is a Failure."""
        assert self.reader is not None
        self.stage = stage
        lines = []
        while True:
            line = await self.reader.readline()
            if not line.endswith(b"\r\n") or len(line) < 5 or not line[:3].isdigit():
                raise Failure(f"bad reply at {stage}", repr(line))
            lines.append(line)
            if line[3:4] == b" ":
                return lines
            if line[3:4] != b"-":
                raise Failure(f"bad reply at {stage}", repr(line))

    async def expect(self, code: int, stage: str) -> bytes:
        lines = await self.reply(stage)
        if int(lines[-1][:3]) != code:
            raise Failure(f"{lines[-1][:3].decode()} at {stage}", repr(b"".join(lines)))
        return lines[-1]

    async def transaction(self, plan: Plan) -> str | None:
        """Send one message as `plan` says; the queue id of its 250, None if aborted."""
        if plan.abort:
            await self._abort(plan)
            return None
        if plan.pipelined:
            return await self._pipelined(plan)
        for index, command in enumerate(envelope(plan)):
            self.send(command)
            await self.expect(250, "mail" if index == 0 else "rcpt")
        if plan.bdat:
            return await self._bdat_chunks(plan)
        self.send(b"DATA\r\n")
        await self.expect(354, "data")
        return await self._final(plan, dot_stuffed(plan.body) + b".\r\n", "end of data")

    async def _pipelined(self, plan: Plan) -> str:
        """RFC 2920: the envelope and DATA (or the whole BDAT LAST) in one write.

        The group may already have gone out behind the previous message's end of data.
        """
        if self.ahead:
            self.ahead = False
        elif plan.bdat:
            self.send(pipelined_opening(plan) + self.tail(plan))
            self.tally.sent += 1
        else:
            self.send(pipelined_opening(plan))
        for index in range(1 + len(plan.recipients)):
            await self.expect(250, "mail" if index == 0 else "rcpt")
        if plan.bdat:
            return await self._queued("bdat last")
        await self.expect(354, "data")
        return await self._final(plan, dot_stuffed(plan.body) + b".\r\n", "end of data")

    async def _bdat_chunks(self, plan: Plan) -> str:
        """Lock-step BDAT: chunks at `plan.chunks`, the last maybe an empty BDAT 0 LAST."""
        bounds = [0, *plan.chunks, len(plan.body)]
        pieces = [plan.body[a:b] for a, b in itertools.pairwise(bounds)]
        if plan.number % 2 and len(pieces) > 1:
            pieces.append(b"")
        for piece in pieces[:-1]:
            self.send(b"BDAT %d\r\n" % len(piece) + piece)
            await self.expect(250, "bdat")
        last = b"BDAT %d LAST\r\n" % len(pieces[-1]) + pieces[-1]
        return await self._final(plan, last, "bdat last")

    async def _abort(self, plan: Plan) -> None:
        """Start the message, hang up half-way through its data (odd: RST), reconnect.

        RFC 5321 4.1.1.4: without the end of data the transaction is aborted, so the
        server must keep nothing of it; the test checks the spool holds only 250s.
        """
        for index, command in enumerate(envelope(plan)):
            self.send(command)
            await self.expect(250, "mail" if index == 0 else "rcpt")
        half = len(plan.body) // 2
        if plan.bdat:
            self.send(b"BDAT %d LAST\r\n" % len(plan.body) + plan.body[:half])
        else:
            self.send(b"DATA\r\n")
            await self.expect(354, "data")
            self.send(dot_stuffed(plan.body)[:half])
        assert self.writer is not None
        await self.writer.drain()
        if plan.number % 2:
            sock = self.writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.close()
        self.tally.aborted += 1
        self.stage = "reconnect"
        await self.open(*self.address)

    def tail(self, plan: Plan) -> bytes:
        """What may follow the end of `plan`'s data in the same write (RFC 2920 3.1).

        QUIT once time is up; else the next message's MAIL, RCPTs and DATA when it is
        a pipelined DATA transaction (a BDAT one carries its content and goes alone).
        """
        if time.monotonic() >= self.until:
            self.quit_sent = True
            return b"QUIT\r\n"
        upcoming = plan_for(self.run_id, self.number, plan.number + 1)
        if upcoming.pipelined and not upcoming.bdat and not upcoming.abort:
            self.ahead = True
            return pipelined_opening(upcoming)
        return b""

    async def _final(self, plan: Plan, data: bytes, stage: str) -> str:
        self.send(data + self.tail(plan))
        self.tally.sent += 1
        return await self._queued(stage)

    async def _queued(self, stage: str) -> str:
        line = await self.expect(250, stage)
        match = QUEUED.match(line)
        if match is None:
            raise Failure(f"no queue id at {stage}", repr(line))
        return match[1].decode()

    async def run(self, until: float) -> None:
        """Messages back to back until the monotonic time `until`, then QUIT."""
        self.until = until
        number = 0
        while not self.quit_sent:
            plan = plan_for(self.run_id, self.number, number)
            async with asyncio.timeout(self.timeout):
                qid = await self.transaction(plan)
            if qid is not None:
                self.tally.acked.append((self.number, number, qid))
            number += 1
        async with asyncio.timeout(self.timeout):
            await self.expect(221, "quit")
            assert self.reader is not None
            if await self.reader.read(1):
                raise Failure("data after 221", "")
        self.tally.quits += 1

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


# --- the whole load --------------------------------------------------------------------


@dataclass
class Load:
    host: str
    port: int
    sessions: int
    seconds: float
    run: str
    timeout: float


def say(line: str) -> None:
    """One progress line for the test (it samples the server when it reads it)."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


async def one_session(
    load: Load, number: int, tally: Tally, gate: asyncio.Semaphore, go: asyncio.Future[float]
) -> None:
    """Connect (at most CONNECT_AT_ONCE at a time), wait for `go`, send, count failures."""
    session = Session(number, load.run, tally, load.timeout)
    try:
        try:
            async with gate:
                await session.open(load.host, load.port)
            tally.opened += 1
        except (OSError, TimeoutError, Failure) as exc:
            tally.connect_failures += 1
            tally.fail(f"connect {type(exc).__name__}", str(exc))
            return
        finally:
            if tally.opened + tally.connect_failures == tally.sessions:
                go.set_result(time.monotonic() + load.seconds)
        until = await go
        await session.run(until)
    except Failure as exc:
        tally.fail(exc.kind, str(exc))
    except TimeoutError:
        tally.fail(f"timeout at {session.stage}", f"session {number}")
    except (OSError, ValueError) as exc:  # ValueError: a reply line over the limit
        tally.fail(f"{type(exc).__name__} at {session.stage}", str(exc))
    finally:
        session.close()


async def marks(load: Load, tally: Tally, go: asyncio.Future[float]) -> None:
    """``MARK k acked`` at each quarter of the sending time (a timer, not a pacing sleep)."""
    until = await go
    start = until - load.seconds
    for k in range(1, 5):
        await asyncio.sleep(max(0.0, start + load.seconds * k / 4 - time.monotonic()))
        say(f"MARK {k} {len(tally.acked)}")


async def drive(load: Load) -> Tally:
    """Run every session to its end; report progress on stdout."""
    tally = Tally(load.sessions)
    gate = asyncio.Semaphore(CONNECT_AT_ONCE)
    go: asyncio.Future[float] = asyncio.get_running_loop().create_future()
    tasks = [
        asyncio.create_task(one_session(load, i, tally, gate, go)) for i in range(load.sessions)
    ]
    marker = asyncio.create_task(marks(load, tally, go))
    await go
    say(f"CONNECTED {tally.opened} {tally.connect_failures}")
    await asyncio.gather(*tasks)
    await marker
    say("CLOSED")
    return tally


def summary(load: Load, tally: Tally, elapsed: float) -> dict[str, object]:
    return {
        "run": load.run,
        "sessions": load.sessions,
        "seconds": load.seconds,
        "elapsed": elapsed,
        "opened": tally.opened,
        "connect_failures": tally.connect_failures,
        "sent": tally.sent,
        "quits": tally.quits,
        "aborted": tally.aborted,
        "acked": tally.acked,
        "errors": dict(tally.errors),
        "error_samples": tally.samples,
    }


def raise_nofile() -> None:
    """Soft descriptor limit up to the hard one: one socket per session."""
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def parse_args(argv: Sequence[str] | None) -> tuple[Load, str]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--sessions", type=int, required=True)
    parser.add_argument("--seconds", type=float, required=True)
    parser.add_argument("--run", default="r0", help="names the messages (Message-ID)")
    parser.add_argument("--timeout", type=float, default=60.0, help="per transaction")
    parser.add_argument("--out", required=True, help="where the JSON summary goes")
    args = parser.parse_args(argv)
    load = Load(args.host, args.port, args.sessions, args.seconds, args.run, args.timeout)
    return load, args.out


def main(argv: Sequence[str] | None = None) -> int:
    load, out = parse_args(argv)
    raise_nofile()
    try:
        import uvloop

        runner = asyncio.Runner(loop_factory=uvloop.new_event_loop)
    except ImportError:  # still correct, only slower
        runner = asyncio.Runner()
    started = time.monotonic()
    with runner:
        tally = runner.run(drive(load))
    with open(out, "w", encoding="utf-8") as f:
        json.dump(summary(load, tally, time.monotonic() - started), f)
    say("DONE")
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
