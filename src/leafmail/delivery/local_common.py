"""What the local delivery modules share: the copy, who writes it, and how it ends.

Every local target (a mailbox, a file named in an aliases file, a command) gets a `Copy`
that starts with ``Return-Path`` and ``Delivered-To`` (the recipient address), with LF
line ends, as Postfix, Dovecot and procmail write them. As root, each target is written
by a `netserver.privileges.Identity` (`identity_of` makes one from a passwd entry). The
errors and the file helpers here are the ones the Maildir and the mbox writer both need,
and `delivered` is the one way a local target reports success.
"""

from __future__ import annotations

import errno
import os
import pwd
import re
from dataclasses import dataclass

from netserver.privileges import Identity

from . import Outcome, Result

CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


class MailboxLocked(Exception):
    """Another program held the mailbox's lock for longer than we wait."""


class UnsafeMailbox(Exception):
    """The mailbox is a symbolic or hard link, not a regular file, or someone else's."""


def identity_of(account: pwd.struct_passwd, gid: int | None = None) -> Identity:
    """Who to become for this account: its uid, `gid` (else its login group), and its
    supplementary groups from the group database, as initgroups(3) gives at login.

    Looked up here, in the parent: the delivery child must not use NSS after fork.
    """
    group = account.pw_gid if gid is None else gid
    groups = os.getgrouplist(account.pw_name, account.pw_gid)
    if group not in groups:
        groups.append(group)
    return Identity(account.pw_name, account.pw_uid, group, tuple(groups), account.pw_dir)


@dataclass(frozen=True)
class Copy:
    """What one target gets: the envelope sender, the recipient address and the message."""

    sender: str
    recipient: str
    data: bytes


# --- the copies ---------------------------------------------------------------------


def header_value(text: str) -> bytes:
    """`text` made safe to be a header field's value: no CR, LF or NUL, UTF-8."""
    return re.sub(r"[\r\n\x00]", "", text).encode("utf-8")


def trace_headers(copy: Copy, eol: bytes) -> bytes:
    """Return-Path and Delivered-To, the lines the local copy starts with."""
    return b"Return-Path: <%s>%sDelivered-To: %s%s" % (
        header_value(copy.sender),
        eol,
        header_value(copy.recipient),
        eol,
    )


def unix_text(copy: Copy) -> bytes:
    """The copy for a command: trace headers, LF line endings (what filters expect)."""
    return trace_headers(copy, b"\n") + copy.data.replace(b"\r\n", b"\n")


# --- files --------------------------------------------------------------------------


WRITE_CHUNK = 1 << 20  # bytes per write(2)


def write_all(fd: int, data: bytes) -> None:
    """Write all of `data` to `fd` (os.write may write less than it is given), a chunk
    at a time: a write to a regular file is not interrupted by a signal, so a delivery
    asked to stop (`leafmail.delivery.asuser.Stopped`) stops after one chunk, not after
    the whole of a large message."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view[:WRITE_CHUNK]) :]


def open_error(exc: OSError, name: str) -> Exception:
    """ELOOP from O_NOFOLLOW means a symbolic link: say so; other errors stay as they are."""
    if exc.errno in (errno.ELOOP, errno.ENOTDIR, errno.EMLINK):
        return UnsafeMailbox(f"{name} is a symbolic link or of the wrong type")
    return exc


# --- results ------------------------------------------------------------------------


def clean(text: str, limit: int = 300) -> str:
    """One printable line (results become reply lines and DSN fields)."""
    flat = " ".join(text.split())
    return "".join(c if c.isprintable() else "?" for c in flat)[:limit]


def delivered(text: str) -> Result:
    return Result(Outcome.DELIVERED, 250, "2.0.0", clean(text))
