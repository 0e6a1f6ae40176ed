"""Which children have ended, for a process that starts many: SIGCHLD read from a
signalfd, and each ended child looked at before it is reaped.

Why not one pidfd per child (as `netserver.children` watches a few long-lived ones): a
process that starts a command per connection (the exec spawner) then pays, per command,
pidfd_open, an epoll_ctl to add it and a close, besides the reap. Here SIGCHLD is
blocked and read from one descriptor in the same epoll set: per command the kernel
only queues the signal (a pending SIGCHLD absorbs the next ones), and what ended is
found with `waitid`. Per wake-up that costs a read of the signalfd and one `waitid`
that finds nothing more; per ended command a `waitid` that looks (``WNOWAIT``) and the
reap. Python's standard library has no signalfd, so it is called through ctypes, as
leafmail.spool calls syncfs.

Looking before reaping keeps a rule the exec spawner's roster depends on: a pid is
taken off any list of live commands *before* it is reaped, so a list never names a pid
the kernel may have given to another process (see `modes.spawner.Roster`). `ended`
yields a child that has ended but is still a zombie; the caller clears its records,
then calls `reap`.
"""

from __future__ import annotations

import ctypes
import os
import signal
from collections.abc import Iterator
from typing import NamedTuple

_SFD_NONBLOCK, _SFD_CLOEXEC = os.O_NONBLOCK, os.O_CLOEXEC  # as <sys/signalfd.h> defines them
_SIGINFO_SIZE = 128  # struct signalfd_siginfo
_ULONG_BITS = 8 * ctypes.sizeof(ctypes.c_ulong)


class Ended(NamedTuple):
    """A child that has ended and not yet been reaped."""

    pid: int
    code: int  # its exit code, or minus the signal that killed it


class ChildExits:
    """SIGCHLD as a readable descriptor (`fd`, for the caller's epoll set).

    Made in the process whose children it watches, before the first of them is started:
    it blocks SIGCHLD in the calling thread, so the process must be single-threaded (the
    exec spawner is). Children started with `os.posix_spawn(..., setsigmask=())` get an
    empty signal mask, so they do not inherit the block. Every child of the process is
    reported, also one the caller did not start through it.
    """

    def __init__(self) -> None:
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGCHLD})
        self.fd = _signalfd(signal.SIGCHLD)

    def ended(self) -> Iterator[Ended]:
        """Each child that has ended, left a zombie until `reap`; the caller must reap
        each one before asking for the next (else the same one comes again).

        The pending signal is read first, so a child that ends after the last look
        makes the descriptor readable again: none is missed."""
        self._drain()
        while True:
            try:
                info = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
            except ChildProcessError:  # no children at all
                return
            if info is None:
                return
            killed = info.si_code != os.CLD_EXITED
            yield Ended(info.si_pid, -info.si_status if killed else info.si_status)

    @staticmethod
    def reap(pid: int) -> bool:
        """Collect an ended child (after `ended` named it); False if it was not there
        (reaped already: nothing left to collect)."""
        try:  # (waitpid: a tuple back, not waitid's result object, for the same call)
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            return False
        return True

    def _drain(self) -> None:
        try:
            while len(os.read(self.fd, 16 * _SIGINFO_SIZE)) == 16 * _SIGINFO_SIZE:
                pass
        except BlockingIOError:
            pass

    def close(self) -> None:
        os.close(self.fd)


def _signalfd(sig: int) -> int:
    """A new non-blocking, close-on-exec signalfd for `sig`; OSError if the kernel refuses."""
    mask = (ctypes.c_ulong * (1024 // _ULONG_BITS))()  # glibc's sigset_t
    mask[(sig - 1) // _ULONG_BITS] = 1 << ((sig - 1) % _ULONG_BITS)
    libc = ctypes.CDLL(None, use_errno=True)
    fd: int = libc.signalfd(-1, ctypes.byref(mask), _SFD_NONBLOCK | _SFD_CLOEXEC)
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"signalfd: {os.strerror(err)}")
    return fd
