"""modes.launch: a command started by the prepared posix_spawn is started as
`os.posix_spawn` starts it (environment, descriptors, signals), and what it cannot do
the same way it leaves to `os.posix_spawn`."""

from __future__ import annotations

import errno
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable

import pytest
from lifecycle_handlers import IO_TIMEOUT, connect, read_to_end

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


# A spawner that accepts on its own listener, in a process of its own. It prints its
# port, serves until its channel (argv[1], a descriptor) ends, then exits. With argv[2]
# "no-libc" the C library offers it no posix_spawn through ctypes (so `Launcher.make`
# gives None): every command is then started by `os.posix_spawn` (`spawner.spawn`).
# With "stale", its fixed environment holds ucspi-tcp names (as a Program made other
# than by ExecMode, which filters them, may), which the connection's values must win.
# With "wildcard" it listens on 0.0.0.0, so each client's local end is asked for.
_SPAWNER = """
import ctypes, ipaddress, os, socket, sys, types
from netserver.connlog import ServerLog
from netserver.endpoint import Endpoint
from netserver.limits import Limits
from netserver.listen.listeners import Listener, ListenSpec
from netserver.modes import launch
from netserver.modes.direct import DirectService
from netserver.modes.shared import SharedLimits
from netserver.modes.spawner import Program, Roster, Spawner
from netserver.refusals import RefusalLines

def without_posix_spawn(kind):  # the C library, as one with no posix_spawn
    class Library(kind):
        def __getattr__(self, name):
            if name == "posix_spawn":
                raise AttributeError(name)
            return super().__getattr__(name)
    return Library

# launch's view of ctypes only: netserver.childexits still calls signalfd through it
loaders = {"CDLL": without_posix_spawn(ctypes.CDLL), "PyDLL": without_posix_spawn(ctypes.PyDLL)}
if sys.argv[2] == "no-libc":
    launch.ctypes = types.SimpleNamespace(**{**vars(ctypes), **loaders})
host = "0.0.0.0" if sys.argv[2] == "wildcard" else "127.0.0.1"
listening = socket.socket()
listening.bind((host, 0))
listening.listen(8)
listening.setblocking(False)
port = listening.getsockname()[1]
local = Endpoint(ipaddress.ip_address(host), port)
spec = ListenSpec(f"{host}:{port}", "tcp", host, port)
table = SharedLimits(Limits(max_conns=10), 1)
table.take_seat(0)
service = DirectService([Listener(listening, spec, local)], table, RefusalLines())
env = {b"PATH": os.environb.get(b"PATH", b"/usr/bin:/bin"), b"LANG": b"C"}
if sys.argv[2] == "stale":
    env.update({b"PROTO": b"stale", b"TCPREMOTEIP": b"192.0.2.99"})
program = Program(sys.argv[3], tuple(sys.argv[3:]), env, None)
chan = socket.socket(fileno=int(sys.argv[1]))
chan.set_inheritable(False)  # as the server's own channel is: not the command's
spawner = Spawner(chan, program, ServerLog(sys.stderr), Roster(10), service)
if (spawner.launcher is None) != (sys.argv[2] == "no-libc"):
    sys.exit("the launcher was made, or not made, against what is under test")
print(port, flush=True)
sys.exit(spawner.run())
"""
# The command: the client's line from fd 0, then, on fd 1, what it was started with
# (its environment as exec gave it: a shell's `env` would show each name once).
_SHOW = "read line; echo got $line; ls /proc/$$/fd; tr '\\0' '\\n' </proc/$$/environ"


def served_by_spawner(
    kind: str, hosts: tuple[str, ...] = ("127.0.0.1",)
) -> tuple[list[list[str]], int, list[int]]:
    """Clients of `_SPAWNER` of `kind` running `_SHOW`, one after the other, each to
    one of `hosts`: what each read, line by line; the spawner's port; each one's port."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    argv = [sys.executable, "-c", _SPAWNER, str(theirs.fileno()), kind, "/bin/sh", "-c", _SHOW]
    outs, ports = [], []
    with ours, subprocess.Popen(argv, stdout=subprocess.PIPE, pass_fds=[theirs.fileno()]) as proc:
        theirs.close()
        assert proc.stdout is not None
        port = int(proc.stdout.readline())  # its readiness: the port it listens on
        for host in hosts:
            with connect((host, port)) as client:
                client.sendall(b"hello\n")
                outs.append(read_to_end(client).decode().splitlines())
                ports.append(client.getsockname()[1])
        ours.close()  # the spawner's channel ends: it exits once the command has
        assert proc.wait(IO_TIMEOUT) == 0
    return outs, port, ports


def test_without_the_c_librarys_posix_spawn_a_command_still_runs_on_the_socket() -> None:
    """The fallback (no glibc posix_spawn through ctypes): the command reads the client
    on fd 0 and answers on fd 1, holds no descriptor but 0, 1 and 2, and gets the fixed
    environment and the connection's ucspi-tcp variables."""
    (out,), port, (mine,) = served_by_spawner("no-libc")
    assert out[0] == "got hello"
    assert [line for line in out[1:] if line.isdigit()] == ["0", "1", "2"]
    env = dict(line.split("=", 1) for line in out if "=" in line)
    assert env["PROTO"] == "TCP" and env["LANG"] == "C"
    assert env["TCPREMOTEIP"] == "127.0.0.1" and env["TCPREMOTEPORT"] == str(mine)
    assert env["TCPLOCALIP"] == "127.0.0.1" and env["TCPLOCALPORT"] == str(port)


def test_a_connections_variables_win_over_the_same_names_in_the_fixed_environment() -> None:
    """A client the spawner accepted gets its variables as ready items, written after the
    fixed environment; where that holds one of their names, each name must still come
    once, with the connection's value (as in a dict), not twice (as in an envp)."""
    (out,), _port, (mine,) = served_by_spawner("stale")
    assert out[0] == "got hello"
    names = [line.split("=", 1)[0] for line in out if "=" in line]
    assert names.count("PROTO") == names.count("TCPREMOTEIP") == 1
    env = dict(line.split("=", 1) for line in out if "=" in line)
    assert env["PROTO"] == "TCP" and env["TCPREMOTEIP"] == "127.0.0.1"
    assert env["TCPREMOTEPORT"] == str(mine)


def test_each_client_gets_the_local_address_it_reached() -> None:
    """On a wildcard listener the local end is asked for each client; the spawner keeps
    the last one's variables while the address repeats, and must not keep them when it
    changes."""
    hosts = ("127.0.0.1", "127.0.0.2", "127.0.0.2", "127.0.0.1")
    outs, port, ports = served_by_spawner("wildcard", hosts)
    for host, out, mine in zip(hosts, outs, ports, strict=True):
        env = dict(line.split("=", 1) for line in out if "=" in line)
        assert (env["TCPLOCALIP"], env["TCPLOCALPORT"]) == (host, str(port))
        assert env["TCPREMOTEPORT"] == str(mine)
