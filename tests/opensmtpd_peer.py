"""A next hop that answers with OpenSMTPD's bytes, for leafmail's SMTP client.

OpenSMTPD 6.8.0p2 (Debian bookworm) was run as leafmail's smarthost on loopback
(`smtpd -d -T smtp`); the replies below are copied from its trace. Its limits are
what leafmail's client has to cope with: `smtp limit max-rcpt N` answers the RCPTs
past N in a transaction ``451 4.5.3 Too many recipients: Too many recipients``, and
`smtp limit max-mails N` (default 100) answers the MAIL past N on one connection
``452 4.5.3 Too many recipients: Too many messages sent``, keeping the session open.

Its server-side TLS is broken: Debian's 6.8.0p2 with OpenSSL 3 offers STARTTLS,
answers ``220 2.0.0 Ready to start TLS`` and then ends every handshake with a fatal
internal_error alert ("missing private key", OpenSMTPD issues 1171 and 1239).

`OpenSMTPDPeer` is a plain socket server (any number of connections, a thread each)
that plays those rules with whatever limits a test sets, and records what it saw.
"""

from __future__ import annotations

import socket
import threading
from dataclasses import dataclass, field
from typing import BinaryIO

from smarthost import ManyConnections

from leafmail.delivery.smarthost import SmarthostAgent, SmarthostSettings
from leafmail.envelope import ClientInfo, Envelope, Recipient

GREETING = b"220 osmtpd.test ESMTP OpenSMTPD\r\n"
EHLO = (
    b"250-osmtpd.test Hello client.test [127.0.0.1], pleased to meet you\r\n"
    b"250-8BITMIME\r\n250-ENHANCEDSTATUSCODES\r\n250-SIZE 52428800\r\n250-DSN\r\n250 HELP\r\n"
)
# A TLS record: alert (21), version 3.3, length 2, fatal (2) internal_error (80).
INTERNAL_ERROR_ALERT = b"\x15\x03\x03\x00\x02\x02\x50"
TOO_MANY_RECIPIENTS = "451 4.5.3 Too many recipients: Too many recipients"
TOO_MANY_MESSAGES = "452 4.5.3 Too many recipients: Too many messages sent"
RCPT_OK = "250 2.1.5 Destination address valid: Recipient ok"


@dataclass
class PeerSetup:
    """How the peer answers (0: no limit)."""

    rcpts: int = 0  # recipients a transaction (max-rcpt)
    rcpt_over: str = TOO_MANY_RECIPIENTS
    messages: int = 0  # transactions a connection (max-mails)
    message_over: str = TOO_MANY_MESSAGES
    every_mail: str = ""  # if set, the reply to every MAIL
    refuse: dict[str, str] = field(default_factory=dict)  # recipient -> its reply
    pipelining: bool = False  # offer PIPELINING; hold MAIL/RCPT replies until DATA
    broken_tls: bool = False  # offer STARTTLS, then fail every handshake


@dataclass
class Transaction:
    """What the peer saw of one MAIL ... end of data."""

    accepted: list[str] = field(default_factory=list)
    content: bytes = b""


@dataclass
class _Session:
    """One connection's state."""

    messages: int = 0
    current: Transaction | None = None
    held: bytes = b""


