"""Smarthost delivery against real SMTP servers on loopback.

The next hop is `smarthost.Smarthost` (aiosmtpd in a thread, told how to answer), a real
`leafmail serve` process where DSN parameters matter (aiosmtpd has no DSN), or a plain
socket scripted in the test for what no real server would do (never greet, answer
nonsense). Messages are spooled in a real `Spool` and sent with `unfreeze(...).send()`,
or handed to `SmarthostAgent.deliver` directly inside `asyncio.run`. TLS is real (a
trustme CA), so is AUTH. Nothing waits by sleeping: every server reports its port.
"""

from __future__ import annotations

import asyncio
import base64
import email
import email.message
import email.policy
import socket
import ssl
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, BinaryIO

import pytest
import trustme
from leafmail_fixtures import LeafmailFactory, leafmail_servers, split_received
from smarthost import OneConnection, SinkTLS, Smarthost, make_sink_tls

from leafmail.delivery import LinkDown, Outcome, Result
from leafmail.delivery.smarthost import SmarthostAgent, SmarthostSettings
from leafmail.envelope import ClientInfo, Envelope, Recipient
from leafmail.message import unfreeze
from leafmail.retry import RetryPolicy
from leafmail.spool import Spool, SpooledMessage, arrival_time
from leafmail.states import QueueState
from leafmail.status import MessageStatus, RcptState

pytestmark = pytest.mark.timeout(30)

HOSTNAME = "mx.test"  # our name in bounces
HELO = "client.test"
SENDER = "alice@example.test"
USER = "alice@example.test"
PASSWORD = "pw-Zq8!never-logged"  # noqa: S105 (a test account)

MakeHost = Callable[..., Smarthost]


# --- fixtures and helpers ------------------------------------------------------------


@pytest.fixture
def hosts() -> Iterator[MakeHost]:
    """Start Smarthosts with any knobs; all stopped (hung sessions released) at teardown."""
    started: list[Smarthost] = []

    def make(**knobs: Any) -> Smarthost:
        host = Smarthost(**knobs).start()
        started.append(host)
        return host

    yield make
    for host in started:
        host.release_hung()
        host.stop()


@pytest.fixture
def sink_tls(tmp_path: Path) -> SinkTLS:
    return make_sink_tls(tmp_path)


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[LeafmailFactory]:
    yield from leafmail_servers(tmp_path)


def settings(port: int, **overrides: Any) -> SmarthostSettings:
    """Settings for 127.0.0.1:port, plaintext, with short timeouts (tests must be bounded)."""
    base = SmarthostSettings(
        host="127.0.0.1",
        port=port,
        helo=HELO,
        tls="none",
        connect_timeout=5.0,
        command_timeout=5.0,
        deadline=8.0,
    )
    return replace(base, **overrides)


def envelope(
    *rcpts: str | Recipient,
    sender: str = SENDER,
    body: str = "7BIT",
    smtputf8: bool = False,
    ret: str | None = None,
    envid: str | None = None,
) -> Envelope:
    return Envelope(
        sender=sender,
        recipients=tuple(r if isinstance(r, Recipient) else Recipient(r) for r in rcpts),
        client=ClientInfo("127.0.0.1", 40000, HELO, "ESMTP"),
        received="2026-01-01T00:00:00Z",
        body=body,
        smtputf8=smtputf8,
        ret=ret,
        envid=envid,
    )


def mail(subject: str = "hello", body: bytes = b"Hello there.\r\n") -> bytes:
    return (
        f"From: Alice <{SENDER}>\r\nTo: Bob <bob@example.test>\r\n"
        f"Subject: {subject}\r\nMessage-ID: <{subject.replace(' ', '.')}@example.test>\r\n"
        "\r\n"
    ).encode() + body


def deliver(
    agent: SmarthostAgent, env: Envelope, data: bytes, rcpts: Sequence[int] | None = None
) -> dict[int, Result]:
    """One agent.deliver in its own event loop; the agent's connections closed after."""

    async def run() -> dict[int, Result]:
        try:
            which = list(range(len(env.recipients))) if rcpts is None else rcpts
            return await agent.deliver(env, data, which)
        finally:
            await agent.close()

    return asyncio.run(run())


def link_down(agent: SmarthostAgent, env: Envelope, data: bytes) -> LinkDown:
    """Deliver and expect LinkDown; return it."""
    with pytest.raises(LinkDown) as info:
        deliver(agent, env, data)
    return info.value


def send(spool: Spool, qid: str, agent: SmarthostAgent, **kw: Any) -> dict[str, Result] | None:
    """unfreeze(...).send(); None when it raised LinkDown (the attempt is recorded anyway)."""
    try:
        return unfreeze(spool, qid).send(agent, hostname=HOSTNAME, **kw)
    except LinkDown:
        return None


def status_of(spool: Spool, qid: str) -> MessageStatus:
    blob = spool.read_status(qid)
    assert blob is not None, f"no status record for {qid}"
    return MessageStatus.from_bytes(blob, spool.get(qid).envelope)


def bounces(spool: Spool) -> list[SpooledMessage]:
    """Messages from the null sender in queue/ (the DSNs an attempt spooled)."""
    found = []
    for qid in spool.ids(QueueState.QUEUE):
        msg = spool.get(qid)
        if msg.envelope.sender == "":
            found.append(msg)
    return found


def dsn_fields(data: bytes) -> list[dict[str, str]]:
    """The blocks of a DSN's status part, [per-message, per-recipient...], read from the
    raw bytes (the email package splits only message/delivery-status into blocks, not
    message/global-delivery-status)."""
    msg = email.message_from_bytes(data, policy=email.policy.default)
    assert msg.get_content_type() == "multipart/report"
    boundary = msg.get_boundary()
    assert boundary is not None
    status_part = data.split(b"\r\n--" + boundary.encode())[2]
    _, _, body = status_part.partition(b"\r\n\r\n")
    blocks = []
    for block in body.strip(b"\r\n").split(b"\r\n\r\n"):
        lines = block.decode("utf-8").split("\r\n")
        blocks.append(dict(line.split(": ", 1) for line in lines))
    return blocks


