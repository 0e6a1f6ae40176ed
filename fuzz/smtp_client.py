"""Fuzz the client-role SMTP engine with a hostile server's replies.

The next hop (an MX host anyone can run) answers the greeting, EHLO and one mail
transaction, pipelined or not as its EHLO reply says, with arbitrary bytes cut into
reads (the first octet says how long each read is). Checked: `BadReply` is the only
error the replies can cause, the engine never asks the I/O layer to send what the
state forbids, a transaction reports delivery only after a 250 to the message with a
recipient accepted, and the replies mean the same read whole or in pieces.
"""

from __future__ import annotations

import time

import atheris
from common import keep_if_slow, run

with atheris.instrument_imports():
    from netserver.smtp.client import Answered, Awaited, ClientProtocol, ClientState
    from netserver.smtp.mailexchange import MailCommands, MailExchange
    from netserver.smtp.replyreader import BadReply

SLOW = 0.1  # seconds for one input, instrumented
_RCPTS = (b"RCPT TO:<c@d.example>\r\n", b"RCPT TO:<e@f.example>\r\n")


class _Session:
    """The I/O layer's part: send what the engines say, in the order they say it."""

    def __init__(self) -> None:
        self.client = ClientProtocol()
        self.exchange: MailExchange | None = None

    def answered(self, event: Answered) -> None:
        client = self.client
        if client.state is not ClientState.COMMANDS:
            return
        if event.awaited is Awaited.GREETING and event.reply.code == 220:
            client.send(Awaited.EHLO, b"EHLO leaf.example\r\n")
        elif event.awaited is Awaited.EHLO and event.reply.code == 250:
            commands = MailCommands(
                b"MAIL FROM:<a@b.example>\r\n",
                _RCPTS,
                b"Subject: x\r\n\r\n.hi\r\n",
                client.supports("pipelining"),
            )
            self.exchange = MailExchange(commands)
            for awaited, line in self.exchange.start():
                client.send(awaited, line)
        elif self.exchange is not None and not self.exchange.finished:
            step = self.exchange.receive(event)
            for awaited, line in step.send:
                client.send(awaited, line)
            if self.exchange.delivered:
                assert event.reply.code == 250 and self.exchange.accepted


def _replay(pieces: list[bytes]) -> list[tuple[Awaited, int, str]]:
    """Feed the replies in these pieces; what each answered, until the end or BadReply."""
    session = _Session()
    seen: list[tuple[Awaited, int, str]] = []
    try:
        for piece in pieces:
            if session.client.state is ClientState.CLOSED:
                break
            for event in session.client.receive_data(piece):
                seen.append((event.awaited, event.reply.code, repr(event.reply.lines)))
                session.answered(event)
    except BadReply:
        seen.append((Awaited.GREETING, 0, "BadReply"))
    return seen


def one_input(data: bytes) -> None:
    if not data:
        return
    size, replies = data[0] + 1, data[1:]
    started = time.process_time()
    whole = _replay([replies])
    pieces = [replies[i : i + size] for i in range(0, len(replies), size)]
    chunked = _replay(pieces)
    # A reply that arrives before its command went is refused (BadReply), so the two
    # runs differ where the input answers ahead; up to the first refusal they agree.
    agreed = min(len(whole), len(chunked)) - 1
    assert whole[:agreed] == chunked[:agreed], "replies mean one thing whole, another in pieces"
    keep_if_slow(data, time.process_time() - started, SLOW)


if __name__ == "__main__":
    run(one_input)
