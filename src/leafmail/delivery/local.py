"""Local delivery: Maildir, mbox, and what the aliases file says (commands, files, forwards).

For each recipient the local part is looked up (lower-case, ``+extension`` dropped) in
the aliases (`leafmail.aliases`), and every target it expands to gets one copy:

- a user's mailbox, at the path template of ``[local]`` ({user}, {home} from passwd):
  a Maildir (a unique file in tmp/, fsync, link into new/, fsync new/: the Maildir
  spec) or an mbox (dotlock and fcntl lock, mboxrd ``From`` quoting, fsync, and on any
  failure truncated back to its old size so it is never left half-written);
- ``/path/file``: appended as an mbox, with the same locks;
- ``|command``: run as an argument list (never a shell), the message on stdin;
- ``user@elsewhere``: forwarded, by committing a new message to the spool. Once the
  commit returns the copy is durable, so the recipient counts as delivered.

Mailbox copies start with ``Return-Path`` and ``Delivered-To`` (the recipient address);
a forwarded copy starts with ``Delivered-To``, and a message that already carries a
Delivered-To for its recipient is a forwarding loop (5.4.6), as in Postfix.

Who writes: as an ordinary user, everything happens as that user. As root, a user's
mailbox files and directories are made owned by the user's account (when it has one),
and are never opened through a symbolic link, a hard link or a non-regular file. Commands
and files named in an aliases or include file run as the owner of that file, and as
`default_user` ("nobody", Postfix's default_privs) when root owns it, so a file a user
can edit only ever does what that user could.

Results: unknown users fail (5.1.1). Anything that can be fixed on this host (disk
full, permissions, a held lock, a broken aliases file, a missing command) defers, so no
mail is lost to a local mistake. When an alias has several targets, one copy each is
made; a deferral of one of them defers the recipient, and the retry may give the others
a second copy (at least once, never zero times).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import itertools
import os
import pwd
import re
import secrets
import signal
import socket
import stat
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass

from netserver.errors import ConfigError
from netserver.smtp.addresses import parse_forward_path
from netserver.smtp.replies import RemoteProtocolError, Reply

from ..aliases import (
    Aliases,
    CommandTarget,
    Expansion,
    FileTarget,
    Problem,
    RemoteTarget,
    Target,
    UserTarget,
    lookup_name,
)
from ..checks import ACCEPT, Check, Defer, Reject, Session, Verdict
from ..checks.loops import header_section
from ..config import Config
from ..envelope import Envelope, Recipient
from ..spool import Spool
from . import Outcome, Result

POSTMASTER = "postmaster"
EX_TEMPFAIL = 75
MAX_OUTPUT = 4096  # bytes of a command's stdout/stderr kept; the rest is read and dropped
COMMAND_PATH = "/usr/local/bin:/usr/bin:/bin"
_USER = re.compile(r"\A[a-z0-9_][a-z0-9_.-]{0,63}\Z")
_FROM_LINE = re.compile(rb"^(>*From )", re.MULTILINE)
_DELIVERED_TO = re.compile(rb"^delivered-to:[ \t]*([^\r\n]*)", re.IGNORECASE | re.MULTILINE)
_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_MBOX = os.O_RDWR | os.O_APPEND | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_COUNTER = itertools.count(1)

UNKNOWN_USER = Reply(550, "5.1.1", "Recipient address rejected: no such user here")
ALIASES_BROKEN = Reply(451, "4.3.5", "Recipient lookup failed: the aliases file is broken")


class MailboxLocked(Exception):
    """Another program held the mailbox's lock for longer than we wait."""


class UnsafeMailbox(Exception):
    """The mailbox is a symbolic or hard link, not a regular file, or someone else's."""


@dataclass(frozen=True)
class Identity:
    """The account a delivery runs as when we are root (and it is not root)."""

    uid: int
    gid: int
    name: str
    home: str

    @classmethod
    def of(cls, account: pwd.struct_passwd) -> Identity:
        return cls(account.pw_uid, account.pw_gid, account.pw_name, account.pw_dir)