def spool_bytes(spool: Spool) -> bytes:
    """Every file under the spool, concatenated (to grep for secrets)."""
    return b"".join(p.read_bytes() for p in sorted(spool.root.rglob("*")) if p.is_file())


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A port that completes the TCP handshake (the kernel's backlog) and never greets."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        yield listener.getsockname()[1]


@pytest.fixture
def closed_port() -> Iterator[int]:
    """A port nobody listens on: bound and held, never listening, so connecting is refused
    and no other test (`make test` runs files in parallel) can be given it meanwhile."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


class ScriptedServer:
    """A one-connection SMTP server on a plain socket that answers each verb as told.

    For replies no real server (and so not aiosmtpd) gives; `replies` maps a verb ("MAIL",
    "RCPT", "DATA", "." for the end of data) to a reply line. It records the commands.
    With `pipelining` it offers PIPELINING and holds its replies to MAIL and RCPT until
    DATA has come, as RFC 2920 lets a server do: a client that waited for each reply
    would wait forever.
    """

    def __init__(self, replies: dict[str, str], *, pipelining: bool = False) -> None:
        self.replies = replies
        self.pipelining = pipelining
        self.commands: list[str] = []
        self.content = bytearray()
        self._server = OneConnection(self._serve)
        self.port = self._server.port

    def _serve(self, conn: socket.socket, reader: BinaryIO) -> None:
        conn.sendall(b"220 scripted.test ESMTP\r\n")
        in_data = False
        held = b""
        for raw_line in reader:
            line = raw_line.rstrip(b"\r\n").decode("utf-8", "replace")
            if in_data:
                if line == ".":
                    in_data = False
                    conn.sendall(self.replies.get(".", "250 2.0.0 ok").encode() + b"\r\n")
                else:
                    self.content += raw_line
                continue
            self.commands.append(line)
            verb = line.split(" ", 1)[0].split(":", 1)[0].upper()
            if verb == "EHLO":
                offer = b"250-PIPELINING\r\n" if self.pipelining else b""
                conn.sendall(b"250-scripted.test\r\n" + offer + b"250 8BITMIME\r\n")
            elif verb == "QUIT":
                conn.sendall(b"221 bye\r\n")
                return
            else:
                reply = self.replies.get(verb, "354 go on" if verb == "DATA" else "250 ok")
                held += reply.encode() + b"\r\n"
                if not self.pipelining or verb not in ("MAIL", "RCPT"):
                    conn.sendall(held)
                    held = b""
                in_data = reply.startswith("354")

    def close(self) -> None:
        self._server.close()


# --- plain delivery ------------------------------------------------------------------


def test_plain_delivery_sends_exactly_the_spooled_bytes(hosts: MakeHost, spool: Spool) -> None:
    host = hosts()
    data = mail(body=b"Line one.\r\n.leading dot\r\n..two dots\r\nlast line\r\n")
    env = envelope("bob@example.test", "carol@example.test")
    qid = spool.commit(env, data)

    results = send(spool, qid, SmarthostAgent(settings(host.port)))

    assert results is not None
    assert set(results) == {"bob@example.test", "carol@example.test"}
    for result in results.values():
        assert (result.outcome, result.code, result.status) == (Outcome.DELIVERED, 250, "2.0.0")
        assert result.remote == f"127.0.0.1:{host.port}"
        assert result.line == "250 2.0.0 accepted"
    [got] = host.received
    assert got.content == data
    assert got.sender == SENDER
    assert got.recipients == ["bob@example.test", "carol@example.test"]
    assert got.tls is False and got.login is None
    assert spool.find(qid) is None, "a fully delivered message must leave the spool"
    assert spool.read_status(qid) is None
    assert bounces(spool) == []


def test_message_without_trailing_crlf_is_sent_whole(hosts: MakeHost) -> None:
    host = hosts()
    data = mail(body=b"no newline at the end")
    results = deliver(SmarthostAgent(settings(host.port)), envelope("bob@example.test"), data)
    assert results[0].outcome is Outcome.DELIVERED
    [got] = host.received
    assert got.content.rstrip(b"\r\n") == data


def test_null_sender_is_passed_on(hosts: MakeHost) -> None:
    host = hosts()
    env = envelope("bob@example.test", sender="")
    results = deliver(SmarthostAgent(settings(host.port)), env, mail())
    assert results[0].outcome is Outcome.DELIVERED
    assert host.received[0].sender == "<>"  # aiosmtpd's spelling of the null path


def test_only_the_requested_recipients_are_tried(hosts: MakeHost) -> None:
    host = hosts()
    env = envelope("a@example.test", "b@example.test", "c@example.test")
    results = deliver(SmarthostAgent(settings(host.port)), env, mail(), rcpts=[2, 0])
    assert set(results) == {0, 2}
    assert sorted(host.received[0].recipients) == ["a@example.test", "c@example.test"]


# --- per-recipient outcomes ----------------------------------------------------------


def test_mixed_recipient_outcomes_and_the_retry(hosts: MakeHost, spool: Spool) -> None:
    host = hosts()
    host.behaviour.rcpt_replies = {
        "later@example.test": "451 4.2.1 mailbox busy, try later",
        "bad@example.test": "550 5.1.1 no such user",
    }
    env = envelope("ok@example.test", "later@example.test", "bad@example.test")
    data = mail("mixed")
    qid = spool.commit(env, data)
    agent = SmarthostAgent(settings(host.port))

    results = send(spool, qid, agent)

    assert results is not None
    ok, later, bad = (
        results[a] for a in ("ok@example.test", "later@example.test", "bad@example.test")
    )
    assert (ok.outcome, ok.code, ok.status) == (Outcome.DELIVERED, 250, "2.0.0")
    assert (later.outcome, later.code, later.status) == (Outcome.DEFERRED, 451, "4.2.1")
    assert later.text == "mailbox busy, try later"
    assert (bad.outcome, bad.code, bad.status) == (Outcome.FAILED, 550, "5.1.1")
    assert [r.recipients for r in host.received] == [["ok@example.test"]]

    # The status record says where each recipient stands, and why.
    assert spool.find(qid) == "deferred"
    assert qid not in spool.ids(QueueState.QUEUE)
    status = status_of(spool, qid)
    states = [(r.state, r.attempts, r.reply) for r in status.recipients]
    assert states == [
        (RcptState.DELIVERED, 1, "250 2.0.0 accepted"),
        (RcptState.DEFERRED, 1, "451 4.2.1 mailbox busy, try later"),
        (RcptState.FAILED, 1, "550 5.1.1 no such user"),
    ]
    assert all(r.remote == f"127.0.0.1:{host.port}" for r in status.recipients)
    assert status.attempts == 1
    assert status.last_error == "451 4.2.1 mailbox busy, try later"
    assert status.next_attempt > status.last_attempt > 0

    # Exactly one bounce, from <> to the sender, about the failed recipient only.
    [dsn] = bounces(spool)
    assert dsn.envelope.sender == ""
    assert [r.address for r in dsn.envelope.recipients] == [SENDER]
    per_rcpt = dsn_fields(dsn.data)[1:]
    assert [b["Final-Recipient"] for b in per_rcpt] == ["rfc822; bad@example.test"]
    assert per_rcpt[0]["Status"] == "5.1.1"

    # The retry tries only the deferred recipient: nobody gets the message twice.
    host.behaviour.rcpt_replies = {}
    again = send(spool, qid, agent)
    assert again is not None
    assert set(again) == {"later@example.test"}
    assert again["later@example.test"].outcome is Outcome.DELIVERED
    assert [r.recipients for r in host.received] == [["ok@example.test"], ["later@example.test"]]
    assert all(r.content == data for r in host.received)
    assert spool.find(qid) is None, "all recipients final: the message is removed"
    assert spool.read_status(qid) is None
    assert len(bounces(spool)) == 1, "the retry must not bounce again"


def test_every_recipient_refused_sends_no_data(hosts: MakeHost, spool: Spool) -> None:
    host = hosts()
    host.behaviour.rcpt_replies = {
        "x@example.test": "550 5.1.1 unknown",
        "y@example.test": "553 5.1.3 bad address",
    }
    qid = spool.commit(envelope("x@example.test", "y@example.test"), mail())
    results = send(spool, qid, SmarthostAgent(settings(host.port)))
    assert results is not None
    assert {a: r.status for a, r in results.items()} == {
        "x@example.test": "5.1.1",
        "y@example.test": "5.1.3",
    }
    assert host.received == []
    assert spool.find(qid) is None
    [dsn] = bounces(spool)
    assert len(dsn_fields(dsn.data)) == 3, "one DSN covers both recipients"


@pytest.mark.parametrize(
    ("reply", "outcome", "status"),
    [
        ("550 5.7.1 sender refused", Outcome.FAILED, "5.7.1"),
        ("553 sender refused without enhanced code", Outcome.FAILED, "5.0.0"),
        ("451 4.3.0 try again later", Outcome.DEFERRED, "4.3.0"),
        ("421 4.3.2 service shutting down", Outcome.DEFERRED, "4.3.2"),
    ],
)
def test_mail_from_refused_applies_to_every_recipient(
    hosts: MakeHost, spool: Spool, reply: str, outcome: Outcome, status: str
) -> None:
    host = hosts()
    host.behaviour.mail_reply = reply
    qid = spool.commit(envelope("a@example.test", "b@example.test"), mail())
    results = send(spool, qid, SmarthostAgent(settings(host.port)))
    assert results is not None
    assert len(results) == 2
    assert {(r.outcome, r.code, r.status) for r in results.values()} == {
        (outcome, int(reply[:3]), status)
    }
    assert host.received == []
    if outcome is Outcome.FAILED:
        assert spool.find(qid) is None
        [dsn] = bounces(spool)
        assert len(dsn_fields(dsn.data)) == 3
    else:
        assert spool.find(qid) == "deferred"
        assert bounces(spool) == []
        assert {r.state for r in status_of(spool, qid).recipients} == {RcptState.DEFERRED}


@pytest.mark.parametrize(
    ("reply", "outcome", "status"),
    [
        ("554 5.6.0 content rejected", Outcome.FAILED, "5.6.0"),
        ("452 4.3.1 insufficient storage", Outcome.DEFERRED, "4.3.1"),
    ],
)
def test_data_refused_applies_to_the_accepted_recipients(
    hosts: MakeHost, reply: str, outcome: Outcome, status: str
) -> None:
    host = hosts()
    host.behaviour.data_reply = reply
    host.behaviour.rcpt_replies = {"gone@example.test": "550 5.1.1 gone"}
    env = envelope("a@example.test", "gone@example.test", "b@example.test")
    results = deliver(SmarthostAgent(settings(host.port)), env, mail())
    assert (results[0].outcome, results[0].status) == (outcome, status)
    assert (results[2].outcome, results[2].status) == (outcome, status)
    assert results[0].text == reply.split(" ", 2)[2]
    assert (results[1].outcome, results[1].status) == (Outcome.FAILED, "5.1.1")
    assert host.received == []


@pytest.mark.parametrize("pipelining", [True, False])
def test_refusals_keep_the_connection_for_the_next_message(
    hosts: MakeHost, pipelining: bool
) -> None:
    """MAIL, RCPT and DATA refusals end with RSET (or nothing); the connection is reused,
    whether the replies came one by one or together (PIPELINING)."""
    host = hosts(pipelining=pipelining)
    agent = SmarthostAgent(settings(host.port))
    env = envelope("a@example.test")

    async def run() -> list[Outcome]:
        outcomes = []
        try:
            for knob in ("mail", "rcpt", "data", "none"):
                host.behaviour.mail_reply = "451 4.3.0 later" if knob == "mail" else None
                host.behaviour.rcpt_replies = (
                    {"a@example.test": "550 5.1.1 no"} if knob == "rcpt" else {}
                )
                host.behaviour.data_reply = "554 5.6.0 no" if knob == "data" else None
                outcomes.append((await agent.deliver(env, mail(knob), [0]))[0].outcome)
        finally:
            await agent.close()
        return outcomes

    outcomes = asyncio.run(run())
    assert outcomes == [Outcome.DEFERRED, Outcome.FAILED, Outcome.FAILED, Outcome.DELIVERED]
    assert host.connections == 1
    assert agent.connections == 1
    assert [r.content for r in host.received] == [mail("none")]


@pytest.mark.parametrize("stage", ["mail", "rcpt"])
def test_odd_positive_reply_is_never_counted_as_delivered(hosts: MakeHost, stage: str) -> None:
    host = hosts()
    odd = "252 2.1.5 cannot verify, will try"
    if stage == "mail":
        host.behaviour.mail_reply = odd
    else:
        host.behaviour.rcpt_replies = {"odd@example.test": odd}
    env = envelope("ok@example.test", "odd@example.test")
    results = deliver(SmarthostAgent(settings(host.port)), env, mail())
    sent_to = {a for r in host.received for a in r.recipients}
    assert "odd@example.test" not in sent_to
    # A recipient the message never went to must not be marked delivered.
    assert results[1].outcome is not Outcome.DELIVERED


def test_data_command_answered_250_is_not_delivered() -> None:
    server = ScriptedServer({"DATA": "250 2.0.0 whatever"})
    try:
        results = deliver(SmarthostAgent(settings(server.port)), envelope("a@example.test"), mail())
    finally:
        server.close()
    assert bytes(server.content) == b""
    assert results[0].outcome is not Outcome.DELIVERED


def test_scripted_server_final_reply_after_content() -> None:
    """The scripted server speaks enough SMTP for a real delivery (checks the helper)."""
    server = ScriptedServer({".": "250 2.6.0 queued as X1"})
    data = mail("scripted")
    try:
        results = deliver(SmarthostAgent(settings(server.port)), envelope("a@example.test"), data)
    finally:
        server.close()
    assert results[0].line == "250 2.6.0 queued as X1"
    assert bytes(server.content) == data
    assert server.commands[1] == f"MAIL FROM:<{SENDER}>"  # no SIZE: not offered


def test_pipelining_sends_mail_rcpt_and_data_before_any_reply() -> None:
    """Against a server that offers PIPELINING, MAIL, every RCPT and DATA go together and
    the replies are read as they come (a multi-line final reply included)."""
    server = ScriptedServer({".": "250-2.6.0 queued\r\n250 2.6.0 as X1"}, pipelining=True)
    data = mail("piped", b".leading dot\r\nbody\r\n")
    env = envelope("a@example.test", "b@example.test")
    try:
        results = deliver(SmarthostAgent(settings(server.port, command_timeout=3.0)), env, data)
    finally:
        server.close()
    assert [r.outcome for r in results.values()] == [Outcome.DELIVERED, Outcome.DELIVERED]
    assert "as X1" in results[0].text
    assert server.commands[1:5] == [
        f"MAIL FROM:<{SENDER}>",
        "RCPT TO:<a@example.test>",
        "RCPT TO:<b@example.test>",
        "DATA",
    ]
    assert bytes(server.content) == data.replace(b"\r\n.", b"\r\n..")  # dot-stuffed


def test_pipelined_refusals_are_read_in_order() -> None:
    """With every reply held until DATA, a refused RCPT is matched to its recipient."""
    server = ScriptedServer({"RCPT": "550 5.1.1 no such user"}, pipelining=True)
    env = envelope("a@example.test", "b@example.test")
    try:
        results = deliver(SmarthostAgent(settings(server.port, command_timeout=3.0)), env, mail())
    finally:
        server.close()
    assert [r.status for r in results.values()] == ["5.1.1", "5.1.1"]
    assert bytes(server.content) == b""  # the 354 to a pipelined DATA got no message
    assert "RSET" in server.commands


def test_bounce_of_a_long_utf8_refusal_can_itself_be_delivered(
    hosts: MakeHost, spool: Spool
) -> None:
    host = hosts()
    line = "550-5.1.1 " + "\u6f22" * 150
    host.behaviour.rcpt_replies = {"bad@example.test": "\r\n".join([line] * 5 + ["550 5.1.1 x"])}
    qid = spool.commit(envelope("bad@example.test"), mail("refused"))
    agent = SmarthostAgent(settings(host.port))
    first = send(spool, qid, agent)
    assert first is not None and first["bad@example.test"].outcome is Outcome.FAILED
    [dsn] = bounces(spool)
    results = send(spool, dsn.qid, agent)
    assert results is not None
    assert results[SENDER].outcome is Outcome.DELIVERED


# --- lost and hung connections -------------------------------------------------------


def test_connection_dropped_at_data_defers_and_loses_nothing(hosts: MakeHost, spool: Spool) -> None:
    host = hosts()
    host.behaviour.drop_at_data = True
    data = mail("dropped")
    qid = spool.commit(envelope("a@example.test", "b@example.test"), data)
    agent = SmarthostAgent(settings(host.port))

    results = send(spool, qid, agent)

    assert results is not None
    for result in results.values():
        assert (result.outcome, result.status) == (Outcome.DEFERRED, "4.4.2")
        assert "lost" in result.text
    assert host.received == []
    assert spool.find(qid) == "deferred"
    assert spool.get(qid).data == data
    assert {r.state for r in status_of(spool, qid).recipients} == {RcptState.DEFERRED}
    assert bounces(spool) == []

    host.behaviour.drop_at_data = False
    again = send(spool, qid, agent)
    assert again is not None
    assert {r.outcome for r in again.values()} == {Outcome.DELIVERED}
    assert [r.content for r in host.received] == [data]
    assert spool.find(qid) is None


def test_lost_connection_is_not_reused(hosts: MakeHost) -> None:
    host = hosts()
    agent = SmarthostAgent(settings(host.port))
    env = envelope("a@example.test")

    async def run() -> list[Outcome]:
        try:
            host.behaviour.drop_at_data = True
            first = (await agent.deliver(env, mail("one"), [0]))[0].outcome
            host.behaviour.drop_at_data = False
            second = (await agent.deliver(env, mail("two"), [0]))[0].outcome
            return [first, second]
        finally:
            await agent.close()

    assert asyncio.run(run()) == [Outcome.DEFERRED, Outcome.DELIVERED]
    assert agent.connections == 2
    assert host.connections == 2


def test_hung_peer_at_data_is_deferred_within_the_deadline(hosts: MakeHost, spool: Spool) -> None:
    host = hosts()
    host.behaviour.hang_at_data = True
    qid = spool.commit(envelope("a@example.test"), mail("hung"))
    agent = SmarthostAgent(settings(host.port, deadline=1.0, command_timeout=30.0))

    started = time.monotonic()
    results = send(spool, qid, agent)
    elapsed = time.monotonic() - started

    assert results is not None
    result = results["a@example.test"]
    assert (result.outcome, result.status) == (Outcome.DEFERRED, "4.4.2")
    assert "deadline" in result.text
    assert 0.9 <= elapsed < 4.0, elapsed
    assert host.received == []
    assert spool.find(qid) == "deferred"


def test_peer_that_never_greets_is_link_down(silent_port: int) -> None:
    agent = SmarthostAgent(settings(silent_port, connect_timeout=0.5, command_timeout=30.0))
    started = time.monotonic()
    error = link_down(agent, envelope("a@example.test"), mail())
    assert time.monotonic() - started < 3.0
    assert "no answer within 0.5s" in str(error)
    assert agent.connections == 0


def test_peer_that_never_greets_defers_the_message_4_4_1(silent_port: int, spool: Spool) -> None:
    qid = spool.commit(envelope("a@example.test", "b@example.test"), mail())
    agent = SmarthostAgent(settings(silent_port, connect_timeout=0.5, command_timeout=30.0))
    started = time.monotonic()
    send(spool, qid, agent)
    assert time.monotonic() - started < 3.0
    assert spool.find(qid) == "deferred"
    status = status_of(spool, qid)
    for rcpt in status.recipients:
        assert rcpt.state is RcptState.DEFERRED
        assert rcpt.reply.startswith("451 4.4.1 ")
        assert "no answer within 0.5s" in rcpt.reply
    assert bounces(spool) == []


def test_send_returns_the_link_down_deferral(silent_port: int, spool: Spool) -> None:
    qid = spool.commit(envelope("a@example.test"), mail())
    agent = SmarthostAgent(settings(silent_port, connect_timeout=0.5))
    results = unfreeze(spool, qid).send(agent, hostname=HOSTNAME)
    assert results["a@example.test"].outcome is Outcome.DEFERRED
    assert results["a@example.test"].status == "4.4.1"


def test_connection_refused_is_link_down(closed_port: int, spool: Spool) -> None:
    agent = SmarthostAgent(settings(closed_port))
    error = link_down(agent, envelope("a@example.test"), mail())
    assert f"127.0.0.1:{closed_port}" in str(error)
    qid = spool.commit(envelope("a@example.test"), mail())
    send(spool, qid, agent)
    assert spool.find(qid) == "deferred"
    assert status_of(spool, qid).recipients[0].reply.startswith("451 4.4.1 ")


# --- TLS -----------------------------------------------------------------------------


def test_starttls_required_and_verified(hosts: MakeHost, sink_tls: SinkTLS) -> None:
    host = hosts(tls=sink_tls.server_context, require_starttls=True)
    agent = SmarthostAgent(settings(host.port, tls="starttls", ca_file=sink_tls.ca_file))
    data = mail("tls")
    results = deliver(agent, envelope("a@example.test"), data)
    assert results[0].outcome is Outcome.DELIVERED
    [got] = host.received
    assert got.tls is True
    assert got.content == data


def test_starttls_required_but_not_offered_is_link_down(hosts: MakeHost, spool: Spool) -> None:
    host = hosts()  # no TLS at all
    agent = SmarthostAgent(settings(host.port, tls="starttls"))
    error = link_down(agent, envelope("a@example.test"), mail())
    assert "does not offer STARTTLS" in str(error)
    qid = spool.commit(envelope("a@example.test"), mail())
    send(spool, qid, agent)
    assert host.received == []
    assert spool.find(qid) == "deferred"
    assert bounces(spool) == []


def test_certificate_from_an_unknown_ca_is_link_down_before_auth(
    hosts: MakeHost, sink_tls: SinkTLS, tmp_path: Path
) -> None:
    host = hosts(tls=sink_tls.server_context, users={USER: PASSWORD})
    other_ca = tmp_path / "other-ca.pem"
    trustme.CA().cert_pem.write_to_path(str(other_ca))
    agent = SmarthostAgent(
        settings(host.port, tls="starttls", ca_file=str(other_ca), username=USER, password=PASSWORD)
    )
    error = link_down(agent, envelope("a@example.test"), mail())
    assert "certificate" in str(error).lower()
    assert host.auth_attempts == [], "the password must not be sent to an unverified server"
    assert host.received == []
    assert PASSWORD not in str(error)


def test_system_cas_do_not_trust_the_test_ca(hosts: MakeHost, sink_tls: SinkTLS) -> None:
    host = hosts(tls=sink_tls.server_context)
    agent = SmarthostAgent(settings(host.port, tls="starttls"))  # no ca_file
    link_down(agent, envelope("a@example.test"), mail())
    assert host.received == []


def test_certificate_for_another_name_is_link_down(
    hosts: MakeHost, sink_tls: SinkTLS, tmp_path: Path
) -> None:
    """The sink's certificate is for 127.0.0.1; a cert for another name must not pass."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    sink_tls.ca.issue_cert("smarthost.test").configure_cert(context)
    host = hosts(tls=context)
    agent = SmarthostAgent(settings(host.port, tls="starttls", ca_file=sink_tls.ca_file))
    error = link_down(agent, envelope("a@example.test"), mail())
    assert "certificate" in str(error).lower() or "match" in str(error).lower()
    assert host.received == []


def test_smtps_to_an_implicit_tls_port(hosts: MakeHost, sink_tls: SinkTLS) -> None:
    host = hosts(tls=sink_tls.server_context, implicit_tls=True)
    agent = SmarthostAgent(settings(host.port, tls="smtps", ca_file=sink_tls.ca_file))
    data = mail("smtps")
    results = deliver(agent, envelope("a@example.test"), data)
    assert results[0].outcome is Outcome.DELIVERED
    # The port speaks nothing but TLS, so arriving at all means it went encrypted.
    assert [r.content for r in host.received] == [data]


def test_smtps_with_an_unknown_ca_is_link_down(
    hosts: MakeHost, sink_tls: SinkTLS, tmp_path: Path
) -> None:
    host = hosts(tls=sink_tls.server_context, implicit_tls=True)
    other_ca = tmp_path / "other-ca.pem"
    trustme.CA().cert_pem.write_to_path(str(other_ca))
    agent = SmarthostAgent(settings(host.port, tls="smtps", ca_file=str(other_ca)))
    link_down(agent, envelope("a@example.test"), mail())
    assert host.received == []


def test_smtps_against_a_plaintext_port_is_link_down(hosts: MakeHost, sink_tls: SinkTLS) -> None:
    host = hosts()
    agent = SmarthostAgent(settings(host.port, tls="smtps", ca_file=sink_tls.ca_file))
    started = time.monotonic()
    link_down(agent, envelope("a@example.test"), mail())
    assert time.monotonic() - started < 6.0
    assert host.received == []


def test_opportunistic_tls_encrypts_with_an_untrusted_certificate(
    hosts: MakeHost, sink_tls: SinkTLS
) -> None:
    host = hosts(tls=sink_tls.server_context)
    agent = SmarthostAgent(settings(host.port, tls="opportunistic"))  # CA not configured
    results = deliver(agent, envelope("a@example.test"), mail())
    assert results[0].outcome is Outcome.DELIVERED
    assert [r.tls for r in host.received] == [True]


def test_opportunistic_tls_falls_back_to_plaintext(hosts: MakeHost) -> None:
    host = hosts()
    agent = SmarthostAgent(settings(host.port, tls="opportunistic"))
    results = deliver(agent, envelope("a@example.test"), mail())
    assert results[0].outcome is Outcome.DELIVERED
    assert [r.tls for r in host.received] == [False]


def test_tls_none_stays_plaintext_even_when_starttls_is_offered(
    hosts: MakeHost, sink_tls: SinkTLS
) -> None:
    host = hosts(tls=sink_tls.server_context)
    agent = SmarthostAgent(settings(host.port, tls="none"))
    results = deliver(agent, envelope("a@example.test"), mail())
    assert results[0].outcome is Outcome.DELIVERED
    assert [r.tls for r in host.received] == [False]


def test_bad_ca_file_is_a_value_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="ca_file"):
        SmarthostAgent(settings(1, tls="starttls", ca_file=str(tmp_path / "missing.pem")))


