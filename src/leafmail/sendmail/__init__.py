"""`leafmail sendmail`: the sendmail(8) command line, spooling straight to the spool.

Programs that send mail (cron, mail(1), git send-email, PHP's mail()) run ``sendmail``
with the message on stdin; this accepts the options they use, the way Postfix and dma
do, and exits 0 only once the message is durable (file and directory fsync'd). When the
spool is this user's own (a personal leafmail, or the daemon's user), it commits the
message itself with `Spool.commit`'s steps, and no daemon is needed: a running one is
only woken through the control socket so that it delivers at once. When the spool is
someone else's (a system daemon's), the message goes through the daemon's submission
socket (leafmail.pickup); with no daemon answering, it exits 75 and claims nothing.

Modes: ``-bm`` (the default: read a message), ``-bs`` (an SMTP dialogue on stdin and
stdout, through the same `ServerProtocol` as the network service), ``-bp`` (list the
queue) and ``-q`` (flush it). Sendmail's options leave no room for ``--config``, so the
config comes from ``$LEAFMAIL_CONFIG`` (else the default location) and the spool from
``$LEAFMAIL_SPOOL`` (else the config). Errors print one line and exit with a sysexits
code: 64 usage, 65 bad data, 73 the spool cannot be created, 75 try again later.

Roles, one module each: `options` (the command line), `context` (config and user),
`reading` (stdin), `addresses` (address lists and paths), `headers` (the header
section and what is added to it), `spooling` (build and commit), `smtp_session` (-bs).
This module dispatches and holds the -bm flow.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from typing import BinaryIO

from netserver.errors import EX_OK, UnavailableError, UsageError
from netserver.usage import exit_status

from .. import config as configuration
from .. import listing
from ..envelope import LOCAL_PROTOCOL, ClientInfo, Envelope, Recipient
from ..spool import Spool
from ..states import QueueState
from .addresses import address_list, masquerade, recipients_from, sender_address
from .context import Context, Submitter
from .errors import BadInput, TryLater
from .headers import Draft, header_recipients
from .options import USAGE, Options, parse_options
from .reading import read_message
from .rewrite import rewrite_headers
from .spooling import _spool_error, choose_submitter, now

__all__ = [
    "BadInput",
    "Options",
    "TryLater",
    "_spool_error",  # the tests check its errno table directly
    "address_list",
    "list_queue",
    "main",
    "parse_options",
    "read_message",
    "run",
    "submit",
]


def submit(opts: Options, ctx: Context, stdin: BinaryIO) -> int:
    """-bm: read one message from stdin and spool it."""
    origin = ctx.origin
    sender = masquerade(sender_address(opts.sender, ctx.identity, origin), ctx.masquerade_domains)
    recipients = recipients_from(opts.recipients, origin)
    if not recipients and not opts.extract:
        raise UsageError("no recipients given (name them, or use -t)")
    limit = ctx.config.smtp.max_message_size
    lines = read_message(stdin, dots_end=opts.dots_end, limit=limit)
    message = Draft.parse(lines)
    if opts.extract:
        from_headers = recipients_from(header_recipients(message), origin)
        recipients += [r for r in from_headers if r not in recipients]
    if not recipients:
        raise UsageError("no recipients: none given and none in To, Cc or Bcc")
    rewrite_headers(message, origin, ctx.masquerade_domains)
    envelope = Envelope(
        sender=sender,
        recipients=tuple(Recipient(r, opts.notify) for r in recipients),
        client=ClientInfo(protocol=LOCAL_PROTOCOL),
        received=now(),
        ret=opts.ret,
        envid=opts.envid,
    )
    data = message.to_bytes()  # with the headers' addresses completed (rewrite_headers)
    submitter = choose_submitter(ctx)
    submitter.submit(data, envelope, full_name=opts.full_name, protocol=None)
    return EX_OK


def list_queue(ctx: Context) -> int:
    """-bp: what `leafmail queue` prints; no spool yet is an empty queue."""
    try:
        spool = Spool(ctx.config.spool, create=False)
    except FileNotFoundError:
        sys.stdout.write(listing.format_queue([]))
        return EX_OK
    listing.write_queue(listing.iter_queue(spool), listing.Printable(sys.stdout))
    return EX_OK


def readable_queue(spool: str) -> None:
    """UnavailableError for a queue this user cannot read: a system daemon's, seen by an
    ordinary user (a traceback half-way through the listing otherwise)."""
    queue = os.path.join(spool, QueueState.QUEUE)
    if os.path.isdir(queue) and not os.access(queue, os.R_OK | os.X_OK):
        raise UnavailableError(
            f"the queue in {spool} is private to the daemon's user; "
            "ask root or that user to run `leafmail queue`"
        )


def run(opts: Options) -> int:
    """Dispatch on the mode, with the config from the environment."""
    config = configuration.load()
    unconfigured = config.source == "defaults" and not os.environ.get("LEAFMAIL_SPOOL")
    ctx = Context(config.submit, Submitter.current(), unconfigured)
    match opts.mode:
        case "queue":
            readable_queue(config.spool)
            return list_queue(ctx)
        case "flush":
            # Here, as -bs's below: -bm, what cron and git send-email run once a message,
            # loads neither the delivery agents nor the SMTP server's checks.
            from ..flush import flush

            return flush(config.queue, config.spool, config.process)
        case "smtp":
            from .smtp_session import SmtpSession

            return SmtpSession(ctx, sys.stdin.fileno(), sys.stdout.fileno()).run()
        case _:
            return submit(opts, ctx, sys.stdin.buffer)


def main(argv: Sequence[str], prog: str = "sendmail") -> int:
    """Run as sendmail(8); errors are one line on stderr and a sysexits status."""

    def body() -> int:
        opts = parse_options(argv)
        if opts.help:
            sys.stdout.write(USAGE.replace("sendmail", prog, 1))
            return EX_OK
        return run(opts)

    return exit_status(prog, body)
