"""Run one local delivery step as the user it is for, in a child process of its own.

Postfix's local(8) and OpenSMTPD's mda both take the recipient's identity *before*
they touch a mailbox, an ``:include:`` file or a ``|command``: then the kernel, not our
code, decides what that user may create, read or run. A Maildir is never planted in a
home the user could not write, and a file the user could not read never reaches a
bounce. This module is that primitive:

- the parent forks; the child becomes a session leader (so a timeout kills it and all
  it started, the command included), resets the signal handlers it inherited from the
  daemon's event loop, closes every descriptor but its reply pipe, and, when we are
  root, takes the identity: supplementary groups, then the group, then the user, and
  checks with getresuid/getresgid that nothing of root is left
  (`netserver.privileges.drop`);
- the child runs the step (a plain function), sends its JSON result or its error down
  the pipe (never pickle) and leaves with ``os._exit``;
- the parent waits on the pipe and on the child's exit without blocking its event loop
  (`run_as`, via the loop's reader callbacks and a pidfd), or in a worker thread
  (`run_as_blocking`, for alias expansion, which runs off the loop as a whole). Past the
  deadline the child's process group is killed and TimeoutError is raised.

A step cut short must not leave half its work behind: an mbox keeping the first part of
an entry shows the user a broken message, followed by the whole one at the retry. So
when `run_as` is cancelled (the daemon stopping) or times out, the child's process group
is first asked to stop (SIGTERM): in the child that raises `Stopped` where the step is,
which unwinds it as any error does (an mbox append is cut back to the size it had, its
dotlock removed, a Maildir's file in tmp/ unlinked; a command gets the signal too). The
parent waits for that up to STOP_GRACE seconds, and only then kills the group.

When we are not root, nothing is switched: the step runs as the current user, in a
child all the same, so that both cases share one code path and one timeout.

Forking a process that has threads is safe here because the child only makes system
calls and runs pure-Python code that was imported before the fork; it looks nothing up
in NSS (the groups come with the identity, resolved in the parent) and never returns
into the parent's code.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import os
import select
import signal
import time
from collections.abc import Callable, Iterator
from typing import Any

from netserver.children import reaped
from netserver.errors import ConfigError
from netserver.privileges import Identity, drop

from .local_common import MailboxLocked, UnsafeMailbox, write_all

__all__ = ["Payload", "StepError", "Stopped", "UserStep", "run_as", "run_as_blocking"]

Payload = dict[str, Any]
UserStep = Callable[[], Payload]
MAX_REPLY = 8 << 20  # bytes of JSON a step may send back (an include file is 1 MiB at most)
STOP_GRACE = 5.0  # seconds a child asked to stop has to undo its step before it is killed
_RESET = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGCHLD, signal.SIGUSR1)
_KNOWN: dict[str, type[Exception]] = {
    "MailboxLocked": MailboxLocked,
    "UnsafeMailbox": UnsafeMailbox,
    "ConfigError": ConfigError,
}


class StepError(Exception):
    """A step failed in the child in a way that has no better type (or died silently)."""


class Stopped(BaseException):
    """Raised in the child by SIGTERM: the parent gave up on the step (a cancellation or
    its deadline). A BaseException, like KeyboardInterrupt, so no `except Exception` in
    a step swallows it, while every `finally` and `except BaseException` runs."""


async def run_as(identity: Identity | None, step: UserStep, *, timeout: float) -> Payload:
    """Run `step` in a child as `identity` (None: as we are); its payload, or its error.

    The event loop is never blocked: the reply is read through the loop's reader
    callbacks and the exit is noticed through a pidfd.
    """
    pid, reply = _spawn(identity, step)
    try:
        async with asyncio.timeout(timeout):
            raw = await _read_async(reply)
            code = await reaped(pid)
    except BaseException:
        os.close(reply)  # a reply half-sent ends with EPIPE, not a child blocked on it
        await _stop(pid)
        raise
    os.close(reply)
    return _decode(raw, code)


def run_as_blocking(identity: Identity | None, step: UserStep, *, timeout: float) -> Payload:
    """`run_as` for code that already runs in a worker thread (never on the loop)."""
    deadline = time.monotonic() + timeout
    with _spawned(identity, step) as (pid, reply):
        raw = _read_blocking(reply, deadline)
        code = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    return _decode(raw, code)


# --- the child --------------------------------------------------------------------------


@contextlib.contextmanager
def _spawned(identity: Identity | None, step: UserStep) -> Iterator[tuple[int, int]]:
    """(pid, reply fd) of a child running `step`; killed and reaped if the caller fails
    (a timeout, a cancellation), and the reply fd closed either way."""
    pid, reply = _spawn(identity, step)
    try:
        yield pid, reply
    except BaseException:
        _kill_and_reap(pid)
        raise
    finally:
        os.close(reply)


def _spawn(identity: Identity | None, step: UserStep) -> tuple[int, int]:
    """Fork; the child runs the step and never returns. The parent gets (pid, reply fd)."""
    if identity is not None and os.geteuid() != 0:
        identity = None  # not root: nothing to switch, run as we are
    reply, write = os.pipe2(os.O_CLOEXEC)
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child's coverage is not collected
        os.close(reply)
        _child(identity, step, write)
    os.close(write)
    return pid, reply


def _child(identity: Identity | None, step: UserStep, write: int) -> None:  # pragma: no cover
    """Take the identity, run the step, send the outcome, exit; nothing returns."""
    try:
        # Held until the handlers are reset: the daemon's SIGTERM handler, inherited,
        # would write to its loop's wake-up fd and stop the daemon itself.
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
        os.setsid()
        _reset_signals()
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
        os.closerange(3, write)
        os.closerange(write + 1, os.sysconf("SC_OPEN_MAX"))
        if identity is not None:
            drop(identity)
        outcome: Payload = {"ok": step()}
    except BaseException as exc:  # everything goes back to the parent, typed
        outcome = {"error": _describe(exc)}
    try:
        write_all(write, json.dumps(outcome).encode("utf-8"))
    finally:
        os._exit(0)


def _reset_signals() -> None:  # pragma: no cover - runs in the child
    """The daemon's handlers (and its loop's wake-up fd) must not act in the child;
    SIGTERM, the parent's request to stop, unwinds the step (`Stopped`)."""
    with contextlib.suppress(ValueError):
        signal.set_wakeup_fd(-1)
    for sig in _RESET:
        signal.signal(sig, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, _stop_requested)
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)  # a closed pipe is EPIPE, as in Python