# --- AUTH ----------------------------------------------------------------------------


def test_auth_plain_over_starttls(hosts: MakeHost, sink_tls: SinkTLS) -> None:
    host = hosts(tls=sink_tls.server_context, require_starttls=True, users={USER: PASSWORD})
    agent = SmarthostAgent(
        settings(
            host.port, tls="starttls", ca_file=sink_tls.ca_file, username=USER, password=PASSWORD
        )
    )
    results = deliver(agent, envelope("a@example.test"), mail())
    assert results[0].outcome is Outcome.DELIVERED
    assert host.auth_attempts == [("PLAIN", USER)]
    [got] = host.received
    assert (got.login, got.tls) == (USER, True)


@pytest.mark.parametrize("password", [PASSWORD, "wrong-" + PASSWORD])
def test_auth_login_when_plain_is_not_offered(
    hosts: MakeHost, sink_tls: SinkTLS, password: str
) -> None:
    """AUTH LOGIN's two 334 steps, right or wrong password; the password never in the error."""
    host = hosts(
        tls=sink_tls.server_context,
        require_starttls=True,
        users={USER: PASSWORD},
        auth_exclude=("PLAIN",),
    )
    agent = SmarthostAgent(
        settings(
            host.port, tls="starttls", ca_file=sink_tls.ca_file, username=USER, password=password
        )
    )
    if password == PASSWORD:
        assert deliver(agent, envelope("a@example.test"), mail())[0].outcome is Outcome.DELIVERED
        assert host.received[0].login == USER
    else:
        error = str(link_down(agent, envelope("a@example.test"), mail()))
        assert "refused the login" in error and "535" in error
        assert password not in error and PASSWORD not in error
    assert host.auth_attempts == [("LOGIN", USER)]


