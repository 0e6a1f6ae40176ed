"""``|command`` deliveries: run an argument list (never a shell), the message on stdin.

The command runs in a delivery child (`leafmail.delivery.asuser`) that has already
taken the identity of whoever owns the aliases or include file that names it (never
root), so the command starts with exactly that user's rights. It gets a small fixed
environment and ``/`` as its working directory, and shares the child's process group:
a command that runs past the timeout is killed with the child and everything they
started. Only the first MAX_OUTPUT bytes of what it prints are kept (the rest is read
and dropped, so its pipes never fill and it never blocks on us). The exit code says
what happened (sysexits.h): 0 delivered, EX_TEMPFAIL (75) try again later, anything
else failed; a command killed by a signal is tried again later.
"""

from __future__ import annotations

import os
import pwd
import selectors
import subprocess
from collections.abc import Sequence

from netserver.errors import EX_TEMPFAIL
from netserver.privileges import Identity

from . import Result
from .asuser import Payload, run_as
from .local_common import Copy, clean, delivered

MAX_OUTPUT = 4096  # bytes of a command's stdout/stderr kept; the rest is read and dropped
COMMAND_PATH = "/usr/local/bin:/usr/bin:/bin"


async def run_command(
    argv: Sequence[str],
    stdin: bytes,
    *,
    identity: Identity | None,
    timeout: float,
    env: dict[str, str],
) -> Result:
    """Run argv (no shell) as `identity` with the message on stdin: exit 0 delivered, 75
    or a timeout deferred, a signal deferred, anything else failed with the first line
    of stderr."""
    try:
        payload = await run_as(identity, lambda: converse(argv, stdin, env), timeout=timeout)
    except TimeoutError:
        return Result.deferred("4.3.0", f"command {argv[0]} timed out after {timeout:g}s")
    except OSError as exc:
        return Result.deferred("4.3.0", f"cannot run {argv[0]}: {exc.strerror or exc}")
    return _command_result(argv[0], int(payload["code"]), str(payload["err"]))


def converse(argv: Sequence[str], data: bytes, env: dict[str, str]) -> Payload:
    """In the delivery child: start the command, feed it, drain it, wait for it."""
    proc = subprocess.Popen(
        list(argv),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd="/",
        env=env,
        close_fds=True,
    )
    with proc:
        err = _pump(proc, data)
        code = proc.wait()
    return {"code": code, "err": err.decode("utf-8", "replace")}


def _pump(proc: subprocess.Popen[bytes], data: bytes) -> bytes:
    """Write `data` to stdin while reading both outputs to their end; the start of stderr.

    A command that stops reading early is judged by its exit code, so EPIPE only ends
    the writing.
    """
    stdin, stdout, stderr = proc.stdin, proc.stdout, proc.stderr
    if stdin is None or stdout is None or stderr is None:
        raise RuntimeError("subprocess pipes missing")
    view = memoryview(data)
    kept = bytearray()
    with selectors.DefaultSelector() as selector:
        for stream in (stdout, stderr):
            os.set_blocking(stream.fileno(), False)
            selector.register(stream, selectors.EVENT_READ)
        if view:
            os.set_blocking(stdin.fileno(), False)
            selector.register(stdin, selectors.EVENT_WRITE)
        else:
            stdin.close()
        while selector.get_map():
            for key, _ in selector.select():
                if key.fileobj is stdin:
                    view = _write_some(stdin.fileno(), view)
                    if not view:
                        selector.unregister(stdin)
                        stdin.close()
                    continue
                chunk = os.read(key.fd, 65536)
                if not chunk:
                    selector.unregister(key.fileobj)
                elif key.fileobj is stderr:
                    kept += chunk[: max(0, MAX_OUTPUT - len(kept))]
    return bytes(kept)


def _write_some(fd: int, view: memoryview) -> memoryview:
    """What is left to write after one non-blocking write (nothing once the pipe broke)."""
    try:
        return view[os.write(fd, view[:65536]) :]
    except BlockingIOError:
        return view
    except BrokenPipeError:
        return view[:0]


def _first_line(output: str) -> str:
    for line in output.splitlines():
        if line.strip():
            return clean(line, 200)
    return "no error message"


def _command_result(name: str, code: int, err: str) -> Result:
    if code == 0:
        return delivered(f"delivered to command {name}")
    if code == EX_TEMPFAIL:
        return Result.deferred("4.3.0", f"command {name} asks to try later: {_first_line(err)}")
    if code < 0:
        return Result.deferred("4.3.0", f"command {name} killed by signal {-code}")
    return Result.failed("5.3.0", f"command {name} failed (exit {code}): {_first_line(err)}")


def command_env(copy: Copy, identity: Identity | None) -> dict[str, str]:
    """A small, fixed environment: who runs it, and the envelope (no shell reads it)."""
    me = identity or _current_identity()
    local, at, domain = copy.recipient.rpartition("@")
    return {
        "PATH": COMMAND_PATH,
        "HOME": me.home,
        "USER": me.user,
        "LOGNAME": me.user,
        "SHELL": "/bin/sh",
        "SENDER": copy.sender,
        "RECIPIENT": copy.recipient,
        "LOCAL": local if at else copy.recipient,
        "DOMAIN": domain,
    }


def _current_identity() -> Identity:
    uid = os.geteuid()
    try:
        entry = pwd.getpwuid(uid)
    except KeyError:
        return Identity(str(uid), uid, os.getegid(), (), "/")
    return Identity(entry.pw_name, uid, entry.pw_gid, (), entry.pw_dir)
