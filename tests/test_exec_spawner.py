"""The spawner processes that start and reap a server's commands (netserver.modes.spawner).

A command service's lasting children: each must be replaced when it dies (and the
connections it served logged as such), never leave a command behind, count each
connection out when its command ends, and leave with the server.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import io
import os
import signal
import socket
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import ServerFactory
from lifecycle_handlers import (
    IO_TIMEOUT,
    children,
    closed_by_peer,
    connect,
    log_count,
    read_to_end,
    recv_line,
    round_trip,
    served,
    socket_fds,
    wait_until,
)

from netserver.accepted import FdRegistry
from netserver.connlog import ServerLog
from netserver.handlers import Command
from netserver.limits import Limits
from netserver.modes.base import ModeContext
from netserver.modes.divert import spawn_shell
from netserver.modes.execute import RESTART_MAX, SPAWNERS, ExecMode
from netserver.modes.spawner import Program, Roster, _variables, spawn

CAT = ["--", "/bin/cat"]


def the_spawners(server_pid: int) -> set[int]:
    """The server's children (forked as the mode starts, just after readiness)."""
    assert wait_until(lambda: len(children(server_pid)) == SPAWNERS)
    return set(children(server_pid))


def serving(server_pid: int) -> int:
    """The spawner whose command serves the one connection open now."""
    assert wait_until(lambda: sum(len(children(p)) for p in children(server_pid)) == 1)
    (spawner,) = [p for p in children(server_pid) if children(p)]
    return spawner


def gone(pid: int) -> bool:
    """True once `pid` has exited and been reaped (by anyone)."""
    return not os.path.exists(f"/proc/{pid}")


def all_gone(pids: set[int]) -> bool:
    return all(gone(pid) for pid in pids)


def test_commands_are_children_of_a_spawner(netserver_proc: ServerFactory) -> None:
    server = netserver_proc(["--listen", "127.0.0.1:0", *CAT])
    spawners = the_spawners(server.proc.pid)
    with connect(server.host_port) as sock:
        assert round_trip(sock) == b"ping\n"
        spawner = serving(server.proc.pid)
        (command,) = children(spawner)
        assert os.readlink(f"/proc/{command}/exe") == os.path.realpath("/bin/cat")
        assert set(children(server.proc.pid)) == spawners
    assert wait_until(lambda: children(spawner) == {})


def ended(pid: int) -> bool:
    """True once `pid` has exited (a zombie that nobody has reaped yet counts)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read()
    except OSError:
        return True
    return raw[raw.rindex(b")") + 2 :].split()[0] == b"Z"


def kill_the_serving_spawner(server_pid: int, sock: socket.socket) -> tuple[int, int]:
    """SIGKILL the spawner whose command serves `sock` (open, answering); (spawner, command)."""
    assert round_trip(sock) == b"ping\n"
    spawner = serving(server_pid)
    (command,) = children(spawner)
    os.kill(spawner, signal.SIGKILL)
    return spawner, command


def test_a_dead_spawner_is_replaced_and_its_commands_still_counted(
    netserver_proc: ServerFactory,
) -> None:
    """The commands a dead spawner leaves go on; the server watches them itself, so
    their connections stay counted (here against --max-per-source 1) until they end,
    and only then are they logged (``spawner-died``: the exit code went with it)."""
    server = netserver_proc(["--listen", "127.0.0.1:0", "--max-per-source", "1", *CAT])
    before = the_spawners(server.proc.pid)
    with connect(server.host_port) as sock:
        first, command = kill_the_serving_spawner(server.proc.pid, sock)
        assert wait_until(lambda: "spawner process died" in server.log())
        assert wait_until(lambda: gone(first) and len(children(server.proc.pid)) == SPAWNERS)
        after = the_spawners(server.proc.pid)  # replaced at once, before any new client
        assert first not in after and after - before
        assert round_trip(sock) == b"ping\n"  # its command still serves it
        assert not served(server.host_port)  # and it still counts: one per source
        assert "status=spawner-died" not in server.log()
    assert wait_until(lambda: log_count(server.log, "status=spawner-died") == 1)
    assert ended(command)
    assert wait_until(lambda: served(server.host_port))  # counted out when it ended
    assert server.stop() == 0
    assert all(gone(pid) for pid in after)


def test_a_dead_spawners_command_is_ended_at_the_stop(netserver_proc: ServerFactory) -> None:
    """After --grace the server ends the commands it adopted too (TERM), and waits for
    them before it exits: none is left running with a client's socket."""
    server = netserver_proc(["--listen", "127.0.0.1:0", "--grace", "0.5", *CAT])
    with connect(server.host_port) as sock:
        _spawner, command = kill_the_serving_spawner(server.proc.pid, sock)
        assert wait_until(lambda: "spawner process died" in server.log())
        server.signal(signal.SIGTERM)
        assert closed_by_peer(sock, 8.0)
        assert server.proc.wait(20) == 0
    assert ended(command)
    assert log_count(server.log, "status=terminated") == 1