def test_wrong_password_is_link_down_and_the_message_stays(
    hosts: MakeHost, sink_tls: SinkTLS, spool: Spool
) -> None:
    wrong = "wrong-" + PASSWORD
    host = hosts(tls=sink_tls.server_context, require_starttls=True, users={USER: PASSWORD})
    agent = SmarthostAgent(
        settings(host.port, tls="starttls", ca_file=sink_tls.ca_file, username=USER, password=wrong)
    )
    error = link_down(agent, envelope("a@example.test"), mail())
    assert "refused the login" in str(error)
    assert wrong not in str(error) and PASSWORD not in str(error)

    data = mail("auth")
    qid = spool.commit(envelope("a@example.test"), data)
    send(spool, qid, agent)
    assert host.received == []
    assert spool.find(qid) == "deferred", "a login failure is temporary: never a bounce"
    assert spool.get(qid).data == data
    assert bounces(spool) == []
    rcpt = status_of(spool, qid).recipients[0]
    assert rcpt.state is RcptState.DEFERRED
    assert rcpt.reply.startswith("451 4.4.1 ")
    # The password is nowhere in the spool: neither in clear nor as AUTH PLAIN's base64.
    everything = spool_bytes(spool)
    for secret in (wrong, PASSWORD):
        plain = base64.b64encode(f"\0{USER}\0{secret}".encode())
        assert secret.encode() not in everything
        assert plain not in everything