class OpenSMTPDPeer:
    """OpenSMTPD's replies under `limits`, on 127.0.0.1:`port`."""

    def __init__(self, limits: PeerSetup) -> None:
        self.limits = limits
        self.transactions: list[Transaction] = []  # the delivered ones, in order
        self.commands: list[str] = []
        self.mails = 0
        self.handshakes = 0  # STARTTLS handshakes tried (and failed, broken_tls)
        self._lock = threading.Lock()
        self._server = ManyConnections(self._serve)
        self.port = self._server.port

    @property
    def connections(self) -> int:
        return self._server.connections

    def close(self) -> None:
        self._server.close()

    def _serve(self, conn: socket.socket, reader: BinaryIO) -> None:
        send = conn.sendall
        send(GREETING)
        session = _Session()
        for raw in reader:
            line = raw.rstrip(b"\r\n").decode()
            with self._lock:
                self.commands.append(line)
            verb = line.split(":", 1)[0].split(" ", 1)[0].upper()
            if verb == "EHLO":
                send(self._ehlo())
            elif verb == "STARTTLS" and self.limits.broken_tls:
                send(b"220 2.0.0 Ready to start TLS\r\n")
                with self._lock:
                    self.handshakes += 1
                conn.recv(4096)  # the ClientHello
                send(INTERNAL_ERROR_ALERT)
                return
            elif verb == "QUIT":
                send(b"221 2.0.0 Bye\r\n")
                return
            elif verb == "DATA" and session.current and session.current.accepted:
                send(session.held + b'354 Enter mail, end with "." on a line by itself\r\n')
                session.held = b""
                send(self._message(session.current, reader))
                session.current = None
            else:
                reply = self._answer(session, verb, line)
                session.held += reply.encode() + b"\r\n"
                if not self.limits.pipelining or verb not in ("MAIL", "RCPT"):
                    send(session.held)
                    session.held = b""
                if reply.startswith("421"):
                    return

    def _ehlo(self) -> bytes:
        offer = b"250-PIPELINING\r\n" if self.limits.pipelining else b""
        offer += b"250-STARTTLS\r\n" if self.limits.broken_tls else b""
        return EHLO.replace(b"250-DSN", offer + b"250-DSN")

    def _answer(self, session: _Session, verb: str, line: str) -> str:
        if verb == "MAIL":
            return self._mail(session)
        if verb == "RCPT" and session.current is not None:
            return self._rcpt(session.current, line.split("<", 1)[1].split(">", 1)[0])
        if verb == "RSET":
            session.current = None
            return "250 2.0.0 Reset state"
        if verb == "DATA":
            return "503 5.5.1 Invalid command: No recipient specified"
        return "500 5.5.1 Invalid command: Command unrecognized"

    def _mail(self, session: _Session) -> str:
        with self._lock:
            self.mails += 1
        session.messages += 1
        limits = self.limits
        if limits.every_mail:
            return limits.every_mail
        if 0 < limits.messages < session.messages:
            return limits.message_over
        session.current = Transaction()
        return "250 2.0.0 Ok"

    def _rcpt(self, current: Transaction, address: str) -> str:
        if address in self.limits.refuse:
            return self.limits.refuse[address]
        if 0 < self.limits.rcpts <= len(current.accepted):
            return self.limits.rcpt_over
        current.accepted.append(address)
        return RCPT_OK

    def _message(self, current: Transaction, reader: BinaryIO) -> bytes:
        """Read the message up to CRLF.CRLF; record the transaction; the final reply."""
        content = bytearray()
        for raw in reader:
            if raw == b".\r\n":
                break
            content += raw
        current.content = bytes(content)
        with self._lock:
            self.transactions.append(current)
            number = len(self.transactions)
        return f"250 2.0.0 {number:08x} Message accepted for delivery\r\n".encode()


def plain_agent(port: int, tls: str = "none") -> SmarthostAgent:
    """leafmail's smarthost agent for 127.0.0.1:`port`, plaintext unless `tls` says
    otherwise, short timeouts."""
    settings = SmarthostSettings(
        host="127.0.0.1", port=port, helo="client.test", tls=tls,
        connect_timeout=5.0, command_timeout=5.0, deadline=15.0,
    )  # fmt: skip
    return SmarthostAgent(settings)


def envelope_to(rcpts: list[str]) -> Envelope:
    """A message's envelope from alice@example.test to `rcpts`."""
    return Envelope(
        sender="alice@example.test",
        recipients=tuple(Recipient(r) for r in rcpts),
        client=ClientInfo("127.0.0.1", 40000, "client.test", "ESMTP"),
        received="2026-01-01T00:00:00Z",
    )
