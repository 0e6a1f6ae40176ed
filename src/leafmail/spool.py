"""The spool: the only module that knows spool paths, the file format and the commit.

Layout (each state is a directory, as in Postfix's queue)::

    SPOOL/tmp/       being written; leftovers are from a crash and were never answered 250
    SPOOL/queue/     committed, waiting for delivery
    SPOOL/deferred/  delivery tried and to be retried (queue runner)
    SPOOL/hold/      held by the operator, or a forwarded copy not yet released (expansion)
    SPOOL/corrupt/   files that failed their self-check; kept for a human, never parsed again
    SPOOL/status/    per-recipient delivery state of a message (leafmail.status), once tried

A message file never changes after the commit; what delivery learns goes into its status
record, replaced atomically (write, fsync, rename). Whoever delivers, holds, releases or
deletes a message first takes an exclusive flock(2) on its file (`Spool.locked`), so the
daemon's queue runner, `leafmail flush` and the queue tools can run at the same time.
Every other move or removal of a committed file takes that lock too (a damaged file set
aside, a forwarded copy released, a failed commit taken back): `settle_duplicates` and
`locked` rely on no file moving while its lock is held.

The commit: write the file into tmp/ (mode 0600, O_EXCL|O_NOFOLLOW), lock it, rename
it into queue/, make its data and its name durable with one barrier, and only then
report success and release the lock, so a 250 is never given for mail a crash could
lose. The lock keeps the queue runner off the file until then; if the barrier fails,
the file is taken back out of queue/ under that lock before the 4xx (`Spool.take_back`),
or the runner would deliver it besides the client's retry. The barrier is syncfs(2),
one flush of the disk's cache where fdatasync plus a directory fsync are two, followed
by the directory's fsync where syncfs writes metadata after its flush (ext4 without a
journal: `syncfs_is_a_barrier`); there a lone file's own fsync, which carries its new
name, is the one flush (`fsync_carries_new_name`) (`Spool.sync_renamed`); many sessions
commit at once, so `GroupCommitter` makes a whole batch durable with one. `Spool.commit`
does the same for one message (into hold/, it flushes the data before the rename too:
see there).

A file is::

    LEAFMAIL-SPOOL/1 <envelope length> <message length> <sha256 of envelope+message>\\n
    <envelope JSON>\\n<message bytes>\\nLEAFMAIL-END\\n

so a truncated, padded or altered file is detected before anything is trusted. JSON runs
no code when loaded.
"""

from __future__ import annotations

import array
import collections
import contextlib
import ctypes
import errno
import fcntl
import functools
import hashlib
import itertools
import json
import os
import queue
import random
import re
import stat
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar, cast

from .envelope import Envelope, EnvelopeError, load_json
from .states import QueueState

if TYPE_CHECKING:  # not at run time: the queue tools and `leafmail sendmail` need neither
    import asyncio  # (imported by `_running_loop`, on a loop)

    from .reaper import Reaper  # (the queue runner's, set by leafmail.queue)

MAGIC = b"LEAFMAIL-SPOOL/1"
TRAILER = b"\nLEAFMAIL-END\n"
TMP = "tmp"  # not a queue state: what is there was never committed
STATUS = "status"  # delivery records (leafmail.status), beside the states
_QUEUE_STATES = frozenset(QueueState)  # `scan` refuses anything else at run time (tmp/ too)
_ID = re.compile(r"\A[0-9A-F]{16}[0-9A-F]{8}\Z")
_OPEN_NEW = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_OPEN_SUBDIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC  # tmp/, states
_OPEN_READ = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC
# Up to this many bytes of message, `GroupCommitter.commit` checksums and writes the file
# on the session's loop (tens of microseconds, cheaper than a thread hand-over); a bigger
# one, whose cost grows with what the client sent, goes to a thread so that the loop's
# other sessions never wait for it (nor for the kernel throttling a writer of dirty pages).
LOOP_WRITE_MAX = 64 * 1024
_OPEN_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
_READ_TRIES = 16  # looks of an unlocked `get` at a message moved after each look
STOP_WAIT = 1.0  # seconds a look waits for moves to stop (Spool._moves_stopped)
_FIRST_READ = 64 * 1024  # most messages and every status record fit in one read
_MAX_READ = 16 * 1024 * 1024


class SpoolError(OSError):
    """The spool could not take the message (disk full, permissions): answer 4xx.

    `kept` is None when nothing of the message stays in the spool (the client's retry
    is its only copy); else it names the file that stays and why (see `Spool.take_back`):
    that message may be delivered and also sent again by the client.
    """

    kept: str | None = None


class RecordNotDurable(OSError):
    """A status record was put in place (renamed over the old one), but the fsync of
    status/ after it failed: readers see the new record, which a power cut may undo.

    The caller must act as if it was written (what it promised before it, a committed
    DSN, stays: the record now says that recipient is final), and as if it may be lost
    (try again, as for an unwritten record).
    """


class CorruptMessage(Exception):
    """A spool file failed its self-check; it has been moved to corrupt/."""


@dataclass(frozen=True)
class SpooledMessage:
    """A message loaded back from the spool ("unfrozen")."""

    qid: str
    state: QueueState
    envelope: Envelope
    data: bytes


@dataclass(frozen=True)
class MessageSummary:
    """What a queue listing shows of a message (`Spool.summary`); `size` is the message's."""

    qid: str
    state: QueueState
    sender: str
    recipients: tuple[str, ...]
    size: int


def new_id() -> str:
    """A queue id: arrival time (ns, hex) and 32 random bits; sorts in arrival order.

    Ids need to be unique, not secret (O_EXCL catches the impossible clash), so the
    cheap PRNG does; secrets would cost a getrandom(2) call per message.
    """
    return f"{time.time_ns():016X}{random.getrandbits(32):08X}"


def valid_id(qid: str) -> bool:
    """True for a well-formed queue id (ids name files: nothing else may pass)."""
    return bool(_ID.match(qid))


# One encoder for every spool file: json.dumps with any option builds a new one per call.
_ENVELOPE_JSON = json.JSONEncoder(separators=(",", ":"), ensure_ascii=True).encode


def encode(envelope: Envelope, data: bytes) -> bytes:
    """The bytes of a spool file for this message."""
    env = _ENVELOPE_JSON(envelope.to_json()).encode()
    digest = hashlib.sha256(env)
    digest.update(data)  # (not env + data: a copy of the message just to hash it)
    header = b"%s %d %d %s\n" % (MAGIC, len(env), len(data), digest.hexdigest().encode())
    return b"".join((header, env, b"\n", data, TRAILER))


def decode(blob: bytes) -> tuple[Envelope, bytes]:
    """Check and parse a spool file; ValueError says what is wrong with it."""
    env, start, end = _checked(blob)
    try:
        return Envelope.from_json(load_json(env, "envelope")), blob[start:end]
    except EnvelopeError as exc:
        raise ValueError(f"bad envelope: {exc}") from None


def _checked(blob: bytes) -> tuple[bytes, int, int]:
    """The envelope bytes and where the message starts and ends, once the header, the
    lengths, the end marker and the checksum agree (ValueError says which does not)."""
    line_end = blob.find(b"\n", 0, 200)
    if line_end < 0:
        raise ValueError("no header line")
    fields = blob[:line_end].split(b" ")
    if len(fields) != 4 or fields[0] != MAGIC:
        raise ValueError("not a leafmail spool file, or an unknown version")
    if not (fields[1].isdigit() and fields[2].isdigit()):
        raise ValueError("bad lengths in header")
    env_len, data_len = int(fields[1]), int(fields[2])
    start = line_end + 1
    end = start + env_len + 1 + data_len
    if len(blob) != end + len(TRAILER) or blob[end:] != TRAILER:
        raise ValueError("truncated or padded (no end marker where the header says)")
    if blob[start + env_len : start + env_len + 1] != b"\n":
        raise ValueError("envelope not terminated")
    env = blob[start : start + env_len]
    digest = hashlib.sha256(env)
    digest.update(memoryview(blob)[start + env_len + 1 : end])
    if digest.hexdigest().encode() != fields[3]:
        raise ValueError("checksum mismatch")
    return env, start + env_len + 1, end


_JSON = json.JSONDecoder()