def test_password_is_never_sent_without_tls(hosts: MakeHost) -> None:
    host = hosts(users={USER: PASSWORD})
    agent = SmarthostAgent(settings(host.port, tls="none", username=USER, password=PASSWORD))
    error = link_down(agent, envelope("a@example.test"), mail())
    assert "without TLS" in str(error)
    assert host.auth_attempts == []


def test_password_is_not_in_the_settings_repr() -> None:
    s = settings(587, tls="starttls", username=USER, password=PASSWORD)
    assert PASSWORD not in repr(s)
    assert PASSWORD not in str(s)
    assert USER in repr(s)


# --- connection reuse ----------------------------------------------------------------


def test_one_connection_carries_many_messages(hosts: MakeHost, sink_tls: SinkTLS) -> None:
    host = hosts(tls=sink_tls.server_context, require_starttls=True, users={USER: PASSWORD})
    agent = SmarthostAgent(
        settings(
            host.port, tls="starttls", ca_file=sink_tls.ca_file, username=USER, password=PASSWORD
        )
    )
    messages = [mail(f"message {n}") for n in range(5)]

    async def run() -> list[dict[int, Result]]:
        try:
            return [
                await agent.deliver(envelope(f"r{n}@example.test"), data, [0])
                for n, data in enumerate(messages)
            ]
        finally:
            await agent.close()

    results = asyncio.run(run())
    assert [r[0].outcome for r in results] == [Outcome.DELIVERED] * 5
    assert [r.content for r in host.received] == messages
    assert [r.recipients for r in host.received] == [[f"r{n}@example.test"] for n in range(5)]
    assert host.connections == 1
    assert agent.connections == 1
    assert len(host.auth_attempts) == 1, "one login per connection, not per message"


