"""The spawner process that starts and reaps a server's commands (see netserver.modes.spawner).

The server's one lasting child for commands: it must be replaced when it dies (and the
connections it served logged as such), never leave a command behind, count each
connection out when its command ends, and leave with the server.
"""

from __future__ import annotations

import functools
import os
import signal
from pathlib import Path

import pytest
from conftest import ServerFactory
from lifecycle_handlers import (
    children,
    closed_by_peer,
    connect,
    log_count,
    read_to_end,
    round_trip,
    served,
    socket_fds,
    wait_until,
)

CAT = ["--", "/bin/cat"]


def the_spawner(server_pid: int) -> int:
    """The server's one child (forked as the mode starts, just after readiness)."""
    assert wait_until(lambda: len(children(server_pid)) == 1)
    (pid,) = children(server_pid)
    return pid


def gone(pid: int) -> bool:
    """True once `pid` has exited and been reaped (by anyone)."""
    return not os.path.exists(f"/proc/{pid}")


def test_commands_are_children_of_the_spawner(netserver_proc: ServerFactory) -> None:
    server = netserver_proc(["--listen", "127.0.0.1:0", *CAT])
    spawner = the_spawner(server.proc.pid)
    with connect(server.host_port) as sock:
        assert round_trip(sock) == b"ping\n"
        (command,) = children(spawner)
        assert os.readlink(f"/proc/{command}/exe") == os.path.realpath("/bin/cat")
        assert set(children(server.proc.pid)) == {spawner}
    assert wait_until(lambda: children(spawner) == {})


def test_a_dead_spawner_is_replaced_and_its_connections_logged(
    netserver_proc: ServerFactory,
) -> None:
    server = netserver_proc(["--listen", "127.0.0.1:0", *CAT])
    first = the_spawner(server.proc.pid)
    with connect(server.host_port) as sock:
        assert round_trip(sock) == b"ping\n"
        os.kill(first, signal.SIGKILL)
        assert wait_until(lambda: "status=spawner-died" in server.log())
    assert "spawner process died" in server.log()
    assert wait_until(lambda: gone(first) and len(children(server.proc.pid)) == 1)
    second = the_spawner(server.proc.pid)  # started at once, before any new client
    assert second != first
    assert served(server.host_port)
    assert server.stop() == 0
    assert gone(second)


def test_the_per_source_count_drops_when_the_command_ends(netserver_proc: ServerFactory) -> None:
    server = netserver_proc(["--listen", "127.0.0.1:0", "--max-per-source", "1", *CAT])
    with connect(server.host_port) as first:
        assert round_trip(first) == b"ping\n"
        assert not served(server.host_port)  # refused: one connection from us already
    assert wait_until(lambda: log_count(server.log, "status=ok") == 1)
    assert served(server.host_port)


def test_the_spawner_leaves_with_the_server(netserver_proc: ServerFactory) -> None:
    server = netserver_proc(["--listen", "127.0.0.1:0", "--grace", "0.5", *CAT])
    spawner = the_spawner(server.proc.pid)
    with connect(server.host_port) as sock:
        assert round_trip(sock) == b"ping\n"
        (command,) = children(spawner)
        server.signal(signal.SIGTERM)
        assert closed_by_peer(sock, 8.0)
        assert server.proc.wait(20) == 0
    assert gone(spawner) and gone(command)
    assert "status=terminated" in server.log()


def test_the_spawner_ignores_a_terminal_interrupt(netserver_proc: ServerFactory) -> None:
    """SIGINT/SIGTERM/SIGHUP sent to the whole group must not end it: the supervisor
    decides when commands end."""
    server = netserver_proc(["--listen", "127.0.0.1:0", *CAT])
    spawner = the_spawner(server.proc.pid)
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        os.kill(spawner, sig)
    assert served(server.host_port)
    assert the_spawner(server.proc.pid) == spawner
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
    spawner = the_spawner(server.proc.pid)
    # Once started it holds one socket, its channel: nothing inherited from the server.
    assert wait_until(lambda: socket_fds(spawner) == 1)
    server_sockets = socket_fds(server.proc.pid)
    with connect(server.host_port) as sock:
        assert round_trip(sock) == b"ping\n"
        # (It lets go just after the spawn, which may be after the command answered.)
        assert wait_until(lambda: socket_fds(spawner) == 1 + copies)
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
    spawner = the_spawner(server.proc.pid)
    script.chmod(0o644)  # no longer executable: posix_spawn fails in the spawner
    with connect(server.host_port) as sock:
        assert closed_by_peer(sock)
    assert wait_until(lambda: "status=spawn-failed" in server.log())
    assert "cannot start a process" in server.log()
    script.chmod(0o755)
    with connect(server.host_port) as sock:
        assert read_to_end(sock) == b"hello\n"
    assert the_spawner(server.proc.pid) == spawner


def test_a_spawner_that_keeps_dying_is_replaced_after_a_back_off(
    netserver_proc: ServerFactory,
) -> None:
    """Each death is logged; young deaths in a row delay the next start (no fork loop),
    and while there is no spawner a client is refused, never left waiting."""
    server = netserver_proc(["--listen", "127.0.0.1:0", *CAT])
    for _ in range(3):
        spawner = the_spawner(server.proc.pid)
        os.kill(spawner, signal.SIGKILL)
        assert wait_until(functools.partial(gone, spawner))
    assert wait_until(lambda: served(server.host_port))
    assert log_count(server.log, "spawner process died") == 3