@dataclass(frozen=True)
class LockPolicy:
    """How long to wait for a mailbox lock, and when a dotlock is stale (Postfix: 500s)."""

    timeout: float = 20.0
    stale_after: float = 500.0
    max_breaks: int = 3  # stale dotlocks removed per delivery, at most


@dataclass(frozen=True)
class Copy:
    """What one target gets: the envelope sender, the recipient address and the message."""

    sender: str
    recipient: str
    data: bytes


# --- who is here ----------------------------------------------------------------------


def valid_user(name: str) -> bool:
    """A name safe to use in a path: no '/', no leading '.' or '-', no NUL, short."""
    return bool(_USER.match(name))


def account(name: str) -> pwd.struct_passwd | None:
    """The passwd entry of a (valid) user name, or None."""
    if not valid_user(name):
        return None
    try:
        return pwd.getpwnam(name)
    except KeyError:
        return None


def local_part(address: str) -> str:
    """The local part of a forward path, unquoted (``postmaster`` has no domain)."""
    try:
        return parse_forward_path(f"<{address}>", utf8=True).local_unquoted
    except RemoteProtocolError:
        return address.rpartition("@")[0] or address


class Directory:
    """Who receives mail here: the configured users (else passwd), aliases, postmaster."""

    def __init__(self, config: Config) -> None:
        self.users = frozenset(user.lower() for user in config.local.users)
        self.aliases: Aliases | None = None
        if config.local.aliases:
            self.aliases = Aliases(config.local.aliases, config.local_domains)
            self.aliases.table()  # a broken file is a ConfigError at start-up, not later

    def is_user(self, name: str) -> bool:
        """A mailbox exists for `name` (postmaster always has one: RFC 5321 4.5.1)."""
        if name == POSTMASTER:
            return True
        if not valid_user(name):
            return False
        return name in self.users if self.users else account(name) is not None

    def knows(self, name: str) -> bool:
        """Mail for this lookup name can be taken (a user, an alias or postmaster)."""
        return self.is_user(name) or (self.aliases is not None and name in self.aliases.table())

    def expand(self, name: str) -> Expansion:
        """Where mail for this lookup name goes; ConfigError if the aliases file is wrong."""
        if self.aliases is not None:
            return self.aliases.expand(name, self.is_user)
        if self.is_user(name):
            return Expansion((UserTarget(name),), ())
        return Expansion((), (Problem("5.1.1", f"no such user: {name}"),))


# --- the copies ---------------------------------------------------------------------


def _header_value(text: str) -> bytes:
    return re.sub(r"[\r\n\x00]", "", text).encode("utf-8")


def trace_headers(copy: Copy, eol: bytes) -> bytes:
    """Return-Path and Delivered-To, the lines the local copy starts with."""
    return b"Return-Path: <%s>%sDelivered-To: %s%s" % (
        _header_value(copy.sender),
        eol,
        _header_value(copy.recipient),
        eol,
    )


def unix_text(copy: Copy) -> bytes:
    """The copy for a command: trace headers, LF line endings (what filters expect)."""
    return trace_headers(copy, b"\n") + copy.data.replace(b"\r\n", b"\n")


def mbox_entry(copy: Copy, now: float) -> bytes:
    """One mboxrd entry: the From_ line, the quoted message and a blank line after it."""
    sender = re.sub(r"\s", "_", copy.sender) or "MAILER-DAEMON"
    from_line = f"From {sender} {time.asctime(time.localtime(now))}\n".encode()
    text = _FROM_LINE.sub(rb">\1", unix_text(copy))
    if not text.endswith(b"\n"):
        text += b"\n"
    return from_line + text + b"\n"


def delivered_to(data: bytes) -> frozenset[str]:
    """The addresses in the message's Delivered-To headers, lower-case, for loop checks."""
    found = _DELIVERED_TO.findall(header_section(data))
    return frozenset(v.decode("utf-8", "replace").strip().strip("<>").lower() for v in found)