def test_concurrent_deliveries_open_one_connection_each_and_give_them_back(
    hosts: MakeHost,
) -> None:
    host = hosts()
    agent = SmarthostAgent(settings(host.port))

    async def batch(tag: str) -> list[Outcome]:
        results = await asyncio.gather(
            *(
                agent.deliver(envelope(f"{tag}{n}@example.test"), mail(f"{tag}{n}"), [0])
                for n in range(3)
            )
        )
        return [r[0].outcome for r in results]

    async def run() -> list[Outcome]:
        try:
            return await batch("a") + await batch("b")
        finally:
            await agent.close()

    assert asyncio.run(run()) == [Outcome.DELIVERED] * 6
    assert agent.connections == 3, "the second batch reuses the first batch's connections"
    assert host.connections == 3
    assert sorted(a for r in host.received for a in r.recipients) == sorted(
        f"{t}{n}@example.test" for t in "ab" for n in range(3)
    )


def test_messages_sent_through_send_reuse_nothing_across_calls(
    hosts: MakeHost, spool: Spool
) -> None:
    """send() runs its own loop and closes the agent's connections after each call."""
    host = hosts()
    agent = SmarthostAgent(settings(host.port))
    for n in range(2):
        qid = spool.commit(envelope("a@example.test"), mail(f"m{n}"))
        assert send(spool, qid, agent) is not None
    assert host.connections == 2
    assert len(host.received) == 2


# --- SMTPUTF8, 8BITMIME, SIZE --------------------------------------------------------


@pytest.mark.parametrize(
    ("sender", "rcpt", "subject"),
    [
        (SENDER, "jösé@example.test", "plain"),
        ("ålice@example.test", "bob@example.test", "plain"),
        (SENDER, "bob@example.test", "Grüße"),
    ],
    ids=["utf8-recipient", "utf8-sender", "utf8-header"],
)
def test_smtputf8_message_to_a_server_without_it_bounces_5_6_7(
    hosts: MakeHost, spool: Spool, sender: str, rcpt: str, subject: str
) -> None:
    host = hosts(smtputf8=False)
    qid = spool.commit(envelope(rcpt, sender=sender, smtputf8=True), mail(subject))
    results = send(spool, qid, SmarthostAgent(settings(host.port)))
    assert results is not None
    result = results[rcpt]
    assert (result.outcome, result.status) == (Outcome.FAILED, "5.6.7")
    assert host.received == []
    assert spool.find(qid) is None
    [dsn] = bounces(spool)
    assert [r.address for r in dsn.envelope.recipients] == [sender]
    assert dsn_fields(dsn.data)[1]["Status"] == "5.6.7"


def test_smtputf8_message_to_a_server_with_it(hosts: MakeHost) -> None:
    host = hosts(smtputf8=True)
    data = mail("Grüße", body="Grüße aus Köln\r\n".encode())
    env = envelope("jösé@example.test", smtputf8=True, body="8BITMIME")
    results = deliver(SmarthostAgent(settings(host.port)), env, data)
    assert results[0].outcome is Outcome.DELIVERED
    [got] = host.received
    assert "SMTPUTF8" in got.mail_options
    assert got.recipients == ["jösé@example.test"]
    assert got.content == data


def test_smtputf8_declared_but_all_ascii_goes_without_it(hosts: MakeHost) -> None:
    host = hosts(smtputf8=False)
    env = envelope("bob@example.test", smtputf8=True)
    results = deliver(SmarthostAgent(settings(host.port)), env, mail())
    assert results[0].outcome is Outcome.DELIVERED
    [got] = host.received
    assert "SMTPUTF8" not in got.mail_options


def test_8bitmime_and_size_are_passed_on(hosts: MakeHost) -> None:
    host = hosts()
    data = mail("eight", body="caf\u00e9 cr\u00e8me\r\n".encode())
    env = envelope("bob@example.test", body="8BITMIME")
    results = deliver(SmarthostAgent(settings(host.port)), env, data)
    assert results[0].outcome is Outcome.DELIVERED
    [got] = host.received
    assert "BODY=8BITMIME" in got.mail_options
    assert f"SIZE={len(data)}" in got.mail_options
    assert "SMTPUTF8" not in got.mail_options
    assert got.content == data


