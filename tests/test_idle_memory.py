"""What a server keeps per idle connection (issue 12: 10,000 idle sessions in 90 MB).

Objects that every connection shares are checked here by identity: a per-connection
copy costs its size 10,000 times (bench/smtp_idle.py measures the whole). Real
servers, real sockets on loopback; the worker processes are real forks.
"""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
from collections.abc import Awaitable, Callable

import pytest
from conftest import ROOT

from netserver import Server
from netserver.limits import Limits
from netserver.modes.eventloop import TASK_NAME, EventLoopMode
from netserver.modes.workers import PoolMode
from netserver.server import ModeSpec, RunOptions

if str(ROOT) not in sys.path:  # the examples package lives at the project root
    sys.path.insert(0, str(ROOT))
import examples.echo

CLIENTS = 3
IO_TIMEOUT = 10.0


async def _echo_clients(port: int) -> list[socket.socket]:
    """Open CLIENTS connections, each answered once (so each is being served)."""
    loop = asyncio.get_running_loop()
    socks = []
    for _ in range(CLIENTS):
        sock = socket.socket()
        sock.setblocking(False)
        socks.append(sock)
        async with asyncio.timeout(IO_TIMEOUT):
            await loop.sock_connect(sock, ("127.0.0.1", port))
            await loop.sock_sendall(sock, b"ping\r\n")
            assert await loop.sock_recv(sock, 100) == b"ping\r\n"
    return socks


def _server(spec: ModeSpec, ready: asyncio.Event, limits: Limits | None) -> Server:
    """The echo example on port 0; `ready` is set once it listens (its readiness signal)."""
    options = RunOptions(loop="asyncio", signals=False, on_ready=lambda _ends: ready.set())
    return Server(
        examples.echo.async_main, "127.0.0.1:0", mode=spec, limits=limits, options=options
    )


def _run(
    spec: ModeSpec, check: Callable[[Server], Awaitable[None]], limits: Limits | None = None
) -> None:
    async def main() -> None:
        ready = asyncio.Event()
        server = _server(spec, ready, limits)
        serving = asyncio.create_task(server.serve())
        async with asyncio.timeout(IO_TIMEOUT):
            await ready.wait()
        port = server.addresses[0].port
        assert port is not None
        socks = await _echo_clients(port)
        try:
            await check(server)
        finally:
            for sock in socks:
                sock.close()
            server.stop()
            await serving

    asyncio.run(main())


def test_event_loop_tasks_share_their_name_and_done_callback() -> None:
    async def check(server: Server) -> None:
        mode = server.mode
        assert isinstance(mode, EventLoopMode)
        assert len(mode.tasks) == CLIENTS
        assert {task.get_name() for task in mode.tasks} == {TASK_NAME}

    _run(ModeSpec("async"), check)


@pytest.mark.slow  # forks a worker process
def test_the_supervisor_keeps_no_socket_or_local_endpoint_per_handed_off_connection() -> None:
    async def check(server: Server) -> None:
        mode = server.mode
        assert isinstance(mode, PoolMode)
        lives = [live for proc in mode.pool.procs.values() for live in proc.conns.values()]
        assert len(lives) == CLIENTS
        assert len({id(live.conn.sock) for live in lives}) == 1
        assert all(live.conn.sock.fileno() == -1 for live in lives)  # closed here
        # ... and its number forgotten: the kernel gives it to the next client, whose
        # registration the end of this one must not undo (nor keep an int for it).
        assert all(live.conn.fd == -1 for live in lives)
        assert len({id(live.conn.record.local) for live in lives}) == 1
        assert len({id(live.conn.record.peer) for live in lives}) == CLIENTS

    # A per-source rate keeps the supervisor's accept and hand-off (modes.direct).
    _run(ModeSpec("async", workers=1), check, Limits(rate_per_source=1000.0))


@pytest.mark.slow  # forks a worker process
def test_the_supervisor_keeps_nothing_per_connection_its_workers_accept() -> None:
    async def check(server: Server) -> None:
        mode = server.mode
        assert isinstance(mode, PoolMode) and mode.direct is not None
        assert not [conn for proc in mode.pool.procs.values() for conn in proc.conns]
        assert server.admission.total == 0
        assert mode.direct.table.total == CLIENTS  # counted in the workers' table

    _run(ModeSpec("async", workers=1), check)


# What `leafmail serve` imports before it forks its processes: each module is in all of
# them (shared until a process writes near it), so one no process runs is pure cost.
SERVE_IMPORTS = "import leafmail.cli, leafmail.daemon, sys; print(' '.join(sorted(sys.modules)))"
NOT_SERVED = (
    "netserver.cli",  # the netserver command: leafmail needs only netserver.usage
    "netserver.gates",
    "netserver.inetd",
    "netserver.tcpd",
    "leafmail.bulk",  # the queue tools: a command of their own, never `serve`
    "leafmail.qshape",
    "leafmail.tools",
    "leafmail.aliases",  # only with [local], which imports it where it is used
    "email.policy",  # only leafmail.api.submit given an email.message.Message needs it
)


def test_leafmail_serve_imports_no_command_its_processes_never_run() -> None:
    done = subprocess.run(
        [sys.executable, "-c", SERVE_IMPORTS],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    modules = set(done.stdout.split())
    assert {"leafmail.daemon", "leafmail.smtpd", "leafmail.qmgr", "netserver.usage"} <= modules
    loaded = sorted(m for m in modules if m.startswith(NOT_SERVED))
    assert loaded == []
