"""-bs: an SMTP dialogue on stdin and stdout, through the same `ServerProtocol` as the
network service.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

from netserver.errors import EX_OK, NetserverError
from netserver.smtp import (
    AuthRequest,
    DataStart,
    DecisionEvent,
    Helo,
    MailFrom,
    MessageReady,
    RcptTo,
    Reply,
    ServerProtocol,
    received_protocol,
    replies,
)

from ..envelope import LOCAL_PROTOCOL, ClientInfo, Envelope, Recipient
from ..receive import SPOOL_FAILED
from .context import Context
from .errors import BadInput
from .reading import READ_CHUNK
from .spooling import SocketSubmitter, SpoolSubmitter, choose_submitter, now


class LocalLineEnds:
    """Make each bare LF of a local -bs dialogue a CRLF, across reads.

    A local program may write its SMTP dialogue with LF line ends (PHP and shell
    scripts do); Postfix's and Exim's sendmail -bs take them. The network service
    refuses a bare LF, because a next hop may end lines (and DATA) differently than we
    do: SMTP smuggling. Here the user is the author of what they could submit with -t
    anyway, so nothing can be smuggled past anyone: without this, such a dialogue got
    its 220, then no reply to anything, and sendmail exited 0 with nothing queued. A bare
    CR is left as it is (the engine refuses it, as it does on the network).

    The first line end decides: a dialogue that starts with CRLF is passed on as it
    comes, for it needs nothing made, and BDAT counts octets (RFC 3030), so a bare LF
    made a CRLF inside a chunk would end the chunk early and cut the message short.
    """

    def __init__(self) -> None:
        self._cr = False  # the last read ended with CR: its LF may open this one
        self._convert: bool | None = None  # None until the first line end is seen

    def __call__(self, data: bytes) -> bytes:
        if self._convert is None:
            self._convert = self._decide(data)
        if not self._convert:
            return data
        head = b""
        if self._cr and data[:1] == b"\n":
            head, data = b"\n", data[1:]
        self._cr = data.endswith(b"\r")
        return head + data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")

    def _decide(self, data: bytes) -> bool | None:
        """Whether the dialogue's line ends are to be made (its first one is a bare LF);
        None while no line end has come (`_cr` kept for a CR that ends this read)."""
        end = data.find(b"\n")
        if end < 0:
            self._cr = data.endswith(b"\r")
            return None
        after_cr = data[end - 1 : end] == b"\r" if end else self._cr
        return not after_cr


class SmtpSession:
    """Drives `ServerProtocol` on a pipe pair for a local, already trusted user.

    The user could run -bm with any sender and recipients, so every HELO, MAIL, RCPT
    and DATA is accepted; what the engine still enforces is the syntax, the size
    limit and the order of commands. Each message is durable before its 250.
    """

    def __init__(self, ctx: Context, stdin_fd: int, stdout_fd: int) -> None:
        self.ctx = ctx
        self.stdin_fd = stdin_fd
        self.stdout_fd = stdout_fd
        self.submitter: SpoolSubmitter | SocketSubmitter | None = None
        self.proto_config = ctx.config.smtp.server_config(ctx.hostname)

    def run(self) -> int:
        """Serve until QUIT or end of input; the exit status is about the spool only."""
        status, greeting = EX_OK, None
        try:
            self.submitter = choose_submitter(self.ctx)
            if isinstance(self.submitter, SocketSubmitter):
                self.submitter.probe()  # no 220 when nobody can take the mail
        except NetserverError as exc:
            print(f"sendmail: {exc}", file=sys.stderr)
            status = exc.exit_code
            greeting = Reply(421, "4.3.0", f"{self.ctx.hostname} spool unavailable")
        proto = ServerProtocol(self.proto_config, greeting)
        line_ends = LocalLineEnds()
        try:
            self._send(proto)
            while not proto.closed:
                data = os.read(self.stdin_fd, READ_CHUNK)  # unbuffered: nothing read before
                if not data:
                    break
                self._process(proto, proto.receive_data(line_ends(data)))
        except BrokenPipeError:
            pass  # the client went away; what was answered 250 is spooled
        return status

    def _process(self, proto: ServerProtocol, events: Sequence[object]) -> None:
        """Answer decisions until the input is used up, replying after each batch."""
        while True:
            decision = next((e for e in events if isinstance(e, DecisionEvent)), None)
            if decision is not None:
                self._decide(proto, decision)
            self._send(proto)
            if decision is None:
                return
            events = proto.resume()

    def _decide(self, proto: ServerProtocol, event: DecisionEvent) -> None:
        match event:
            case Helo() | MailFrom() | RcptTo() | DataStart():
                proto.accept()
            case MessageReady():
                self._message(proto, event)
            case AuthRequest():
                proto.reject(replies.not_implemented("AUTH not available"))
            case _:
                raise TypeError(f"unexpected decision {event!r}")

    def _message(self, proto: ServerProtocol, event: MessageReady) -> None:
        assert self.submitter is not None
        try:
            qid = self.submitter.submit(
                event.data,
                self._envelope(event),
                full_name="",  # the sender is the client's choice: no name of ours
                protocol=received_protocol(event.session, event.envelope),
            )
        except BadInput as exc:
            proto.reject(Reply(554, "5.6.0", f"Message refused: {exc}"))
            return
        except NetserverError as exc:
            print(f"sendmail: {exc}", file=sys.stderr)
            proto.reject(SPOOL_FAILED)
            return
        proto.accept(replies.queued(qid))

    def _envelope(self, event: MessageReady) -> Envelope:
        """The spool envelope; ``<Postmaster>`` becomes postmaster@HOSTNAME."""
        smtp = event.envelope
        params = smtp.params
        return Envelope(
            sender=str(smtp.sender) if smtp.sender else "",
            recipients=tuple(
                Recipient(
                    str(r.mailbox) if r.mailbox.domain else f"postmaster@{self.ctx.hostname}",
                    tuple(sorted(n.value for n in r.params.notify or ())),
                    f"{r.params.orcpt.addr_type};{r.params.orcpt.address}"
                    if r.params.orcpt
                    else None,
                )
                for r in smtp.recipients
            ),
            client=ClientInfo(protocol=LOCAL_PROTOCOL, helo=event.session.helo),
            received=now(),
            body=params.body.value if params.body else "7BIT",
            smtputf8=params.smtputf8,
            ret=params.ret.value if params.ret else None,
            envid=params.envid,
        )

    def _send(self, proto: ServerProtocol) -> None:
        """Write the queued replies straight to the descriptor: no buffer to lose."""
        view = memoryview(proto.data_to_send())
        while view:
            view = view[os.write(self.stdout_fd, view) :]
