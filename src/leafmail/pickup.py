"""The daemon's side of local submission: ordinary users' `sendmail` without setuid.

On a shared machine the spool belongs to the daemon's user, so other users' `leafmail
sendmail` (cron jobs, PHP's mail() as www-data) cannot write it. They connect to
``SPOOL/public/submit`` instead (wire format: leafmail.submitwire), the way OpenSMTPD's
enqueuer connects to smtpd.sock; Postfix's pickup plays this role for its maildrop.

Who submits comes from the kernel (SO_PEERCRED), so the Received line names the real
uid however the request is made. The message then goes through exactly what sendmail
does when it spools by itself: the same address checks, the same header completion
(`sendmail.spooling.build`), the same size limit, and the same commit: the answer
``{"queued": QID}`` is sent only once the file and its directory are fsync'd.

Costs are bounded: the request line (1 MiB) and the message (smtp.max_message_size),
one deadline for waiting, reading and preparing them, at most MAX_ACTIVE messages
being read at once and MAX_OPEN connections open (MAX_OPEN_PER_UID of them one
user's), `[pickup] message_rate_limit` messages per uid and `rate_time_unit`
(leafmail.submitrate), and the parsing runs in a thread, never on the event loop.
This runs in an unprivileged process: whoever serves it reads bytes from any local
user.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import struct
from collections.abc import Callable
from pathlib import Path

from netserver.connlog import ServerLog
from netserver.errors import EX_DATAERR, EX_TEMPFAIL, EX_USAGE, NetserverError

from .config import SubmitConfig
from .controlserver import UnixListener
from .envelope import LOCAL_PROTOCOL, ClientInfo, Envelope, EnvelopeError, Recipient
from .sendmail.addresses import mailbox
from .sendmail.context import Context, Submitter
from .sendmail.headers import Draft
from .sendmail.reading import crlf_lines
from .sendmail.spooling import Submission, build, now
from .spool import GroupCommitter, SpoolError
from .spoolcheck import PUBLIC_DIR, PUBLIC_MODE, TRAVERSE
from .submitrate import SubmitRate
from .submitwire import HEADER_LIMIT, SubmitRequest, encode_reply, parse_request, socket_path

MAX_ACTIVE = 8  # messages read and prepared at once; more wait for their turn
MAX_OPEN = 64  # connections at once; past it they are closed unanswered
# One user's connections at once (root and the daemon's user not counted): past it that
# user's next one is refused (75), so one user cannot take every slot from the others.
MAX_OPEN_PER_UID = 16
READ_TIMEOUT = 60.0  # the client has the whole message in memory before it connects
_PEERCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid
_NOTIFY = frozenset({"NEVER", "SUCCESS", "FAILURE", "DELAY"})


class Rejected(Exception):
    """The request is refused; `status` is the sysexits code the client exits with."""

    def __init__(self, text: str, status: int = EX_DATAERR) -> None:
        super().__init__(text)
        self.status = status


class PickupServer:
    """Serves ``SPOOL/public/submit`` for as long as the daemon runs, with the settings
    `leafmail sendmail` spools by (`SubmitConfig`)."""

    def __init__(
        self,
        config: SubmitConfig,
        committer: GroupCommitter,
        log: ServerLog,
        on_spooled: Callable[[str], None] | None = None,
        *,
        rate: SubmitRate,
    ) -> None:
        self.config = config
        self.committer = committer
        self.log = log
        self.on_spooled = on_spooled
        self.path = socket_path(config.spool)
        self._active = asyncio.Semaphore(MAX_ACTIVE)
        self._open = 0
        self._open_by_uid: dict[int, int] = {}
        self.rate = rate  # [pickup] message_rate_limit per uid
        self.exempt = rate.exempt  # uids counted by neither limit (root, the daemon's)
        self._listener = UnixListener(self.path)

    async def start(self) -> bool:
        """Open public/ and the socket to local users; False (logged) if it cannot be."""
        try:
            _open_public(Path(self.config.spool))
        except OSError as exc:
            self.log.info("no local submission socket", error=str(exc))
            return False
        return await self._listener.open(
            self._client,
            limit=HEADER_LIMIT,
            log=self.log,
            what="local submission socket",
            mode=0o666,
        )

    async def close(self) -> None:
        await self._listener.close()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._open += 1
        try:
            if self._open > MAX_OPEN:  # the submitter sees no answer: exit 75, nothing lost
                self.log.info("local submission refused: too many connections")
                return
            uid = _peer_uid(writer)
            reply = await self._counted(uid, reader)
            if reply is not None:
                writer.write(encode_reply(reply))
                await writer.drain()
        except OSError:
            pass  # the submitter went away; it was never told "queued"
        finally:
            self._open -= 1
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    async def _counted(self, uid: int, reader: asyncio.StreamReader) -> dict[str, object] | None:
        """`_serve`, counted among `uid`'s open connections (past MAX_OPEN_PER_UID: 75)."""
        if uid in self.exempt:
            return await self._serve(uid, reader)
        open_now = self._open_by_uid.get(uid, 0) + 1
        if open_now > MAX_OPEN_PER_UID:
            why = f"uid {uid} has {MAX_OPEN_PER_UID} submissions open already; try again later"
            self.log.info("local submission refused", uid=uid, reason=why)
            return {"error": why, "status": EX_TEMPFAIL}
        self._open_by_uid[uid] = open_now
        try:
            return await self._serve(uid, reader)
        finally:
            left = self._open_by_uid.pop(uid) - 1
            if left:
                self._open_by_uid[uid] = left

    async def _serve(self, uid: int, reader: asyncio.StreamReader) -> dict[str, object] | None:
        """One request: the reply to send, or None for a connection that sent nothing."""
        loop = asyncio.get_running_loop()
        limit = self.config.smtp.max_message_size
        try:
            async with asyncio.timeout(READ_TIMEOUT):
                line = await reader.readline()
                if not line:
                    return None  # a probe (sendmail -bs asks whether anyone listens)
                over = self.rate.take(uid)  # a request, not a probe: it counts
                if over is not None:
                    raise Rejected(over, EX_TEMPFAIL)
                async with self._active:  # the message itself: MAX_ACTIVE at once
                    request = await loop.run_in_executor(None, _request, line, limit)
                    data = await reader.readexactly(request.size)
                    identity = Submitter.for_uid(uid)
                    ctx = Context(self.config, identity)
                    item = await loop.run_in_executor(None, prepare, request, data, ctx)
        except Rejected as exc:
            self.log.info("local submission refused", uid=uid, reason=str(exc))
            return {"error": str(exc), "status": exc.status}
        except (TimeoutError, asyncio.IncompleteReadError, ValueError):
            return {"error": "incomplete or over-long request", "status": EX_DATAERR}
        try:
            qid = await self.committer.commit(item.envelope, item.data, item.qid)
        except SpoolError as exc:
            # The operator must hear of a failing spool (the SMTP service logs it the
            # same way); the reason says whether a copy stayed (see Spool.take_back).
            self.log.error(
                "local submission refused: the spool failed",
                qid=item.qid,
                uid=uid,
                reason=exc.strerror,
            )
            return {"error": f"cannot spool the message: {exc.strerror}", "status": EX_TEMPFAIL}
        self.log.info("local submission", qid=qid, uid=uid, user=identity.login, size=len(data))
        if self.on_spooled is not None:
            self.on_spooled(qid)
        return {"queued": qid}


