"""Child processes: forking with a channel, watching, reaping and killing them.

A child is watched through a pidfd on the event loop, so it is reaped the moment it
exits -- no SIGCHLD handler, no zombie, no reaping of children that are not ours -- and
this works whether or not the server runs in the main thread. The modes that serve each
connection in a child (`netserver.modes.process`) and leafmail's workers build on this.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import struct
import sys
import traceback
from collections.abc import Callable
from typing import NoReturn

from .errors import EX_SOFTWARE


def kill_and_reap(pid: int) -> None:
    """End a child we cannot watch, and collect it so it is no zombie."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)


def watch_child(loop: asyncio.AbstractEventLoop, pid: int, on_exit: Callable[[int], None]) -> int:
    """Call `on_exit(exitcode)` once `pid` ends (negative: killed by that signal).

    Returns the pidfd, which the caller must register as a descriptor a later forked
    child has to close.
    """
    pidfd = os.pidfd_open(pid)

    def exited() -> None:
        try:
            got, status = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            got, status = pid, 0
        if got == 0:
            return
        loop.remove_reader(pidfd)
        os.close(pidfd)
        on_exit(os.waitstatus_to_exitcode(status))

    loop.add_reader(pidfd, exited)
    return pidfd


def fork_with_channel(kind: int = socket.SOCK_STREAM) -> tuple[int, socket.socket]:
    """Fork, with a Unix socket pair between parent and child.

    Returns (0, the child's end) in the child and (pid, the parent's end) in the parent;
    each side has closed the other's end. OSError, with nothing left open, when the
    system refuses the pair or the fork.
    """
    ours, theirs = socket.socketpair(socket.AF_UNIX, kind)
    try:
        pid = os.fork()
    except OSError:
        ours.close()
        theirs.close()
        raise
    if pid == 0:
        ours.close()
        return 0, theirs
    theirs.close()
    return pid, ours


def run_child(main: Callable[[], int]) -> NoReturn:
    """In a forked child: run `main` and exit with its code, never unwinding into the
    parent's code (its event loop, its `finally` blocks); EX_SOFTWARE if `main` raised."""
    code = EX_SOFTWARE
    try:
        code = main()
    except BaseException:  # whatever it is: report it, then exit
        traceback.print_exc(file=sys.stderr)
    finally:
        with contextlib.suppress(BaseException):
            sys.stderr.flush()
        os._exit(code)


async def reaped(pid: int) -> int:
    """`pid`'s exit code once it has ended and been reaped (negative: killed by that
    signal), waited for on the running loop through its pidfd (see `watch_child`).

    Cancelled, it stops watching and leaves the child alone: the caller kills and reaps.
    """
    loop = asyncio.get_running_loop()
    ended: asyncio.Future[int] = loop.create_future()
    pidfd = watch_child(loop, pid, ended.set_result)
    try:
        return await ended
    finally:
        if not ended.done():
            loop.remove_reader(pidfd)
            os.close(pidfd)


_FD = struct.Struct("i")  # one descriptor number in SCM_RIGHTS data


def send_fd(chan: socket.socket, message: bytes, fd: int) -> None:
    """Send `message` with descriptor `fd` attached (SCM_RIGHTS), in one system call.

    `socket.send_fds` does the same through an array it builds per call; the
    supervisor sends one per connection.
    """
    chan.sendmsg([message], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, _FD.pack(fd))])


def receive_fds(chan: socket.socket, max_msg: int, max_fds: int) -> tuple[bytes, list[int]]:
    """One message from `chan` and the descriptors it carries, close-on-exec from the start.

    `socket.recv_fds` installs them inheritable, so a command that any handler of the
    process runs while one is open would inherit another client's connection.
    """
    data, ancdata, _flags, _addr = chan.recvmsg(
        max_msg, socket.CMSG_SPACE(_FD.size * max_fds), socket.MSG_CMSG_CLOEXEC
    )
    fds: list[int] = []
    for level, kind, raw in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds += [fd for (fd,) in _FD.iter_unpack(raw[: len(raw) - len(raw) % _FD.size])]
    return data, fds


def receive_ready(
    chan: socket.socket, max_msg: int, max_fds: int
) -> tuple[bytes, list[int]] | None:
    """`receive_fds` on a non-blocking channel: None when nothing is waiting now.

    A channel that fails reads as ended (``b""``, no descriptors), as a closed one does:
    either way the peer is gone, and the reader of a supervisor's channel ends its work.
    """
    try:
        return receive_fds(chan, max_msg, max_fds)
    except (BlockingIOError, InterruptedError):
        return None
    except OSError:
        return b"", []