# --- files: shared helpers ------------------------------------------------------------


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _unsafe(exc: OSError, name: str) -> Exception:
    """ELOOP from O_NOFOLLOW means a symbolic link: say so; other errors stay as they are."""
    if exc.errno in (errno.ELOOP, errno.ENOTDIR, errno.EMLINK):
        return UnsafeMailbox(f"{name} is a symbolic link or of the wrong type")
    return exc


def _open_dir(name: str, dir_fd: int | None = None) -> int:
    try:
        return os.open(name, _DIR, dir_fd=dir_fd)
    except OSError as exc:
        raise _unsafe(exc, name) from None


def _ensure_dir(name: str, owner: Identity | None, dir_fd: int | None = None) -> int:
    """Open directory `name`, made (0700, for `owner`) when missing; never via a symlink."""
    created = False
    with contextlib.suppress(FileExistsError):
        os.mkdir(name, 0o700, dir_fd=dir_fd)
        created = True
    fd = _open_dir(name, dir_fd)
    try:
        _check_owner(fd, name, owner, fix=created)
        if created:  # the new entry must survive a crash as much as the mail in it
            _sync_parent(name, dir_fd)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _sync_parent(name: str, dir_fd: int | None) -> None:
    if dir_fd is not None:
        os.fsync(dir_fd)
        return
    parent = os.open(os.path.dirname(name) or ".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(parent)
    finally:
        os.close(parent)


def _check_owner(fd: int, name: str, owner: Identity | None, *, fix: bool) -> None:
    """As root: what we just made is given to `owner`; what was there must be theirs."""
    if owner is None:
        return
    uid = os.fstat(fd).st_uid
    if uid == owner.uid:
        return
    if not fix:
        raise UnsafeMailbox(f"{name} belongs to uid {uid}, not to {owner.name}")
    os.fchown(fd, owner.uid, owner.gid)


def _wait_for(attempt: Callable[[], bool], deadline: float, what: str) -> None:
    """Call `attempt` until it succeeds; MailboxLocked once `deadline` (monotonic) passes."""
    delay = 0.005
    while not attempt():
        left = deadline - time.monotonic()
        if left <= 0:
            raise MailboxLocked(what)
        time.sleep(min(delay, left))
        delay = min(delay * 2, 0.2)


# --- Maildir ------------------------------------------------------------------------


def maildir_name() -> str:
    """A unique name, time.MusecPpidQcountRrandom.host, as the Maildir spec advises."""
    usecs = time.time_ns() // 1000
    seconds, micro = divmod(usecs, 1_000_000)
    host = socket.gethostname().replace("/", "\\057").replace(":", "\\072")
    unique = f"P{os.getpid()}Q{next(_COUNTER)}R{secrets.token_hex(4)}"
    return f"{seconds}.M{micro}{unique}.{host}"


def write_maildir(path: str, message: bytes, owner: Identity | None = None) -> str:
    """Deliver `message` into the Maildir at `path` (made when missing); its name in new/."""
    fds: list[int] = []
    try:
        fds.append(top := _ensure_dir(path, owner))
        fds.append(_ensure_dir("cur", owner, top))
        fds.append(tmp := _ensure_dir("tmp", owner, top))
        fds.append(new := _ensure_dir("new", owner, top))
        return _publish(tmp, new, message, owner)
    finally:
        for fd in fds:
            os.close(fd)


def _publish(tmp: int, new: int, message: bytes, owner: Identity | None) -> str:
    """tmp/NAME written and synced, linked to new/NAME, tmp/NAME removed, new/ synced."""
    name = _write_unique(tmp, message, owner)
    try:
        try:
            os.link(name, name, src_dir_fd=tmp, dst_dir_fd=new)
        except OSError as exc:
            if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.ENOSYS):
                raise
            os.rename(name, name, src_dir_fd=tmp, dst_dir_fd=new)  # no hard links here
    finally:
        with contextlib.suppress(OSError):
            os.unlink(name, dir_fd=tmp)
    os.fsync(new)
    return name


def _write_unique(tmp: int, message: bytes, owner: Identity | None) -> str:
    for _ in range(5):
        name = maildir_name()
        try:
            fd = os.open(name, _CREATE, 0o600, dir_fd=tmp)
        except FileExistsError:
            continue
        try:
            if owner is not None:
                os.fchown(fd, owner.uid, owner.gid)
            _write_all(fd, message)
            os.fsync(fd)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(name, dir_fd=tmp)
            raise
        finally:
            os.close(fd)
        return name
    raise FileExistsError(errno.EEXIST, "no unique file name in tmp/")


# --- mbox ---------------------------------------------------------------------------


def append_mbox(
    path: str,
    entry: bytes,
    owner: Identity | None = None,
    locks: LockPolicy | None = None,
    *,
    strict: bool = False,
) -> None:
    """Append one mbox entry under a dotlock and an fcntl lock; all of it or nothing.

    With `strict` (a file named in an aliases file) `owner` may only create the file in
    a directory of their own, as if the kernel checked their permissions.
    """
    locks = locks or LockPolicy()
    parent, base = os.path.split(os.path.normpath(path))
    if not base or not parent:
        raise UnsafeMailbox(f"{path!r} is not a file path")
    deadline = time.monotonic() + locks.timeout
    with contextlib.ExitStack() as stack:
        dirfd = os.open(parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        stack.callback(os.close, dirfd)
        stack.enter_context(dotlock(dirfd, base + ".lock", deadline, locks))
        fd = _open_mbox(dirfd, base, owner, strict=strict)
        stack.callback(os.close, fd)  # closing releases the fcntl lock
        _wait_for(lambda: _try_lockf(fd), deadline, f"{base} is locked by another program")
        _append(fd, entry)


@contextlib.contextmanager
def dotlock(dirfd: int, name: str, deadline: float, locks: LockPolicy) -> Iterator[None]:
    """Hold NAME.lock (made with O_EXCL) in the mailbox's directory, as MUAs expect.

    A lock older than `stale_after` is removed, at most `max_breaks` times. Only our own
    lock (same inode) is removed at the end.
    """
    taker = _Dotlock(dirfd, name, locks)
    _wait_for(taker.try_take, deadline, f"{name} is held by another program")
    try:
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            if os.stat(name, dir_fd=dirfd, follow_symlinks=False).st_ino == taker.inode:
                os.unlink(name, dir_fd=dirfd)


class _Dotlock:
    def __init__(self, dirfd: int, name: str, locks: LockPolicy) -> None:
        self.dirfd = dirfd
        self.name = name
        self.locks = locks
        self.breaks = 0
        self.inode = -1

    def try_take(self) -> bool:
        try:
            fd = os.open(self.name, _CREATE, 0o600, dir_fd=self.dirfd)
        except FileExistsError:
            if self.breaks < self.locks.max_breaks and self._stale():
                self.breaks += 1
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.name, dir_fd=self.dirfd)
            return False
        try:
            os.write(fd, f"{os.getpid()}\n".encode())
            self.inode = os.fstat(fd).st_ino
        finally:
            os.close(fd)
        return True

    def _stale(self) -> bool:
        try:
            info = os.stat(self.name, dir_fd=self.dirfd, follow_symlinks=False)
        except FileNotFoundError:
            return False
        return time.time() - info.st_mtime > self.locks.stale_after


def _try_lockf(fd: int) -> bool:
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno in (errno.EACCES, errno.EAGAIN):
            return False
        raise
    return True


def _open_mbox(dirfd: int, name: str, owner: Identity | None, *, strict: bool) -> int:
    """The mbox opened for appending (made 0600 when missing), checked to be safe."""
    for _ in range(3):
        try:
            fd = os.open(name, _MBOX, dir_fd=dirfd)
        except FileNotFoundError:
            created = _create_mbox(dirfd, name, owner, strict=strict)
            if created is None:
                continue  # someone made it meanwhile: open theirs
            return created
        except OSError as exc:
            raise _unsafe(exc, name) from None
        try:
            _check_mbox(fd, name, owner)
        except BaseException:
            os.close(fd)
            raise
        return fd
    raise UnsafeMailbox(f"{name} keeps appearing and disappearing")


