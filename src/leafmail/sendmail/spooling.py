"""Turning a message into a `Submission` and committing it to the spool; shared by
-bm and -bs.
"""

from __future__ import annotations

import errno
import time
from dataclasses import dataclass, replace

from netserver.errors import CantCreateError, NetserverError

from .. import config as configuration
from .. import control
from ..envelope import Envelope
from ..spool import Spool, new_id
from .context import Context
from .errors import TryLater
from .headers import Message, complete, local_received

# errno values that mean "this spool cannot be written at all" rather than "not now".
_CANTCREAT_ERRNOS = frozenset(
    {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR, errno.ENOENT, errno.ELOOP, errno.EEXIST}
)


@dataclass(frozen=True)
class Submission:
    """One message ready to spool."""

    qid: str
    envelope: Envelope
    data: bytes


def build(
    message: Message,
    ctx: Context,
    *,
    envelope: Envelope,
    full_name: str | None,
    protocol: str | None,
) -> Submission:
    """Complete the headers, prepend the Received header, set BODY and SMTPUTF8."""
    qid = new_id()
    complete(message, ctx, qid=qid, sender=envelope.sender, name=full_name)
    addresses = [r.address for r in envelope.recipients]
    trace = local_received(
        hostname=ctx.hostname,
        uid=ctx.identity.uid,
        qid=qid,
        recipients=addresses,
        protocol=protocol,
    )
    data = trace + message.to_bytes()
    utf8 = envelope.smtputf8 or not all(a.isascii() for a in [envelope.sender, *addresses])
    body = "8BITMIME" if envelope.body == "8BITMIME" or not data.isascii() else "7BIT"
    return Submission(qid, replace(envelope, body=body, smtputf8=utf8), data)


def open_spool(config: configuration.Config) -> Spool:
    """The spool, created if needed; CantCreateError / TryLater say why not."""
    try:
        return Spool(config.spool)
    except OSError as exc:
        raise _spool_error(exc, f"cannot use the spool {config.spool}") from None


def commit(spool: Spool, item: Submission) -> None:
    """Spool.commit with our queue id: durable (fsync'd file and directory) on return.

    The id is chosen before the commit because the Received and Message-ID headers
    carry it, as the SMTP service's do.
    """
    try:
        spool.commit(item.envelope, item.data, item.qid)
    except OSError as exc:
        raise _spool_error(exc, "cannot spool the message") from None


def _spool_error(exc: OSError, what: str) -> NetserverError:
    reason = exc.strerror or str(exc)
    if exc.errno in _CANTCREAT_ERRNOS:
        return CantCreateError(f"{what}: {reason}")
    return TryLater(f"{what}: {reason} (nothing was queued; try again later)")


def wake(spool: Spool) -> None:
    """Tell a running daemon that mail is waiting (see control.wake)."""
    control.wake(spool.control_path)


def now() -> str:
    """The envelope's received time: UTC, ISO 8601, to the second."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
