"""Turning a message into a `Submission` and committing it to the spool; shared by
-bm and -bs.
"""

from __future__ import annotations

import errno
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path

from netserver.errors import CantCreateError, NetserverError, UsageError

from .. import control, submitwire
from ..envelope import Envelope
from ..spool import Spool, SpoolError, control_path, new_id
from ..spoolcheck import check_spool
from ..trace import MAX_HOPS, count_received, local_received_header
from .context import Context
from .errors import BadInput, TryLater
from .headers import Draft, complete
from .reading import crlf_lines

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
    message: Draft,
    ctx: Context,
    *,
    envelope: Envelope,
    full_name: str | None,
    protocol: str | None,
) -> Submission:
    """Complete the headers, prepend the Received header, set BODY and SMTPUTF8.

    A message that has made more than MAX_HOPS hops is refused here as at the end of
    DATA (Postfix's cleanup applies hopcount_limit to sendmail's mail too): Delivered-To
    stops a loop that comes back to the same recipient, but not one through a |command
    or a program that resubmits with sendmail to a new recipient each time; each pass
    adds a Received field, so the count ends it.
    """
    qid = new_id()
    complete(message, ctx, qid=qid, sender=envelope.sender, name=full_name)
    content = message.to_bytes()
    if count_received(content) > MAX_HOPS:
        raise BadInput(f"too many hops (over {MAX_HOPS} Received fields): mail loop detected")
    addresses = [r.address for r in envelope.recipients]
    trace = local_received_header(
        hostname=ctx.hostname,
        uid=ctx.identity.uid,
        qid=qid,
        recipients=addresses,
        protocol=protocol,
    )
    data = trace + content
    utf8 = envelope.smtputf8 or not all(a.isascii() for a in [envelope.sender, *addresses])
    body = "8BITMIME" if envelope.body == "8BITMIME" or not data.isascii() else "7BIT"
    return Submission(qid, replace(envelope, body=body, smtputf8=utf8), data)


def open_spool(path: str) -> Spool:
    """The spool at `path`, checked and created if needed; CantCreateError / TryLater say
    why not, ConfigError (78) refuses an unsafe one (leafmail.spoolcheck)."""
    try:
        check_spool(path, os.geteuid())
        return Spool(path)
    except OSError as exc:
        raise _spool_error(exc, f"cannot use the spool {path}") from None


@dataclass(frozen=True)
class SpoolSubmitter:
    """Write the spool ourselves: it is ours (a personal leafmail, or the daemon's user)."""

    ctx: Context
    spool: Spool

    def submit(
        self, data: bytes, envelope: Envelope, *, full_name: str | None, protocol: str | None
    ) -> str:
        message = Draft.parse(crlf_lines(data))
        item = build(message, self.ctx, envelope=envelope, full_name=full_name, protocol=protocol)
        commit(self.spool, item)
        wake(self.spool)
        return item.qid


@dataclass(frozen=True)
class SocketSubmitter:
    """Hand the message to the daemon through its submission socket (leafmail.pickup)."""

    ctx: Context
    path: Path

    def probe(self) -> None:
        """TryLater unless a daemon listens (for -bs, before its greeting)."""
        try:
            submitwire.probe(self.path)
        except submitwire.NoDaemon as exc:
            raise self._no_daemon(exc) from None

    def submit(
        self, data: bytes, envelope: Envelope, *, full_name: str | None, protocol: str | None
    ) -> str:
        name = self.ctx.identity.full_name(full_name)  # -F, $NAME or GECOS: ours to say
        try:
            return submitwire.submit(self.path, envelope, data, full_name=name, protocol=protocol)
        except submitwire.NoDaemon as exc:
            raise self._no_daemon(exc) from None
        except submitwire.Refused as exc:
            raise _refusal(exc) from None

    def _no_daemon(self, exc: OSError) -> TryLater:
        reason = exc.strerror or str(exc)
        return TryLater(
            f"the spool {self.ctx.config.spool} is not ours to write and no leafmail daemon "
            f"answers on {self.path} ({reason}); nothing was queued, try again later"
        )


def choose_submitter(ctx: Context) -> SpoolSubmitter | SocketSubmitter:
    """Write the spool if it is ours (or may become ours), else go through the daemon.

    Ours: it exists and this user owns it, or it does not exist yet and this user may
    create it (a personal leafmail). Anything else is someone else's spool (a system
    daemon's): even root goes through the socket then, so that every spool file stays
    the daemon user's.
    """
    path = Path(ctx.config.spool)
    try:
        owner: int | None = path.stat().st_uid
    except (FileNotFoundError, NotADirectoryError):
        owner = None
    except OSError:  # cannot even look (a private parent directory): not ours
        owner = -1
    if owner == os.geteuid() or (owner is None and _may_create(path)):
        if ctx.unconfigured:
            _require_a_daemon(path)
        return SpoolSubmitter(ctx, open_spool(ctx.config.spool))
    return SocketSubmitter(ctx, submitwire.socket_path(path))


def _require_a_daemon(path: Path) -> None:
    """TryLater (75, nothing queued) unless a daemon serves the default spool `path`.

    With no config file and no LEAFMAIL_SPOOL, the spool is the XDG default, which no
    system daemon reads: a cron job's or a web server's mail left there would be
    reported sent and never leave. A user who runs `leafmail serve` on it is served; a
    user who queues on purpose and flushes later says so with a config or the variable.
    """
    if not control.answers(control_path(path)):
        raise TryLater(
            f"no leafmail is set up for this user: no config file (LEAFMAIL_CONFIG, "
            f"~/.config/leafmail/leafmail.toml, /etc/leafmail/leafmail.toml) and no "
            f"daemon serves the default spool {path}; nothing was queued (start "
            f"`leafmail serve`, or set LEAFMAIL_CONFIG or LEAFMAIL_SPOOL)"
        )


def _may_create(path: Path) -> bool:
    """True if the nearest existing ancestor of `path` lets this user add to it."""
    for parent in path.parents:
        if parent.exists():
            return not parent.is_dir() or os.access(parent, os.W_OK | os.X_OK)
    return False


def _refusal(exc: submitwire.Refused) -> NetserverError:
    if exc.status == BadInput.exit_code:
        return BadInput(str(exc))
    if exc.status == UsageError.exit_code:
        return UsageError(str(exc))
    return TryLater(f"the daemon did not queue the message: {exc}")


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
    if isinstance(exc, SpoolError) and exc.kept is not None:  # see Spool.take_back
        return TryLater(f"{what}: {reason} (see `leafmail queue` before trying again)")
    return TryLater(f"{what}: {reason} (nothing was queued; try again later)")


def wake(spool: Spool) -> None:
    """Tell a running daemon that mail is waiting (see control.wake)."""
    control.wake(spool.control_path)


def now() -> str:
    """The envelope's received time: UTC, ISO 8601, to the second."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