def _peek_envelope(env: bytes) -> tuple[str, tuple[str, ...]]:
    """Sender and recipient addresses from envelope JSON, without building an Envelope.

    A listing needs only these; the full check (`Envelope.from_json`) runs when the
    message is delivered or shown. Whatever this refuses, the full check refuses too.
    """
    try:
        obj = _JSON.decode(env.decode("utf-8"))
    except (ValueError, RecursionError) as exc:
        raise ValueError(f"bad envelope: not JSON: {exc}") from None
    sender = obj.get("sender") if isinstance(obj, dict) else None
    rcpts = obj.get("recipients") if isinstance(obj, dict) else None
    if not isinstance(sender, str) or not isinstance(rcpts, list) or not rcpts:
        raise ValueError("bad envelope: no sender or recipients")
    addresses = tuple(r.get("address") if isinstance(r, dict) else None for r in rcpts)
    if not all(isinstance(a, str) for a in addresses):
        raise ValueError("bad envelope: a recipient without an address")
    return sender, cast(tuple[str, ...], addresses)


def _load_syncfs() -> Callable[[int], int] | None:
    """libc's syncfs(2): one call makes every file written so far on the filesystem durable."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)  # the C library this process runs on
        return cast(Callable[[int], int], libc.syncfs)
    except (OSError, AttributeError):
        return None


def _reports_errors(release: str) -> bool:
    """Whether this kernel's syncfs(2) reports a failed write-back: Linux 5.8 and later
    (before, it returned 0 whatever happened, so it cannot be the only barrier)."""
    try:
        major, minor = (int(part) for part in release.split(".")[:2])
    except ValueError:
        return False
    return (major, minor) >= (5, 8)


# A group commit's one barrier, only where it reports a failure (see `sync_renamed`).
_SYNCFS_CHECKED = _load_syncfs() if _reports_errors(os.uname().release.split("-")[0]) else None

# File systems whose syncfs(2) ends with the flush of the disk's cache, after the last
# write it made: their `sync_fs` forces the log, which holds every change of metadata.
_LOGGED = frozenset({"xfs", "btrfs"})


def syncfs_is_a_barrier(
    path: str | os.PathLike[str], proc: str = "/proc", sys_root: str = "/sys"
) -> bool:
    """Whether syncfs(2) alone makes what was written under `path` durable.

    Linux's syncfs writes the inodes, asks the file system's `sync_fs` (which flushes
    the disk's cache) and only then writes the block device's dirty buffers. On ext4
    with a journal, XFS or btrfs the metadata is in the log, committed and flushed by
    `sync_fs`; on ext4 without a journal (this project's bench VM) the inode and
    directory blocks are those buffers, written after the flush (traced with the
    block_bio_queue event: WSM of the new file's inode block after the FWS). There, and
    wherever this cannot tell (another file system, no /proc or /sys), the caller must
    flush once more (`Spool.sync_renamed`).
    """
    fstype, journal = _file_system(path, proc, sys_root)
    return fstype in _LOGGED or (fstype == "ext4" and journal is True)


def fsync_carries_new_name(
    path: str | os.PathLike[str], proc: str = "/proc", sys_root: str = "/sys"
) -> bool:
    """Whether fsync(2) of a file just created or renamed into a directory under `path`
    also makes that name durable, with its one flush: ext4 without a journal.

    There every new entry marks its inode (EXT4_STATE_NEWENTRY: `ext4_add_entry`, which
    a rename into a directory calls too), and the file's fsync then writes, besides its
    data and its inode block, the dirty blocks and the inode of the directory the file
    is now in (`ext4_sync_parent`) before the one flush; traced on the bench VM (Linux
    6.18, block_bio_queue): data, the file's inode block, queue/'s entry block, then the
    flush, and queue/'s inode block too when the entry made the directory grow. One
    flush for a lone message where syncfs (whose metadata writes follow its flush here)
    and the directory's fsync are two (bench/RESULTS.md, "A batch of one on ext4 without
    a journal"). Elsewhere (a journal's commit holds the name; ext2, tmpfs, or anything
    this cannot tell) False: a file's fsync is not known to carry its name. (A directory
    with its entries inline in its inode is the spool's to check: `_entries_inline`.)
    """
    fstype, journal = _file_system(path, proc, sys_root)
    return fstype == "ext4" and journal is False


# EXT4_INLINE_DATA_FL as FS_IOC_GETFLAGS reports it (lsattr's "N"): a directory whose
# entries live in its inode, not in blocks of its own (the inline_data feature).
_INLINE_DATA = 0x10000000
_FS_IOC_GETFLAGS = 0x80086601


def _entries_inline(directory: str) -> bool:
    """Whether `directory` keeps its entries in its own inode (ext4's inline_data), or
    this cannot tell: then an entry added to it is a change of the directory's inode,
    which a file's fsync on ext4 without a journal writes only if that inode is marked
    dirty; `Spool` keeps the directory's fsync for it (`fsync_carries_name`)."""
    flags = array.array("i", [0])
    try:
        fd = os.open(directory, _OPEN_DIR | os.O_NOFOLLOW)
    except OSError:
        return True
    try:
        fcntl.ioctl(fd, _FS_IOC_GETFLAGS, flags, True)
    except OSError:
        return True
    finally:
        os.close(fd)
    return bool(flags[0] & _INLINE_DATA)


def _file_system(
    path: str | os.PathLike[str], proc: str, sys_root: str
) -> tuple[str | None, bool | None]:
    """The type of the file system holding `path`, and for ext4 whether it has a journal
    (None: not ext4, or it cannot tell)."""
    dev = os.stat(path).st_dev
    try:
        fstype = _fs_type(f"{os.major(dev)}:{os.minor(dev)}", Path(proc, "self/mountinfo"))
        if fstype != "ext4":
            return fstype, None
        device = Path(sys_root, f"dev/block/{os.major(dev)}:{os.minor(dev)}").resolve().name
        task = Path(sys_root, f"fs/ext4/{device}/journal_task").read_text().strip()
    except OSError:
        return None, None
    return fstype, task not in ("", "<none>")


def _fs_type(number: str, mountinfo: Path) -> str | None:
    """The type of the file system mounted from device `number` (MAJOR:MINOR)."""
    for line in mountinfo.read_text().splitlines():
        fields = line.split()
        if len(fields) > 2 and fields[2] == number and " - " in line:
            return line.split(" - ", 1)[1].split()[0]
    return None


class Spool:
    """A spool directory: commit, list, load, move and remove messages."""

    def __init__(self, root: str | os.PathLike[str], *, create: bool = True) -> None:
        self.root = Path(root)
        # Barrier system calls made (fdatasync, fsync, syncfs): each asks the disk to
        # flush its write-back cache, so a benchmark can set them beside the disk's count.
        self.syncs = 0
        self._held: dict[str, int] = {}  # qid -> descriptor holding its lock
        self._sizes: dict[str, int] = {}  # qid -> its file's size, while it is held
        self._unrecorded: set[str] = set()  # held, and found with no status record
        # Closes removed messages' descriptors off the caller's thread (the queue
        # runner sets one: see leafmail.reaper); None closes them at once.
        self.reaper: Reaper | None = None
        self._dirs = {state: str(self.root / state) for state in (TMP, *QueueState)}
        self._status_dir = str(self.root / STATUS)
        if create:
            self.root.mkdir(mode=0o700, parents=True, exist_ok=True)  # the spool is private
            for name in (TMP, STATUS, *QueueState):
                (self.root / name).mkdir(mode=0o700, parents=True, exist_ok=True)
        elif not (self.root / QueueState.QUEUE).is_dir():
            raise FileNotFoundError(f"{self.root} is not a leafmail spool")
        self.owner = _foreign_owner(self.root)
        # Whether `sync_renamed` may trust one syncfs (see `syncfs_is_a_barrier`), and
        # whether a lone file's fsync makes its new name durable (`fsync_carries_new_name`).
        self.syncfs_complete = syncfs_is_a_barrier(self.root)
        # (Not while a state directory holds its entries inline: an ext4 directory never
        # goes back to inline once it has blocks, so a later start takes the shortcut.)
        self.fsync_carries_name = fsync_carries_new_name(self.root) and not any(
            _entries_inline(self._dirs[state]) for state in QueueState
        )

    def _own(self, fd: int) -> None:
        """Root writing into the daemon user's spool makes the file that user's (or the
        unprivileged queue manager could not read it)."""
        if self.owner is not None and os.geteuid() == 0:  # (not after a drop to the owner)
            os.fchown(fd, *self.owner)

    @property
    def control_path(self) -> Path:
        """The running daemon's control socket (leafmail.control)."""
        return control_path(self.root)

    def path(self, state: QueueState, qid: str) -> Path:
        return Path(self._file(state, qid))

    def _file(self, where: str, qid: str) -> str:
        """The file of `qid` in a queue state or tmp/, as a string (the hot path avoids
        pathlib); `where` is a directory name, so tmp/ (not a queue state) goes too."""
        directory = self._dirs.get(where)
        if directory is None or not valid_id(qid):
            raise ValueError(f"bad spool state or queue id: {where}/{qid}")
        return f"{directory}/{qid}"

    # -- committing ----------------------------------------------------------------------
    def write_tmp(self, qid: str, blob: bytes, tmp_dir: int | None = None) -> int:
        """Create tmp/QID (0600, never following a link, never reusing a name), lock it
        and write it.

        Returns the open descriptor, which holds the lock; the caller makes the file
        durable and closes it. `tmp_dir`
        is a descriptor of tmp/ (`open_dir`), which a committer holds: the file is then
        created relative to it, without walking the spool's path for each message.
        """
        path = self._file(TMP, qid)  # also checks the id: it names a file
        if tmp_dir is None:
            fd = os.open(path, _OPEN_NEW, 0o600)
        else:
            fd = os.open(qid, _OPEN_NEW, 0o600, dir_fd=tmp_dir)
        try:
            # Locked before anything is written, so that a daemon starting meanwhile
            # leaves the file alone (`clean_tmp`); the lock goes with it into the queue.
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            self._own(fd)
            view = memoryview(blob)
            while view:
                view = view[os.write(fd, view) :]
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(path)
            raise
        return fd

    def open_dir(self, where: str) -> int:
        """A descriptor of tmp/ or a queue state's directory, never through a link.

        The commit's hot path creates and renames files relative to such descriptors:
        the spool's path (in the workers /proc/self/fd/N/..., through procfs) is walked
        once, not two or three times for each message.
        """
        if where not in self._dirs:
            raise ValueError(f"bad spool state: {where}")
        return os.open(self._dirs[where], _OPEN_SUBDIR)

    def make_durable(self, fd: int) -> None:
        """Flush one file's data to stable storage before its name is published (a
        commit into hold/: see `commit`); a test makes it fail by overriding it."""
        self.syncs += 1
        os.fdatasync(fd)

    def sync_dir(self, state: QueueState) -> None:
        """Make the renames and unlinks in a state directory durable."""
        self._sync(state)

    def _sync(self, name: str) -> None:
        """fsync a directory under the root: a queue state, or status/ (not a state)."""
        fd = os.open(self.root / name, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            self.fsync_dir(fd)
        finally:
            os.close(fd)

    def fsync_dir(self, fd: int) -> None:
        """fsync(2) an open spool directory: every directory barrier of the spool, the
        group commit's too, goes through here (a test makes one fail by overriding it,
        as a failing disk does)."""
        self.syncs += 1
        os.fsync(fd)

    def sync_renamed(self, fds: list[int], dir_fd: int) -> None:
        """Make files already renamed into the directory `dir_fd` durable, their data and
        their names, with as few flushes of the disk's cache as this file system allows.

        fdatasync(file) and fsync(dir) are two barriers, and on a disk with a write-back
        cache each is a flush request (measured: 2.00 flushes per message against
        Postfix's 1.00 under s1-1K, `bench.smtp_alone --servers postfix,leafmail`).
        One file on ext4 without a journal: its fsync, which writes the new name's
        directory block with it before its one flush (`fsync_carries_new_name`). Else
        syncfs(2), which reports a write-back error of the file system that happened
        since the descriptor it is given was opened (Linux 5.8 and later), so `fds[0]`
        must be the file opened first: then it fails if any of them did not reach the
        disk. On a file system where syncfs writes metadata after its flush (ext4
        without a journal: `syncfs_is_a_barrier`), the directory's fsync then flushes
        once more, after those writes returned (two flushes a batch). Where it would not
        say (an older kernel, no syncfs) each file is fdatasync'ed and the directory
        fsync'ed, in either order the same promise: nothing is answered until every
        barrier returned.
        """
        if len(fds) == 1 and self.fsync_carries_name:
            self.syncs += 1
            os.fsync(fds[0])  # data, inode, and the directory's new entry; one flush
            return
        if _SYNCFS_CHECKED is not None:
            if _SYNCFS_CHECKED(fds[0]) == 0:
                self.syncs += 1
                if not self.syncfs_complete:  # its last writes came after its flush
                    self.fsync_dir(dir_fd)  # one flush more, after them
                return
            err = ctypes.get_errno()
            if err not in (errno.ENOSYS, errno.EINVAL):
                self.syncs += 1
                raise OSError(err, os.strerror(err))
        for fd in fds:
            self.syncs += 1
            os.fdatasync(fd)
        self.fsync_dir(dir_fd)

    def take_back(self, qid: str, state: QueueState, dir_fd: int, fd: int) -> str | None:
        """Unlink `qid` from `state` (open as `dir_fd`), whose lock the caller holds on `fd`
        (a commit whose barrier failed: `commit`, `GroupCommitter._barrier`).

        No queue runner can have it (it skips a locked file) and no mover can have
        moved it (every mover takes the lock), so the name is still this file; that is
        checked all the same. Returns None once it is gone, or a sentence naming the
        file that stays (the unlink failed too), for the SpoolError's `kept`.
        """
        try:
            if os.stat(qid, dir_fd=dir_fd, follow_symlinks=False).st_ino == os.fstat(fd).st_ino:
                os.unlink(qid, dir_fd=dir_fd)
        except FileNotFoundError:
            return None
        except OSError as exc:
            return f"{state}/{qid} stays: cannot remove it: {exc.strerror}"
        with contextlib.suppress(OSError):  # best effort: this disk just failed a barrier
            self.fsync_dir(dir_fd)
        return None

    @contextlib.contextmanager
    def _pinned(self, qid: str, state: QueueState, *, wait: bool) -> Iterator[bool]:
        """Hold the lock of the file named `state/qid`, as `locked` does for a message
        wherever it is: True while the lock is held and the name is still that file;
        False if it is gone or was moved, or (without `wait`) someone else holds it.

        For a caller that knows where the file is and must not act on it if it is not
        there any more (a rename into the queue it takes back, a copy it releases from
        hold/, a damaged file it moves to corrupt/).
        """
        path = self._file(state, qid)
        try:
            fd = os.open(path, _OPEN_READ)
        except FileNotFoundError:
            yield False
            return
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
                mine = os.lstat(path).st_ino == os.fstat(fd).st_ino
            except (BlockingIOError, FileNotFoundError):
                mine = False
            yield mine
        finally:
            os.close(fd)  # releases the flock

    def commit(
        self,
        envelope: Envelope,
        data: bytes,
        qid: str | None = None,
        *,
        state: QueueState = QueueState.QUEUE,
    ) -> str:
        """Durably spool one message now (the sendmail path); returns its queue id.

        Pass `qid` (from `new_id`) when the message's own headers must carry it, or when
        the id was recorded before the commit (a forwarded copy, `leafmail.expansion`),
        which also commits into hold/ until that record says it may go.

        The group commit's shape, for one message: tmp/QID is written and locked, renamed
        into `state`, and made durable, data and name, with one barrier (`sync_renamed`:
        one flush of the disk's cache where fdatasync plus a directory fsync were two,
        on a file system where syncfs alone is a barrier or where the file's fsync
        carries its new name);
        the lock is released only after it. Meanwhile a queue runner skips the file
        and a tool waits for it, so if the barrier fails the file is unlinked under the
        lock still held (`take_back`: nobody else can have it) before the SpoolError,
        and the caller's retry is the only copy. A crash before the barrier returned
        left no success reported, and in `state` nothing, the whole file (a duplicate
        at worst), or a name whose data did not reach the disk, which fails its
        self-check and is moved to corrupt/ when it is read. Never a loss.

        Except into hold/: there a forwarded copy's recovery (`leafmail.expansion`) takes
        a file it finds for a complete copy, which it releases instead of making a new
        one, so that file's data is made durable before its name (fdatasync, then the
        rename and the barrier: two flushes or more, each counted in `syncs`).
        """
        qid = qid or new_id()
        blob = encode(envelope, data)
        dir_fd = self.open_dir(state)
        try:
            fd = self._place(qid, blob, state, data_first=state is QueueState.HOLD)
            try:
                self.sync_renamed([fd], dir_fd)
            except OSError as exc:
                raise _spool_error(exc, self.take_back(qid, state, dir_fd, fd)) from None
            finally:
                os.close(fd)  # releases the lock: durable now, or taken back
        finally:
            os.close(dir_fd)
        return qid

    def _place(self, qid: str, blob: bytes, state: QueueState, *, data_first: bool) -> int:
        """tmp/QID written, locked and renamed into `state` (its name not yet durable;
        with `data_first`, its data is); its open descriptor, which holds the lock. An
        OSError leaves nothing behind (`write_tmp` removes a partial file itself)."""
        fd = self.write_tmp(qid, blob)
        try:
            if data_first:
                self.make_durable(fd)
            os.rename(self._file(TMP, qid), self._file(state, qid))  # locked: write_tmp
        except BaseException:
            os.close(fd)
            self.discard_tmp(qid)
            raise
        return fd

    def discard_tmp(self, qid: str) -> None:
        with contextlib.suppress(OSError):
            os.unlink(self._file(TMP, qid))

    def clean_tmp(self) -> int:
        """Remove files left in tmp/ by a crash (none of them was answered 250).

        Never through a symbolic link: tmp/ itself is opened with O_NOFOLLOW (a link
        there is an error, not a directory to empty), and an entry is unlinked by name
        relative to that descriptor, which removes a link, never what it names.

        A file whose lock someone holds is being committed by a process that runs now
        (`write_tmp` locks it before it writes): a `leafmail sendmail` or `flush
        --no-daemon` that found no daemon a moment before this one started. It is left
        to that process, which renames it into the queue or removes it; a crash
        releases the lock, and the next start removes what it left.

        A name whose file is also named in a queue state while its link count says one
        is kept (see `tmp_leftovers`): a power cut after a lone commit's one fsync on
        ext4 without a journal leaves the rename's removal from tmp/ unwritten, and
        until e2fsck corrects the count, unlinking that name would free the committed
        message's inode under its queue name.
        """
        count = 0
        with _state_dir(self.root, TMP) as fd:
            for name in _plain_entries(fd):
                with contextlib.suppress(OSError):
                    if self._committed_under_one_link(name, os.lstat(name, dir_fd=fd)):
                        continue
                    count += _unlink_unless_locked(name, fd)
        return count

    def tmp_leftovers(self) -> list[str]:
        """Names in tmp/ that `clean_tmp` keeps because their file is also committed
        under one counted link (a file system for e2fsck)."""
        with _state_dir(self.root, TMP) as fd:
            kept = []
            for name in _plain_entries(fd):
                with contextlib.suppress(OSError):
                    if self._committed_under_one_link(name, os.lstat(name, dir_fd=fd)):
                        kept.append(name)
            return kept

    def _committed_under_one_link(self, name: str, info: os.stat_result) -> bool:
        """True if tmp/NAME's file is a message in a queue state that counts one link.

        Two names with one counted link is a file system that needs e2fsck; with the
        count right (two), the tmp/ name is an ordinary leftover of the rename.
        """
        if not stat.S_ISREG(info.st_mode) or info.st_nlink != 1:
            return False
        for state in QueueState:
            try:
                other = os.lstat(self._dirs[state] + "/" + name)
            except (OSError, ValueError):
                continue
            if (other.st_dev, other.st_ino) == (info.st_dev, info.st_ino):
                return True
        return False

    # -- reading ------------------------------------------------------------------------
    def ids(self, state: QueueState = QueueState.QUEUE) -> list[str]:
        """Queue ids in a state, oldest first (junk and symlinks are left out)."""
        return sorted(name for name in self.scan(state) if isinstance(name, str))

    def scan(self, state: QueueState) -> Iterator[str | Junk]:
        """What a state directory holds, in directory order, as it is read.

        A regular file with a queue id for a name yields that id; anything else (a
        symlink, a directory, a stray file) yields a `Junk`. Nothing is sorted or kept,
        so listing a queue of any size costs constant memory. A symlink is never
        followed: its target is not the spool's, and reading or deleting through it
        would touch a file someone else chose.
        """
        if state not in _QUEUE_STATES:
            raise ValueError(f"unknown spool state {state!r}")
        with os.scandir(self._dirs[state]) as entries:
            for entry in entries:
                yield _classify(state, entry)

    def junk(self, state: QueueState, name: str) -> Junk | None:
        """The entry `state/name` if it is junk (not a message file), else None."""
        if state not in _QUEUE_STATES or name in ("", ".", "..") or "/" in name or "\0" in name:
            return None
        try:
            info = os.lstat(f"{self._dirs[state]}/{name}")
        except (OSError, ValueError):
            return None
        if stat.S_ISREG(info.st_mode) and valid_id(name):
            return None
        return Junk(state, name, _junk_reason(info.st_mode, name), info.st_size, info.st_mtime)

    def remove_junk(self, junk: Junk) -> None:
        """Unlink a junk entry itself: a symlink goes, never its target.

        A directory is removed only when empty (rmdir); anything in it is for a human.
        """
        path = f"{self._dirs[junk.state]}/{junk.name}"
        if stat.S_ISDIR(os.lstat(path).st_mode):
            os.rmdir(path)
        else:
            os.unlink(path)
        self.sync_dir(junk.state)

    def find(self, qid: str) -> QueueState | None:
        """The state a message is in, or None; only a regular file is a message.

        A message is in exactly one state directory at every instant (rename is atomic),
        but a look through the directories can still miss one that another process
        moves meanwhile from a directory not yet looked in to one already passed
        (`leafmail release` moves hold/ -> queue/ behind a look that passed queue/), and
        a look taken off the CPU between two directories can be passed by several moves.
        So a miss is looked for once more while no move can happen: `move` renames under
        a shared flock of the spool's root and this last look holds it exclusively. Only
        a message that is really gone pays for it (an open, two flocks and a close).
        """
        if not valid_id(qid):
            return None
        state = self._look(qid)
        if state is None:
            with self._moves_stopped():
                state = self._look(qid)
        return state

    def _look(self, qid: str) -> QueueState | None:
        """One look through the state directories, in `QueueState`'s order."""
        for state in QueueState:
            try:
                if stat.S_ISREG(os.lstat(self._file(state, qid)).st_mode):
                    return state
            except FileNotFoundError:
                continue
        return None

    @contextlib.contextmanager
    def _moving(self) -> Iterator[None]:
        """Hold the spool root's flock shared around a move's rename (moves do not wait
        for each other, only for an exact look: `_moves_stopped`).

        The root is opened anew each time: a descriptor kept across a fork would share
        its lock with the child, and the two would no longer exclude each other.
        """
        fd = os.open(self.root, _OPEN_DIR)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH)
            yield
        finally:
            os.close(fd)  # releases the flock

    @contextlib.contextmanager
    def _moves_stopped(self) -> Iterator[None]:
        """Hold the spool root's flock exclusively, so that no move happens meanwhile.

        It waits at most `STOP_WAIT` (a child forked during a rename keeps a copy of
        the mover's descriptor, and its shared lock, until it closes it); past that the
        caller looks anyway, which is as good as a look without the lock.
        """
        fd = os.open(self.root, _OPEN_DIR)
        try:
            deadline = time.monotonic() + STOP_WAIT
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        break
                    time.sleep(0.001)  # a rename holds it for microseconds
            yield
        finally:
            os.close(fd)  # releases the flock

    def get(self, qid: str, state: QueueState | None = None) -> SpooledMessage:
        """Load and check a message; a damaged file goes to corrupt/ (CorruptMessage).

        Pass `state` when it is known (under the message's lock) to skip the lookup.
        """
        fd = self._held.get(qid)  # locked: read through the lock's descriptor
        if state is None and fd is None:  # unlocked: it may move while it is looked up
            state, blob = self._find_and_read(qid)
        else:
            state = state or self.find(qid)
            if state is None or state == QueueState.CORRUPT:
                raise KeyError(qid)
            blob = (
                _read_all(self._file(state, qid)) if fd is None else _read_fd(fd, self._sizes[qid])
            )
        try:
            envelope, data = decode(blob)
        except ValueError as exc:
            self._set_aside(qid, state)
            raise CorruptMessage(f"{qid}: {exc}") from None
        return SpooledMessage(qid, state, envelope, data)

    def _set_aside(self, qid: str, state: QueueState) -> None:
        """Move a file that failed its self-check to corrupt/, under its lock.

        Read under the caller's lock, it moves at once. Read without it (`leafmail
        show`, a listing), it moves only if its lock is free: a holder may be moving
        it (a tool, `settle_duplicates`), and a move behind its back breaks what the
        holder checked. A file someone holds is left to them; nothing delivers it
        unread (the runner checks every file under its lock), so the next reader sets
        it aside.
        """
        if qid in self._held:
            self.move(qid, state, QueueState.CORRUPT)
            return
        with self._pinned(qid, state, wait=False) as mine:
            if mine:
                self.move(qid, state, QueueState.CORRUPT)

    def _find_and_read(self, qid: str) -> tuple[QueueState, bytes]:
        """Look a message up and read it, unlocked; KeyError if it is not in the spool.

        A message moved by another process between the look-up and the open is looked
        up and opened again with moves stopped (`_open_found`), so `leafmail show` finds
        a message the runner defers or a tool holds at that moment.
        """
        for attempt in range(_READ_TRIES):
            try:
                found = self._open_found(qid, exact=attempt > 0)
            except FileNotFoundError:
                continue  # moved (or removed) between the look-up and the open
            if found is None:
                break
            return found[0], _read_open(found[1])
        raise KeyError(qid)

    def _open_found(self, qid: str, *, exact: bool) -> tuple[QueueState, int] | None:
        """Look a message up and open its file: (state, descriptor), or None if it is
        gone or corrupt. FileNotFoundError if it went between the look and the open:
        moved, unless `exact`, which holds moves off from the look to the open (a
        mover that is quicker than this process, say while it waits for the CPU, could
        otherwise win every time); removed, either way.
        """
        if not exact:
            state = self.find(qid)
            if state is None or state == QueueState.CORRUPT:
                return None
            return state, os.open(self._file(state, qid), _OPEN_READ)
        with self._moves_stopped():
            state = self._look(qid)  # exact: no move can pass it now
            if state is None or state == QueueState.CORRUPT:
                return None
            return state, os.open(self._file(state, qid), _OPEN_READ)

    def summary(self, qid: str, state: QueueState) -> MessageSummary:
        """What a listing shows of a message: sender, recipients and size.

        The file is checked as `get` checks it (a damaged one goes to corrupt/, raising
        CorruptMessage), but the envelope is only peeked at, which makes listing a long
        queue several times cheaper than loading every message.
        """
        blob = _read_all(self._file(state, qid))
        try:
            env, start, end = _checked(blob)
            sender, rcpts = _peek_envelope(env)
        except ValueError as exc:
            self._set_aside(qid, state)
            raise CorruptMessage(f"{qid}: {exc}") from None
        return MessageSummary(qid, state, sender, rcpts, end - start)

    def messages(
        self, state: QueueState = QueueState.QUEUE
    ) -> Iterator[SpooledMessage | CorruptMessage]:
        """Every message in a state; damaged ones are yielded as CorruptMessage, not raised."""
        for qid in self.ids(state):
            try:
                yield self.get(qid)
            except CorruptMessage as exc:
                yield exc
            except (KeyError, FileNotFoundError):
                continue

    def move(self, qid: str, src: QueueState, dst: QueueState) -> None:
        """Move a message between states, durably (the destination directory's fsync);
        the rename holds the root's shared flock, so an exact `find` can stop moves.

        The caller holds the message's lock (`locked`; `move_from` takes it): what
        `settle_duplicates` and `_where_locked` check under that lock must stay true.

        Only `dst` is fsynced. On a journalling filesystem (ext4, XFS) the rename's two
        directory changes are one transaction, which that fsync commits, so fsyncing
        `src` too would buy nothing; it measured 1.4x-2x the wall time of a move here.
        Where a crash can still leave the file named in both directories (a filesystem
        that writes the two changes apart), `settle_duplicates` keeps one at the next
        start, so the message is never delivered twice.
        """
        with self._moving():  # (see `find`)
            os.rename(self._file(src, qid), self._file(dst, qid))
        self.sync_dir(dst)

    def move_from(self, qid: str, src: QueueState, dst: QueueState) -> bool:
        """Move a message from `src` to `dst` under its lock, waiting for a holder;
        False if it is not (any more) in `src`. For a caller that does not hold the
        message's lock (and must not: flock would wait for itself)."""
        with self._pinned(qid, src, wait=True) as mine:
            if mine:
                self.move(qid, src, dst)
        return mine

    def settle_duplicates(self) -> list[tuple[str, QueueState]]:
        """Keep one of each message a crash left in two state directories; run at start.

        The copy in the later state of `QueueState`'s order stays (corrupt over held over
        deferred over queued), and the earlier one is unlinked. A message that failed its
        self-check must never be sent. A hold, which an operator or a forwarded copy's
        record asked for, is not undone by a crash: the worst case is that a release the
        crash interrupted is done again (by the operator, or by the forwarding record's
        recovery, which releases a copy it finds held). Between deferred/ and queue/ the
        status record, shared by both names, decides when the message goes, so keeping
        deferred/ loses nothing. Returns (queue id, the state whose name was removed).
        """
        seen: dict[str, QueueState] = {}
        removed: list[tuple[str, QueueState]] = []
        for state in QueueState:  # the winner of a pair is always met second
            for qid in self.ids(state):
                loser = seen.get(qid)
                seen[qid] = state
                if loser is not None and self._drop_copy(qid, loser, state):
                    removed.append((qid, loser))
        return removed

    def _drop_copy(self, qid: str, loser: QueueState, winner: QueueState) -> bool:
        """Unlink `loser/qid` while `winner/qid` is there too; False if it cannot be
        done safely now (a copy is gone, locked or replaced meanwhile).

        Both names are locked (one lock when they are one file, as a crash leaves them)
        and checked to still name the locked files, so no queue tool or runner moves
        either while the loser goes: the last copy of a message is never removed.
        """
        fds: list[int] = []
        try:
            for state in (loser, winner):
                fd = os.open(self._file(state, qid), _OPEN_READ)
                fds.append(fd)
                if len(fds) == 1 or os.fstat(fd).st_ino != os.fstat(fds[0]).st_ino:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            for state, fd in zip((loser, winner), fds, strict=True):
                if os.lstat(self._file(state, qid)).st_ino != os.fstat(fd).st_ino:
                    return False
            os.unlink(self._file(loser, qid))
        except OSError:  # gone, or busy (BlockingIOError): left for the next start
            return False
        finally:
            for fd in fds:
                os.close(fd)
        self.sync_dir(loser)
        return True

    def remove(self, qid: str, *, durable: bool = True) -> None:
        """Delete a message (and its status) from whatever state it is in.

        `durable=False` skips the directory fsync: for a message delivered to every
        recipient, a crash that undoes the unlink only means it is sent again (at least
        once), so the fsync would buy nothing but cost a disk flush per message.
        """
        state = self.find(qid)
        if state is None:
            raise KeyError(qid)
        if qid in self._held:  # the caller's lock
            os.unlink(self.path(state, qid))
        else:  # (`leafmail delete` of a corrupt file, which `locked` never yields)
            with self._pinned(qid, state, wait=True) as mine:
                if not mine:
                    raise KeyError(qid)  # moved or removed meanwhile
                os.unlink(self.path(state, qid))
        self._unlink_status(qid)
        if durable:
            self.sync_dir(state)

    def discard_delivered(self, qid: str, state: QueueState) -> None:
        """Remove a message whose every recipient has a final result; hold its lock.

        Like `remove(durable=False)` it skips the directory fsync (a crash that undoes
        the unlink only sends the message again), and it knows the state, so it costs
        no lookups. The unlinks run on the caller's thread (handing each to a helper
        thread measured slower: the event loop then waits for the GIL after each of its
        own system calls), but the last close, which frees the file's blocks and can wait
        for the disk, goes to the `reaper` when there is one.
        """
        fd = self._held.pop(qid, None)
        try:
            os.unlink(self._file(state, qid))
        except BaseException:
            if fd is not None:
                os.close(fd)
            raise
        if fd is not None:
            if self.reaper is not None:
                self.reaper.close(fd)
            else:
                os.close(fd)
        if qid in self._unrecorded:
            # Read under this lock and found absent, never written since: nothing to
            # unlink. (A QID.new alone, from a first write killed half-way, is an
            # orphan clean_status removes at the next start, as any crash leftover.)
            self._unrecorded.discard(qid)
            return
        self._unlink_status(qid)

    def _unlink_status(self, qid: str) -> None:
        """Remove a message's status record and a QID.new a killed write_status left.

        A status left behind (an unlink failed) is an orphan that clean_status removes.
        """
        for path in (f"{self._status_dir}/{qid}", f"{self._status_dir}/{qid}.new"):
            with contextlib.suppress(OSError):
                os.unlink(path)

    # -- delivery state -----------------------------------------------------------------
    def read_status(self, qid: str) -> bytes | None:
        """The status record of a message, or None before its first delivery attempt."""
        if not valid_id(qid):
            raise ValueError(f"bad queue id {qid!r}")
        try:
            return _read_all(f"{self._status_dir}/{qid}")
        except FileNotFoundError:
            if qid in self._held:  # under the lock, so it stays absent until we write one
                self._unrecorded.add(qid)
            return None

    def write_status(self, qid: str, blob: bytes) -> None:
        """Replace a message's status record atomically and durably (hold its lock).

        RecordNotDurable if the record is in place but its directory's fsync failed."""
        if not valid_id(qid):
            raise ValueError(f"bad queue id {qid!r}")
        self._unrecorded.discard(qid)
        final = self.root / STATUS / qid
        new = final.with_name(qid + ".new")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(new)  # left by a crash; only the lock holder writes here
        fd = os.open(new, _OPEN_NEW, 0o600)
        try:
            try:
                self._own(fd)
                view = memoryview(blob)
                while view:
                    view = view[os.write(fd, view) :]
                os.fdatasync(fd)
            finally:
                os.close(fd)
            os.rename(new, final)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(new)  # a full disk must not leave a half record behind
            raise
        try:
            self._sync(STATUS)
        except OSError as exc:
            raise RecordNotDurable(exc.errno, f"status/{qid} not synced: {exc.strerror}") from None

    def clean_status(self) -> int:
        """Remove status records whose message is gone (left by a crash or a delete).

        That includes the QID.new of a write_status a SIGKILL cut short: no later
        write or removal of that message will come to take it away.
        """
        count = 0
        with _state_dir(self.root, STATUS) as fd:
            for name in _plain_entries(fd):
                qid = name.removesuffix(".new")
                if valid_id(qid) and self.find(qid) is None:
                    with contextlib.suppress(OSError):
                        os.unlink(name, dir_fd=fd)
                        count += 1
        return count

    @contextlib.contextmanager
    def locked(self, qid: str, *, wait: bool = False) -> Iterator[QueueState | None]:
        """Hold a message's lock; yields its state, or None if it is gone (or busy).

        With `wait=False` a message someone else holds counts as busy and yields None
        (the runner skips it); with `wait=True` this blocks until the holder is done,
        which the queue runner's per-attempt deadline bounds.
        """
        held = self._acquire(qid, wait)
        if held is None:
            yield None
            return
        fd, state, size = held
        self._held[qid] = fd
        self._sizes[qid] = size
        try:
            yield state
        finally:
            self._sizes.pop(qid, None)
            self._unrecorded.discard(qid)
            fd_left = self._held.pop(qid, None)
            if fd_left is not None:  # not handed to discard_delivered
                os.close(fd_left)  # closing the descriptor releases the flock

    def size(self, qid: str, state: QueueState) -> int:
        """The size of a message's file (known without a system call while it is locked)."""
        size = self._sizes.get(qid)
        return os.stat(self._file(state, qid)).st_size if size is None else size

    def _acquire(self, qid: str, wait: bool) -> tuple[int, QueueState, int] | None:
        """Lock the file, then check it is still where it was: it may move meanwhile.

        Returns the locked descriptor, the state and the file's size (a committed file
        never changes, so the size stays true while the lock is held)."""
        for attempt in range(8):
            try:
                found = self._open_found(qid, exact=attempt > 0)
            except FileNotFoundError:
                continue
            if found is None:
                return None
            state, fd = found
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
            except BlockingIOError:
                os.close(fd)
                return None
            info = os.fstat(fd)
            where = self._where_locked(qid, state, info.st_ino)
            if where is not None:
                return fd, where, info.st_size
            os.close(fd)
        return None

    def _where_locked(self, qid: str, state: QueueState, ino: int) -> QueueState | None:
        """The state whose `qid` is the locked file `ino`: `state`, as looked up before
        the lock, or wherever a move made while the lock was awaited put it (no move
        comes after: movers hold the lock). None if it is gone or corrupt.

        Looking again, instead of starting over, is what lets a queue tool get a
        message that the runner or another tool keeps moving: starting over, it could
        lose the race for the lock every time and call the message gone.
        """
        with contextlib.suppress(FileNotFoundError):
            if os.stat(self._file(state, qid)).st_ino == ino:
                return state
        moved = self.find(qid)
        if moved is None or moved == QueueState.CORRUPT:
            return None
        with contextlib.suppress(FileNotFoundError):
            if os.stat(self._file(moved, qid)).st_ino == ino:
                return moved
        return None


@dataclass(frozen=True)
class Junk:
    """Something in a state directory that is not a message file, and why.

    `size` and `mtime` are the entry's own (lstat), never a symlink target's.
    """

    state: QueueState
    name: str
    why: str
    size: int = 0
    mtime: float = 0.0

    @property
    def ref(self) -> str:
        """How the queue tools name it: STATE/NAME (a queue id has no slash)."""
        return f"{self.state}/{self.name}"


def _classify(state: QueueState, entry: os.DirEntry[str]) -> str | Junk:
    """A queue id for a message file, a Junk for anything else (d_type; no stat)."""
    name = entry.name
    if valid_id(name) and entry.is_file(follow_symlinks=False):
        return name
    try:
        info = entry.stat(follow_symlinks=False)
    except OSError:
        return Junk(state, name, "vanished while listed")
    return Junk(state, name, _junk_reason(info.st_mode, name), info.st_size, info.st_mtime)


def _junk_reason(mode: int, name: str) -> str:
    if stat.S_ISLNK(mode):
        return "a symbolic link, never followed"
    if stat.S_ISDIR(mode):
        return "a directory, not a message file"
    if not stat.S_ISREG(mode):
        return "not a regular file"
    return "not a queue file name"


TMP_CREATING = 60.0  # seconds an empty tmp/ file is taken as one `write_tmp` just made


def _being_created(info: os.stat_result) -> bool:
    """Whether a tmp/ file is one `write_tmp` has made and not yet locked: empty, and
    made a moment ago (an empty one a writer left when it died goes at a later start).
    Between its create and its lock the writer has written nothing, so the lock of
    every file with data settles it; this one must not even be locked, or the writer's
    LOCK_NB would fail that moment."""
    fresh = time.time() - info.st_ctime < TMP_CREATING
    return stat.S_ISREG(info.st_mode) and info.st_size == 0 and fresh


def _unlink_unless_locked(name: str, dir_fd: int) -> int:
    """Unlink tmp/NAME (relative to `dir_fd`) unless a writer holds its lock: 1 if it
    went, 0 if not. A symbolic link or other non-file goes without a look at what it
    names (O_NOFOLLOW refuses to open it: unlinked as it is)."""
    try:
        fd = os.open(name, _OPEN_READ | os.O_NONBLOCK, dir_fd=dir_fd)
    except OSError:
        os.unlink(name, dir_fd=dir_fd)
        return 1
    try:
        if _being_created(os.fstat(fd)):
            return 0  # no lock taken: the writer's own comes next
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return 0  # being committed right now
    finally:
        os.close(fd)  # (a lock taken is released: nobody opens a leftover to write)
    os.unlink(name, dir_fd=dir_fd)
    return 1


def _read_all(path: str) -> bytes:
    """A whole file, never through a symlink, in as few system calls as it takes.

    Listing a long queue reads two small files per message, so the buffered-file layer
    (an fdopen, an fstat, a read and a read that finds the end) is skipped: a read that
    returns less than asked is the end of a regular file.
    """
    return _read_open(os.open(path, _OPEN_READ))


def _read_open(fd: int) -> bytes:
    """The whole of an open file, as `_read_all` reads it; closes `fd`."""
    try:
        size = _FIRST_READ
        chunks = []
        while True:
            chunk = os.read(fd, size)
            if chunk:
                chunks.append(chunk)
            if len(chunk) < size:
                return chunks[0] if len(chunks) == 1 else b"".join(chunks)
            size = min(size * 4, _MAX_READ)
    finally:
        os.close(fd)


def _read_fd(fd: int, size: int) -> bytes:
    """`size` bytes from the start of an open file (pread: the offset is left alone).

    A short read is returned as it is: the self-check then reports the file truncated.
    """
    chunks, offset = [], 0
    while offset < size:
        chunk = os.pread(fd, min(size - offset, _MAX_READ), offset)
        if not chunk:
            break
        chunks.append(chunk)
        offset += len(chunk)
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def _foreign_owner(root: Path) -> tuple[int, int] | None:
    """(uid, gid) of a spool root owned by someone else, when we are root; else None."""
    if os.geteuid() != 0:
        return None
    try:
        info = os.stat(root)
    except OSError:
        return None
    return None if info.st_uid == 0 else (info.st_uid, info.st_gid)


def arrival_time(qid: str) -> float:
    """When a message was spooled: its id starts with the arrival time in nanoseconds."""
    return int(qid[:16], 16) / 1e9


def control_path(root: str | Path) -> Path:
    """The control socket of the daemon of the spool at `root`, without opening it
    (`leafmail sendmail` asks whether a daemon serves a spool it has not created)."""
    return Path(root) / "control"


@contextlib.contextmanager
def _state_dir(root: Path, name: str) -> Iterator[int]:
    """A descriptor of the state directory `name`, refusing a symbolic link there."""
    opening = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
    root_fd = os.open(root, opening)
    try:
        try:
            fd = os.open(name, opening | os.O_NOFOLLOW, dir_fd=root_fd)
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                what = f"{root}/{name} is not a directory (a symlink?)"
                raise SpoolError(exc.errno, what) from None
            raise
    finally:
        os.close(root_fd)
    try:
        yield fd
    finally:
        os.close(fd)


def _plain_entries(dir_fd: int) -> list[str]:
    """Names in a directory that are not directories (links count as plain: they are
    unlinked themselves); scandir on a descriptor never follows a link to list it."""
    with os.scandir(dir_fd) as entries:
        return [e.name for e in entries if not e.is_dir(follow_symlinks=False)]


@dataclass(slots=True)
class _Placed:
    """A message renamed into its queue state, not yet durable: `fd` holds its lock, so
    no runner or tool takes it until the barrier has returned and `fd` is closed."""

    qid: str
    fd: int
    order: int  # when its file was opened: the batch's barrier uses the earliest's


@dataclass(slots=True)
class _Request:
    """A placed message handed to the sync thread, and the session waiting for it."""

    placed: _Placed
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[str]


class GroupCommitter:
    """Commits messages from many sessions in batches that share one durability barrier.

    Each message is written into tmp/, locked (flock on its open descriptor) and renamed
    into the queue state at once (`_place`): by the session's own loop for one of up to
    `LOOP_WRITE_MAX` bytes (page cache and metadata only, no wait for the disk), in a
    thread for a bigger one. The sync thread, woken once a turn of the owner's loop
    (`_submit`), then takes every message waiting and makes them durable, data and
    names, with one barrier (`Spool.sync_renamed`: one syncfs(2), one flush of the
    disk's cache), and wakes each loop once with its sessions' answers; the loop closes
    the descriptors, which releases the locks. Two hand-overs and one barrier a batch,
    where a pipeline of two barriers (the data's, then the directory's) cost four
    hand-overs and two flushes.

    Until its barrier returned a message is in the queue state but locked: a queue runner
    skips a locked file (`Spool.locked` with LOCK_NB), a tool waits for it. If the
    barrier fails, every message of the batch is unlinked under the lock still held
    (`Spool.take_back`: nobody else can have it) before the sessions hear 4xx, so each
    client's resend is the only copy. A crash before the barrier returned: no 250 was
    sent, and the clients send again. What the crash left in the queue is then nothing,
    whole files (a duplicate at worst) or names whose data did not reach the disk (the
    order of the disk's writes is its own), which fail their self-check and go to
    corrupt/ when the runner reads them. Never a loss: the 250 comes after the barrier.

    With `sessions` (how many sessions its owner has open on the loop that commits, a
    count the owner keeps: `leafmail.session.OpenSessions`), a small message of the only
    session open, with nothing of the committer's in flight, is made durable on the
    loop itself, with no thread at all (`_commit_on_loop`).
    """

    def __init__(
        self,
        spool: Spool,
        max_batch: int = 256,
        state: QueueState = QueueState.QUEUE,
        *,
        sessions: Callable[[], int] | None = None,
    ) -> None:
        self.spool = spool
        self.max_batch = max_batch
        # The owner's count of open sessions, all on one loop (None: never on the loop).
        self.sessions = sessions
        self._pending = 0  # commits in the threads (counted on the owner's one loop)
        self.state = state
        self.batches = 0
        self.committed = 0
        self._dir = spool.open_dir(state)
        self._tmp = spool.open_dir(TMP)  # files are created and renamed relative to these
        self._opened = itertools.count()  # next() is atomic: the loop and executor threads take
        # Requests for the sync thread (None: stop), and its wake-ups, which say "look".
        self._requests: collections.deque[_Request | None] = collections.deque()
        self._wake: queue.SimpleQueue[bool] = queue.SimpleQueue()
        self._wake_due = False  # a wake-up is scheduled at the end of the owner's loop turn
        self._thread = threading.Thread(target=self._sync_stage, name="leafmail-write", daemon=True)
        self._thread.start()

    async def commit(self, envelope: Envelope, data: bytes, qid: str | None = None) -> str:
        """Spool one message durably; returns its queue id or raises SpoolError.

        Pass `qid` (from `new_id`) when the id must be known before the commit, e.g. for
        the message's own Received header.
        """
        qid = qid or new_id()
        if len(data) > LOOP_WRITE_MAX:
            return await self._commit_big(qid, envelope, data)
        placed = self._place(qid, envelope, data)
        if self._alone_here():
            self._commit_on_loop(placed)
            return qid
        return await self._handed_over(placed)

    async def _commit_big(self, qid: str, envelope: Envelope, data: bytes) -> str:
        """A message over `LOOP_WRITE_MAX`: written and placed by a thread of the loop's
        executor, which hands it to the sync thread itself. A session cancelled meanwhile
        thus never leaves a placed file locked and unsynced: the sync thread makes it
        durable and the loop releases it, answering nobody (a duplicate at worst)."""
        loop = _running_loop()
        future: asyncio.Future[str] = loop.create_future()
        self._pending += 1
        try:
            loop.run_in_executor(None, self._place_off_loop, qid, envelope, data, future)
            return await future
        finally:
            self._pending -= 1

    def _place_off_loop(
        self, qid: str, envelope: Envelope, data: bytes, future: asyncio.Future[str]
    ) -> None:
        """(executor thread) Place the message and hand it to the sync thread; a failure
        goes to the session's future."""
        loop = future.get_loop()
        try:
            placed = self._place(qid, envelope, data)
        except Exception as exc:  # whatever it is, the session must hear it
            with contextlib.suppress(RuntimeError):  # a closed loop: nobody waits
                loop.call_soon_threadsafe(_fail_future, future, exc)
            return
        self._submit(_Request(placed, loop, future))

    async def _handed_over(self, placed: _Placed) -> str:
        """Hand a placed message to the sync thread; its answer."""
        loop = _running_loop()
        future: asyncio.Future[str] = loop.create_future()
        self._pending += 1
        try:
            self._submit(_Request(placed, loop, future), loop)
            return await future
        finally:
            self._pending -= 1

    def _submit(self, request: _Request, loop: asyncio.AbstractEventLoop | None = None) -> None:
        """Queue a placed message for the sync thread, and wake it: at once, or, from the
        owner's one loop (`sessions`), once at the end of the loop's turn.

        The messages a loop's turn places then share a barrier: waking the thread at the
        first one, as soon as the loop let go of the interpreter lock (its next system
        call, often placing the second) the thread would take a batch of one and start
        its barrier, and the others would wait for it to end and then their own. The
        message is queued here, not at the end of the turn, so `close` still finds
        every message placed before it, whatever becomes of the session.
        """
        self._requests.append(request)
        if loop is None or self.sessions is None:
            self._wake.put(True)
        elif not self._wake_due:
            self._wake_due = True
            loop.call_soon(self._wake_now)

    def _wake_now(self) -> None:
        """(the owner's loop, end of a turn) Wake the sync thread for the turn's messages."""
        self._wake_due = False
        self._wake.put(True)

    def _alone_here(self) -> bool:
        """Whether the committing session is its owner's only one open and nothing of
        the committer is in flight: then a barrier on the loop blocks nobody else."""
        sessions = self.sessions
        return sessions is not None and self._pending == 0 and sessions() <= 1

    def _place(self, qid: str, envelope: Envelope, data: bytes) -> _Placed:
        """tmp/QID written, locked and renamed into the queue state (not yet durable);
        or SpoolError, with nothing left behind."""
        order = next(self._opened)
        try:
            fd = self.spool.write_tmp(qid, encode(envelope, data), self._tmp)
        except OSError as exc:
            self.spool.discard_tmp(qid)  # a partial file, if one was left: never answered
            raise _spool_error(exc) from None
        try:
            os.rename(qid, qid, src_dir_fd=self._tmp, dst_dir_fd=self._dir)  # locked: write_tmp
        except OSError as exc:
            os.close(fd)
            self.spool.discard_tmp(qid)
            raise _spool_error(exc) from None
        return _Placed(qid, fd, order)

    def close(self) -> None:
        """Finish the requests already queued, then stop the thread."""
        self._requests.append(None)
        self._wake.put(True)
        self._thread.join()
        os.close(self._dir)
        os.close(self._tmp)

    # -- the barrier ----------------------------------------------------------------------
    def _commit_on_loop(self, placed: _Placed) -> None:
        """The barrier of one placed message on the session's own loop, with no thread.

        For the only session open in its owner (`sessions`) with no other commit of
        ours in flight, and a message written on the loop (`LOOP_WRITE_MAX`). The
        thread hands the message over twice (loop -> thread, thread -> loop for the
        answer), and when the two run on different CPUs each hand-over is a cross-CPU
        wake-up (dear in a VM: +30 to +400 µs a message, measured with `taskset`, see
        bench/RESULTS.md). Here there is nobody to hand over to.

        While the barrier runs the loop does nothing else. Nobody waits on it but this
        session, which waits for the barrier anyway: its owner's other sessions are none
        (a session that opens meanwhile waits in the listen backlog, or is accepted by
        another worker, whose loop is not blocked), and its timers (the minimum data
        rate, the idle timeout) fire late by one barrier, not early. On a sick disk whose
        barrier takes seconds, it is this worker that waits those seconds, with one
        session, instead of its thread: the next session that opens meanwhile is served
        by another worker or after the barrier, and then through the thread. Crash and
        failure semantics are the thread's (see the class).
        """
        try:
            failed = self._barrier([placed])
        finally:
            _release([placed])
        if failed is not None:
            raise failed[placed.qid]

    def _sync_stage(self) -> None:
        """(thread) Sleep until woken, then make everything queued durable, batch by batch.
        A wake-up for requests an earlier batch already took finds none: harmless."""
        while True:
            self._wake.get()
            while self._requests:
                batch, stop = _drain(self._requests, self.max_batch)
                if batch:
                    self._sync_batch(batch)
                if stop:
                    return

    def _sync_batch(self, batch: list[_Request]) -> None:
        """(thread) One barrier for the batch, then one wake-up of each loop."""
        failed = self._barrier([req.placed for req in batch])
        if failed is None:
            _in_loops(batch, _answer)
        else:
            _in_loops(batch, functools.partial(_refuse, errors=failed))

    def _barrier(self, batch: list[_Placed]) -> dict[str, SpoolError] | None:
        """Make a placed batch durable; None, or each message's SpoolError once every
        one of them was taken back out of the queue under its lock (or the error says
        which file stayed)."""
        earliest = min(batch, key=lambda placed: placed.order)  # syncfs reports since its open
        fds = [earliest.fd] + [placed.fd for placed in batch if placed is not earliest]
        try:
            self.spool.sync_renamed(fds, self._dir)
        except OSError as exc:
            return {
                placed.qid: _spool_error(
                    exc, self.spool.take_back(placed.qid, self.state, self._dir, placed.fd)
                )
                for placed in batch
            }
        self.batches += 1
        self.committed += len(batch)
        return None


_T = TypeVar("_T")


def _drain(source: collections.deque[_T | None], most: int) -> tuple[list[_T], bool]:
    """Take up to `most` of the items waiting, oldest first; True once None was seen.
    (popleft and append are atomic: the loops and executor threads append meanwhile.)"""
    items: list[_T] = []
    while source and len(items) < most:
        item = source.popleft()
        if item is None:
            return items, True
        items.append(item)
    return items, False


def _spool_error(exc: OSError, kept: str | None = None) -> SpoolError:
    """The SpoolError for `exc`; `kept` says what stays of the message (`Spool.take_back`)."""
    text = f"cannot spool: {exc.strerror}"
    if kept is not None:
        text += f"; {kept}, so it may also be delivered besides the sender's retry"
    error = SpoolError(exc.errno, text)
    error.kept = kept
    return error


def _release(batch: list[_Placed]) -> None:
    """Close the messages' files, which releases their locks: durable now, or taken back.
    A close(2) error is not a failure of the commit (the barrier reported the writes)."""
    for placed in batch:
        fd, placed.fd = placed.fd, -1
        if fd >= 0:
            with contextlib.suppress(OSError):
                os.close(fd)


def _running_loop() -> asyncio.AbstractEventLoop:
    """The committing session's loop. asyncio is imported here, where a loop runs and it
    is loaded already, not with the module: the queue tools and `leafmail sendmail`
    import this module, and asyncio would cost each of their runs some 40 ms of CPU."""
    import asyncio

    return asyncio.get_running_loop()


def _fail_future(future: asyncio.Future[str], error: BaseException) -> None:
    if not future.done():
        future.set_exception(error)


def _answer(requests: list[_Request]) -> None:
    """(loop) The batch is durable: release the locks, then answer the sessions."""
    _release([req.placed for req in requests])
    for req in requests:
        if not req.future.done():
            req.future.set_result(req.placed.qid)


def _refuse(requests: list[_Request], errors: dict[str, SpoolError]) -> None:
    """(loop) The barrier failed: release the locks, then each session hears its error."""
    _release([req.placed for req in requests])
    for req in requests:
        if not req.future.done():
            req.future.set_exception(errors[req.placed.qid])


def _in_loops(requests: list[_Request], then: Callable[[list[_Request]], None]) -> int:
    """Run `then(part)` in each request's loop, one call per loop (from a thread);
    returns how many calls were scheduled (a closed loop has nobody waiting)."""
    parts: dict[asyncio.AbstractEventLoop, list[_Request]] = {}
    for req in requests:
        parts.setdefault(req.loop, []).append(req)
    scheduled = 0
    for loop, part in parts.items():
        try:
            loop.call_soon_threadsafe(then, part)
        except RuntimeError:  # its loop is closed: nobody waits, leave no descriptor
            _release([req.placed for req in part])
            continue
        scheduled += 1
    return scheduled
