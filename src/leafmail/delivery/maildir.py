"""Maildir delivery: a unique file in tmp/, fsync, link into new/, fsync new/.

That is the Maildir spec's recipe: a reader only ever sees complete messages in new/, and
once new/ is synced the mail survives a crash. This runs as the mailbox's user
(`leafmail.delivery.asuser`), so what it makes belongs to them and the kernel decides
where they may make it. Directories that are missing are made (0700), the parents of
the Maildir too, as Postfix's local(8) does; one that cannot be made is named in the
error. Nothing is opened through a symbolic link, and when the caller says whose the
mailbox is (`owner`, a uid), a directory that was already there must be theirs.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import os
import secrets
import socket
import time

from .local_common import CREATE, UnsafeMailbox, open_error, write_all

_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_COUNTER = itertools.count(1)


def maildir_name() -> str:
    """A unique name, time.MusecPpidQcountRrandom.host, as the Maildir spec advises."""
    usecs = time.time_ns() // 1000
    seconds, micro = divmod(usecs, 1_000_000)
    host = socket.gethostname().replace("/", "\\057").replace(":", "\\072")
    unique = f"P{os.getpid()}Q{next(_COUNTER)}R{secrets.token_hex(4)}"
    return f"{seconds}.M{micro}{unique}.{host}"


def write_maildir(path: str, message: bytes, owner: int | None = None) -> str:
    """Deliver `message` into the Maildir at `path` (made when missing); its name in new/."""
    fds: list[int] = []
    try:
        make_parents(os.path.dirname(os.path.normpath(path)))
        fds.append(top := _ensure_dir(path, owner))
        fds.append(_ensure_dir("cur", owner, top))
        fds.append(tmp := _ensure_dir("tmp", owner, top))
        fds.append(new := _ensure_dir("new", owner, top))
        return _publish(tmp, new, message)
    finally:
        for fd in fds:
            os.close(fd)


def _publish(tmp: int, new: int, message: bytes) -> str:
    """tmp/NAME written and synced, linked to new/NAME, tmp/NAME removed, new/ synced."""
    name = _write_unique(tmp, message)
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


def _write_unique(tmp: int, message: bytes) -> str:
    for _ in range(5):
        name = maildir_name()
        try:
            fd = os.open(name, CREATE, 0o600, dir_fd=tmp)
        except FileExistsError:
            continue
        try:
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


def make_parents(path: str) -> None:
    """Make the missing directories of `path` (0700), each as who we are, or say which
    one could not be made (OSError with its name). Each new entry is made durable in
    its parent (fsync), as the Maildir's own are: a delivery reported done must not
    sit under a directory a power cut forgets (a file system without a journal writes
    a directory's entries only when that directory is synced)."""
    missing: list[str] = []
    while not os.path.lexists(path):
        missing.append(path)
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    for directory in reversed(missing):
        try:
            os.mkdir(directory, 0o700)
        except FileExistsError:
            continue
        except OSError as exc:
            raise OSError(exc.errno, f"cannot create {directory}: {exc.strerror}") from None
        _sync_parent(directory, None)  # or a power cut can lose it, and the mail under it


def _open_dir(name: str, dir_fd: int | None = None) -> int:
    try:
        return os.open(name, _DIR, dir_fd=dir_fd)
    except OSError as exc:
        raise open_error(exc, name) from None


def _ensure_dir(name: str, owner: int | None, dir_fd: int | None = None) -> int:
    """Open directory `name`, made (0700) when missing; never via a symlink."""
    created = False
    with contextlib.suppress(FileExistsError):
        os.mkdir(name, 0o700, dir_fd=dir_fd)
        created = True
    fd = _open_dir(name, dir_fd)
    try:
        if not created:
            _check_owner(fd, name, owner)
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


def _check_owner(fd: int, name: str, owner: int | None) -> None:
    """A directory that was already there must belong to the mailbox's user."""
    uid = os.fstat(fd).st_uid
    if owner is not None and uid != owner:
        raise UnsafeMailbox(f"{name} belongs to uid {uid}, not to uid {owner}")
