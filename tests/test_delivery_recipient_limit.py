"""A next hop that takes only so many recipients in one transaction.

RFC 5321 4.5.3.1.10: a server with a limit on RCPT commands answers the ones past it
with 452 (old servers 552), and a client SHOULD be prepared to send the message again
to the rest in further transactions. OpenSMTPD (`smtp limit max-rcpt N`) answers them
``451 4.5.3`` (RFC 3463's X.5.3, "too many recipients"); Postfix's smtpd
(`smtpd_recipient_limit`) ``452 4.5.3``. Found relaying through OpenSMTPD 6.8.0p2 with
``smtp limit max-rcpt 2``: five recipients, two delivered, and the other three deferred
to the retry schedule (5 min, 10 min, ... each round delivering two more), where the
rest belongs in a new transaction on the same connection, at once.

The server here is a plain socket that answers with OpenSMTPD 6.8's bytes, as its
trace (`smtpd -d -T smtp`) showed them, for as many transactions as the client opens.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import BinaryIO

import pytest
from smarthost import OneConnection

from leafmail.delivery import Outcome, Result
from leafmail.delivery.smarthost import SmarthostAgent, SmarthostSettings
from leafmail.envelope import ClientInfo, Envelope, Recipient

pytestmark = pytest.mark.timeout(30)

SENDER = "alice@example.test"
MESSAGE = b"Subject: many\r\n\r\n.a line with a dot\r\nbody\r\n"

# OpenSMTPD 6.8.0p2 (Debian bookworm), from its SMTP trace.
OPENSMTPD_EHLO = (
    b"250-osmtpd.test Hello client.test [127.0.0.1], pleased to meet you\r\n"
    b"250-8BITMIME\r\n250-ENHANCEDSTATUSCODES\r\n250-SIZE 52428800\r\n250-DSN\r\n250 HELP\r\n"
)
OPENSMTPD_TOO_MANY = "451 4.5.3 Too many recipients: Too many recipients"
POSTFIX_TOO_MANY = "452 4.5.3 Error: too many recipients"


@dataclass
class Transaction:
    """What the server saw of one MAIL ... end of data."""

    accepted: list[str] = field(default_factory=list)
    content: bytes = b""


class LimitedServer:
    """One connection; at most `limit` recipients a transaction, the rest `over`.

    `refuse` maps a recipient to its own reply (checked before the limit, as a server
    refuses an address it does not know whatever the count). With `pipelining` it
    offers PIPELINING and holds its MAIL and RCPT replies until DATA (RFC 2920).
    """

    def __init__(
        self,
        limit: int,
        over: str = OPENSMTPD_TOO_MANY,
        *,
        refuse: dict[str, str] | None = None,
        pipelining: bool = False,
    ) -> None:
        self.limit, self.over, self.pipelining = limit, over, pipelining
        self.refuse = refuse or {}
        self.transactions: list[Transaction] = []
        self.commands: list[str] = []
        self._server = OneConnection(self._serve)
        self.port = self._server.port

    def _serve(self, conn: socket.socket, reader: BinaryIO) -> None:
        conn.sendall(b"220 osmtpd.test ESMTP OpenSMTPD\r\n")
        held = b""
        for raw in reader:
            line = raw.rstrip(b"\r\n").decode()
            self.commands.append(line)
            verb = line.split(":", 1)[0].split(" ", 1)[0].upper()
            if verb == "EHLO":
                offer = b"250-PIPELINING\r\n" if self.pipelining else b""
                conn.sendall(OPENSMTPD_EHLO.replace(b"250-DSN", offer + b"250-DSN"))
                continue
            if verb == "QUIT":
                conn.sendall(b"221 2.0.0 Bye\r\n")
                return
            if verb == "DATA" and self.transactions[-1].accepted:
                conn.sendall(held + b'354 Enter mail, end with "." on a line by itself\r\n')
                held = b""
                self._read_message(conn, reader)
                continue
            held += self._answer(verb, line).encode() + b"\r\n"
            if not self.pipelining or verb not in ("MAIL", "RCPT"):
                conn.sendall(held)
                held = b""

    def _answer(self, verb: str, line: str) -> str:
        if verb == "MAIL":
            self.transactions.append(Transaction())
            return "250 2.0.0 Ok"
        if verb == "RCPT":
            address = line.split("<", 1)[1].split(">", 1)[0]
            if address in self.refuse:
                return self.refuse[address]
            current = self.transactions[-1]
            if len(current.accepted) >= self.limit:
                return self.over
            current.accepted.append(address)
            return "250 2.1.5 Destination address valid: Recipient ok"
        if verb == "RSET":
            return "250 2.0.0 Reset state"
        if verb == "DATA":
            return "503 5.5.1 Invalid command: No recipient specified"
        return "500 5.5.1 Invalid command: Command unrecognized"

    def _read_message(self, conn: socket.socket, reader: BinaryIO) -> None:
        content = bytearray()
        for raw in reader:
            if raw == b".\r\n":
                break
            content += raw
        self.transactions[-1].content = bytes(content)
        number = len(self.transactions)
        conn.sendall(f"250 2.0.0 {number:08x} Message accepted for delivery\r\n".encode())

    def close(self) -> None:
        self._server.close()


def deliver(port: int, rcpts: Sequence[str]) -> dict[int, Result]:
    """One SmarthostAgent.deliver of MESSAGE to `rcpts`, plaintext, short timeouts."""
    settings = SmarthostSettings(
        host="127.0.0.1", port=port, helo="client.test", tls="none",
        connect_timeout=5.0, command_timeout=5.0, deadline=15.0,
    )  # fmt: skip
    envelope = Envelope(
        sender=SENDER,
        recipients=tuple(Recipient(r) for r in rcpts),
        client=ClientInfo("127.0.0.1", 40000, "client.test", "ESMTP"),
        received="2026-01-01T00:00:00Z",
    )
    agent = SmarthostAgent(settings)

    async def run() -> dict[int, Result]:
        try:
            return await agent.deliver(envelope, MESSAGE, list(range(len(rcpts))))
        finally:
            await agent.close()

    return asyncio.run(run())


def rcpts(count: int) -> list[str]:
    return [f"r{n}@example.test" for n in range(1, count + 1)]


def outcomes(results: dict[int, Result]) -> list[Outcome]:
    return [results[i].outcome for i in sorted(results)]


@pytest.mark.parametrize(
    ("over", "pipelining"),
    [
        (OPENSMTPD_TOO_MANY, False),  # OpenSMTPD's own bytes
        (POSTFIX_TOO_MANY, True),  # Postfix's smtpd_recipient_limit, pipelined
        ("452 Too many recipients", False),  # RFC 5321's code with no enhanced code
        ("552 5.5.3 Too many recipients", False),  # the old servers' 552 (RFC 5321)
    ],
)
def test_the_recipients_past_the_limit_go_in_new_transactions_at_once(
    over: str, pipelining: bool
) -> None:
    server = LimitedServer(2, over, pipelining=pipelining)
    try:
        results = deliver(server.port, rcpts(5))
    finally:
        server.close()
    assert outcomes(results) == [Outcome.DELIVERED] * 5, [r.line for r in results.values()]
    assert [t.accepted for t in server.transactions] == [
        ["r1@example.test", "r2@example.test"],
        ["r3@example.test", "r4@example.test"],
        ["r5@example.test"],
    ]
    stuffed = MESSAGE.replace(b"\r\n.", b"\r\n..")
    assert [t.content for t in server.transactions] == [stuffed] * 3
    assert server.commands.count("EHLO client.test") == 1  # one connection, one greeting
    assert results[4].text.startswith("00000003 Message accepted")


def test_other_refusals_in_a_transaction_are_final_for_this_attempt() -> None:
    """Only the too-many replies are sent again: a recipient refused for itself (a 550,
    a full mailbox's 452 4.2.2) keeps its result and is never tried twice."""
    refuse = {
        "r1@example.test": "550 5.1.1 Invalid recipient",
        "r2@example.test": "452 4.2.2 Mailbox full",
    }
    server = LimitedServer(1, refuse=refuse)
    try:
        results = deliver(server.port, rcpts(4))
    finally:
        server.close()
    assert [results[i].line for i in range(2)] == [
        "550 5.1.1 Invalid recipient",
        "452 4.2.2 Mailbox full",
    ]
    assert outcomes(results)[2:] == [Outcome.DELIVERED, Outcome.DELIVERED]
    tried = [c for c in server.commands if c.startswith("RCPT")]
    assert tried == [f"RCPT TO:<r{n}@example.test>" for n in (1, 2, 3, 4, 4)]  # r4 twice


def test_a_transaction_that_delivers_to_nobody_ends_the_attempt() -> None:
    """A server that calls every recipient one too many never loops the client: the
    recipients are deferred after the one transaction that delivered nothing."""
    server = LimitedServer(0)
    try:
        results = deliver(server.port, rcpts(3))
    finally:
        server.close()
    assert outcomes(results) == [Outcome.DEFERRED] * 3
    assert {results[i].line for i in results} == {OPENSMTPD_TOO_MANY}
    assert [c.split(":")[0] for c in server.commands[1:]].count("MAIL FROM") == 1