def _stop_requested(signum: int, frame: object) -> None:  # pragma: no cover - in the child
    """Raise `Stopped` once; a second SIGTERM must not interrupt the undoing."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise Stopped("asked to stop")


def _describe(exc: BaseException) -> Payload:
    if isinstance(exc, OSError):
        return {
            "type": "OSError",
            "errno": exc.errno,
            "text": exc.strerror or str(exc),
            "filename": exc.filename if isinstance(exc.filename, str) else None,
        }
    return {"type": type(exc).__name__, "text": str(exc)}


# --- the parent -------------------------------------------------------------------------


def _decode(raw: bytes, code: int) -> Payload:
    """The child's payload, or its error raised here with its type."""
    try:
        outcome = json.loads(raw) if raw else None
    except ValueError:
        outcome = None
    if not isinstance(outcome, dict):
        raise StepError(f"the delivery process ended without an answer ({_ending(code)})")
    if "ok" in outcome and isinstance(outcome["ok"], dict):
        return outcome["ok"]
    raise _rebuild(outcome.get("error"))


def _rebuild(error: object) -> Exception:
    if not isinstance(error, dict):
        return StepError("the delivery process sent a malformed answer")
    text = str(error.get("text", ""))
    kind = error.get("type")
    if kind == "OSError" and isinstance(error.get("errno"), int):
        filename = error.get("filename")
        if isinstance(filename, str):
            return OSError(error["errno"], text, filename)
        return OSError(error["errno"], text)
    known = _KNOWN.get(str(kind))
    return known(text) if known is not None else StepError(f"{kind}: {text}")


def _ending(code: int) -> str:
    """An exit code as os.waitstatus_to_exitcode gives it, in words."""
    return f"killed by signal {-code}" if code < 0 else f"exit {code}"


async def _read_async(fd: int) -> bytes:
    """Everything the child writes until it exits, read without blocking the loop."""
    os.set_blocking(fd, False)
    chunks = bytearray()

    def more() -> bool:
        try:
            while chunk := os.read(fd, 65536):
                chunks.extend(chunk)
                if len(chunks) > MAX_REPLY:
                    raise StepError("the delivery process sent too much")
        except BlockingIOError:
            return False
        return True  # end of file: the child has gone

    await _until(fd, more)
    return bytes(chunks)


async def _until(fd: int, ready: Callable[[], bool]) -> None:
    """Call `ready` each time `fd` is readable, until it says True (or raises)."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()

    def wake() -> None:
        if done.done():
            return
        try:
            if ready():
                done.set_result(None)
        except Exception as exc:
            done.set_exception(exc)

    loop.add_reader(fd, wake)
    try:
        await done
    finally:
        loop.remove_reader(fd)


def _read_blocking(fd: int, deadline: float) -> bytes:
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    chunks = bytearray()
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(errno.ETIMEDOUT, "the delivery step took too long")
        if not poller.poll(left * 1000):
            continue
        chunk = os.read(fd, 65536)
        if not chunk:
            return bytes(chunks)
        chunks.extend(chunk)
        if len(chunks) > MAX_REPLY:
            raise StepError("the delivery process sent too much")


async def _stop(pid: int) -> None:
    """Ask the child's process group to stop (SIGTERM), give it STOP_GRACE seconds to
    undo its step and exit, then kill it; cancelled again meanwhile, kill it at once."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGTERM)
    try:
        async with asyncio.timeout(STOP_GRACE):
            await reaped(pid)
    except TimeoutError:
        _kill_and_reap(pid)
    except BaseException:
        _kill_and_reap(pid)
        raise


def _kill_and_reap(pid: int) -> None:
    """Kill the child and whatever it started (its process group), and reap it."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)
