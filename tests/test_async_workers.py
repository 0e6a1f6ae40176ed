"""`netserver serve --mode async --workers N`: any async handler on N processes.

A real server process; the handler answers with the pid of the process serving the
connection, so the test sees which worker took it. The supervisor still counts every
connection: a per-source cap holds across workers, a killed worker is replaced, and
killing the supervisor ends every worker.
"""

from __future__ import annotations

import os
import select
import signal
import socket
import time
from pathlib import Path

from conftest import RunningServer, ServerFactory
from lifecycle_handlers import HANDLER_ENV, IO_TIMEOUT, all_exit, wait_until

DEADLINE = 15.0


def serve(
    netserver_proc: ServerFactory, *extra: str, handler: str = "async_pid"
) -> tuple[RunningServer, tuple[str, int]]:
    server = netserver_proc(
        [
            "--mode", "async", "--workers", "2", "--listen", "127.0.0.1:0",
            "--handler", f"lifecycle_handlers:{handler}", *extra,
        ],
        env=HANDLER_ENV,
    )  # fmt: skip
    return server, server.host_port


def connect(address: tuple[str, int]) -> tuple[socket.socket, int]:
    """Connect and read the serving pid (first line)."""
    sock = socket.create_connection(address, timeout=IO_TIMEOUT)
    data = b""
    while not data.endswith(b"\n"):
        chunk = sock.recv(64)
        assert chunk, f"closed before the pid line: {data!r}"
        data += chunk
    return sock, int(data)


def children(pid: int) -> list[int]:
    """The child processes of `pid`, as each of its threads lists those it forked."""
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            found += [int(c) for c in (task / "children").read_text().split()]
        except FileNotFoundError:  # a thread that ended since the listing forked none now
            continue
    return found


def test_connections_are_spread_over_the_workers(netserver_proc: ServerFactory) -> None:
    server, address = serve(netserver_proc)
    held = [connect(address) for _ in range(4)]  # served: the workers have started
    pids = {pid for _sock, pid in held}
    assert len(pids) == 2  # the least busy worker takes each new connection
    assert pids == set(children(server.proc.pid))
    for sock, _pid in held:
        sock.sendall(b"echo\n")
        assert sock.recv(16) == b"echo\n"
        sock.close()


def test_per_source_cap_counts_across_workers(netserver_proc: ServerFactory) -> None:
    _server, address = serve(netserver_proc, "--max-per-source", "2")
    first, second = connect(address), connect(address)
    assert first[1] != second[1]
    third = socket.create_connection(address, timeout=IO_TIMEOUT)
    assert third.recv(64) == b""  # refused by the supervisor, which counts for all
    third.close()
    first[0].close()
    deadline = time.monotonic() + DEADLINE
    while True:  # the end is reported by the worker; the slot comes back
        sock = socket.create_connection(address, timeout=IO_TIMEOUT)
        got = sock.recv(64)
        sock.close()
        if got:
            break
        assert time.monotonic() < deadline, "the slot never came back"
        time.sleep(0.02)
    second[0].close()


def test_a_killed_worker_is_replaced_and_the_supervisor_takes_them_all_down(
    netserver_proc: ServerFactory,
) -> None:
    server, address = serve(netserver_proc)
    parent = server.proc.pid
    connect(address)[0].close()  # served, so the workers have started
    old = children(parent)
    os.kill(old[0], signal.SIGKILL)
    deadline = time.monotonic() + DEADLINE
    while len(set(children(parent)) - {old[0]}) < 2:
        assert time.monotonic() < deadline, "no replacement worker"
        time.sleep(0.02)
    workers = children(parent)
    fds = [os.pidfd_open(pid) for pid in workers]
    os.kill(parent, signal.SIGKILL)
    server.proc.wait(IO_TIMEOUT)
    assert all_exit(fds, DEADLINE), "a worker outlived its supervisor"


def test_a_client_gone_mid_answer_ends_its_connection_not_the_worker(
    netserver_proc: ServerFactory,
) -> None:
    """A write into a connection the client has closed is EPIPE, not a SIGPIPE.

    A worker serves many clients from one process, so it keeps Python's SIGPIPE
    disposition (ignored) instead of the default that a forked handler gets: a client
    that closes while its answer is being written would otherwise kill the worker and
    every session in it, which any client can do at will.
    """
    server, address = serve(netserver_proc, handler="async_pid_answer_late")
    sock, pid = connect(address)
    worker = os.pidfd_open(pid)
    port = sock.getsockname()[1]
    sock.sendall(b"bye\n")
    sock.close()  # the handler answers after this: into a closed socket
    ended = f"peer=127.0.0.1:{port} "
    assert wait_until(
        lambda: ended in server.log() or bool(select.select([worker], [], [], 0)[0]),
        DEADLINE,
    ), "the connection neither ended nor killed its worker"
    assert not select.select([worker], [], [], 0)[0], f"the worker died: {server.log()}"
    os.close(worker)
    assert pid in children(server.proc.pid)


def test_a_worker_holds_every_socket_close_on_exec(netserver_proc: ServerFactory) -> None:
    """A descriptor passed to a worker is close-on-exec from the moment it arrives.

    A worker serves many clients at once: a command that one handler runs must not
    inherit another client's connection (`socket.recv_fds` would install it inheritable).
    """
    _server, address = serve(netserver_proc)
    held = [connect(address) for _ in range(3)]
    for pid in {pid for _sock, pid in held}:
        sockets = [
            fd for fd in Path(f"/proc/{pid}/fd").iterdir() if os.readlink(fd).startswith("socket:")
        ]
        assert len(sockets) >= 2  # the channel to the supervisor and a client at least
        for fd in sockets:
            flags = next(
                line.split()[1]
                for line in (Path(f"/proc/{pid}/fdinfo") / fd.name).read_text().splitlines()
                if line.startswith("flags:")
            )
            assert int(flags, 8) & os.O_CLOEXEC, f"worker {pid} fd {fd.name} is inheritable"
    for sock, _pid in held:
        sock.close()
