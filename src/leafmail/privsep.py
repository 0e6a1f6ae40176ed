"""Privilege separation for `leafmail serve`: whom the workers run as, and what they inherit.

Started as root, the parent keeps root only to bind, to open the spool and to fork; the
processes that read the network (smtpd workers, the queue manager) become the
``[process] user`` (default ``leafmail``, Postfix's mail_owner) before they read a byte.
Started as anyone else, everything runs as that user and nothing is dropped.

The workers reach the spool through a directory descriptor the parent opened
(``/proc/self/fd/N``), so the spool's path may pass through directories the daemon's
user cannot enter, and a path swapped after the start cannot redirect them. New mail is
announced to the queue manager on a datagram socket pair: one queue id per datagram.
"""

from __future__ import annotations

import asyncio
import contextlib
import mmap
import os
import socket
import struct
from dataclasses import dataclass
from pathlib import Path

from netserver import privileges
from netserver.connlog import ServerLog
from netserver.errors import ConfigError
from netserver.privileges import Identity

from .config import ProcessConfig
from .spoolcheck import check_spool
from .throttle import SourceTable

ANNOUNCE_BATCH = 128  # queue ids in one datagram at most
ANNOUNCE_BYTES = ANNOUNCE_BATCH * 65  # room for ids of up to 64 bytes and separators
USERADD = "useradd --system --home-dir /var/spool/leafmail --shell /usr/sbin/nologin {user}"


def process_identity(process: ProcessConfig) -> Identity | None:
    """The identity to drop to, or None when not running as root (nothing to drop).

    ConfigError (exit 78) when the user does not exist, saying how to create it.
    """
    if os.geteuid() != 0:
        return None
    user = process.user
    try:
        identity = privileges.resolve(user)
    except ConfigError:
        raise ConfigError(
            f"[process] user {user!r} does not exist; create it with: {USERADD.format(user=user)}"
        ) from None
    if identity.uid == 0:
        raise ConfigError(f"[process] user {user!r} is root: the workers must not be")
    return identity


def become(identity: Identity | None) -> None:
    """Drop to `identity` for good (no-op for None): groups, gid, uid, then verified."""
    if identity is not None:
        privileges.drop(identity)


def adopt_spool(root: Path, identity: Identity) -> bool:
    """Give a root-owned spool (from an older, root-run leafmail) to the daemon's user,
    never following a symbolic link; True if it was changed.

    A spool owned by root that passes the start check as root's (no writable or
    symlinked directory: leafmail.spoolcheck raises ConfigError with the reason) was
    written only by root, so handing it over is safe. Another owner is left alone.
    """
    try:
        info = os.stat(root)
    except OSError:
        return False  # missing: the start check creates it; unusable: it says why
    if info.st_uid != 0:
        return False
    check_spool(root, 0, create=False)
    tree = list(os.walk(root, followlinks=False))
    for top, dirs, files in tree:
        for name in (*dirs, *files):
            with contextlib.suppress(FileNotFoundError):
                os.lchown(os.path.join(top, name), identity.uid, identity.gid)
    os.lchown(root, identity.uid, identity.gid)
    return True


class SpoolHandle:
    """A descriptor of the spool directory, opened by the parent, used by its children."""

    def __init__(self, root: Path) -> None:
        self.fd = os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)

    @property
    def path(self) -> str:
        """The spool as this process (or a forked child) reaches it."""
        return f"/proc/self/fd/{self.fd}"


class Announcer:
    """New mail from the smtpd workers to the queue manager: queue ids in datagrams.

    Ids announced in one turn of an event loop travel together, in one datagram sent at
    the end of the turn: a group commit answers its whole batch in one turn, so the
    queue manager wakes once per batch instead of once per message (one send and one
    receive a message cost the pair about 40 µs of CPU in the SMTP benchmark). Off an
    event loop, or from a second loop of the same process, an id goes at once, alone.

    Sends never block a session: if the queue manager is so far behind that its socket
    is full, the ids are dropped, and its next scan of the queue finds the messages.
    """

    def __init__(self) -> None:
        self.receiver, self.sender = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sender.setblocking(False)
        self.receiver.setblocking(False)
        self.dropped = 0
        self._pending: list[str] = []
        self._loop: asyncio.AbstractEventLoop | None = None  # whose turn `_pending` waits for

    def announce(self, qid: str) -> None:
        """Tell the queue manager about `qid` (at the end of this loop turn)."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self._send([qid])
            return
        if self._pending and loop is not self._loop:
            self._send([qid])  # another loop's batch is waiting: do not mix them
            return
        self._pending.append(qid)
        if len(self._pending) == 1:
            self._loop = loop
            loop.call_soon(self.flush)
        elif len(self._pending) >= ANNOUNCE_BATCH:
            self.flush()

    def flush(self) -> None:
        """Send the ids waiting for the end of the turn now."""
        ids, self._pending = self._pending, []
        if ids:
            self._send(ids)

    def _send(self, ids: list[str]) -> None:
        try:
            self.sender.send("\n".join(ids).encode("ascii"))
        except OSError:
            self.dropped += len(ids)

    def receive(self) -> list[str]:
        """Every queue id waiting (call when the receiver is readable)."""
        found: list[str] = []
        while True:
            try:
                data = self.receiver.recv(ANNOUNCE_BYTES)
            except (BlockingIOError, InterruptedError):
                return found
            if not data:
                return found
            found += data.decode("ascii", "replace").split("\n")


class Backlog:
    """The queue size, written by the queue manager and read by every smtpd worker.

    One shared anonymous page made by the parent before it forks; an aligned 8-byte
    store is read whole, so no lock is needed for this one number.
    """

    _FORMAT = struct.Struct("=q")

    def __init__(self) -> None:
        self._page = mmap.mmap(-1, mmap.PAGESIZE)

    def set(self, count: int) -> None:
        self._FORMAT.pack_into(self._page, 0, count)

    def get(self) -> int:
        return int(self._FORMAT.unpack_from(self._page, 0)[0])


@dataclass(frozen=True)
class Inherited:
    """What the parent opens for its children before it forks them."""

    spool_path: str
    identity: Identity | None
    announcer: Announcer
    backlog: Backlog
    log: ServerLog
    auth_failures: SourceTable