@pytest.mark.slow  # forks: the point is that a child's writes reach the parent
def test_the_roster_is_written_by_the_spawner_and_read_by_the_supervisor() -> None:
    """The memory is shared: what a forked process (the spawner) lists, its parent
    reads; a cleared slot is no longer listed and is used again; a full roster lists
    no more (those commands are counted out at once if their spawner dies)."""
    roster = Roster(2)
    try:
        pid = os.fork()
        if pid == 0:  # the spawner's side
            first = roster.put(7, 1001)
            roster.put(8, 1002)
            code = 0 if roster.put(9, 1003) == -1 else 1
            roster.clear(first)
            os._exit(code if roster.put(10, 1004) == first else 1)
        assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0
        assert sorted(roster.entries()) == [(8, 1002), (10, 1004)]
    finally:
        roster.close()


def _exec_status(into: int) -> int:
    return spawn(Program("/bin/cat", ("cat", "/proc/self/status"), {}, None), {}, into)


def _twist_status(into: int) -> int:
    return spawn_shell("exec cat /proc/self/status", {}, into)


@pytest.mark.slow  # starts a command
@pytest.mark.parametrize("start", [_exec_status, _twist_status], ids=["exec", "twist"])
def test_a_command_starts_with_every_signal_at_its_default(start: Callable[[int], int]) -> None:
    """Even a signal the server inherited as ignored (nohup leaves SIGHUP so; here
    SIGPROF, which no code of the server touches) is not ignored in the command: an
    exec command, or a tcpd twist/spawn shell."""
    before = signal.signal(signal.SIGPROF, signal.SIG_IGN)
    try:
        out, into = os.pipe()  # in the socket's place: the command's stdin and stdout
        pid = start(into)
        os.close(into)
        with os.fdopen(out, "rb") as stream:
            status = stream.read().decode()
        os.waitpid(pid, 0)
    finally:
        signal.signal(signal.SIGPROF, before)
    (mask,) = [int(line[7:], 16) for line in status.splitlines() if line.startswith("SigIgn:")]
    ignored = {sig for sig in range(1, 65) if mask >> (sig - 1) & 1}
    # (glibc's posix_spawn itself leaves its two internal signals, 32 and 33, ignored.)
    assert not ignored & signal.valid_signals()


def test_the_per_source_count_drops_when_the_command_ends(netserver_proc: ServerFactory) -> None:
    server = netserver_proc(["--listen", "127.0.0.1:0", "--max-per-source", "1", *CAT])
    with connect(server.host_port) as first:
        assert round_trip(first) == b"ping\n"
        assert not served(server.host_port)  # refused: one connection from us already
    assert wait_until(lambda: log_count(server.log, "status=ok") == 1)
    assert served(server.host_port)


def test_the_spawners_leave_with_the_server(netserver_proc: ServerFactory) -> None:
    server = netserver_proc(["--listen", "127.0.0.1:0", "--grace", "0.5", *CAT])
    spawners = the_spawners(server.proc.pid)
    with connect(server.host_port) as sock:
        assert round_trip(sock) == b"ping\n"
        (command,) = children(serving(server.proc.pid))
        server.signal(signal.SIGTERM)
        assert closed_by_peer(sock, 8.0)
        assert server.proc.wait(20) == 0
    assert all(gone(pid) for pid in spawners) and gone(command)
    assert "status=terminated" in server.log()


