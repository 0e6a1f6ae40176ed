"""leafmail from Python: submit a message, list the queue, unfreeze one and send it.

These are the calls a program makes instead of running `leafmail sendmail`, `leafmail
queue` or `leafmail flush`; `leafmail/__init__.py` exports them. Each works on a spool
directory (the same one `leafmail serve` uses), so a program and a running daemon share
the queue safely: the spool's locks and atomic renames are the only coordination.

`submit` is `Spool.commit` plus the nudge the sendmail command gives: the message is
durable (file and directory fsync'd) when it returns, and a daemon running on that spool
is told through its control socket to deliver now rather than at its next scan. Without
a daemon the message waits in the queue, which is not an error (Postfix's sendmail
behaves the same when its pickup service is down).
"""

from __future__ import annotations

import email.message
import os
from collections.abc import Sequence

from netserver.smtp.addresses import parse_forward_path, parse_reverse_path
from netserver.smtp.replies import RemoteProtocolError

from . import control
from .config import TLS_MODES
from .delivery import Agent
from .envelope import LOCAL_PROTOCOL, ClientInfo, Envelope, Recipient
from .listing import QueueEntry, iter_queue
from .sendmail.reading import without_nul
from .spool import Spool

SpoolLike = Spool | str | os.PathLike[str]


def open_spool(spool: SpoolLike, *, create: bool = False) -> Spool:
    """`spool` itself, or the spool at that path (created only when `create` is set)."""
    return spool if isinstance(spool, Spool) else Spool(spool, create=create)


def submit(
    spool: SpoolLike,
    sender: str,
    recipients: Sequence[str],
    message: bytes | email.message.Message,
    *,
    wake: bool = True,
) -> str:
    """Queue a message for `recipients` and return its queue id; durable on return.

    `sender` is the envelope sender ("" for the null sender of a bounce); `message` is
    the whole message, headers and body, as bytes or an `email.message.Message`. Line
    ends become CRLF, as on the wire; the message is otherwise spooled as given (no
    header is added: that is `leafmail sendmail`'s job). ValueError names a malformed
    address. With `wake`, a `leafmail serve` running on this spool delivers it at once.
    A spool directory that does not exist yet is created (0700).
    """
    if isinstance(recipients, str):
        raise TypeError("recipients must be a sequence of addresses, not one string")
    if not recipients:
        raise ValueError("a message needs at least one recipient")
    utf8 = not all(a.isascii() for a in [sender, *recipients])
    _check_addresses(sender, recipients, utf8=utf8)
    data = _wire_form(message)
    envelope = Envelope(
        sender,
        tuple(Recipient(address) for address in recipients),
        client=ClientInfo(protocol=LOCAL_PROTOCOL),
        body="7BIT" if data.isascii() else "8BITMIME",
        smtputf8=utf8,
    )
    target = open_spool(spool, create=True)
    qid = target.commit(envelope, data)
    if wake:
        control.wake(target.control_path)
    return qid


def list_queue(spool: SpoolLike) -> list[QueueEntry]:
    """Every message in the spool (queued, deferred, held, corrupt), as `leafmail queue`
    lists them: id, state, size, arrival, sender, recipients with their state, last
    error and next attempt. A list, so all in memory: `leafmail.listing.iter_queue` gives
    them one at a time."""
    return list(iter_queue(open_spool(spool)))


def smarthost(
    host: str,
    port: int = 587,
    *,
    helo: str = "localhost",
    tls: str = "starttls",
    ca_file: str = "",
    username: str = "",
    password: str = "",
) -> Agent:
    """A delivery agent for one smarthost, for `Message.send` (`unfreeze(...).send(agent)`).

    `tls` is one of [delivery] tls's values: "starttls" (required, the default),
    "smtps" (implicit TLS), "opportunistic" or "none"; the certificate is checked against
    the system CAs or `ca_file`. ValueError for an unknown mode, or a password that would
    go without TLS. The same agent `leafmail serve` uses with [delivery] smarthost.
    """
    from .delivery.smarthost import SmarthostAgent, SmarthostSettings  # TLS contexts: on use

    if tls not in TLS_MODES:
        raise ValueError(f"tls must be one of {', '.join(TLS_MODES)}, not {tls!r}")
    if username and tls in ("none", "opportunistic"):
        raise ValueError(f"a username with tls = {tls} would send the password unprotected")
    return SmarthostAgent(SmarthostSettings(host, port, helo, tls, ca_file, username, password))


def _check_addresses(sender: str, recipients: Sequence[str], *, utf8: bool) -> None:
    """The checks an SMTP client's MAIL FROM and RCPT TO get; ValueError with the reason."""
    try:
        parse_reverse_path(f"<{sender}>", utf8=utf8)
        for address in recipients:
            parse_forward_path(f"<{address}>", utf8=utf8)
    except RemoteProtocolError as exc:
        text = exc.reply.text
        raise ValueError(text if isinstance(text, str) else " ".join(text)) from None


def _wire_form(message: bytes | email.message.Message) -> bytes:
    """The message with CRLF line ends (a lone CR or LF becomes CRLF), ending in one, and
    without NUL octets (which no next hop may be sent)."""
    if isinstance(message, email.message.Message):
        from email.policy import SMTP  # here: no process of `leafmail serve` needs it

        message = message.as_bytes(policy=SMTP)
    lines = without_nul(message).replace(b"\r\n", b"\n").replace(b"\r", b"\n").split(b"\n")
    if lines[-1] == b"":
        lines.pop()
    return b"".join(line + b"\r\n" for line in lines)