def _create_mbox(dirfd: int, name: str, owner: Identity | None, *, strict: bool) -> int | None:
    if owner is not None and strict and os.fstat(dirfd).st_uid != owner.uid:
        raise UnsafeMailbox(f"{owner.name} may not create {name} in that directory")
    try:
        fd = os.open(name, _MBOX | os.O_CREAT | os.O_EXCL, 0o600, dir_fd=dirfd)
    except FileExistsError:
        return None
    try:
        if owner is not None:
            os.fchown(fd, owner.uid, owner.gid)
        os.fsync(dirfd)  # the new file's name, durable like what is appended to it
    except BaseException:
        os.close(fd)
        raise
    return fd


def _check_mbox(fd: int, name: str, owner: Identity | None) -> None:
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        raise UnsafeMailbox(f"{name} is not a regular file")
    if info.st_nlink != 1:
        raise UnsafeMailbox(f"{name} has {info.st_nlink} hard links")
    if owner is not None and info.st_uid != owner.uid:
        raise UnsafeMailbox(f"{name} belongs to uid {info.st_uid}, not to {owner.name}")


def _append(fd: int, entry: bytes) -> None:
    """Write the entry after a blank line, fsync; on failure cut back to the old size."""
    size = os.fstat(fd).st_size
    tail = os.pread(fd, 2, max(0, size - 2)) if size else b"\n\n"
    gap = b"" if tail == b"\n\n" else b"\n" if tail.endswith(b"\n") else b"\n\n"
    try:
        _write_all(fd, gap + entry)
        os.fsync(fd)
    except BaseException:
        with contextlib.suppress(OSError):
            os.ftruncate(fd, size)
            os.fsync(fd)
        raise


# --- commands -----------------------------------------------------------------------


async def run_command(
    argv: Sequence[str],
    stdin: bytes,
    *,
    identity: Identity | None,
    timeout: float,
    env: dict[str, str],
) -> Result:
    """Run argv (no shell) with the message on stdin: exit 0 delivered, 75 or a timeout
    deferred, a signal deferred, anything else failed with the first line of stderr."""
    switch = identity is not None
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            cwd="/",
            env=env,
            start_new_session=True,  # its own process group: a timeout kills all of it
            user=identity.uid if identity is not None else None,
            group=identity.gid if identity is not None else None,
            extra_groups=[] if switch else None,
        )
    except OSError as exc:
        return Result.deferred("4.3.0", f"cannot run {argv[0]}: {exc.strerror or exc}")
    try:
        async with asyncio.timeout(timeout):
            err, code = await _converse(proc, stdin)
    except TimeoutError:
        _kill(proc)
        await proc.wait()
        return Result.deferred("4.3.0", f"command {argv[0]} timed out after {timeout:g}s")
    except BaseException:  # cancelled (shutdown): leave no command running behind us
        _kill(proc)
        raise
    return _command_result(argv[0], code, err)


async def _converse(proc: asyncio.subprocess.Process, data: bytes) -> tuple[bytes, int]:
    if proc.stdin is None or proc.stdout is None or proc.stderr is None:
        raise RuntimeError("subprocess pipes missing")
    _out, err, _ = await asyncio.gather(
        _drain(proc.stdout), _drain(proc.stderr), _feed(proc.stdin, data)
    )
    return err, await proc.wait()


async def _feed(stream: asyncio.StreamWriter, data: bytes) -> None:
    """Write the message; a command that stops reading early is judged by its exit code."""
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        stream.write(data)
        await stream.drain()
    stream.close()
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        await stream.wait_closed()


async def _drain(stream: asyncio.StreamReader) -> bytes:
    """Read to the end, keeping the first MAX_OUTPUT bytes (so the pipe never fills)."""
    kept = bytearray()
    while chunk := await stream.read(65536):
        kept += chunk[: max(0, MAX_OUTPUT - len(kept))]
    return bytes(kept)