def test_the_spawners_ignore_a_terminal_interrupt(netserver_proc: ServerFactory) -> None:
    """SIGINT/SIGTERM/SIGHUP sent to the whole group must not end them: the supervisor
    decides when commands end."""
    server = netserver_proc(["--listen", "127.0.0.1:0", *CAT])
    spawners = the_spawners(server.proc.pid)
    for spawner in spawners:
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            os.kill(spawner, sig)
    assert served(server.host_port)
    assert the_spawners(server.proc.pid) == spawners
    assert "spawner process died" not in server.log()


@pytest.mark.parametrize(
    ("timeout", "copies", "counts"), [("0", 0, "in=- out=-"), ("30", 1, "in=5 out=5")]
)
def test_a_copy_of_the_socket_is_kept_only_for_the_idle_timeout(
    netserver_proc: ServerFactory, timeout: str, copies: int, counts: str
) -> None:
    """Without an idle timeout the spawner lets go of the socket at once (the client
    sees the end when the command exits; the log has no byte counts); with one it keeps
    a copy, to read the idle time and, at the end, the byte counts from TCP_INFO."""
    server = netserver_proc(["--listen", "127.0.0.1:0", "--timeout", timeout, *CAT])
    spawners = the_spawners(server.proc.pid)
    # Once started each holds two sockets, its channel and the listener it accepts on
    # (no gate needs the server): nothing else inherited from the server.
    assert wait_until(lambda: all(socket_fds(p) == 2 for p in spawners))
    server_sockets = socket_fds(server.proc.pid)
    with connect(server.host_port) as sock:
        assert round_trip(sock) == b"ping\n"
        spawner = serving(server.proc.pid)
        # (It lets go just after the spawn, which may be after the command answered.)
        assert wait_until(lambda: socket_fds(spawner) == 2 + copies)
        assert socket_fds(server.proc.pid) == server_sockets  # the server let go of it
    assert wait_until(lambda: log_count(server.log, "status=ok") == 1)
    assert log_count(server.log, counts) == 1


def test_a_command_that_cannot_start_is_logged_and_the_spawner_goes_on(
    netserver_proc: ServerFactory, tmp_path: Path
) -> None:
    script = tmp_path / "hello"
    script.write_text("#!/bin/sh\necho hello\n")
    script.chmod(0o755)
    server = netserver_proc(["--listen", "127.0.0.1:0", "--", str(script)])
    spawners = the_spawners(server.proc.pid)
    script.chmod(0o644)  # no longer executable: posix_spawn fails in the spawner
    with connect(server.host_port) as sock:
        assert closed_by_peer(sock)
    assert wait_until(lambda: "status=spawn-failed" in server.log())
    assert "cannot start a process" in server.log()
    script.chmod(0o755)
    for _ in range(SPAWNERS):  # each spawner in turn
        with connect(server.host_port) as sock:
            assert read_to_end(sock) == b"hello\n"
    assert the_spawners(server.proc.pid) == spawners


NO_SPAWNER = "421 no service now"
SHORT_RESTART_MAX = 0.5


