"""mbox delivery: append one mboxrd entry under a dotlock and an fcntl lock, or nothing.

Mail readers lock an mbox in one of two ways, so both are taken: NAME.lock made with
O_EXCL in the mailbox's directory (a stale one is broken, as Postfix does after 500s) and
an fcntl lock on the file. ``From`` lines in the message are quoted the mboxrd way, so a
reader can always undo the quoting. The entry is fsynced, and on any failure the file is
truncated back to its old size, so it is never left half-written.

A writer that is killed (SIGKILL, past the grace of `leafmail.delivery.asuser`) cannot
clean up: its dotlock would stay for 500s (every delivery and MUA waiting on it) and part
of an entry would stay in the mbox. So our dotlock says it is ours (a second line,
``leafmail``) and its writer holds an flock on it, which the kernel drops when the
writer dies; before it appends, the writer adds where the entry starts, how long it is
and its first bytes. A later writer (as the same user) that finds such a lock with no
flock breaks it at once, and once it holds the mbox's locks cuts off what the dead
writer left of its entry (only when the file is the same, and ends inside that entry,
with its first bytes). A whole entry is kept: its delivery may have been reported.

The file is never opened through a symbolic link, and must be a regular file with one
hard link. This runs as the mailbox's user (`leafmail.delivery.asuser`), so a file we
make is theirs and the kernel decides where they may make it; when the caller says whose
the mailbox is (`owner`, a uid), a file that was already there must be theirs.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import stat
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from .local_common import (
    CREATE,
    Copy,
    MailboxLocked,
    UnsafeMailbox,
    open_error,
    unix_text,
    write_all,
)

_FROM_LINE = re.compile(rb"^(>*From )", re.MULTILINE)
_MBOX = os.O_RDWR | os.O_APPEND | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_PEEK = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_OURS = "leafmail"  # a dotlock's second line: its writer holds an flock on it
_HEAD = 48  # bytes of an entry's start kept in the dotlock, to recognise what is left of it


@dataclass(frozen=True)
class LockPolicy:
    """How long to wait for a mailbox lock, and when a dotlock is stale (Postfix: 500s)."""

    timeout: float = 20.0
    stale_after: float = 500.0
    max_breaks: int = 3  # stale dotlocks removed per delivery, at most


def mbox_entry(copy: Copy, now: float) -> bytes:
    """One mboxrd entry: the From_ line, the quoted message and a blank line after it."""
    sender = re.sub(r"\s", "_", copy.sender) or "MAILER-DAEMON"
    from_line = f"From {sender} {time.asctime(time.localtime(now))}\n".encode()
    text = _FROM_LINE.sub(rb">\1", unix_text(copy))
    if not text.endswith(b"\n"):
        text += b"\n"
    return from_line + text + b"\n"


def append_mbox(
    path: str, entry: bytes, owner: int | None = None, locks: LockPolicy | None = None
) -> None:
    """Append one mbox entry under a dotlock and an fcntl lock; all of it or nothing."""
    locks = locks or LockPolicy()
    parent, base = os.path.split(os.path.normpath(path))
    if not base or not parent:
        raise UnsafeMailbox(f"{path!r} is not a file path")
    deadline = time.monotonic() + locks.timeout
    with contextlib.ExitStack() as stack:
        dirfd = os.open(parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        stack.callback(os.close, dirfd)
        lock = stack.enter_context(dotlock(dirfd, base + ".lock", deadline, locks))
        fd = _open_mbox(dirfd, base, owner)
        stack.callback(os.close, fd)  # closing releases the fcntl lock
        _wait_for(lambda: _try_lockf(fd), deadline, f"{base} is locked by another program")
        if lock.unfinished is not None:
            lock.unfinished.cut(fd)
        _append(fd, entry, lock.announce)


@dataclass(frozen=True)
class Unfinished:
    """An append a killed writer began: the mbox's inode, its size before, the entry's
    length and first bytes (as its dotlock says)."""

    inode: int
    size: int
    length: int
    head: bytes

    @classmethod
    def parse(cls, line: str) -> Unfinished | None:
        """``append INODE SIZE LENGTH HEAD-IN-HEX``, or None for anything else."""
        fields = line.split()
        if len(fields) != 5 or fields[0] != "append" or not all(f.isdigit() for f in fields[1:4]):
            return None
        try:
            head = bytes.fromhex(fields[4])
        except ValueError:
            return None
        return cls(int(fields[1]), int(fields[2]), int(fields[3]), head)

    def line(self) -> str:
        return f"append {self.inode} {self.size} {self.length} {self.head.hex()}\n"

    def cut(self, fd: int) -> None:
        """Cut the mbox back to where the entry began, if it still ends inside it."""
        info = os.fstat(fd)
        left = info.st_size - self.size
        if info.st_ino != self.inode or not 0 < left < self.length:
            return
        if os.pread(fd, min(left, len(self.head)), self.size) != self.head[:left]:
            return  # not what was being written there: changed since, leave it
        os.ftruncate(fd, self.size)
        os.fsync(fd)


@contextlib.contextmanager
def dotlock(dirfd: int, name: str, deadline: float, locks: LockPolicy) -> Iterator[_Dotlock]:
    """Hold NAME.lock (made with O_EXCL) in the mailbox's directory, as MUAs expect.

    A lock older than `stale_after` is removed, and one of ours whose writer is gone at
    once, at most `max_breaks` times in all. Only our own lock (same inode) is removed
    at the end, before its flock is let go.
    """
    taker = _Dotlock(dirfd, name, locks)
    _wait_for(taker.try_take, deadline, f"{name} is held by another program")
    try:
        yield taker
    finally:
        try:
            with contextlib.suppress(FileNotFoundError):
                if os.stat(name, dir_fd=dirfd, follow_symlinks=False).st_ino == taker.inode:
                    os.unlink(name, dir_fd=dirfd)
        finally:
            os.close(taker.fd)


class _Dotlock:
    def __init__(self, dirfd: int, name: str, locks: LockPolicy) -> None:
        self.dirfd = dirfd
        self.name = name
        self.locks = locks
        self.breaks = 0
        self.inode = -1
        self.fd = -1  # our lock, open and flocked while we hold it
        self.header = 0  # bytes of it before the append record
        self.unfinished: Unfinished | None = None  # what a dead writer's lock said

    def try_take(self) -> bool:
        try:
            fd = os.open(self.name, CREATE, 0o600, dir_fd=self.dirfd)
        except FileExistsError:
            if self.breaks < self.locks.max_breaks and (self._abandoned() or self._stale()):
                self.breaks += 1
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.name, dir_fd=self.dirfd)
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # before the content that says it is ours
            header = f"{os.getpid()}\n{_OURS}\n".encode()
            write_all(fd, header)
            self.inode = os.fstat(fd).st_ino
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(self.name, dir_fd=self.dirfd)  # made by us (O_EXCL) a moment ago
            os.close(fd)
            raise
        self.fd, self.header = fd, len(header)
        return True

    def announce(self, inode: int, size: int, entry: bytes) -> None:
        """Say in the lock what is about to be appended, for a writer after us to cut
        it off should we be killed half-way."""
        record = Unfinished(inode, size, len(entry), entry[:_HEAD]).line().encode()
        with contextlib.suppress(OSError):  # a hint for a repair; the append goes on without
            os.pwrite(self.fd, record, self.header)

    def _abandoned(self) -> bool:
        """The lock is one of ours (made by this user) whose writer is gone: its flock
        went with it. What it was appending is kept for `Unfinished.cut`."""
        try:
            fd = os.open(self.name, _PEEK, dir_fd=self.dirfd)
        except OSError:
            return False
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode) or info.st_uid != os.geteuid():
                return False
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                return False  # its writer is alive
            lines = os.read(fd, 4096).decode("ascii", "replace").split("\n")
            if len(lines) < 3 or lines[1] != _OURS:
                return False
            current = os.stat(self.name, dir_fd=self.dirfd, follow_symlinks=False)
            if current.st_ino != info.st_ino:
                return False  # replaced meanwhile
            self.unfinished = Unfinished.parse(lines[2])
            return True
        finally:
            os.close(fd)

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


def _open_mbox(dirfd: int, name: str, owner: int | None) -> int:
    """The mbox opened for appending (made 0600 when missing), checked to be safe."""
    for _ in range(3):
        try:
            fd = os.open(name, _MBOX, dir_fd=dirfd)
        except FileNotFoundError:
            created = _create_mbox(dirfd, name)
            if created is None:
                continue  # someone made it meanwhile: open theirs
            return created
        except OSError as exc:
            raise open_error(exc, name) from None
        try:
            _check_mbox(fd, name, owner)
        except BaseException:
            os.close(fd)
            raise
        return fd
    raise UnsafeMailbox(f"{name} keeps appearing and disappearing")


def _create_mbox(dirfd: int, name: str) -> int | None:
    try:
        fd = os.open(name, _MBOX | os.O_CREAT | os.O_EXCL, 0o600, dir_fd=dirfd)
    except FileExistsError:
        return None
    try:
        os.fsync(dirfd)  # the new file's name, durable like what is appended to it
    except BaseException:
        os.close(fd)
        raise
    return fd


def _check_mbox(fd: int, name: str, owner: int | None) -> None:
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        raise UnsafeMailbox(f"{name} is not a regular file")
    if info.st_nlink != 1:
        raise UnsafeMailbox(f"{name} has {info.st_nlink} hard links")
    if owner is not None and info.st_uid != owner:
        raise UnsafeMailbox(f"{name} belongs to uid {info.st_uid}, not to uid {owner}")


def _append(fd: int, entry: bytes, announce: Callable[[int, int, bytes], None]) -> None:
    """Write the entry after a blank line, fsync; on failure cut back to the old size.
    `announce(inode, size, data)` is told first what goes where."""
    info = os.fstat(fd)
    size = info.st_size
    tail = os.pread(fd, 2, max(0, size - 2)) if size else b"\n\n"
    gap = b"" if tail == b"\n\n" else b"\n" if tail.endswith(b"\n") else b"\n\n"
    data = gap + entry
    announce(info.st_ino, size, data)
    try:
        write_all(fd, data)
        os.fsync(fd)
    except BaseException:
        with contextlib.suppress(OSError):
            os.ftruncate(fd, size)
            os.fsync(fd)
        raise


def _wait_for(attempt: Callable[[], bool], deadline: float, what: str) -> None:
    """Call `attempt` until it succeeds; MailboxLocked once `deadline` (monotonic) passes."""
    delay = 0.005
    while not attempt():
        left = deadline - time.monotonic()
        if left <= 0:
            raise MailboxLocked(what)
        time.sleep(min(delay, left))
        delay = min(delay * 2, 0.2)
