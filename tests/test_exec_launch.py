"""modes.launch: a command started by the prepared posix_spawn is started as
`os.posix_spawn` starts it (environment, descriptors, signals), and what it cannot do
the same way it leaves to `os.posix_spawn`."""

from __future__ import annotations

import errno
import os
import signal
from collections.abc import Callable

import pytest

from netserver.modes.base import DEFAULT_SIGNALS
from netserver.modes.launch import SLOTS, Launcher

# Starts commands (layers.py does not see a posix_spawn made through ctypes: said here).
pytestmark = pytest.mark.slow

BASE = {b"PATH": os.environb.get(b"PATH", b"/usr/bin:/bin"), b"LANG": b"C", b"EMPTY": b""}
VARIABLES = {b"PROTO": b"TCP", b"TCPREMOTEIP": b"192.0.2.7", b"TCPREMOTEPORT": b"4242"}
# What the command reports: its environment, then its ignored and blocked signal masks.
REPORT = ["/bin/sh", "-c", "env; exec grep -E '^Sig(Ign|Blk)' /proc/self/status"]


def output_of(start: object) -> str:
    """Run `start(fd)` (it returns a pid) with a pipe as the command's fd 0 and 1."""
    read_end, write_end = os.pipe()
    try:
        pid = start(write_end)  # type: ignore[operator]
    finally:
        os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        out = pipe.read()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    return out.decode()


def launcher(path: str = REPORT[0]) -> Launcher:
    made = Launcher.make(path, REPORT, BASE, DEFAULT_SIGNALS)
    assert made is not None
    return made


def by_posix_spawn(fd: int) -> int:
    return os.posix_spawn(
        REPORT[0],
        REPORT,
        {**BASE, **VARIABLES},
        file_actions=[(os.POSIX_SPAWN_DUP2, fd, 0), (os.POSIX_SPAWN_DUP2, fd, 1)],
        setsigdef=DEFAULT_SIGNALS,
        setsigmask=(),
    )


def test_a_launched_command_sees_what_posix_spawn_gives_it() -> None:
    """Same environment (fixed part and the call's variables), and every signal at its
    default and unblocked, though the caller ignores one and blocks another."""
    old = signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR2})
    try:
        ours = output_of(lambda fd: launcher().spawn(fd, VARIABLES))
        theirs = output_of(by_posix_spawn)
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGUSR2})
        signal.signal(signal.SIGUSR1, old)
    assert sorted(ours.splitlines()) == sorted(theirs.splitlines())
    assert "TCPREMOTEIP=192.0.2.7" in ours.splitlines()
    status = dict(line.split(":\t") for line in ours.splitlines() if line.startswith("Sig"))
    assert int(status["SigBlk"], 16) == 0
    assert not int(status["SigIgn"], 16) & (1 << (signal.SIGUSR1 - 1))  # (glibc's own: ignored)


def test_the_variables_of_one_call_do_not_stay_for_the_next() -> None:
    one = launcher()
    first = output_of(lambda fd: one.spawn(fd, VARIABLES))
    second = output_of(lambda fd: one.spawn(fd, {b"PROTO": b"UNIX"}))
    assert "TCPREMOTEIP=192.0.2.7" in first.splitlines()
    assert not any(line.startswith("TCP") for line in second.splitlines())
    assert "PROTO=UNIX" in second.splitlines()


def test_what_it_cannot_do_the_same_way_is_left_to_posix_spawn() -> None:
    """A name of the fixed part (a dict's later value wins; in an envp the earlier one
    would) or more variables than slots: done by os.posix_spawn, with the same result."""
    one = launcher()
    shadowed = output_of(lambda fd: one.spawn(fd, {b"LANG": b"fr_FR"}))
    assert "LANG=fr_FR" in shadowed.splitlines() and "LANG=C" not in shadowed.splitlines()
    many = {b"V%d" % i: b"x%d" % i for i in range(SLOTS + 1)}
    lines = output_of(lambda fd: one.spawn(fd, many)).splitlines()
    assert all(f"V{i}=x{i}" in lines for i in range(SLOTS + 1))


def test_a_command_that_cannot_start_raises_as_posix_spawn_does() -> None:
    with pytest.raises(OSError) as ours:
        launcher("/nonexistent/command").spawn(0, VARIABLES)
    with pytest.raises(OSError) as theirs:
        os.posix_spawn("/nonexistent/command", ["x"], BASE)
    assert ours.value.errno == theirs.value.errno == errno.ENOENT
    assert str(ours.value) == str(theirs.value)


def test_a_call_on_another_descriptor_gets_file_actions_for_it() -> None:
    """The dup2 actions are kept while the descriptor number repeats, and rebuilt when
    it does not (the command's output must come through the new one)."""
    one = launcher()
    used: list[int] = []

    def start(variables: dict[bytes, bytes]) -> Callable[[int], int]:
        def on(fd: int) -> int:
            used.append(fd)
            return one.spawn(fd, variables)

        return on

    first = output_of(start(VARIABLES))
    again = output_of(start(VARIABLES))
    held = os.pipe()  # the next pipe gets other numbers
    try:
        moved = output_of(start({b"PROTO": b"UNIX"}))
    finally:
        os.close(held[0])
        os.close(held[1])
    assert used[0] == used[1] != used[2]
    assert "PROTO=TCP" in first.splitlines() and "PROTO=TCP" in again.splitlines()
    assert "PROTO=UNIX" in moved.splitlines()
