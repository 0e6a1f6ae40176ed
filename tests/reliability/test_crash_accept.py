"""Acceptance under SIGKILL: a 250 is a promise that survives any crash (issue 7, crash).

Several real clients (smtplib with DATA, single and multi-recipient; raw sockets with
BDAT chunks) send uniquely numbered messages to `leafmail serve` with no smarthost, so
everything stays in the spool. Meanwhile the test SIGKILLs the server at random moments
(seeded, the seed is printed) and restarts it on the same spool. A client whose
connection died before its 250 counts the message as not acknowledged and goes on with a
new number; so a number is sent on one connection only, and may be spooled at most once.

At the end every acknowledged message must be in queue/ exactly once, under the queue id
of its 250, byte for byte what was sent behind one Received header; an unacknowledged
one may be there too (the commit finished, the 250 was lost), but then complete. No
file in any state may fail its self-check, and what a killed process left in tmp/ is
gone once the next one said READY.

`leafmail sendmail` killed mid-submission gets the same treatment: it writes into the
spool itself, so a kill there must not leave a partial message either.
"""

from __future__ import annotations

import os
import random
import smtplib
import subprocess
import threading
import time
import traceback
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import pytest
import soak
from conftest import ROOT
from crash_support import (
    Restartable,
    SpoolFile,
    audit,
    message_bytes,
    seeded_rng,
    sequence_number,
    sigkill,
)
from leafmail_fixtures import (
    CLIENT,
    HOSTNAME,
    IO_TIMEOUT,
    RawSMTP,
    Reply,
    check_spooled,
    clean_env,
    extensions,
    leafmail_command,
    queued_id,
    smtplib_send,
    spawn_leafmail,
    split_received,
    write_config,
)

from leafmail.spool import SpooledMessage

SENDER = "sender@client.test"
KILLS = soak.scaled(20, 200)
CLIENTS = 3
LIFETIME = (0.02, 0.18)  # seconds a server process lives before its SIGKILL (random)
PER_SESSION = 4  # messages an smtplib client sends before it says QUIT
SENDMAIL_RUNS = soak.scaled(5, 60)

Address = tuple[str, int]


class UnexpectedReply(Exception):
    """The server answered something other than 250 while it was alive: a real failure."""


@dataclass
class Sent:
    """One numbered message a client started to send, and its queue id once acked."""

    number: int
    data: bytes
    recipients: tuple[str, ...]
    way: str  # "data" or "bdat"
    qid: str | None = None


@dataclass
class Ledger:
    """What the clients sent and what the server acknowledged, shared by the threads."""

    sent: dict[int, Sent] = field(default_factory=dict)
    inflight: int = 0
    errors: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def new(self, way: str, rng: random.Random) -> Sent:
        """Number and build the next message; it is in flight until `done`."""
        count = rng.choice((1, 1, 1, 2, 3))
        recipients = tuple(f"rcpt{i}@{d}.test" for i, d in zip(range(count), "abc", strict=False))
        size = rng.choice((300, 2_000, 8_000, 8_000, 200_000))
        with self.lock:
            number = len(self.sent) + 1
            sent = Sent(number, message_bytes(number, size, to=recipients[0]), recipients, way)
            self.sent[number] = sent
            self.inflight += 1
        return sent

    def done(self, sent: Sent, qid: str | None) -> None:
        with self.lock:
            sent.qid = qid
            self.inflight -= 1

    def acknowledged(self) -> list[Sent]:
        with self.lock:
            return [s for s in self.sent.values() if s.qid is not None]


# --- the clients -----------------------------------------------------------------------


def send_session(address: Address, ledger: Ledger, rng: random.Random) -> None:
    """Up to PER_SESSION messages with DATA in one smtplib session."""
    with smtplib.SMTP(*address, local_hostname=CLIENT, timeout=IO_TIMEOUT) as client:
        for _ in range(PER_SESSION):
            sent = ledger.new("data", rng)
            qid = None
            try:
                qid = smtplib_send(client, SENDER, sent.recipients, sent.data)
            except AssertionError as exc:  # smtplib_send asserts each reply is 250
                raise UnexpectedReply(str(exc)) from None
            finally:
                ledger.done(sent, qid)
        client.quit()