def _request(line: bytes, limit: int) -> SubmitRequest:
    if not line.endswith(b"\n"):
        raise Rejected("the request line is incomplete")
    try:
        request = parse_request(line)
    except EnvelopeError as exc:
        raise Rejected(f"bad request: {exc}", EX_USAGE) from None
    if request.size > limit:
        raise Rejected(f"message larger than the limit of {limit} octets")
    return request


def prepare(request: SubmitRequest, data: bytes, ctx: Context) -> Submission:
    """What sendmail would spool for this user: checked envelope, completed headers,
    a Received line with the kernel's uid. Rejected says what is wrong (in a thread)."""
    envelope = checked_envelope(request.envelope, ctx.hostname)
    try:
        return build(
            Draft.parse(crlf_lines(data)),
            ctx,
            envelope=envelope,
            full_name=request.full_name or "",
            protocol=_protocol(request.protocol),
        )
    except NetserverError as exc:  # BadInput from the header checks
        raise Rejected(str(exc), exc.exit_code) from None


def checked_envelope(claimed: Envelope, hostname: str) -> Envelope:
    """The envelope a sendmail user may ask for, checked as sendmail checks it; what
    only the daemon knows (how and when it arrived) is set here, not taken."""
    try:
        sender = mailbox(claimed.sender, hostname, role="sender") if claimed.sender else ""
        recipients = tuple(
            Recipient(mailbox(r.address, hostname), _notify(r.notify), _orcpt(r.orcpt))
            for r in claimed.recipients
        )
    except NetserverError as exc:
        raise Rejected(str(exc), exc.exit_code) from None
    if claimed.ret not in (None, "FULL", "HDRS"):
        raise Rejected(f"bad RET {claimed.ret!r}")
    if claimed.envid is not None and not _printable(claimed.envid, 100):
        raise Rejected("bad ENVID")
    if claimed.body not in ("7BIT", "8BITMIME"):
        raise Rejected(f"bad BODY {claimed.body!r}")
    helo = claimed.client.helo
    return Envelope(
        sender=sender,
        recipients=recipients,
        client=ClientInfo(
            protocol=LOCAL_PROTOCOL, helo=helo if helo and _printable(helo, 255) else None
        ),
        received=now(),
        body=claimed.body,
        smtputf8=claimed.smtputf8,
        ret=claimed.ret,
        envid=claimed.envid,
    )


