"""Shared fixtures: run `netserver serve` as a real process and wait for its READY line.

Readiness comes from the server itself (``--ready-fd``), never from sleeping: the
server writes ``READY ADDR ...`` once its sockets listen, with the ports it really got.

The test layers (fast, slow) are a plugin of their own: tests/layers.py.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from hypothesis import HealthCheck, settings
from smarthost import sink, spool  # noqa: F401 (fixtures: pytest finds them here)

if TYPE_CHECKING:
    from netserver import Server

pytest_plugins = ["layers", "pytester"]  # the test layers (tests/layers.py); pytester

ROOT = Path(__file__).resolve().parent.parent
READY_TIMEOUT = 20.0

# Property tests judge what a function returns, never how fast: no per-example deadline
# (200 ms by default) and no health check on slow generation, both of which a loaded
# machine trips at random (and report as a flaky failure). A test's own @settings keeps
# what it says; what it leaves out comes from here.
settings.register_profile("netserver", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("netserver")


@contextlib.contextmanager
def served(server: Server) -> Iterator[None]:
    """`server.run()` on a thread of this process (the main thread keeps the signals)
    from its ready signal to the end of the block; then stopped, and the thread ends."""
    thread = threading.Thread(target=server.run, name="test-served")
    thread.start()
    try:
        assert server.ready.wait(READY_TIMEOUT)
        yield
    finally:
        server.stop()
        thread.join(READY_TIMEOUT)
    assert not thread.is_alive()


@dataclass
class RunningServer:
    """A `netserver serve` process and where it listens."""

    proc: subprocess.Popen[bytes]
    addresses: list[str]
    log_path: Path
    _stopped: bool = field(default=False)

    @property
    def host_port(self) -> tuple[str, int]:
        """The first address as (host, port) for socket.create_connection."""
        host, _, port = self.addresses[0].rpartition(":")
        return host.strip("[]"), int(port)

    def log(self) -> str:
        """Everything the server wrote to stderr so far."""
        return self.log_path.read_text(errors="replace")

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def stop(self, timeout: float = 20.0) -> int:
        """SIGTERM and wait; returns the exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(timeout)


def launch_with_ready_fd(
    argv_for: Callable[[int], list[str]],
    log_path: Path,
    env: dict[str, str],
    pass_fds: tuple[int, ...] = (),
    cwd: Path = ROOT,
    ready_timeout: float = READY_TIMEOUT,
) -> tuple[subprocess.Popen[bytes], list[str]]:
    """Start ``argv_for(fd)`` in `cwd`, stdout/stderr to `log_path`; wait for its READY line.

    The program is given the write end of a pipe as ``--ready-fd``; returns the process
    and the addresses the READY line names. A program that dies or stays silent for
    `ready_timeout` seconds is killed and its log raised.
    """
    read_fd, write_fd = os.pipe()
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            argv_for(write_fd),
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            pass_fds=(write_fd, *pass_fds),
            env=env,
        )
    os.close(write_fd)
    try:
        ready, _, _ = select.select([read_fd], [], [], ready_timeout)
        line = os.read(read_fd, 4096).decode() if ready else ""
    finally:
        os.close(read_fd)
    if not line.startswith("READY "):
        proc.kill()
        proc.wait()
        raise RuntimeError(f"server did not start: {log_path.read_text(errors='replace')}")
    return proc, line.split()[1:]


def start_server(
    args: list[str],
    tmp_path: Path,
    env: dict[str, str] | None = None,
    pass_fds: tuple[int, ...] = (),
) -> RunningServer:
    """Start ``netserver serve ARGS`` with --ready-fd and return once it listens.

    `pass_fds` are extra descriptors the server inherits (to show it does not leak them).
    """
    log_path = tmp_path / f"server-{len(list(tmp_path.glob('server-*.log')))}.log"
    proc, addresses = launch_with_ready_fd(
        lambda fd: [sys.executable, "-m", "netserver.cli", "serve", "--ready-fd", str(fd), *args],
        log_path,
        {**os.environ, **(env or {})},
        pass_fds,
    )
    return RunningServer(proc, addresses, log_path)


ServerFactory = Callable[..., RunningServer]


@pytest.fixture
def netserver_proc(tmp_path: Path) -> Iterator[ServerFactory]:
    """A factory: ``netserver_proc([...args])`` starts a server, stopped at teardown."""
    started: list[RunningServer] = []

    def factory(args: list[str], env: dict[str, str] | None = None) -> RunningServer:
        server = start_server(args, tmp_path, env)
        started.append(server)
        return server

    yield factory
    for server in started:
        server.stop()


class FakeClock:
    """An injected clock (retry tests): it only moves when the test says so."""

    def __init__(self, start: float | None = None) -> None:
        self.now = time.time() if start is None else start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds
