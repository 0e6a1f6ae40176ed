"""Nothing accumulates: children are reaped, descriptors closed, threads reused.

After hundreds of connections the server must look as it did after the first one:
no zombie children, the same number of open descriptors, a bounded number of threads.
And when descriptors run out, accept backs off instead of spinning, then recovers.
The server's state is read from /proc; "all connections ended" is the observable event
of one ``conn`` log line per connection.
"""

from __future__ import annotations

import resource
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from conftest import RunningServer, ServerFactory
from lifecycle_handlers import (
    HANDLER_ENV,
    children,
    connect,
    cpu_seconds,
    fd_count,
    log_count,
    nothing_arrives,
    recv_line,
    round_trip,
    serve_args,
    served,
    status_field,
    wait_until,
    zombies,
)

from netserver.modes.execute import SPAWNERS

CONN_LINE = "netserver: conn "
# Hundreds of connections, a fork for each in some modes: on a quiet machine seconds, but
# one stress run (-n 4 beside two CPU hogs and the full suite) took the 500 forks of
# fork-stdio past the suite's 60 s. A bound on a hang, not a performance figure.
MANY_CONNECTIONS = pytest.mark.timeout(240)


def converse(address: tuple[str, int]) -> bool:
    with connect(address) as sock:
        return round_trip(sock) == b"ping\n" and round_trip(sock, b"pong\n") == b"pong\n"


def run_clients(server: RunningServer, count: int, concurrency: int = 1) -> None:
    """*count* short conversations, then wait until the server has logged every end."""
    before = log_count(server.log, CONN_LINE)
    if concurrency == 1:
        results = [converse(server.host_port) for _ in range(count)]
    else:
        with ThreadPoolExecutor(concurrency) as pool:
            results = list(pool.map(lambda _: converse(server.host_port), range(count)))
    assert all(results), f"{results.count(False)} of {count} conversations failed"
    assert wait_until(lambda: log_count(server.log, CONN_LINE) == before + count)


def converse_to_its_end(server: RunningServer) -> bool:
    """A conversation, then wait until the server has logged its end.

    A client that has closed is not a connection the server has finished: on a loaded
    machine the server may still be ending several, and each holds a thread (a stress
    run saw 6 more threads, one client after another). Waiting for each end keeps the
    connections the server serves at once to the clients' concurrency, so a thread
    count above that is a thread not reused, whatever the scheduler did.
    """
    with connect(server.host_port) as sock:
        talked = round_trip(sock) == b"ping\n" and round_trip(sock, b"pong\n") == b"pong\n"
        ended = f"peer=127.0.0.1:{sock.getsockname()[1]} "
    return talked and wait_until(lambda: ended in server.log())


def run_clients_to_their_ends(server: RunningServer, count: int, concurrency: int) -> None:
    """*count* conversations, at most *concurrency* of them open in the server at once."""
    before = log_count(server.log, CONN_LINE)
    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(lambda _: converse_to_its_end(server), range(count)))
    assert all(results), f"{results.count(False)} of {count} conversations failed"
    assert log_count(server.log, CONN_LINE) == before + count


def warmed_up(server: RunningServer) -> None:
    """One connection first, so lazily created things (pools, buffers) exist at baseline."""
    run_clients(server, 1)


@MANY_CONNECTIONS
@pytest.mark.parametrize(
    ("args", "count", "helpers"),
    [
        pytest.param(serve_args("fork"), 500, 0, id="fork-stdio"),
        pytest.param(
            serve_args("fork", "--handler", "lifecycle_handlers:conn_echo"),
            200,
            0,
            id="fork-connection",
        ),
        pytest.param(["--listen", "127.0.0.1:0", "--", "/bin/cat"], 500, SPAWNERS, id="command"),
        pytest.param(
            ["--listen", "127.0.0.1:0", "--mode", "async", "--", "/bin/cat"],
            100,
            SPAWNERS,
            id="command-async",
        ),
    ],
)
def test_process_per_connection_leaves_nothing_behind(
    netserver_proc: ServerFactory, args: list[str], count: int, helpers: int
) -> None:
    """Commands are started and reaped by spawner processes, the server's lasting
    children: they must look as they did after the first connection too, no child left."""
    server = netserver_proc(args, env=HANDLER_ENV)
    pid = server.proc.pid
    warmed_up(server)
    lasting = set(children(pid))
    assert len(lasting) == helpers
    fds = {process: fd_count(process) for process in (pid, *lasting)}
    run_clients(server, count)
    assert zombies(pid) == []
    assert set(children(pid)) == lasting, "a child outlived its connection"
    for spawner in lasting:
        assert children(spawner) == {}, "a command outlived its connection"
    assert {process: fd_count(process) for process in fds} == fds
    assert log_count(server.log, "status=ok") == count + 1


@MANY_CONNECTIONS
def test_prefork_leaves_nothing_behind(netserver_proc: ServerFactory) -> None:
    """200 connections with workers recycled every 25: old workers are all reaped."""
    server = netserver_proc(
        serve_args("prefork", "--recycle", "25", "--workers-min", "2", "--workers-max", "4"),
        env=HANDLER_ENV,
    )
    pid = server.proc.pid
    warmed_up(server)
    fds, workers = fd_count(pid), len(children(pid))
    run_clients(server, 100)
    run_clients(server, 100, concurrency=4)

    def settled() -> bool:
        """No zombie, and two supervisor descriptors (channel, pidfd) per worker.

        A worker that has just retired may still be exiting; give that a moment.
        """
        pool = children(pid)
        return "Z" not in pool.values() and fd_count(pid) == fds + 2 * (len(pool) - workers)

    assert wait_until(settled), (children(pid), fd_count(pid), fds, workers)
    assert 2 <= len(children(pid)) <= 4
    assert log_count(server.log, "status=ok") == 201


