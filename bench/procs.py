"""Starting the servers under test as processes, knowing their port, and always stopping them.

Readiness comes from the server, never from sleeping: netserver and the baseline write
``READY 127.0.0.1:PORT`` to an inherited pipe (``--ready-fd``), and tcpserver prints the
port it bound on stdout with ``-1``. Every server listens on 127.0.0.1 port 0, so runs
never collide with each other or with anything else on the machine.

`running` is a context manager: the process is stopped (SIGTERM, then SIGKILL) when the
block ends, whatever happened inside it.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
READY_TIMEOUT = 20.0
STOP_TIMEOUT = 15.0


@dataclass(frozen=True)
class ServerSpec:
    """How to start one server: `argv(fd)` builds its command line.

    With ``announce="ready-fd"`` the command gets the write end of a pipe as `fd` and
    must write ``READY HOST:PORT`` to it; with ``"stdout-port"`` it must print the bare
    port number on stdout (tcpserver -1) and `fd` is unused.
    """

    name: str
    argv: Callable[[int], list[str]]
    announce: str = "ready-fd"


@dataclass
class RunningServer:
    """A started server process and the port it listens on (127.0.0.1)."""

    name: str
    proc: subprocess.Popen[bytes]
    port: int
    log_path: Path

    def log_tail(self, lines: int = 20) -> str:
        """The end of the server's stderr, for error messages."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


def python_module(module: str, *args: str) -> list[str]:
    """``python -m MODULE ARGS`` with this interpreter (the venv's)."""
    return [sys.executable, "-m", module, *args]


def _read_line(fd: int, timeout: float) -> str:
    """One announcement line from `fd`, or "" if none came in `timeout` seconds."""
    ready, _, _ = select.select([fd], [], [], timeout)
    return os.read(fd, 4096).decode(errors="replace") if ready else ""


def _parse_port(spec: ServerSpec, line: str) -> int | None:
    words = line.split()
    if spec.announce == "stdout-port":
        return int(words[0]) if words and words[0].isdigit() else None
    if len(words) >= 2 and words[0] == "READY":
        port = words[1].rpartition(":")[2]
        return int(port) if port.isdigit() else None
    return None


def start(spec: ServerSpec, log_dir: Path) -> RunningServer:
    """Start the server and return once it listens; RuntimeError if it does not."""
    log_path = log_dir / f"{spec.name.replace(' ', '_').replace('/', '_')}.log"
    read_fd, write_fd = os.pipe()
    try:
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(
                spec.argv(write_fd),
                cwd=ROOT,
                stdin=subprocess.DEVNULL,
                stdout=write_fd if spec.announce == "stdout-port" else log,
                stderr=log,
                pass_fds=(write_fd,) if spec.announce == "ready-fd" else (),
            )
        os.close(write_fd)
        write_fd = -1
        line = _read_line(read_fd, READY_TIMEOUT)
    finally:
        os.close(read_fd)
        if write_fd >= 0:
            os.close(write_fd)
    server = RunningServer(spec.name, proc, 0, log_path)
    port = _parse_port(spec, line)
    if port is None:
        stop(server)
        raise RuntimeError(f"{spec.name} did not start ({line!r}):\n{server.log_tail()}")
    server.port = port
    return server


def stop(server: RunningServer) -> None:
    """SIGTERM, wait; SIGKILL if it is still there after STOP_TIMEOUT seconds."""
    proc = server.proc
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(STOP_TIMEOUT)


@contextlib.contextmanager
def running(spec: ServerSpec, log_dir: Path) -> Iterator[RunningServer]:
    """Start `spec` for the duration of the block; stop it however the block ends."""
    server = start(spec, log_dir)
    try:
        yield server
    finally:
        stop(server)
