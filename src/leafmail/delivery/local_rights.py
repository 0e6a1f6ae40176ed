"""Who writes each local target when we are root: the rules of Postfix's local(8).

`leafmail.delivery.local` decides what a recipient expands to; this module decides
under which identity each piece is written or run (see the table in its docstring and
in README.md): the recipient's account, the spool group of a shared /var/mail, the
`virtual_user` of users without an account, the `default_user` of root's files. Never
root, except for root's own mailbox, as Postfix does.
"""

from __future__ import annotations

import os
import pwd
import stat
from collections.abc import Callable
from dataclasses import dataclass

from netserver.errors import ConfigError
from netserver.privileges import Identity

from .local_common import identity_of


@dataclass(frozen=True)
class UserMailbox:
    """Where a user's mail goes, who writes it (None: as we are) and whose it must be."""

    path: str
    writer: Identity | None
    owner: int | None


# --- who writes -----------------------------------------------------------------------


def mailbox_writer(
    found: pwd.struct_passwd | None,
    shared: os.stat_result | None,
    virtual: Callable[[], Identity],
) -> tuple[Identity | None, int | None]:
    """Who writes a mailbox, and the uid it must belong to (None, None: as we are).

    `found` is the recipient's account (None for a virtual mailbox), `shared` the
    status of a shared spool directory (see `shared_directory`).
    """
    if os.geteuid() != 0:
        return None, None
    if found is None:
        writer = virtual()
        return writer, writer.uid
    if found.pw_uid == 0:
        return None, 0  # root's own mailbox, as Postfix writes it
    return identity_of(found, spool_group(found, shared)), found.pw_uid


def virtual_identity(spec: str) -> Identity:
    """`[local] virtual_user`: an account name or "uid:gid"; never root (ConfigError)."""
    uid_text, colon, gid_text = spec.partition(":")
    if colon and uid_text.isdigit() and gid_text.isdigit():
        uid, gid = int(uid_text), int(gid_text)
        found = Identity(spec, uid, gid, (gid,), "/")
    else:
        entry = _account(spec) if not spec.isdigit() else None
        if entry is None:
            raise ConfigError(
                f"local.virtual_user {spec!r} does not exist: create it "
                f"(useradd --system {spec}) or name another account or a uid:gid"
            )
        found = identity_of(entry)
    if found.uid == 0 or found.gid == 0:
        raise ConfigError(f"local.virtual_user {spec!r} must not be root")
    return found


def default_identity(name: str) -> Identity:
    """`default_user` (Postfix's default_privs): commands and files of root's files."""
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        raise ConfigError(f"default user {name!r} does not exist") from None
    if entry.pw_uid == 0:
        raise ConfigError(f"default user {name!r} must not be root")
    return identity_of(entry)


def shared_directory(template: str, path: str) -> os.stat_result | None:
    """The status of a shared mail spool directory (/var/mail): the mailbox's directory
    when the template names no {user} or {home} there; None otherwise, so a directory a
    user controls can never lend its group."""
    if "{" in os.path.dirname(template):
        return None
    try:
        return os.stat(os.path.dirname(path))
    except OSError:
        return None


def spool_group(found: pwd.struct_passwd, shared: os.stat_result | None) -> int | None:
    """The group to write with: a group-writable shared spool's (not world-writable),
    as Postfix's local(8) does for /var/mail; else the account's login group (None)."""
    if shared is None or shared.st_mode & stat.S_IWOTH or not shared.st_mode & stat.S_IWGRP:
        return None
    return shared.st_gid


def _account(name: str) -> pwd.struct_passwd | None:
    try:
        return pwd.getpwnam(name)
    except KeyError:
        return None