def _kill(proc: asyncio.subprocess.Process) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(ProcessLookupError):
        proc.kill()


def _first_line(output: bytes) -> str:
    for line in output.decode("utf-8", "replace").splitlines():
        if line.strip():
            return _clean(line, 200)
    return "no error message"


def _command_result(name: str, code: int, err: bytes) -> Result:
    if code == 0:
        return delivered(f"delivered to command {name}")
    if code == EX_TEMPFAIL:
        return Result.deferred("4.3.0", f"command {name} asks to try later: {_first_line(err)}")
    if code < 0:
        return Result.deferred("4.3.0", f"command {name} killed by signal {-code}")
    return Result.failed("5.3.0", f"command {name} failed (exit {code}): {_first_line(err)}")


def command_env(copy: Copy, identity: Identity | None) -> dict[str, str]:
    """A small, fixed environment: who runs it, and the envelope (no shell reads it)."""
    me = identity or _current_identity()
    local, at, domain = copy.recipient.rpartition("@")
    return {
        "PATH": COMMAND_PATH,
        "HOME": me.home,
        "USER": me.name,
        "LOGNAME": me.name,
        "SHELL": "/bin/sh",
        "SENDER": copy.sender,
        "RECIPIENT": copy.recipient,
        "LOCAL": local if at else copy.recipient,
        "DOMAIN": domain,
    }


def _current_identity() -> Identity:
    uid = os.geteuid()
    try:
        return Identity.of(pwd.getpwuid(uid))
    except KeyError:
        return Identity(uid, os.getegid(), str(uid), "/")


# --- results ------------------------------------------------------------------------


def _clean(text: str, limit: int = 300) -> str:
    """One printable line (results become reply lines and DSN fields)."""
    flat = " ".join(text.split())
    return "".join(c if c.isprintable() else "?" for c in flat)[:limit]


def delivered(text: str) -> Result:
    return Result(Outcome.DELIVERED, 250, "2.0.0", _clean(text))


def from_problem(problem: Problem) -> Result:
    text = _clean(problem.text)
    if problem.status.startswith("4"):
        return Result.deferred(problem.status, text)
    return Result.failed(problem.status, text)


def trouble(exc: Exception, where: str) -> Result:
    """A delivery that raised: deferred, with an RFC 3463 status that says why."""
    if isinstance(exc, MailboxLocked | UnsafeMailbox):
        return Result.deferred("4.2.0", _clean(f"{where}: {exc}"))
    if isinstance(exc, ConfigError):
        return Result.deferred("4.3.5", _clean(f"{where}: {exc}"))
    if isinstance(exc, OSError):
        status = {errno.ENOSPC: "4.3.1", errno.EDQUOT: "4.2.2"}.get(exc.errno or 0, "4.3.0")
        return Result.deferred(status, _clean(f"{where}: {exc.strerror or exc}"))
    return Result.deferred("4.3.0", _clean(f"{where}: {type(exc).__name__}: {exc}"))


def combine(address: str, results: list[Result]) -> Result:
    """One result for a recipient whose alias made several copies."""
    if len(results) == 1:
        return results[0]
    if not results:
        return Result.failed("5.1.1", _clean(f"{address}: the alias has no targets"))
    deferred = [r for r in results if r.outcome is Outcome.DEFERRED]
    failed = [r for r in results if r.outcome is Outcome.FAILED]
    total = len(results)
    if deferred:
        first = deferred[0]
        text = f"{len(deferred)} of {total} copies deferred: {first.text}"
        return Result(Outcome.DEFERRED, first.code, first.status, _clean(text))
    if failed:
        first = failed[0]
        text = f"{total - len(failed)} of {total} copies delivered; {first.text}"
        return Result(Outcome.FAILED, first.code, first.status, _clean(text))
    return delivered(f"delivered {total} copies")


def describe(target: Target) -> str:
    if isinstance(target, UserTarget):
        return f"mailbox of {target.name}"
    if isinstance(target, FileTarget):
        return f"file {target.path}"
    if isinstance(target, CommandTarget):
        return f"command {target.argv[0]}"
    return f"forward to {target.address}"