@MANY_CONNECTIONS
def test_thread_mode_reuses_threads(netserver_proc: ServerFactory) -> None:
    server = netserver_proc(serve_args("thread"), env=HANDLER_ENV)
    pid = server.proc.pid
    warmed_up(server)
    fds, threads = fd_count(pid), status_field(pid, "Threads")
    run_clients_to_their_ends(server, 300, concurrency=1)
    assert status_field(pid, "Threads") <= threads + 3
    run_clients_to_their_ends(server, 500, concurrency=10)
    assert status_field(pid, "Threads") <= threads + 2 * 10
    assert fd_count(pid) == fds


@MANY_CONNECTIONS
def test_async_mode_leaves_no_descriptors(netserver_proc: ServerFactory) -> None:
    server = netserver_proc(serve_args("async"), env=HANDLER_ENV)
    pid = server.proc.pid
    warmed_up(server)
    fds, threads = fd_count(pid), status_field(pid, "Threads")
    run_clients(server, 300, concurrency=10)
    assert fd_count(pid) == fds
    assert status_field(pid, "Threads") == threads


# --------------------------------------------------------------------------- EMFILE

HOLD = 1.0
CLIENTS = 30
# How long a client waits to be served once descriptors are back: the server's accept
# may still back off for up to a second (listen.accept's longest delay), and a loaded
# machine adds to that. The wait ends as soon as the answer comes.
SERVED_WITHIN = 15.0


def limit_descriptors(pid: int, spare: int) -> tuple[int, int]:
    """Lower the server's soft RLIMIT_NOFILE to *spare* above what it has open now.

    Returns the previous limits. (The hard limit stays: raising it back needs
    CAP_SYS_RESOURCE, and a test may want to restore the soft one.)
    """
    previous = resource.prlimit(pid, resource.RLIMIT_NOFILE)
    resource.prlimit(pid, resource.RLIMIT_NOFILE, (fd_count(pid) + spare, previous[1]))
    return previous


# In fork mode each connection costs the supervisor two descriptors (the socket and a
# pidfd), so whether accept() or pidfd_open() is the call that hits the limit depends
# on the parity of the spare descriptors: both are tested.


@pytest.mark.parametrize(
    ("mode", "spare"),
    [
        pytest.param("async", 10, id="async"),
        pytest.param("thread", 10, id="thread"),
        pytest.param("fork", 10, id="fork-accept-fails"),
        pytest.param("fork", 11, id="fork-pidfd-fails"),
        pytest.param("prefork", 10, id="prefork"),
    ],
)
def test_running_out_of_descriptors_backs_off(
    netserver_proc: ServerFactory, mode: str, spare: int
) -> None:
    server = netserver_proc(serve_args(mode, "--max-conns", "1000"), env=HANDLER_ENV)
    pid = server.proc.pid
    warmed_up(server)
    limit_descriptors(pid, spare)
    cpu_before = cpu_seconds(pid)
    held = [connect(server.host_port) for _ in range(CLIENTS)]
    try:
        # Either outcome is an event to wait for; only one of them is right.
        assert wait_until(lambda: any(t in server.log() for t in ("backing off", "Traceback")))
        time.sleep(HOLD)  # the behaviour under test: what the server does meanwhile
        spent = cpu_seconds(pid) - cpu_before
        assert log_count(server.log, "backing off") == 1
        assert 'error="Too many open files"' in server.log()
    finally:
        for sock in held:
            sock.close()
    assert spent < 0.4 * HOLD, f"server used {spent:.2f}s of CPU while out of descriptors"
    assert wait_until(lambda: served(server.host_port)), "not serving after descriptors freed"
    assert wait_until(lambda: zombies(pid) == []), f"zombies: {zombies(pid)}"
    assert "Traceback" not in server.log(), server.log()
    assert server.stop() == 0


def test_fork_mode_gets_its_capacity_back_after_running_out(
    netserver_proc: ServerFactory,
) -> None:
    server = netserver_proc(serve_args("fork", "--max-conns", "4"), env=HANDLER_ENV)
    pid = server.proc.pid
    warmed_up(server)
    previous = limit_descriptors(pid, 5)  # odd: a child's pidfd_open is what fails
    held = [connect(server.host_port) for _ in range(6)]
    try:
        for sock in held:
            sock.sendall(b"held\n")
        assert [recv_line(sock) for sock in held[:2]] == [b"held\n"] * 2
        time.sleep(HOLD / 2)  # let the server try (and fail) to take the rest
    finally:
        for sock in held:
            sock.close()
    assert wait_until(lambda: set(children(pid).values()) <= {"Z"}), children(pid)
    resource.prlimit(pid, resource.RLIMIT_NOFILE, previous)
    clients = [connect(server.host_port) for _ in range(4)]
    try:
        for n, sock in enumerate(clients):
            sock.sendall(b"%d\n" % n)
        for n, sock in enumerate(clients):
            assert not nothing_arrives(sock, SERVED_WITHIN), f"client {n} of 4 not served"
            assert recv_line(sock) == b"%d\n" % n
    finally:
        for sock in clients:
            sock.close()
