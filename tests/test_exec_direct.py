"""Spawners that accept on the listening socket themselves (modes.spawner with
modes.direct's table and judge).

`netserver serve -- /bin/cat` with no gate that needs the server: each spawner watches
the inherited listener, judges, counts the client in the table the spawners share, and
starts the command. Real clients on loopback. A spawner is stopped (SIGSTOP) to make
the other one take the next client, so a limit is seen to hold across the two.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import socket
from collections.abc import Iterator
from pathlib import Path

from conftest import ServerFactory
from lifecycle_handlers import (
    all_exit,
    children,
    closed_by_peer,
    connect,
    holds_socket,
    log_count,
    nothing_arrives,
    recv_line,
    round_trip,
    wait_until,
)
from test_direct_accept import listener_inode, wait_log
from test_exec_spawner import CAT, the_spawners

QUIET = 0.5  # how long a client that must wait is watched for a wrong answer
# The most a check that must come true is waited for, on a machine under heavy load
# (each one returns as soon as it holds).
DEADLINE = 15.0


@contextlib.contextmanager
def stopped(pid: int) -> Iterator[None]:
    """`pid` stopped (SIGSTOP) inside the block: it accepts nothing, reaps nothing."""
    os.kill(pid, signal.SIGSTOP)
    # kill() returns before the stop: a spawner still in epoll_wait can take the next
    # client's wake-up (EPOLLEXCLUSIVE wakes one waiter) and then stop holding it.
    assert wait_until(lambda: state(pid) == "T")
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


def state(pid: int) -> str:
    """The process state letter of `pid` (R, S, T ...; "" once it is gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return ""


def serving_spawner(server_pid: int, spawners: set[int]) -> int:
    """The one spawner with a command running."""
    assert wait_until(lambda: sum(bool(children(p)) for p in spawners) == 1)
    (spawner,) = [p for p in spawners if children(p)]
    return spawner


def watch_exits(pids: set[int]) -> list[int]:
    """A pidfd for each of `pids`, which must be live or unreaped children of a live
    server (so no pid can have been reused yet): `all_exit` waits on them.

    Not the pid's state in /proc: a reaped spawner's pid names whatever process takes
    it next, and with pid_max at 32768 and an exec benchmark starting ~2,000 commands a
    second beside the tests, that can happen within seconds."""
    return [os.pidfd_open(pid) for pid in pids]


def refuses_connections(address: tuple[str, int]) -> bool:
    """Connecting is refused; a connect that times out (an accept queue that filled up
    under load) is not a refusal yet, and not an error either, nor is a reset (the last
    holder closed the listener while this connection was in its queue: the full-suite
    loop under load saw ECONNRESET from connect once); the next try is refused."""
    try:
        socket.create_connection(address, timeout=1.0).close()
    except ConnectionRefusedError:
        return True
    except (TimeoutError, ConnectionResetError):
        return False
    return False


def watched_events(pid: int, inode: str) -> list[int]:
    """The event masks under which `pid`'s epoll sets watch the socket `inode`
    (from /proc/PID/fdinfo of each epoll descriptor: one ``tfd:`` line per target)."""
    links = fd_links(pid)
    socket_fds = {fd for fd, link in links.items() if link == f"socket:[{inode}]"}
    masks = []
    for fd, link in links.items():
        if link != "anon_inode:[eventpoll]":
            continue
        try:
            info = Path(f"/proc/{pid}/fdinfo/{fd}").read_text()
        except FileNotFoundError:  # closed since the listing
            continue
        for line in info.splitlines():
            fields = line.split()
            if fields[:1] == ["tfd:"] and fields[1] in socket_fds:
                masks.append(int(fields[3], 16))  # tfd: N events: MASK data: ...
    return masks


def fd_links(pid: int) -> dict[str, str]:
    """What each open descriptor of `pid` is, by number; one closed while it is read (a
    spawner just forked closes what it does not keep) is left out, not an error."""
    links = {}
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            links[fd.name] = os.readlink(fd)
        except FileNotFoundError:
            continue
    return links


def test_a_client_wakes_one_waiting_spawner(netserver_proc: ServerFactory) -> None:
    """Each spawner watches the listener with EPOLLEXCLUSIVE: the kernel wakes one of
    those waiting for each client, not all of them (with plain poll both woke, and one
    lost the race to accept)."""
    server = netserver_proc(["--listen", "127.0.0.1:0", *CAT])
    spawners = the_spawners(server.proc.pid)
    inode = listener_inode(server.host_port[1])
    assert wait_until(lambda: all(watched_events(pid, inode) for pid in spawners))
    for pid in spawners:
        (mask,) = watched_events(pid, inode)
        assert mask & select.EPOLLEXCLUSIVE and mask & select.EPOLLIN
    with connect(server.host_port) as sock:
        assert round_trip(sock) == b"ping\n"


def test_the_spawners_accept_and_the_supervisor_does_not(netserver_proc: ServerFactory) -> None:
    server = netserver_proc(["--listen", "127.0.0.1:0", *CAT])
    spawners = the_spawners(server.proc.pid)
    inode = listener_inode(server.host_port[1])
    assert wait_until(lambda: all(holds_socket(pid, inode) for pid in spawners))
    with connect(server.host_port) as sock:
        assert round_trip(sock) == b"ping\n"
        assert serving_spawner(server.proc.pid, spawners) in spawners
    assert wait_until(lambda: log_count(server.log, "status=ok") == 1)
    assert "mode=fork" in server.log()  # the server's mode name, as the supervisor logs it


def test_max_conns_holds_across_spawners(netserver_proc: ServerFactory) -> None:
    """Two clients served by one spawner fill --max-conns 2 for the other too; a place
    freed by the first (once it has counted its client out) serves the waiting one."""
    server = netserver_proc(["--listen", "127.0.0.1:0", "--max-conns", "2", *CAT])
    first, second = sorted(the_spawners(server.proc.pid))
    with stopped(first):
        one, two = connect(server.host_port), connect(server.host_port)
        assert round_trip(one) == b"ping\n" and round_trip(two) == b"ping\n"
    with stopped(second):  # only `first` can take the third client now
        third = connect(server.host_port)
        third.sendall(b"ping\n")
        assert nothing_arrives(third, QUIET)  # full: it waits, it is not refused
        one.close()  # its command ends, but `second` is stopped and cannot count it out
        assert nothing_arrives(third, QUIET)
    assert recv_line(third) == b"ping\n"
    for sock in (two, third):
        sock.close()
    assert wait_until(lambda: log_count(server.log, "status=ok") == 3)
    assert "refused" not in server.log()


def test_max_per_source_refuses_across_spawners(netserver_proc: ServerFactory) -> None:
    """A client over --max-per-source is refused by the other spawner (the source's
    count is shared); another source is served."""
    args = ["--listen", "127.0.0.1:0", "--max-per-source", "1", *CAT]
    server = netserver_proc(args)
    spawners = the_spawners(server.proc.pid)
    with connect(server.host_port) as held:
        assert round_trip(held) == b"ping\n"
        with stopped(serving_spawner(server.proc.pid, spawners)):
            with connect(server.host_port) as over:
                assert closed_by_peer(over)
            with connect(server.host_port, source="127.0.0.2") as other:
                assert round_trip(other) == b"ping\n"
    assert wait_until(lambda: log_count(server.log, "status=ok") == 2)
    assert log_count(server.log, 'reason="more than 1 connections from 127.0.0.1"') == 1


def test_a_killed_spawners_command_keeps_its_place_until_it_ends(
    netserver_proc: ServerFactory,
) -> None:
    """--max-conns 1: the command of a spawner killed with SIGKILL still holds the one
    place while it runs (the server watches it); when it ends the place is free."""
    server = netserver_proc(["--listen", "127.0.0.1:0", "--max-conns", "1", *CAT])
    spawners = the_spawners(server.proc.pid)
    first = connect(server.host_port)
    assert round_trip(first) == b"ping\n"
    os.kill(serving_spawner(server.proc.pid, spawners), signal.SIGKILL)
    wait_log(server, "spawner process died")
    assert wait_until(lambda: len(children(server.proc.pid)) == len(spawners))
    waiting = connect(server.host_port)
    waiting.sendall(b"ping\n")
    assert nothing_arrives(waiting, QUIET)
    assert round_trip(first) == b"ping\n"  # its command still serves it
    port = first.getsockname()[1]
    first.close()
    assert recv_line(waiting) == b"ping\n"
    waiting.close()
    assert wait_until(lambda: log_count(server.log, "status=ok") == 1)
    (died,) = [line for line in server.log().splitlines() if "status=spawner-died" in line]
    assert f"peer=127.0.0.1:{port} local=127.0.0.1:{server.host_port[1]}" in died


def test_the_spawners_let_go_of_the_port_when_the_server_is_killed(
    netserver_proc: ServerFactory,
) -> None:
    """SIGKILL of the server: the spawners close the listener at once (nobody takes new
    clients), let the running command finish, then exit."""
    server = netserver_proc(["--listen", "127.0.0.1:0", *CAT])
    spawners = watch_exits(the_spawners(server.proc.pid))
    with connect(server.host_port) as sock:
        assert round_trip(sock) == b"ping\n"
        server.proc.kill()
        server.proc.wait()
        assert wait_until(lambda: refuses_connections(server.host_port), DEADLINE), (
            "a spawner still holds the listener"
        )
        assert round_trip(sock) == b"ping\n"  # the command goes on
    assert all_exit(spawners, DEADLINE), "a spawner outlived its last command"


def test_reloaded_access_rules_reach_the_spawners(
    netserver_proc: ServerFactory, tmp_path: Path
) -> None:
    """Spawners judge by the rules they were forked with: a reload starts new ones; a
    rule that needs a name gives the accepting back to the supervisor."""
    rules = tmp_path / "access"
    rules.write_text("allow 127.0.0.0/8\n")
    server = netserver_proc(["--listen", "127.0.0.1:0", "--access-file", str(rules), *CAT])
    old = watch_exits(the_spawners(server.proc.pid))
    with connect(server.host_port) as sock:
        assert round_trip(sock) == b"ping\n"
    rules.write_text("deny 127.0.0.1\n")
    server.signal(signal.SIGHUP)
    wait_log(server, "access rules reloaded")
    assert all_exit(old, DEADLINE), "a retired spawner is still there"  # nothing ran
    with connect(server.host_port) as sock:
        assert closed_by_peer(sock)
    with connect(server.host_port, source="127.0.0.2") as sock:
        assert round_trip(sock) == b"ping\n"
    rules.write_text("allow localhost\n")  # a name: the supervisor judges again
    server.signal(signal.SIGHUP)
    wait_log(server, "the supervisor accepts again")
    inode = listener_inode(server.host_port[1])
    pid = server.proc.pid
    assert wait_until(lambda: not any(holds_socket(p, inode) for p in children(pid)))
    assert server.stop() == 0


def test_quiet_drops_the_connection_lines_but_not_the_refusals(
    netserver_proc: ServerFactory,
) -> None:
    """``--quiet``: like tcpserver without -v, no line for a connection that was served;
    a refusal is still logged. The server is stopped before its log is read, so every
    line a spawner would have written is there."""
    args = ["--listen", "127.0.0.1:0", "--quiet", "--max-per-source", "1", *CAT]
    server = netserver_proc(args)
    for source in ("127.0.0.2", "127.0.0.3", "127.0.0.4"):
        with connect(server.host_port, source=source) as sock:
            assert round_trip(sock) == b"ping\n"
    with connect(server.host_port) as held:
        assert round_trip(held) == b"ping\n"
        with connect(server.host_port) as over:
            assert closed_by_peer(over)
    assert server.stop() == 0
    assert log_count(server.log, 'reason="more than 1 connections from 127.0.0.1"') == 1
    assert log_count(server.log, "netserver: conn ") == 0