def test_8bit_data_received_without_body_goes_on_with_body_8bitmime(hosts: MakeHost) -> None:
    """8-bit data that its client sent without BODY=8BITMIME (accepted, as Postfix does)
    is declared at the next hop: RFC 6152 3 has a client send 8-bit data only with
    BODY=8BITMIME, and a strict server (Postfix's strict_8bitmime) refuses it otherwise."""
    host = hosts()
    data = mail("eight", body="caf\u00e9\r\n".encode())
    results = deliver(SmarthostAgent(settings(host.port)), envelope("bob@example.test"), data)
    assert results[0].outcome is Outcome.DELIVERED
    [got] = host.received
    assert "BODY=8BITMIME" in got.mail_options
    assert got.content == data


def test_a_bare_postmaster_goes_on_qualified_with_our_name(hosts: MakeHost) -> None:
    """RCPT TO:<Postmaster> meant this server's postmaster (RFC 5321 4.1.1.3); sent on
    bare, the smarthost took it for its own (Postfix qualified it with its own name).
    It goes on as postmaster@<our name>, as Postfix's append_at_myorigin writes it."""
    host = hosts()
    env = envelope("Postmaster", "bob@example.test")
    results = deliver(SmarthostAgent(settings(host.port)), env, mail())
    assert [r.outcome for r in results.values()] == [Outcome.DELIVERED] * 2
    [got] = host.received
    assert got.recipients == [f"Postmaster@{HELO}", "bob@example.test"]


def test_7bit_message_has_no_body_parameter(hosts: MakeHost) -> None:
    host = hosts()
    data = mail()
    results = deliver(SmarthostAgent(settings(host.port)), envelope("bob@example.test"), data)
    assert results[0].outcome is Outcome.DELIVERED
    assert host.received[0].mail_options == [f"SIZE={len(data)}"]


def test_8bit_data_to_a_server_without_8bitmime_bounces_5_6_3(
    hosts: MakeHost, spool: Spool
) -> None:
    host = hosts(eightbitmime=False)
    data = mail("eight", body="caf\u00e9\r\n".encode())
    qid = spool.commit(envelope("bob@example.test", body="8BITMIME"), data)
    results = send(spool, qid, SmarthostAgent(settings(host.port)))
    assert results is not None
    result = results["bob@example.test"]
    assert (result.outcome, result.status) == (Outcome.FAILED, "5.6.3")
    assert host.received == []
    [dsn] = bounces(spool)
    assert dsn_fields(dsn.data)[1]["Status"] == "5.6.3"


def test_ascii_data_marked_8bitmime_goes_to_a_7bit_server_without_body(hosts: MakeHost) -> None:
    host = hosts(eightbitmime=False)
    data = mail("seven")
    env = envelope("bob@example.test", body="8BITMIME")
    results = deliver(SmarthostAgent(settings(host.port)), env, data)
    assert results[0].outcome is Outcome.DELIVERED
    [got] = host.received
    assert not any(o.startswith("BODY=") for o in got.mail_options)
    assert got.content == data


def test_message_over_the_servers_size_bounces_5_3_4(hosts: MakeHost, spool: Spool) -> None:
    host = hosts(size_limit=2000)
    data = mail("big", body=(b"y" * 78 + b"\r\n") * 30)
    assert len(data) > 2000
    qid = spool.commit(envelope("bob@example.test"), data)
    results = send(spool, qid, SmarthostAgent(settings(host.port)))
    assert results is not None
    result = results["bob@example.test"]
    assert (result.outcome, result.status) == (Outcome.FAILED, "5.3.4")
    assert str(len(data)) in result.text and "2000" in result.text
    assert host.received == []
    [dsn] = bounces(spool)
    assert dsn_fields(dsn.data)[1]["Status"] == "5.3.4"