def send_bdat(address: Address, ledger: Ledger, rng: random.Random) -> None:
    """One message in two or three BDAT chunks (RFC 3030) over a raw socket."""
    with RawSMTP(address) as raw:
        raw.greeting()
        if "CHUNKING" not in extensions(raw.ehlo()):
            raise UnexpectedReply("leafmail does not offer CHUNKING")
        sent = ledger.new("bdat", rng)
        qid = None
        try:
            expect_250(raw.command(f"MAIL FROM:<{SENDER}>"))
            for rcpt in sent.recipients:
                expect_250(raw.command(f"RCPT TO:<{rcpt}>"))
            cuts = sorted(rng.sample(range(1, len(sent.data)), rng.choice((1, 2))))
            chunks = [
                sent.data[a:b] for a, b in zip([0, *cuts], [*cuts, len(sent.data)], strict=True)
            ]
            for i, chunk in enumerate(chunks):
                last = b" LAST" if i == len(chunks) - 1 else b""
                raw.send(b"BDAT %d%s\r\n%s" % (len(chunk), last, chunk))
                reply = expect_250(raw.reply())
            qid = queued_id(reply.text)
        finally:
            ledger.done(sent, qid)


def expect_250(reply: Reply) -> Reply:
    if reply.code != 250:
        raise UnexpectedReply(repr(reply))
    return reply


def client_loop(
    server: Restartable, ledger: Ledger, stop: threading.Event, rng: random.Random
) -> None:
    """Send until told to stop; a connection that dies is only fine if a kill caused it."""
    try:
        while not stop.is_set():
            generation, address = server.current()
            if address is None:
                server.wait_newer(generation, 10.0)
                continue
            try:
                if rng.random() < 0.25:
                    send_bdat(address, ledger, rng)
                else:
                    send_session(address, ledger, rng)
            except (OSError, smtplib.SMTPException) as exc:
                now, alive = server.current()
                if now == generation and alive is not None:  # no kill: a real failure
                    ledger.errors.append(f"connection failed without a kill: {exc!r}")
                    return
                server.wait_newer(generation, 10.0)
    except Exception:
        ledger.errors.append(traceback.format_exc())


# --- the test --------------------------------------------------------------------------


def serve_argv(spool: Path) -> list[str]:
    return ["--spool", str(spool), "--hostname", HOSTNAME, "--listen", "127.0.0.1:0"]


@dataclass
class KillFigures:
    kills_mid_transaction: int = 0
    tmp_leftovers: int = 0


def kill_and_restart(server: Restartable, ledger: Ledger, figures: KillFigures) -> None:
    """One SIGKILL and restart; the killed process's tmp/ files must be gone at READY."""
    with ledger.lock:
        figures.kills_mid_transaction += ledger.inflight > 0
    server.kill()
    left = set(os.listdir(server.spool / "tmp"))
    figures.tmp_leftovers += len(left)
    server.start()
    still = left & set(os.listdir(server.spool / "tmp"))
    assert not still, f"tmp/ files of the killed process survived the restart: {still}"


def check_one(found: SpoolFile, sent: Sent) -> None:
    """A spooled message is complete and exact; an acked one also carries its 250's id."""
    msg = SpooledMessage(found.qid, found.state, found.envelope, found.data)
    if sent.qid is not None:
        check_spooled(msg, sent.data, qid=sent.qid, recipients=sent.recipients, sender=SENDER)
        return
    received, rest = split_received(found.data)  # spooled, but its 250 was lost
    assert rest == sent.data, f"partial or altered message {sent.number} ({len(rest)} octets)"
    assert received.qid == found.qid
    assert [r.address for r in found.envelope.recipients] == list(sent.recipients)


@pytest.mark.timeout(soak.scaled(90, 900))
def test_every_acknowledged_message_survives_sigkill(tmp_path: Path) -> None:
    rng, seed = seeded_rng("crash-accept")
    spool = tmp_path / "spool"
    server = Restartable(tmp_path, serve_argv(spool), spool)
    server.start()
    ledger, stop, figures = Ledger(), threading.Event(), KillFigures()
    threads = [
        threading.Thread(
            target=client_loop, args=(server, ledger, stop, random.Random(rng.random()))
        )
        for _ in range(CLIENTS)
    ]
    for thread in threads:
        thread.start()
    try:
        for _ in range(KILLS):
            time.sleep(rng.uniform(*LIFETIME))  # the random moment is the test
            kill_and_restart(server, ledger, figures)
    finally:
        stop.set()
        for thread in threads:
            thread.join(30)
        code = server.stop()
    assert not ledger.errors, "\n".join(ledger.errors) + server.log()
    assert code == 0, server.log()

    result = audit(spool)
    assert result.damaged == [] and result.corrupt == [], result
    assert (result.tmp, result.status) == ([], []), result
    assert {m.state for m in result.messages} <= {"queue"}
    by_number: dict[int, list[SpoolFile]] = defaultdict(list)
    for found in result.messages:
        by_number[sequence_number(found.data)].append(found)
    assert set(by_number) <= set(ledger.sent), "a spooled message nobody sent"
    twice = {n: [f.qid for f in fs] for n, fs in by_number.items() if len(fs) > 1}
    assert not twice, f"one transaction spooled more than once: {twice}"
    for number, (found,) in by_number.items():
        check_one(found, ledger.sent[number])
    acked = ledger.acknowledged()
    lost = [s.number for s in acked if s.number not in by_number]
    soak.record(
        "crash",
        "acceptance under SIGKILL",
        seed=seed,
        sent=len(ledger.sent),
        acknowledged=len(acked),
        acknowledged_bdat=sum(s.way == "bdat" for s in acked),
        spooled=len(result.messages),
        spooled_unacknowledged=len(result.messages) - (len(acked) - len(lost)),
        lost=len(lost),
        kills=server.kills,
        kills_mid_transaction=figures.kills_mid_transaction,
        tmp_leftovers_cleaned=figures.tmp_leftovers,
    )
    assert lost == [], f"acknowledged with 250 but not in the spool: {lost}"
    assert server.kills == KILLS
    assert len(acked) >= KILLS, "too little mail got through for the kills to mean much"
    assert figures.kills_mid_transaction > 0, "no kill hit a transaction in flight"
    assert any(s.way == "bdat" for s in acked) and any(len(s.recipients) > 1 for s in acked)


