"""Maildir delivery: a unique file in tmp/, fsync, link into new/, fsync new/.

That is the Maildir spec's recipe: a reader only ever sees complete messages in new/, and
once new/ is synced the mail survives a crash. Directories that are missing are made
(0700); as root they, and the message, are given to the mailbox's owner, and nothing is
ever opened through a symbolic link. A directory that was already there must belong to
the owner.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import os
import secrets
import socket
import time

from .local_common import CREATE, Identity, UnsafeMailbox, open_error, write_all

_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_COUNTER = itertools.count(1)


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
            fd = os.open(name, CREATE, 0o600, dir_fd=tmp)
        except FileExistsError:
            continue
        try:
            if owner is not None:
                os.fchown(fd, owner.uid, owner.gid)
            write_all(fd, message)
            os.fsync(fd)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(name, dir_fd=tmp)
            raise
        finally:
            os.close(fd)
        return name
    raise FileExistsError(errno.EEXIST, "no unique file name in tmp/")


# --- directories --------------------------------------------------------------------


def _open_dir(name: str, dir_fd: int | None = None) -> int:
    try:
        return os.open(name, _DIR, dir_fd=dir_fd)
    except OSError as exc:
        raise open_error(exc, name) from None


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