def _notify(values: tuple[str, ...]) -> tuple[str, ...]:
    if not set(values) <= _NOTIFY or ("NEVER" in values and len(values) > 1):
        raise Rejected(f"bad NOTIFY {','.join(values)!r}")
    return values


def _orcpt(value: str | None) -> str | None:
    if value is not None and (";" not in value or not _printable(value, 500)):
        raise Rejected("bad ORCPT")
    return value


def _protocol(value: str | None) -> str | None:
    """The "with" of -bs (SMTP, ESMTP ...); None for -bm."""
    if value is not None and not (value.isascii() and value.isalnum() and len(value) <= 16):
        raise Rejected(f"bad protocol {value!r}")
    return value


def _printable(text: str, most: int) -> bool:
    return 0 < len(text) <= most and all(" " < c < "\x7f" for c in text)


def _peer_uid(writer: asyncio.StreamWriter) -> int:
    """The submitter's uid, from the kernel (SO_PEERCRED), as of its connect(2)."""
    sock: socket.socket = writer.get_extra_info("socket")
    _pid, uid, _gid = _PEERCRED.unpack(
        sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
    )
    return int(uid)


def _open_public(spool: Path) -> None:
    """public/ 0755 and a spool others may traverse (0711), so users reach the socket;
    the start check (leafmail.spoolcheck) has refused them if they were unsafe, and
    accepts these modes as they are (its ROOT_MODE_MAX), so no restart flips them."""
    root_fd = os.open(spool, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        with contextlib.suppress(FileExistsError):
            os.mkdir(PUBLIC_DIR, PUBLIC_MODE, dir_fd=root_fd)
        fd = os.open(
            PUBLIC_DIR, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=root_fd
        )
        try:
            os.fchmod(fd, PUBLIC_MODE)
        finally:
            os.close(fd)
        mode = os.fstat(root_fd).st_mode & 0o777
        if mode & TRAVERSE != TRAVERSE:
            os.fchmod(root_fd, (mode & 0o700) | TRAVERSE)
    finally:
        os.close(root_fd)