# --- leafmail sendmail ------------------------------------------------------------------


def feed(pipe: IO[bytes] | None, data: bytes) -> None:
    """Write a message to sendmail's stdin; a killed sendmail breaks the pipe, fine."""
    assert pipe is not None
    try:
        pipe.write(data)
        pipe.close()
    except OSError:
        pass


def run_sendmail(env: dict[str, str], data: bytes, kill_after: float | None) -> int | None:
    """Run ``leafmail sendmail -i RCPT`` on `data`; SIGKILL it after `kill_after` seconds."""
    proc = subprocess.Popen(
        leafmail_command("sendmail", "-i", "-f", SENDER, "rcpt@a.test"),
        cwd=ROOT,
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    writer = threading.Thread(target=feed, args=(proc.stdin, data))
    writer.start()
    try:
        if kill_after is None:
            return proc.wait(30)
        time.sleep(kill_after)  # the random moment is the test
        return sigkill(proc)
    finally:
        sigkill(proc)
        writer.join(10)


def check_sendmail_copy(found: SpoolFile, sent: bytes) -> None:
    """sendmail adds only its Received header to a message with Date/From/Message-ID."""
    assert found.data.endswith(sent), f"partial or altered message in {found.state}/{found.qid}"
    trace = found.data[: len(found.data) - len(sent)]
    assert trace.startswith(b"Received: ") and f"id {found.qid}".encode() in trace, trace


@pytest.mark.timeout(soak.scaled(60, 600))
def test_sendmail_killed_mid_submission_leaves_no_partial_message(tmp_path: Path) -> None:
    rng, seed = seeded_rng("crash-sendmail")
    spool = tmp_path / "spool"
    config = write_config(tmp_path, 'hostname = "leaf.test"\n')
    env = clean_env(tmp_path, {"LEAFMAIL_CONFIG": str(config), "LEAFMAIL_SPOOL": str(spool)})
    sent: dict[int, bytes] = {0: message_bytes(0, 6_000_000)}
    began = time.monotonic()
    outcome = {0: run_sendmail(env, sent[0], None)}  # one left to finish: how long it takes
    whole = time.monotonic() - began
    for number in range(1, SENDMAIL_RUNS + 1):
        sent[number] = message_bytes(number, rng.choice((2_000, 2_000_000, 6_000_000)))
        outcome[number] = run_sendmail(env, sent[number], rng.uniform(0.3, 1.0) * whole)
    assert set(outcome.values()) <= {0, -9}, outcome

    result = audit(spool)
    assert result.damaged == [] and result.corrupt == [], result
    by_number: dict[int, list[SpoolFile]] = defaultdict(list)
    for found in result.messages:
        by_number[sequence_number(found.data)].append(found)
        check_sendmail_copy(found, sent[sequence_number(found.data)])
    assert all(len(fs) == 1 for fs in by_number.values()), by_number
    acked = [n for n, code in outcome.items() if code == 0]
    lost = [n for n in acked if n not in by_number]
    leftovers = len(result.tmp)

    daemon = spawn_leafmail(tmp_path, serve_argv(spool), spool_path=spool)
    try:
        assert os.listdir(spool / "tmp") == [], "tmp/ leftovers of killed sendmails survive"
    finally:
        assert daemon.stop() == 0, daemon.log()
    soak.record(
        "crash",
        "sendmail under SIGKILL",
        seed=seed,
        sent=len(sent),
        acknowledged=len(acked),
        killed=sum(code == -9 for code in outcome.values()),
        spooled=len(result.messages),
        lost=len(lost),
        tmp_leftovers_cleaned=leftovers,
    )
    assert lost == [], f"sendmail exited 0 but the message is not in the spool: {lost}"
