"""Workers that accept on the listening socket themselves (modes.direct, modes.shared).

`netserver serve --mode async --workers 2` with no gate but its limits: the workers
watch the inherited listener, and the caps hold across them through the shared table.
Real clients on loopback; the handler answers with the pid of the worker serving it.
"""

from __future__ import annotations

import os
import pwd
import select
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import RunningServer, ServerFactory
from leafmail_fixtures import LeafmailFactory, RawSMTP, leafmail_servers
from lifecycle_handlers import IO_TIMEOUT, all_exit, holds_socket
from test_async_workers import DEADLINE, children, connect, serve

QUIET = 0.5  # how long a client that must wait is watched for a wrong answer


def listener_inode(port: int) -> str:
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if int(fields[1].split(":")[1], 16) == port and fields[3] == "0A":  # LISTEN
            return fields[9]
    raise AssertionError(f"nothing listens on port {port}")


def answers(sock: socket.socket, wait: float) -> bytes | None:
    """What the server sent within `wait` seconds (b"" for its end), or None."""
    ready, _, _ = select.select([sock], [], [], wait)
    return sock.recv(64) if ready else None


def retry_until_served(address: tuple[str, int], what: str) -> tuple[socket.socket, int]:
    """Connect until a worker serves us (a refusal is a closed connection)."""
    deadline = time.monotonic() + DEADLINE
    while True:
        sock = socket.create_connection(address, timeout=IO_TIMEOUT)
        got = answers(sock, DEADLINE)
        if got:
            return sock, int(got)
        sock.close()
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def test_each_worker_accepts_on_the_listener(netserver_proc: ServerFactory) -> None:
    server, address = serve(netserver_proc)
    held = [connect(address) for _ in range(2)]
    inode = listener_inode(address[1])
    workers = children(server.proc.pid)
    assert {pid for _sock, pid in held} == set(workers)  # the least busy took each one
    assert all(holds_socket(pid, inode) for pid in workers)
    for sock, _pid in held:
        sock.close()


def test_max_conns_holds_across_workers(netserver_proc: ServerFactory) -> None:
    _server, address = serve(netserver_proc, "--max-conns", "2")
    first, second = connect(address), connect(address)
    assert first[1] != second[1]  # one in each worker: the cap counts both
    third = socket.create_connection(address, timeout=IO_TIMEOUT)
    assert answers(third, QUIET) is None  # waits (in the backlog or held), not refused
    first[0].close()
    got = answers(third, DEADLINE)
    assert got and int(got) in (first[1], second[1])
    second[0].close()
    third.close()


def test_per_source_refusals_are_counted_across_workers(netserver_proc: ServerFactory) -> None:
    server, address = serve(netserver_proc, "--max-per-source", "2")
    first, second = connect(address), connect(address)
    assert first[1] != second[1]
    for _ in range(3):
        with socket.create_connection(address, timeout=IO_TIMEOUT) as extra:
            assert answers(extra, DEADLINE) == b""  # refused by whichever worker took it
    refused = [line for line in server.log().splitlines() if "refused" in line]
    assert len(refused) == 3 and all("more than 2 connections" in x for x in refused)
    first[0].close()
    retry_until_served(address, "the slot to come back")[0].close()
    second[0].close()


def test_a_killed_worker_frees_its_slots(netserver_proc: ServerFactory) -> None:
    server, address = serve(netserver_proc, "--max-conns", "1")
    sock, pid = connect(address)
    os.kill(pid, signal.SIGKILL)
    assert answers(sock, DEADLINE) == b""  # its session died with it
    sock.close()
    # The table still counted that session: unless the supervisor counts it out, the
    # cap of 1 would keep every later client waiting.
    again, _pid = retry_until_served(address, "a client after the kill")
    again.close()
    assert "connections counted out" in server.log()


def test_parent_sigkill_ends_workers_and_their_sessions(netserver_proc: ServerFactory) -> None:
    server, address = serve(netserver_proc)
    held = [connect(address) for _ in range(2)]
    workers = children(server.proc.pid)
    fds = [os.pidfd_open(pid) for pid in workers]
    server.proc.kill()
    server.proc.wait(IO_TIMEOUT)
    assert all_exit(fds, DEADLINE), "a worker outlived its supervisor"
    for sock, _pid in held:
        assert answers(sock, DEADLINE) == b""
        sock.close()
    # Nobody holds the listener any more: nobody serves unsupervised.
    try:
        socket.create_connection(address, timeout=IO_TIMEOUT).close()
    except ConnectionRefusedError:
        return
    raise AssertionError("a connection was accepted after every process died")


def test_reloaded_access_rules_reach_the_workers(
    netserver_proc: ServerFactory, tmp_path: Path
) -> None:
    """Workers that accept judge by the rules they were forked with: a reload starts new
    ones; a rule that needs a name gives the accepting back to the supervisor."""
    rules = tmp_path / "access"
    rules.write_text("allow 127.0.0.0/8\n")
    server, address = serve(netserver_proc, "--access-file", str(rules))
    connect(address)[0].close()
    rules.write_text("deny 127.0.0.1\n")
    server.signal(signal.SIGHUP)
    wait_log(server, "access rules reloaded")
    deadline = time.monotonic() + DEADLINE
    while True:  # the old workers may take a client until they have retired
        with socket.create_connection(address, timeout=IO_TIMEOUT) as sock:
            if answers(sock, DEADLINE) == b"":
                break
        assert time.monotonic() < deadline, "the new rule never applied"
    rules.write_text("allow localhost\n")  # a name: the supervisor judges again
    server.signal(signal.SIGHUP)
    wait_log(server, "the supervisor accepts again")
    inode = listener_inode(address[1])
    deadline = time.monotonic() + DEADLINE
    while any(holds_socket(pid, inode) for pid in children(server.proc.pid)):
        assert time.monotonic() < deadline, "a worker still accepts"
        time.sleep(0.02)


def wait_log(server: RunningServer, text: str) -> None:
    deadline = time.monotonic() + DEADLINE
    while text not in server.log():
        assert time.monotonic() < deadline, f"no {text!r} in the log"
        time.sleep(0.02)


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[LeafmailFactory]:
    yield from leafmail_servers(tmp_path)


def test_leafmail_max_sessions_holds_across_smtpd_workers(servers: LeafmailFactory) -> None:
    """leafmail's smtpd workers accept themselves: `max_sessions` counts the sessions
    of both, and a client past it waits for a free place (no greeting, no refusal)."""
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("leafmail")
        except KeyError:
            pytest.skip("no leafmail user (.ci/run creates it)")
    server = servers("[smtp]\nmax_sessions = 2\n[process]\nworkers = 2\n")
    held = [RawSMTP(server.address()) for _ in range(2)]
    for raw in held:
        assert raw.greeting().code == 220
    third = RawSMTP(server.address())
    assert answers(third.sock, QUIET) is None  # waits for a place: not refused
    held[0].close()
    assert third.greeting().code == 220
    third.close()
    held[1].close()
