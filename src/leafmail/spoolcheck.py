"""The spool's start check: a spool is checked, not trusted.

Whoever can write the spool can make the daemon deliver or relay anything, and the
start-up clean-up removes files in it. So before anything is read or removed,
`check_spool` looks at the spool directory and each state directory without following
a symbolic link (lstat through a descriptor of the spool, as Postfix's postfix-script
check looks at its queue directories), and either refuses the spool or repairs it:

refused (ConfigError, exit 78), because it cannot be made safe without a human:
  - a directory not owned by the daemon's user: its owner could swap or fill it;
  - a directory that group or others can write: anyone may already have planted files,
    and tightening the mode would not remove them;
  - a state directory that is a symbolic link or not a directory: the clean-up and the
    queue would work on whatever the link names (the attack: a root daemon whose tmp/
    led to another directory emptied that directory at start-up).

repaired (one note each, which the caller logs), because nothing was at risk:
  - a missing state directory is created, 0700;
  - a mode that lets others only read or traverse is tightened: 0700 for the state
    directories, 0711 at most for the spool itself (others may pass through it to
    public/, where the submission socket lives; see leafmail.pickup).

The spool directory itself may be a symbolic link (an operator putting the spool on
another disk); the check applies to the directory it names.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import stat
from pathlib import Path

from netserver.errors import ConfigError

from .config import ProcessConfig
from .spool import STATUS, TMP
from .states import QueueState

STATE_DIRS = (TMP, STATUS, *QueueState)  # every directory Spool makes
PUBLIC_DIR = "public"  # the submission socket's directory (leafmail.pickup)
PUBLIC_MODE = 0o755  # anyone may look up the socket in it; only the daemon's user writes
STATE_MODE = 0o700
TRAVERSE = 0o011  # group and others may pass through the spool to public/, not list it
ROOT_MODE_MAX = STATE_MODE | TRAVERSE  # 0711: the most the start check lets the spool have
_WRITABLE = stat.S_IWGRP | stat.S_IWOTH
_DIR_OPEN = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC


def check_spool(path: str | os.PathLike[str], owner_uid: int, *, create: bool = True) -> list[str]:
    """Check (and where safe, repair) the spool at `path` for a daemon running as `owner_uid`.

    Returns what was repaired, one note per change; raises ConfigError naming the
    reason when the spool must be refused. With `create` False (the queue tools) a
    missing spool is FileNotFoundError and missing state directories are left alone.
    """
    root = Path(path)
    notes: list[str] = []
    fresh = not root.exists()
    if fresh:
        if not create:
            raise FileNotFoundError(f"no leafmail spool at {root}")
        root.parent.mkdir(parents=True, exist_ok=True)
        _make_dir(None, str(root), owner_uid)
    try:
        fd = os.open(root, _DIR_OPEN)
    except OSError as exc:
        raise ConfigError(f"spool {root}: cannot open it: {exc.strerror}") from None
    try:
        _check_dir(fd, str(root), owner_uid, ROOT_MODE_MAX, notes, is_root=True)
        made = [
            f"{name}/"
            for name in STATE_DIRS
            if _check_entry(fd, root, name, owner_uid, notes, create=create)
        ]
        _check_public(fd, root, owner_uid)
    finally:
        os.close(fd)
    if made and not fresh:  # a new spool is not a repair
        notes.append(f"created {', '.join(made)} in {root} (0700): they were missing")
    return notes


def _check_entry(
    root_fd: int, root: Path, name: str, owner_uid: int, notes: list[str], *, create: bool
) -> bool:
    """One state directory: present, a real directory, ours, private. True if made now."""
    try:
        info = os.stat(name, dir_fd=root_fd, follow_symlinks=False)
    except FileNotFoundError:
        if create:
            _make_dir(root_fd, name, owner_uid)
        return create
    where = f"{root}/{name}"
    if stat.S_ISLNK(info.st_mode):
        target = os.readlink(name, dir_fd=root_fd)
        raise ConfigError(
            f"spool {root}: {name}/ is a symbolic link (to {target!r}); refusing a spool "
            "whose state directories lead elsewhere"
        )
    if not stat.S_ISDIR(info.st_mode):
        raise ConfigError(f"spool {root}: {name} is not a directory")
    fd = os.open(name, _DIR_OPEN | os.O_NOFOLLOW, dir_fd=root_fd)
    try:
        _check_dir(fd, where, owner_uid, STATE_MODE, notes, is_root=False)
    finally:
        os.close(fd)
    return False


def _check_public(root_fd: int, root: Path, owner_uid: int) -> None:
    """public/ (if any) must be ours and closed to writers: it holds the submission socket,
    and whoever could write there could put their own socket in its place."""
    try:
        info = os.stat(PUBLIC_DIR, dir_fd=root_fd, follow_symlinks=False)
    except FileNotFoundError:
        return
    if not stat.S_ISDIR(info.st_mode):
        raise ConfigError(f"spool {root}: {PUBLIC_DIR} is not a directory (or is a symlink)")
    _refuse_owner_or_writers(info, f"{root}/{PUBLIC_DIR}", owner_uid)


def _check_dir(
    fd: int, where: str, owner_uid: int, mode_max: int, notes: list[str], *, is_root: bool
) -> None:
    """Refuse a wrong owner or a writable mode; tighten a mode that only lets others read."""
    info = os.fstat(fd)
    _refuse_owner_or_writers(info, where, owner_uid)
    mode = stat.S_IMODE(info.st_mode)
    if mode & ~mode_max & 0o777:
        tight = mode & mode_max
        os.fchmod(fd, tight)
        what = f"the spool {where}" if is_root else f"{where}/"
        notes.append(f"tightened {what} from {mode:04o} to {tight:04o}: only its owner reads it")


def _refuse_owner_or_writers(info: os.stat_result, where: str, owner_uid: int) -> None:
    if info.st_uid != owner_uid:
        raise ConfigError(
            f"spool {where} is owned by {_user(info.st_uid)}, not by {_user(owner_uid)} "
            "that the daemon runs as; refusing it (chown it, or use another spool)"
        )
    mode = stat.S_IMODE(info.st_mode)
    if mode & _WRITABLE:
        raise ConfigError(
            f"spool {where} is group- or world-writable (mode {mode:04o}): another user may "
            "have planted mail in it; refusing it (check its files, then chmod go-w)"
        )


def _make_dir(root_fd: int | None, name: str, owner_uid: int) -> None:
    """mkdir 0700 (whatever the umask), owned by the daemon's user."""
    os.mkdir(name, STATE_MODE, dir_fd=root_fd)
    fd = os.open(name, _DIR_OPEN | os.O_NOFOLLOW, dir_fd=root_fd)
    try:
        os.fchmod(fd, STATE_MODE)
        if os.fstat(fd).st_uid != owner_uid:  # root preparing a spool for the daemon's user
            os.fchown(fd, owner_uid, -1)
    finally:
        os.close(fd)


def _user(uid: int) -> str:
    """'uid 1001 (alice)', or just 'uid 1001' without a passwd entry."""
    try:
        return f"uid {uid} ({pwd.getpwuid(uid).pw_name})"
    except KeyError:
        return f"uid {uid}"


def spool_owner(spool: str, process: ProcessConfig) -> int:
    """The uid the spool must belong to for a tool run now: ours; as root, root for a
    spool root still owns (no daemon has taken it yet), else the daemon's user."""
    if os.geteuid() != 0:
        return os.geteuid()
    with contextlib.suppress(OSError):
        if os.stat(spool).st_uid == 0:
            return 0
    try:
        return pwd.getpwnam(process.user).pw_uid
    except KeyError:
        return 0
