"""Real system users for the local delivery tests that run as root (CI runs as root).

Users are made with useradd (`system_users.ensure_user`), idempotently, with names that
start with ``lmt`` and homes under HOMES, a directory only root may write. Nothing here
fakes /etc/passwd.
`scratch` makes a per-test directory that these users can reach (pytest's own tmp_path
sits under a 0700 directory of root's, which no other user may enter).
"""

from __future__ import annotations

import os
import pwd
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import system_users

ROOT = os.geteuid() == 0
# Commands run as other users need an interpreter they can reach: the test's own may sit
# under /root (pyenv), which only root may enter. The scripts use the stdlib only.
PYTHON = "/usr/bin/python3" if ROOT and os.access("/usr/bin/python3", os.X_OK) else sys.executable
HOMES = Path("/tmp/lmt-homes")
SCRATCH = Path("/tmp/lmt-scratch")


def ensure_user(
    name: str, home: Path | None = None, groups: tuple[str, ...] = ()
) -> pwd.struct_passwd:
    """`system_users.ensure_user`, with the home under HOMES unless `home` says where."""
    _root_dir(HOMES)
    return system_users.ensure_user(name, home or HOMES / name, groups)


def fresh_home(entry: pwd.struct_passwd) -> Path:
    """An empty home (0755, the user's own) at the account's home directory."""
    home = Path(entry.pw_dir)
    shutil.rmtree(home, ignore_errors=True)
    home.mkdir(mode=0o755)
    os.chown(home, entry.pw_uid, entry.pw_gid)
    return home


_MADE: list[Path] = []


def scratch(owner: pwd.struct_passwd | None = None, mode: int = 0o755) -> Path:
    """A new directory under SCRATCH that every user can enter; `owner`'s when given.
    `remove_scratch` removes them all."""
    _root_dir(SCRATCH)
    path = Path(tempfile.mkdtemp(dir=SCRATCH))
    _MADE.append(path)
    path.chmod(mode)
    if owner is not None:
        os.chown(path, owner.pw_uid, owner.pw_gid)
    return path


def remove_scratch() -> None:
    """Remove every directory `scratch` made (the tests' fixtures call it at teardown)."""
    while _MADE:
        shutil.rmtree(_MADE.pop(), ignore_errors=True)


def _root_dir(path: Path) -> None:
    """A directory of root's that others may traverse but not write (0755)."""
    path.mkdir(mode=0o755, exist_ok=True)
    os.chown(path, 0, 0)
    path.chmod(0o755)


def owner_of(path: Path) -> tuple[int, int]:
    info = os.lstat(path)
    return info.st_uid, info.st_gid


# --- local delivery tests whose users have no account ---------------------------------
# As root, such users are written by [local] virtual_user (never root): VIRTUAL, a real
# user, who must be able to reach and write the test's directory.

VIRTUAL = "lmtvirt"


def virtual_tmp(tmp_path: Path) -> Iterator[Path]:
    """For a `tmp_path` fixture: pytest's, or as root a scratch directory VIRTUAL owns."""
    if not ROOT:
        yield tmp_path
        return
    yield scratch(ensure_user(VIRTUAL))
    remove_scratch()


def virtual_user_toml() -> str:
    """The [local] line that names VIRTUAL as virtual_user (as root; nothing otherwise)."""
    return f'virtual_user = "{VIRTUAL}"\n' if ROOT else ""


def give_to_virtual(*paths: Path) -> None:
    """As root: give what the test made to VIRTUAL, whose mailboxes it stands for."""
    if ROOT:
        entry = ensure_user(VIRTUAL)
        for path in paths:
            os.chown(path, entry.pw_uid, entry.pw_gid, follow_symlinks=False)
