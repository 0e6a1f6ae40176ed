"""``|command`` deliveries: run an argument list (never a shell), the message on stdin.

The command gets its own process group, a small fixed environment, ``/`` as its working
directory and, as root, the identity of whoever owns the aliases or include file that
names it. Only the first MAX_OUTPUT bytes of what it prints are kept (the rest is read
and dropped, so its pipes never fill and it never blocks on us), and a command that runs
past the timeout is killed with its whole process group. The exit code says what
happened (sysexits.h): 0 delivered, EX_TEMPFAIL (75) try again later, anything else
failed; a command killed by a signal is tried again later.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pwd
import signal
from collections.abc import Callable, Sequence

from . import Result
from .local_common import Copy, Identity, clean, delivered

EX_TEMPFAIL = 75
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
    """Run argv (no shell) with the message on stdin: exit 0 delivered, 75 or a timeout
    deferred, a signal deferred, anything else failed with the first line of stderr."""
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            cwd="/",
            env=env,
            start_new_session=True,  # its own process group: a timeout kills all of it
            preexec_fn=None if identity is None else _become(identity),
        )
    except OSError as exc:
        return Result.deferred("4.3.0", f"cannot run {argv[0]}: {exc.strerror or exc}")
    try:
        async with asyncio.timeout(timeout):
            err, code = await _converse(proc, stdin)
    except TimeoutError:
        _kill(proc)
        await proc.wait()
        return Result.deferred("4.3.0", f"command {argv[0]} timed out after {timeout:g}s")
    except BaseException:  # cancelled (shutdown): leave no command running behind us
        _kill(proc)
        raise
    return _command_result(argv[0], code, err)


def _become(identity: Identity) -> Callable[[], None]:
    """What the child runs before exec to take on `identity`.

    Not the user=/group=/extra_groups= arguments: uvloop, the daemon's event loop,
    refuses them, and every command delivery would fail. Supplementary groups go first,
    then the group, then the user, while we may still change them.
    """

    def switch() -> None:
        os.setgroups([])
        os.setgid(identity.gid)
        os.setuid(identity.uid)

    return switch


async def _converse(proc: asyncio.subprocess.Process, data: bytes) -> tuple[bytes, int]:
    if proc.stdin is None or proc.stdout is None or proc.stderr is None:
        raise RuntimeError("subprocess pipes missing")
    _out, err, _ = await asyncio.gather(
        _drain(proc.stdout), _drain(proc.stderr), _feed(proc.stdin, data)
    )
    return err, await proc.wait()


async def _feed(stream: asyncio.StreamWriter, data: bytes) -> None:
    """Write the message; a command that stops reading early is judged by its exit code."""
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        stream.write(data)
        await stream.drain()
    stream.close()
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        await stream.wait_closed()


async def _drain(stream: asyncio.StreamReader) -> bytes:
    """Read to the end, keeping the first MAX_OUTPUT bytes (so the pipe never fills)."""
    kept = bytearray()
    while chunk := await stream.read(65536):
        kept += chunk[: max(0, MAX_OUTPUT - len(kept))]
    return bytes(kept)


def _kill(proc: asyncio.subprocess.Process) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(ProcessLookupError):
        proc.kill()


def _first_line(output: bytes) -> str:
    for line in output.decode("utf-8", "replace").splitlines():
        if line.strip():
            return clean(line, 200)
    return "no error message"


def _command_result(name: str, code: int, err: bytes) -> Result:
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
        "USER": me.name,
        "LOGNAME": me.name,
        "SHELL": "/bin/sh",
        "SENDER": copy.sender,
        "RECIPIENT": copy.recipient,
        "LOCAL": local if at else copy.recipient,
        "DOMAIN": domain,
    }


def _current_identity() -> Identity:
    uid = os.geteuid()
    try:
        return Identity.of(pwd.getpwuid(uid))
    except KeyError:
        return Identity(uid, os.getegid(), str(uid), "/")