# --- the agent ----------------------------------------------------------------------


class LocalAgent:
    """Delivers to this host's mailboxes, files, commands, and forwards by re-spooling."""

    def __init__(
        self,
        config: Config,
        spool: Spool,
        *,
        locks: LockPolicy | None = None,
        default_user: str = "nobody",
        notify: Callable[[str], None] | None = None,
    ) -> None:
        self.config = config
        self.spool = spool
        self.directory = Directory(config)
        self.locks = locks or LockPolicy()
        self.default_user = default_user
        self.notify = notify  # told the queue id of each forwarded copy (QueueRunner.notify)

    async def deliver(
        self, envelope: Envelope, data: bytes, rcpts: Sequence[int]
    ) -> dict[int, Result]:
        """One result per recipient; a mailbox two recipients share gets one copy."""
        memo: dict[Target, asyncio.Task[Result]] = {}
        loops = delivered_to(data)
        results = await asyncio.gather(
            *(self._recipient(envelope, data, i, loops, memo) for i in rcpts)
        )
        return dict(zip(rcpts, results, strict=True))

    async def close(self) -> None:
        """Nothing is kept open between messages."""

    async def _recipient(
        self,
        envelope: Envelope,
        data: bytes,
        index: int,
        loops: frozenset[str],
        memo: dict[Target, asyncio.Task[Result]],
    ) -> Result:
        address = envelope.recipients[index].address
        if address.lower() in loops:
            return Result.failed("5.4.6", _clean(f"mail forwarding loop for {address}"))
        try:
            expansion = self.directory.expand(lookup_name(local_part(address)))
        except ConfigError as exc:
            return Result.deferred("4.3.5", _clean(str(exc)))
        copy = Copy(envelope.sender, address, data)
        waits: list[Awaitable[Result]] = []
        remote: list[RemoteTarget] = []
        for target in expansion.targets:
            if isinstance(target, RemoteTarget):
                remote.append(target)
            else:
                waits.append(self._once(memo, target, copy))
        if remote:
            waits.append(self._forward(envelope, index, data, remote))
        results = list(await asyncio.gather(*waits))
        return combine(address, results + [from_problem(p) for p in expansion.problems])

    def _once(
        self, memo: dict[Target, asyncio.Task[Result]], target: Target, copy: Copy
    ) -> asyncio.Task[Result]:
        task = memo.get(target)
        if task is None:
            task = memo[target] = asyncio.ensure_future(self._guarded(target, copy))
        return task

    async def _guarded(self, target: Target, copy: Copy) -> Result:
        """Deliver to one target; whatever goes wrong defers it rather than lose the mail."""
        try:
            if isinstance(target, UserTarget):
                return await self._to_mailbox(target.name, copy)
            if isinstance(target, FileTarget):
                return await self._to_file(target, copy)
            if isinstance(target, CommandTarget):
                return await self._to_command(target, copy)
            raise TypeError(f"not a local target: {target!r}")
        except Exception as exc:
            return trouble(exc, describe(target))

    # -- mailboxes ----------------------------------------------------------------------
    def mailbox(self, name: str) -> tuple[str, Identity | None] | Result:
        """The mailbox path of user `name` and who owns it, or why there is none."""
        if not valid_user(name):
            return Result.failed("5.1.1", _clean(f"no such user: {name}"))
        template = self.config.local.path_template
        found = account(name)
        if "{home}" in template and found is None and name == POSTMASTER:
            found = account("root")  # postmaster without an account: root's mailbox
        owner = _as_root_for(found)
        path = template.replace("{user}", name)
        if "{home}" in template:
            if found is None:
                return Result.deferred("4.3.5", f"no home directory for {name}")
            path = path.replace("{home}", found.pw_dir)
        if not os.path.isabs(path):
            return Result.deferred("4.3.5", _clean(f"mailbox path {path} is not absolute"))
        return os.path.normpath(path), owner

    async def _to_mailbox(self, name: str, copy: Copy) -> Result:
        found = self.mailbox(name)
        if isinstance(found, Result):
            return found
        path, owner = found
        if self.config.local.mailbox == "maildir":
            message = trace_headers(copy, b"\r\n") + copy.data
            await asyncio.to_thread(write_maildir, path, message, owner)
        else:
            entry = mbox_entry(copy, time.time())
            await asyncio.to_thread(append_mbox, path, entry, owner, self.locks)
        return delivered(f"delivered to the {self.config.local.mailbox} of {name}")

    # -- what the aliases name ------------------------------------------------------
    def runs_as(self, uid: int, gid: int) -> Identity | None:
        """Who a command or file named in a file owned by uid runs as (None: as we are)."""
        if os.geteuid() != 0:
            return None
        if uid == 0:
            try:
                found = pwd.getpwnam(self.default_user)
            except KeyError:
                raise ConfigError(f"default user {self.default_user!r} does not exist") from None
        else:
            try:
                found = pwd.getpwuid(uid)
            except KeyError:
                return Identity(uid, gid, str(uid), "/")
        return _as_root_for(found)

    async def _to_file(self, target: FileTarget, copy: Copy) -> Result:
        owner = self.runs_as(target.uid, target.gid)
        entry = mbox_entry(copy, time.time())
        await asyncio.to_thread(append_mbox, target.path, entry, owner, self.locks, strict=True)
        return delivered(f"appended to {target.path}")

    async def _to_command(self, target: CommandTarget, copy: Copy) -> Result:
        identity = self.runs_as(target.uid, target.gid)
        return await run_command(
            target.argv,
            unix_text(copy),
            identity=identity,
            timeout=self.config.local.command_timeout,
            env=command_env(copy, identity),
        )

    async def _forward(
        self, envelope: Envelope, index: int, data: bytes, targets: list[RemoteTarget]
    ) -> Result:
        """Spool a new message to the remote targets; durable once commit returns."""
        original = envelope.recipients[index]
        orcpt = original.orcpt or (
            f"rfc822;{original.address}" if original.address.isascii() else None
        )
        forward = Envelope(
            sender=envelope.sender,
            recipients=tuple(Recipient(t.address, original.notify, orcpt) for t in targets),
            client=envelope.client,
            received=envelope.received,
            body=envelope.body,
            smtputf8=envelope.smtputf8,
            ret=envelope.ret,
            envid=envelope.envid,
        )
        marked = b"Delivered-To: %s\r\n" % _header_value(original.address) + data
        try:
            qid = await asyncio.to_thread(self.spool.commit, forward, marked)
        except OSError as exc:
            return trouble(exc, "spooling the forwarded copy")
        if self.notify is not None:
            self.notify(qid)
        names = ", ".join(t.address for t in targets)
        return delivered(f"forwarded to {names} as {qid}")


def _as_root_for(found: pwd.struct_passwd | None) -> Identity | None:
    """The identity to give files to: only when we are root and the account is not."""
    if found is None or os.geteuid() != 0 or found.pw_uid == 0:
        return None
    return Identity.of(found)


# --- the RCPT check -----------------------------------------------------------------


def local_recipient_check(config: Config) -> Check:
    """RCPT stage: refuse (550 5.1.1) local recipients nobody here would take.

    Recipients routed elsewhere pass untouched; users, aliases and postmaster pass. A
    broken aliases file defers (451 4.3.5) instead of refusing good mail.
    """
    directory = Directory(config) if config.local.enabled else None

    def check(session: Session) -> Verdict:
        rcpt = session.recipient
        if directory is None or rcpt is None:
            return ACCEPT
        if rcpt.domain and config.route_for(rcpt.domain) != "local":
            return ACCEPT
        try:
            known = directory.knows(lookup_name(rcpt.local_unquoted))
        except ConfigError:
            return Defer(ALIASES_BROKEN)
        return ACCEPT if known else Reject(UNKNOWN_USER)

    return check