@pytest.mark.parametrize("accepting", ["server", "spawners"])
def test_a_spawner_that_keeps_dying_is_replaced_after_a_back_off(
    netserver_proc: ServerFactory, accepting: str
) -> None:
    """Each death is logged; young deaths in a row delay the next start (no fork loop).
    While there is no spawner, a client the server accepts is refused, never left
    waiting, and it reads the refusal line (netserver.linger) before the close; with no
    gate that needs the server the spawners accept themselves, and a client that comes
    meanwhile waits in the listen backlog for the next one (as under Postfix's master
    while a service is throttled)."""
    server_path = ["--refuse-message", NO_SPAWNER]
    # Six young deaths in a row: the last restart waits the back-off's cap. Where the
    # test connects during it (the server accepts and must refuse), the cap stays the
    # default RESTART_MAX, so the client surely comes before the spawners are back
    # even on a loaded machine; where the client waits in the backlog for them, nothing
    # depends on its length, and a short one (--restart-max) saves most of the test's
    # time (7 s before: 0.4 + 1.6 + 5 s of back-offs). Each wait for a restart allows
    # for the whole back-off.
    cap = RESTART_MAX if accepting == "server" else SHORT_RESTART_MAX
    server_path += ["--restart-max", str(cap)]
    if accepting == "server":
        server_path += ["--rate-per-source", "1000"]
    server = netserver_proc(["--listen", "127.0.0.1:0", *server_path, *CAT])
    restart = cap + IO_TIMEOUT
    for _ in range(3):
        assert wait_until(lambda: len(children(server.proc.pid)) == SPAWNERS, restart), (
            f"the server's children and states: {children(server.proc.pid)}; "
            f"its log ends: {server.log()[-600:]!r}"
        )
        spawners = set(children(server.proc.pid))
        for spawner in spawners:
            os.kill(spawner, signal.SIGKILL)
        assert wait_until(functools.partial(all_gone, spawners))
    if accepting == "server":
        # The last back-off is seconds long (six young deaths): no spawner meanwhile.
        with connect(server.host_port) as sock:
            assert read_to_end(sock) == (NO_SPAWNER + "\r\n").encode()
        assert wait_until(lambda: "status=spawn-failed" in server.log())
        assert wait_until(lambda: served(server.host_port), restart)
    else:
        with connect(server.host_port, timeout=restart) as sock:  # the back-off, then served
            assert round_trip(sock) == b"ping\n"
    assert log_count(server.log, "spawner process died") == 3 * SPAWNERS


@pytest.mark.slow  # forks the spawners
def test_a_back_off_ends_in_a_restart_with_no_client_to_prompt_it() -> None:
    """The restart timer is asked for again when it fires before the back-off is over.

    The loop's clock is cached and rounded, so a timer set for the back-off may fire
    just before it ends; `_available` then stops, and without a new timer no spawner
    would start until a client came (the cause of an intermittent failure above).
    """

    async def restarted() -> int:
        loop = asyncio.get_running_loop()
        log = ServerLog(io.StringIO())
        ctx = ModeContext(
            Command(("/bin/true",)), Limits(), log, loop, FdRegistry(), lambda conn: None, "exec"
        )
        mode = ExecMode(ctx, Command(("/bin/true",)), "/bin/true")
        mode._restart_at = time.monotonic() + 0.05  # a back-off under way, no timer set
        assert mode._available() is None
        try:
            deadline = loop.time() + IO_TIMEOUT
            while len(mode.spawners) < SPAWNERS and loop.time() < deadline:
                await asyncio.sleep(0.01)  # polls the mode's state: no readiness signal
            return len(mode.spawners)
        finally:
            mode.terminate()
            await mode.closed()

    assert asyncio.run(restarted()) == SPAWNERS


@pytest.mark.slow  # an ExecMode may fork spawners once its back-off is over
@pytest.mark.parametrize(("restart_max", "longest"), [(None, RESTART_MAX), (0.3, 0.3)])
def test_the_back_off_is_capped_by_the_limits(restart_max: float | None, longest: float) -> None:
    """Limits.restart_max (netserver serve --restart-max) caps the back-off after young
    deaths in a row; without it the cap is the mode's own RESTART_MAX."""

    async def waits() -> list[tuple[float, float]]:
        """Each death's wait, as the bounds the clock allows: (at least, at most)."""
        loop = asyncio.get_running_loop()
        log = ServerLog(io.StringIO())
        limits = Limits(restart_max=restart_max)
        ctx = ModeContext(
            Command(("/bin/true",)), limits, log, loop, FdRegistry(), lambda conn: None, "exec"
        )
        mode = ExecMode(ctx, Command(("/bin/true",)), "/bin/true")
        found = []
        try:
            for _ in range(8):  # each one young: it "started" just now
                before = time.monotonic()
                mode._back_off(SimpleNamespace(started=before))  # type: ignore[arg-type]
                after = time.monotonic()
                found.append((mode._restart_at - after, mode._restart_at - before))
        finally:
            mode.terminate()
            await mode.closed()
        return found

    found = asyncio.run(waits())
    first, last = found[0], found[-1]
    assert first[0] <= 0.0 <= first[1]  # the first death: at once
    assert last[0] <= longest <= last[1]  # the cap, reached after six deaths
    assert all(low <= longest for low, _ in found)  # never longer