def test_message_at_the_servers_size_limit_goes(hosts: MakeHost) -> None:
    host = hosts(size_limit=2000)
    head = mail("fits", body=b"")
    lines = (b"z" * 98 + b"\r\n") * ((2000 - len(head)) // 100)
    data = head + lines + b"y" * (2000 - len(head) - len(lines) - 2) + b"\r\n"
    assert len(data) == 2000
    results = deliver(SmarthostAgent(settings(host.port)), envelope("bob@example.test"), data)
    assert results[0].outcome is Outcome.DELIVERED
    assert host.received[0].content == data


# --- DSN parameters onward (a real leafmail serve as the next hop) --------------------


def test_dsn_parameters_are_passed_to_a_dsn_capable_next_hop(
    servers: LeafmailFactory, spool: Spool
) -> None:
    nexthop = servers()
    env = envelope(
        Recipient("x@example.test", ("DELAY", "FAILURE"), "rfc822;x+tag=1@example.test"),
        Recipient("y@example.test", ("NEVER",)),
        Recipient("z@example.test"),
        ret="HDRS",
        envid="abc+1",
    )
    data = mail("dsn params")
    qid = spool.commit(env, data)

    results = send(spool, qid, SmarthostAgent(settings(nexthop.port)))

    assert results is not None
    assert {r.outcome for r in results.values()} == {Outcome.DELIVERED}
    assert all(r.text.startswith("OK queued as ") for r in results.values())
    [msg] = nexthop.messages()
    _, rest = split_received(msg.data)
    assert rest == data
    got = msg.envelope
    assert got.sender == SENDER
    assert got.ret == "HDRS"
    assert got.envid == "abc+1"
    x, y, z = got.recipients
    assert (x.address, x.notify, x.orcpt) == (
        "x@example.test",
        ("DELAY", "FAILURE"),
        "rfc822;x+tag=1@example.test",
    )
    assert (y.address, y.notify, y.orcpt) == ("y@example.test", ("NEVER",), None)
    assert (z.address, z.notify, z.orcpt) == ("z@example.test", (), None)
    assert spool.find(qid) is None


def test_a_utf8_orcpt_is_passed_on_in_rfc6533_escapes(
    servers: LeafmailFactory, spool: Spool
) -> None:
    """ORCPT=utf-8;... (RFC 6533) must go on as it came (RFC 3461 4.2); it was dropped
    when its address was not ASCII. It goes as utf-8-addr-xtext, ASCII with \\x{HEX}
    escapes, which a next hop without SMTPUTF8 takes too (this one reads it back)."""
    nexthop = servers()
    orcpt = "utf-8;w\u00f8\u00df+1=\\@example.test"
    env = envelope(Recipient("w@example.test", ("FAILURE",), orcpt))
    qid = spool.commit(env, mail("utf-8 orcpt"))

    results = send(spool, qid, SmarthostAgent(settings(nexthop.port)))

    assert results is not None
    assert results["w@example.test"].outcome is Outcome.DELIVERED
    [msg] = nexthop.messages()
    [got] = msg.envelope.recipients
    assert (got.address, got.notify, got.orcpt) == ("w@example.test", ("FAILURE",), orcpt)


def test_dsn_parameters_are_left_out_for_a_server_without_dsn(hosts: MakeHost) -> None:
    host = hosts()
    env = envelope(
        Recipient("x@example.test", ("FAILURE",), "rfc822;x@example.test"),
        ret="FULL",
        envid="e1",
    )
    data = mail()
    results = deliver(SmarthostAgent(settings(host.port)), env, data)
    assert results[0].outcome is Outcome.DELIVERED
    [got] = host.received
    assert got.mail_options == [f"SIZE={len(data)}"]
    assert got.rcpt_options == [[]]


# --- retry policy around an attempt --------------------------------------------------


def test_delay_warning_goes_out_once(hosts: MakeHost, spool: Spool) -> None:
    host = hosts()
    host.behaviour.rcpt_replies = {"slow@example.test": "450 4.2.0 mailbox busy"}
    qid = spool.commit(envelope("slow@example.test", "fast@example.test"), mail("slow"))
    policy = RetryPolicy(delay_warning=600.0)
    agent = SmarthostAgent(settings(host.port))
    later = arrival_time(qid) + 3600.0

    results = send(spool, qid, agent, policy=policy, now=later)
    assert results is not None
    assert results["slow@example.test"].outcome is Outcome.DEFERRED
    [warning] = bounces(spool)
    blocks = dsn_fields(warning.data)
    assert [b["Final-Recipient"] for b in blocks[1:]] == ["rfc822; slow@example.test"]
    assert blocks[1]["Action"] == "delayed"
    assert blocks[1]["Will-Retry-Until"]
    assert status_of(spool, qid).warned is True

    send(spool, qid, agent, policy=policy, now=later + 600)
    assert len(bounces(spool)) == 1, "at most one delay warning per message"
    assert spool.find(qid) == "deferred"


def test_expired_message_bounces_without_connecting(closed_port: int, spool: Spool) -> None:
    qid = spool.commit(envelope("a@example.test"), mail("old"))
    policy = RetryPolicy(lifetime=3600.0)
    agent = SmarthostAgent(settings(closed_port))
    results = send(spool, qid, agent, policy=policy, now=arrival_time(qid) + 7200.0)
    assert results is not None
    result = results["a@example.test"]
    assert (result.outcome, result.status) == (Outcome.FAILED, "4.4.7")
    assert agent.connections == 0
    assert spool.find(qid) is None
    [dsn] = bounces(spool)
    assert dsn_fields(dsn.data)[1]["Status"] == "4.4.7"


def test_the_bounce_of_an_smtputf8_message_goes_back_without_smtputf8_when_it_can(
    hosts: MakeHost, spool: Spool
) -> None:
    """The bounce of an internationalized message to an ASCII sender has ASCII addresses
    and header fields: it needs no SMTPUTF8 (RFC 6531 3.2's test) and passes the hop
    that refused the original, its UTF-8 parts carried by 8BITMIME (RFC 6532 3.7 and
    RFC 6533 6 allow the message/global-* types any transfer encoding). A mail program
    reads it as a global report."""
    host = hosts(smtputf8=False)
    qid = spool.commit(envelope("jösé@example.test", smtputf8=True), mail("Grüße"))
    agent = SmarthostAgent(settings(host.port))
    first = send(spool, qid, agent)
    assert first is not None and first["jösé@example.test"].status == "5.6.7"
    [dsn] = bounces(spool)
    again = send(spool, dsn.qid, agent)
    assert again is not None and again[SENDER].outcome is Outcome.DELIVERED
    [got] = host.received
    assert "SMTPUTF8" not in got.mail_options and "BODY=8BITMIME" in got.mail_options
    report = email.message_from_bytes(got.content, policy=email.policy.default)
    assert report.get_param("report-type") == "global-delivery-status"
    assert isinstance(report, email.message.EmailMessage)
    types = [p.get_content_type() for p in report.iter_parts()]
    assert types == ["text/plain", "message/global-delivery-status", "message/global"]
    assert dsn_fields(got.content)[1]["Final-Recipient"] == "utf-8; jösé@example.test"


def test_a_bounce_to_a_utf8_sender_is_never_sent_without_smtputf8(
    hosts: MakeHost, spool: Spool
) -> None:
    """A UTF-8 sender cannot be downgraded (RFC 6531 3.2), so its bounce cannot pass a hop
    without SMTPUTF8: it fails 5.6.7 there, and the postmaster gets the double bounce."""
    host = hosts(smtputf8=False)
    sender = "ålice@example.test"
    qid = spool.commit(envelope("bob@example.test", sender=sender, smtputf8=True), mail())
    host.behaviour.rcpt_replies = {"bob@example.test": "550 5.1.1 no such user"}
    agent = SmarthostAgent(settings(host.port))
    send(spool, qid, agent)
    [dsn] = bounces(spool)
    again = send(spool, dsn.qid, agent, postmaster="postmaster@example.test")
    assert again is not None and again[sender].status == "5.6.7"
    assert host.received == []
    [double] = [m for m in bounces(spool) if m.qid != dsn.qid]
    assert [r.address for r in double.envelope.recipients] == ["postmaster@example.test"]


@pytest.mark.parametrize("smtputf8", [True, False])
def test_a_utf8_recipient_goes_with_smtputf8_even_in_an_unmarked_envelope(
    hosts: MakeHost, smtputf8: bool
) -> None:
    """An alias's forwarded copy for a UTF-8 address was spooled without the SMTPUTF8
    mark before such copies got it; its RCPT cannot be written without SMTPUTF8, so it
    asks for it (RFC 6531 3.2) as a marked one does, or is refused 5.6.7 where absent."""
    host = hosts(smtputf8=smtputf8)
    env = envelope("jösé@example.test", smtputf8=False)
    results = deliver(SmarthostAgent(settings(host.port)), env, mail())
    if smtputf8:
        assert results[0].outcome is Outcome.DELIVERED
        [got] = host.received
        assert "SMTPUTF8" in got.mail_options and got.recipients == ["jösé@example.test"]
    else:
        assert (results[0].outcome, results[0].status) == (Outcome.FAILED, "5.6.7")
        assert host.received == []


def test_opportunistic_fallback_to_a_server_that_requires_tls_defers(hosts: MakeHost) -> None:
    """A handshake that fails (here a server with no certificate: no shared cipher; in
    life also a reset mid-handshake) sends opportunistic TLS on in plaintext. A server
    that requires TLS answers that session's MAIL "530 Must issue a STARTTLS command
    first" (RFC 3207 4): the session was refused, not the message, which must wait for
    a handshake that works and not bounce as a permanent failure."""
    broken = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)  # no certificate: every handshake fails
    host = hosts(tls=broken, require_starttls=True)
    agent = SmarthostAgent(settings(host.port, tls="opportunistic"))
    results = deliver(agent, envelope("a@example.test"), mail())
    assert results[0].outcome is Outcome.DEFERRED, results[0]
    assert "530 Must issue a STARTTLS command first" in results[0].text
    assert host.received == []
