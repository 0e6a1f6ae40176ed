"""Dropping root after the listening sockets are bound.

Ports below 1024 need root (or CAP_NET_BIND_SERVICE) only to bind; the handlers and
commands that read what strangers send should run as an ordinary user. The order is the
one that cannot fail half-way into a worse state: supplementary groups first (only root
may set them), then the group, then the user, which gives up the right to do the rest.
Afterwards we check that root cannot be regained, because a silent failure here is the
kind of bug nobody notices until it matters.
"""

from __future__ import annotations

import contextlib
import grp
import os
import pwd
from collections.abc import Sequence
from dataclasses import dataclass

from .errors import ConfigError, NetserverError


class PrivilegeError(NetserverError):
    """The switch to another user failed or could be undone (EX_NOPERM, 77)."""

    exit_code = 77


@dataclass(frozen=True)
class Identity:
    """Whom to become: names for logs and the environment, numbers for the kernel."""

    user: str
    uid: int
    gid: int
    groups: tuple[int, ...]
    home: str


def resolve(user: str, group: str | None = None, groups: Sequence[str] | None = None) -> Identity:
    """Look the names up now (at start-up, so a typo is a configuration error).

    `group` defaults to the user's login group; `groups` (supplementary) to the user's
    groups in /etc/group, as initgroups(3) and systemd's User= do.
    """
    try:
        entry = pwd.getpwnam(user) if not user.isdigit() else pwd.getpwuid(int(user))
    except KeyError:
        raise ConfigError(f"unknown user {user!r}") from None
    gid = entry.pw_gid if group is None else group_id(group)
    extra = (
        os.getgrouplist(entry.pw_name, gid)
        if groups is None
        else [gid, *(group_id(g) for g in groups)]
    )
    return Identity(entry.pw_name, entry.pw_uid, gid, tuple(dict.fromkeys(extra)), entry.pw_dir)


def group_id(name: str) -> int:
    """A group name or number as a gid; ConfigError if there is no such group."""
    if name.isdigit():
        return int(name)
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        raise ConfigError(f"unknown group {name!r}") from None


def is_current(identity: Identity) -> bool:
    """True if we already are that user and group (nothing to drop)."""
    return os.geteuid() == identity.uid and os.getegid() == identity.gid


def drop(identity: Identity) -> None:
    """Become `identity` for good: setgroups, setgid, setuid, then prove it sticks.

    Not being root is fine when we already are that user; otherwise PrivilegeError.
    """
    if is_current(identity) and os.geteuid() != 0:
        return
    if os.geteuid() != 0:
        raise PrivilegeError(
            f"cannot switch to user {identity.user!r}: not running as root "
            f"(running as uid {os.geteuid()})"
        )
    try:
        os.setgroups(list(identity.groups))
        os.setresgid(identity.gid, identity.gid, identity.gid)
        os.setresuid(identity.uid, identity.uid, identity.uid)
    except OSError as exc:
        raise PrivilegeError(f"cannot switch to user {identity.user!r}: {exc}") from None
    _verify(identity)
    os.environ.update(USER=identity.user, LOGNAME=identity.user, HOME=identity.home)


def _verify(identity: Identity) -> None:
    """Every id is the new one, and (unless root was asked for) setuid(0) now fails."""
    if set(os.getresuid()) != {identity.uid} or set(os.getresgid()) != {identity.gid}:
        raise PrivilegeError(f"switch to user {identity.user!r} left other ids in place")
    if identity.uid == 0:
        return
    regained = False
    with contextlib.suppress(PermissionError):
        os.setuid(0)
        regained = True
    if regained:
        raise PrivilegeError(f"user {identity.user!r} could regain root after the switch")