@pytest.mark.slow  # an ExecMode may fork spawners once its back-off is over
def test_a_very_long_run_of_young_deaths_still_waits_the_cap() -> None:
    """Past 1,024 young deaths in a row (a spawner that cannot start for 85 minutes at
    5 s apart), 0.1 * 2**n no longer fits a float: the OverflowError left the service
    without spawners, refusing every client, even after the cause was gone."""

    async def wait() -> tuple[float, float]:
        """The wait, as the bounds the clock allows: (at least, at most)."""
        loop = asyncio.get_running_loop()
        ctx = ModeContext(
            Command(("/bin/true",)),
            Limits(),
            ServerLog(io.StringIO()),
            loop,
            FdRegistry(),
            lambda conn: None,
            "exec",
        )
        mode = ExecMode(ctx, Command(("/bin/true",)), "/bin/true")
        try:
            mode._young_deaths = 1100
            before = time.monotonic()
            mode._back_off(SimpleNamespace(started=before))  # type: ignore[arg-type]
            after = time.monotonic()
            return mode._restart_at - after, mode._restart_at - before
        finally:
            mode.terminate()
            await mode.closed()

    low, high = asyncio.run(wait())
    assert low <= RESTART_MAX <= high


@pytest.mark.parametrize(
    ("text", "env"),
    [
        (b"PROTO=TCP\0TCPREMOTEIP=192.0.2.1", {b"PROTO": b"TCP", b"TCPREMOTEIP": b"192.0.2.1"}),
        (b"A=b=c\0EMPTY=", {b"A": b"b=c", b"EMPTY": b""}),  # the first "=" splits
        (b"PROTO=TCP\0NOEQUALS\0X=1", {b"PROTO": b"TCP", b"NOEQUALS": b"", b"X": b"1"}),
        (b"PROTO=TCP\0=nameless\0\0X=1", {b"PROTO": b"TCP", b"X": b"1"}),  # no empty name
        (b"", {}),
    ],
)
def test_the_variables_a_spawner_receives_become_the_environment(
    text: bytes, env: dict[bytes, bytes]
) -> None:
    """`_variables`, split in C, keeps the rules of the loop it replaced (posix_spawn
    refuses an empty name, so none may reach it)."""
    assert _variables(text) == env


def _pidfds(pid: int) -> int:
    """How many of the process's descriptors are pidfds."""
    count = 0
    for name in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            count += os.readlink(f"/proc/{pid}/fd/{name}") == "anon_inode:[pidfd]"
    return count


def test_a_spawner_learns_of_ended_commands_without_a_descriptor_each(
    netserver_proc: ServerFactory,
) -> None:
    """The spawner reads SIGCHLD from one signalfd, not a pidfd per command (three
    system calls per connection, and a closed pidfd that a command's exec still held
    stayed in the epoll set, reported at every wait: bench/RESULTS.md). Its block of
    SIGCHLD does not reach the commands: each starts with no signal blocked. Each
    command's end is still seen and logged."""
    show = "grep ^SigBlk: /proc/self/status; exec cat"
    server = netserver_proc(["--listen", "127.0.0.1:0", "--", "/bin/sh", "-c", show])
    spawners = the_spawners(server.proc.pid)
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(connect(server.host_port)) for _ in range(3)]
        for sock in socks:
            assert recv_line(sock) == b"SigBlk:\t0000000000000000\n"
            assert round_trip(sock) == b"ping\n"
        assert sum(len(children(p)) for p in spawners) == 3
        assert sum(_pidfds(p) for p in spawners) == 0
    assert wait_until(lambda: log_count(server.log, "status=ok") == 3)
    assert all(children(p) == {} for p in spawners)
