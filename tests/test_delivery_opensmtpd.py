"""OpenSMTPD as the smarthost: its limits per transaction and per connection, its TLS.

Found relaying leafmail through OpenSMTPD 6.8.0p2 (Debian bookworm) on loopback; the
next hop here is `opensmtpd_peer.OpenSMTPDPeer`, OpenSMTPD 6.8's bytes from a socket.

Recipients a transaction (`smtp limit max-rcpt N`). RFC 5321 4.5.3.1.10: a server with
a limit on RCPT commands answers the ones past it with 452 (old servers 552), and a
client SHOULD be prepared to send the message to the rest in further transactions.
OpenSMTPD answers them ``451 4.5.3`` (RFC 3463's X.5.3, "too many recipients"),
Postfix's smtpd (`smtpd_recipient_limit`) ``452 4.5.3``. With ``max-rcpt 2`` and five
recipients, two were delivered and three deferred to the retry schedule (5 min,
10 min, ... two more each round), where they belong in a new transaction, at once.

Messages a connection (`smtp limit max-mails N`, default 100). leafmail reuses its
connections to the smarthost (up to 1,000 messages each); OpenSMTPD answers the MAIL
past N ``452 4.5.3 Too many recipients: Too many messages sent`` and keeps the session
open. With ``max-mails 1``, of 8 messages flushed over 4 connections 4 were deferred
with that reply, and the spent connection went back to the pool, so every later
message given to it was deferred the same way; with the default 100 and concurrency 4,
a queue run past 400 messages.

Server TLS that fails. Debian 12's OpenSMTPD 6.8.0p2 (OpenSSL 3) offers STARTTLS and
ends every handshake with an internal_error alert (OpenSMTPD issues 1171, 1239). With
`tls = "opportunistic"` leafmail deferred every message to it, for good, where the MX
route retries a failed handshake in plaintext (RFC 7435).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest
from opensmtpd_peer import (
    TOO_MANY_MESSAGES,
    TOO_MANY_RECIPIENTS,
    OpenSMTPDPeer,
    PeerSetup,
    envelope_to,
    plain_agent,
)

from leafmail.delivery import LinkDown, Outcome, Result
from leafmail.delivery.smarthost import SmarthostAgent

pytestmark = pytest.mark.timeout(30)

MESSAGE = b"Subject: many\r\n\r\n.a line with a dot\r\nbody\r\n"
POSTFIX_TOO_MANY = "452 4.5.3 Error: too many recipients"


@pytest.fixture
def peers() -> Iterator[list[OpenSMTPDPeer]]:
    started: list[OpenSMTPDPeer] = []
    yield started
    for peer in started:
        peer.close()


def start(started: list[OpenSMTPDPeer], limits: PeerSetup) -> OpenSMTPDPeer:
    peer = OpenSMTPDPeer(limits)
    started.append(peer)
    return peer


def deliver(port: int, rcpts: list[str], tls: str = "none") -> dict[int, Result]:
    """One SmarthostAgent.deliver of MESSAGE to `rcpts`."""
    agent = plain_agent(port, tls)

    async def run() -> dict[int, Result]:
        try:
            return await agent.deliver(envelope_to(rcpts), MESSAGE, list(range(len(rcpts))))
        finally:
            await agent.close()

    return asyncio.run(run())


# --- recipients a transaction ----------------------------------------------------


def rcpts(count: int) -> list[str]:
    return [f"r{n}@example.test" for n in range(1, count + 1)]


def outcomes(results: dict[int, Result]) -> list[Outcome]:
    return [results[i].outcome for i in sorted(results)]


@pytest.mark.parametrize(
    ("over", "pipelining"),
    [
        (TOO_MANY_RECIPIENTS, False),  # OpenSMTPD's own bytes
        (POSTFIX_TOO_MANY, True),  # Postfix's smtpd_recipient_limit, pipelined
        ("452 Too many recipients", False),  # RFC 5321's code with no enhanced code
        ("552 5.5.3 Too many recipients", False),  # the old servers' 552 (RFC 5321)
    ],
)
def test_the_recipients_past_the_limit_go_in_new_transactions_at_once(
    peers: list[OpenSMTPDPeer], over: str, pipelining: bool
) -> None:
    server = start(peers, PeerSetup(rcpts=2, rcpt_over=over, pipelining=pipelining))
    results = deliver(server.port, rcpts(5))
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


def test_other_refusals_in_a_transaction_are_final_for_this_attempt(
    peers: list[OpenSMTPDPeer],
) -> None:
    """Only the too-many replies are sent again: a recipient refused for itself (a 550,
    a full mailbox's 452 4.2.2) keeps its result and is never tried twice."""
    refuse = {
        "r1@example.test": "550 5.1.1 Invalid recipient",
        "r2@example.test": "452 4.2.2 Mailbox full",
    }
    server = start(peers, PeerSetup(rcpts=1, refuse=refuse))
    results = deliver(server.port, rcpts(4))
    assert [results[i].line for i in range(2)] == [
        "550 5.1.1 Invalid recipient",
        "452 4.2.2 Mailbox full",
    ]
    assert outcomes(results)[2:] == [Outcome.DELIVERED, Outcome.DELIVERED]
    tried = [c for c in server.commands if c.startswith("RCPT")]
    assert tried == [f"RCPT TO:<r{n}@example.test>" for n in (1, 2, 3, 4, 4)]  # r4 twice


def test_a_transaction_that_delivers_to_nobody_ends_the_attempt(
    peers: list[OpenSMTPDPeer],
) -> None:
    """A server that calls every recipient one too many never loops the client: the
    recipients are deferred after the one transaction that delivered nothing."""
    server = start(peers, PeerSetup(refuse={r: TOO_MANY_RECIPIENTS for r in rcpts(3)}))
    results = deliver(server.port, rcpts(3))
    assert outcomes(results) == [Outcome.DEFERRED] * 3
    assert {results[i].line for i in results} == {TOO_MANY_RECIPIENTS}
    assert [c.split(":")[0] for c in server.commands[1:]].count("MAIL FROM") == 1


# --- messages a connection -------------------------------------------------------


def deliver_in_turn(port: int, count: int, rcpts: int = 1) -> tuple[list[Result], SmarthostAgent]:
    """`count` messages one after the other through one agent (its connection pool),
    each to `rcpts` recipients; the results of all of them, in order."""
    agent = plain_agent(port)

    async def run() -> list[Result]:
        results = []
        try:
            for n in range(1, count + 1):
                to = [f"r{n}.{i}@example.test" for i in range(rcpts)]
                data = f"Subject: message {n}\r\n\r\nbody {n}\r\n".encode()
                done = await agent.deliver(envelope_to(to), data, list(range(rcpts)))
                results += [done[i] for i in range(rcpts)]
        finally:
            await agent.close()
        return results

    return asyncio.run(run()), agent


def subjects(peer: OpenSMTPDPeer) -> list[bytes]:
    return [t.content.split(b"\r\n")[0] for t in peer.transactions]


@pytest.mark.parametrize(
    "over",
    [
        TOO_MANY_MESSAGES,  # OpenSMTPD's max-mails: the session stays open
        "421 4.7.0 Too many messages in this connection",  # and a server that hangs up
    ],
)
def test_a_spent_session_sends_the_message_on_a_new_connection(
    peers: list[OpenSMTPDPeer], over: str
) -> None:
    peer = start(peers, PeerSetup(messages=2, message_over=over))
    results, agent = deliver_in_turn(peer.port, 5)
    assert [r.outcome for r in results] == [Outcome.DELIVERED] * 5, [r.line for r in results]
    assert subjects(peer) == [f"Subject: message {n}".encode() for n in range(1, 6)]
    assert agent.connections == peer.connections == 3  # 2 + 2 + 1 messages
    assert peer.mails == 7  # the 3rd and 5th MAIL were each refused once


def test_a_new_connections_refusal_of_mail_is_the_result(peers: list[OpenSMTPDPeer]) -> None:
    """Only a reused connection is suspected: on a fresh one the same reply defers the
    message, so a server that refuses every MAIL costs one connection a message."""
    peer = start(peers, PeerSetup(every_mail=TOO_MANY_MESSAGES))
    results, _ = deliver_in_turn(peer.port, 1)
    assert results[0].outcome is Outcome.DEFERRED
    assert results[0].line == TOO_MANY_MESSAGES
    assert (peer.connections, peer.mails) == (1, 1)


def test_other_temporary_refusals_of_mail_are_not_retried(peers: list[OpenSMTPDPeer]) -> None:
    """A refusal about the sender or the load (451 4.7.1) would be the same on a new
    connection: the message is deferred on the reused one, nothing reconnects."""
    peer = start(peers, PeerSetup(messages=1, message_over="451 4.7.1 sender rate limit exceeded"))
    results, agent = deliver_in_turn(peer.port, 2)
    assert [r.outcome for r in results] == [Outcome.DELIVERED, Outcome.DEFERRED]
    assert results[1].line == "451 4.7.1 sender rate limit exceeded"
    assert agent.connections == peer.connections == 1


def test_a_session_spent_between_recipient_batches_goes_on_a_new_connection(
    peers: list[OpenSMTPDPeer],
) -> None:
    """OpenSMTPD with `max-rcpt 2` and `max-mails 1`: a message to three recipients needs
    two transactions and a session allows one, so each message takes two connections
    (and the second message first finds the pooled one spent)."""
    peer = start(peers, PeerSetup(rcpts=2, messages=1))
    results, agent = deliver_in_turn(peer.port, 2, rcpts=3)
    assert [r.outcome for r in results] == [Outcome.DELIVERED] * 6, [r.line for r in results]
    assert [len(t.accepted) for t in peer.transactions] == [2, 1, 2, 1]
    assert agent.connections == peer.connections == 4


# --- server TLS that fails ----------------------------------------------------------


def test_opportunistic_tls_goes_on_in_plaintext_when_the_handshake_fails(
    peers: list[OpenSMTPDPeer],
) -> None:
    """The handshake's failure ends that connection; the message goes on a new one
    without STARTTLS, as RFC 7435 and the MX route do (no password can be lost: the
    config refuses a username with opportunistic TLS)."""
    peer = start(peers, PeerSetup(broken_tls=True))
    results = deliver(peer.port, rcpts(2), tls="opportunistic")
    assert outcomes(results) == [Outcome.DELIVERED] * 2, [r.line for r in results.values()]
    assert (peer.connections, peer.handshakes) == (2, 1)
    assert peer.commands.count("STARTTLS") == 1
    assert [t.accepted for t in peer.transactions] == [rcpts(2)]


def test_required_tls_never_goes_on_in_plaintext(peers: list[OpenSMTPDPeer]) -> None:
    peer = start(peers, PeerSetup(broken_tls=True))
    with pytest.raises(LinkDown, match="TLSV1_ALERT_INTERNAL_ERROR"):
        deliver(peer.port, rcpts(1), tls="starttls")
    assert (peer.connections, peer.mails) == (1, 0)
