"""Handlers for the limits, lifecycle, access and leak tests, and the client side they share.

The server under test imports the handlers (``--handler lifecycle_handlers:echo`` with
``PYTHONPATH`` set to this directory, see `HANDLER_ENV`); the tests import the helpers
below, which talk to that server over real loopback sockets and read what the kernel
says about its process in /proc. Nothing here sleeps to wait for a server: waiting is
either a blocking socket call with a timeout or `wait_until`, a bounded poll for an
observable event (a log line, a process state).
"""

from __future__ import annotations

import contextlib
import os
import re
import select
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path

from netserver import AsyncConnection, Connection

TESTS_DIR = Path(__file__).resolve().parent
HANDLER_ENV = {"PYTHONPATH": str(TESTS_DIR)}
IO_TIMEOUT = 5.0
# The most `wait_until` waits by default for what must come true (a log line, a child
# reaped, a state reached). Every caller asserts it does, and the wait ends as soon as
# it holds, so only a failure takes this long: it is set for a loaded 2-core machine
# running two test files at once, where a fork or a reap may take seconds.
WAIT_DEADLINE = 15.0

# --------------------------------------------------------------------------- handlers


def echo() -> None:
    """Stdio form: every line comes back (fork, prefork, thread modes)."""
    for line in sys.stdin:
        sys.stdout.write(line)


def conn_echo(conn: Connection) -> None:
    """Connection form: bytes back exactly as they came."""
    while line := conn.rfile.readline():
        conn.write(line)


async def async_echo(conn: AsyncConnection) -> None:
    """Async form, for event-loop mode."""
    while line := await conn.readline():
        conn.write(line)
        await conn.drain()


# The handler flag for each mode: a stdio handler for the sync modes, async for async.
MODE_HANDLER = {
    "fork": "lifecycle_handlers:echo",
    "prefork": "lifecycle_handlers:echo",
    "thread": "lifecycle_handlers:echo",
    "async": "lifecycle_handlers:async_echo",
}


def serve_args(mode: str, *extra: str, listen: str = "127.0.0.1:0") -> list[str]:
    """`netserver serve` arguments for the echo handler in *mode*."""
    return ["--listen", listen, "--mode", mode, "--handler", MODE_HANDLER[mode], *extra]


# --------------------------------------------------------------------------- clients


def connect(
    address: tuple[str, int], source: str | None = None, timeout: float = IO_TIMEOUT
) -> socket.socket:
    """A TCP connection to *address*, from the loopback address *source* if given."""
    family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        if source is not None:
            sock.bind((source, 0))
        sock.connect(address)
    except BaseException:
        sock.close()
        raise
    return sock


def recv_line(sock: socket.socket) -> bytes:
    """Bytes up to and including the first LF; less if the peer closes first."""
    data = bytearray()
    while not data.endswith(b"\n"):
        chunk = sock.recv(1)
        if not chunk:
            break
        data += chunk
    return bytes(data)


def round_trip(sock: socket.socket, line: bytes = b"ping\n") -> bytes:
    """Send *line* and return the line that comes back (b"" if the server closed)."""
    sock.sendall(line)
    return recv_line(sock)


def read_to_end(sock: socket.socket) -> bytes:
    """Everything until the peer closes; a reset counts as the end."""
    data = bytearray()
    with contextlib.suppress(ConnectionResetError):
        while chunk := sock.recv(65536):
            data += chunk
    return bytes(data)


def served(address: tuple[str, int], source: str | None = None) -> bool:
    """Whether a new client gets an echo back (False: closed or reset without one)."""
    with connect(address, source) as sock:
        try:
            return round_trip(sock) == b"ping\n"
        except (ConnectionResetError, BrokenPipeError):
            return False


def closed_by_peer(sock: socket.socket, timeout: float = IO_TIMEOUT) -> bool:
    """Wait up to *timeout* for the peer to close; True if it did (EOF or reset)."""
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        ready, _, _ = select.select([sock], [], [], left)
        if not ready:
            return False
        try:
            if not sock.recv(65536):
                return True
        except ConnectionResetError:
            return True
    return False


def nothing_arrives(sock: socket.socket, within: float) -> bool:
    """True if no byte (and no EOF) arrives on *sock* within *within* seconds."""
    ready, _, _ = select.select([sock], [], [], within)
    return not ready


def wait_until(predicate: Callable[[], bool], timeout: float = WAIT_DEADLINE) -> bool:
    """Poll *predicate* every 10 ms for at most *timeout* seconds; its last answer."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


# --------------------------------------------------------------------------- /proc


def wait_for_flock_waiter(
    pid: int, inode: int, check: Callable[[], None] = lambda: None, timeout: float = 10.0
) -> None:
    """Wait (bounded) until the kernel lists process `pid` (any of its threads) as
    waiting for an exclusive flock on `inode`; `check` raises if waiting is pointless.

    /proc/locks marks a blocked waiter with "->"; this is the kernel's own word that the
    waiter is inside flock(2), so no guessing with sleeps.
    """
    deadline = time.monotonic() + timeout
    pattern = re.compile(rf"-> FLOCK\s+ADVISORY\s+WRITE\s+{pid}\s+\S+:{inode}\s")
    while time.monotonic() < deadline:
        if pattern.search(Path("/proc/locks").read_text()):
            return
        check()
        time.sleep(0.02)  # polling a condition the product gives no signal for
    locks = Path("/proc/locks").read_text()
    raise AssertionError(f"pid {pid} never waited for the lock on inode {inode}:\n{locks}")


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (children, their children ...).

    A thread or process that ends while it is read (a worker's thread pool winds down,
    a child exits) is passed over: it has no children to list any more."""
    found: list[int] = []
    todo = [pid]
    while todo:
        parent = todo.pop()
        try:
            tasks = list(Path(f"/proc/{parent}/task").iterdir())
        except (FileNotFoundError, ProcessLookupError):
            continue
        for task in tasks:
            try:
                children = [int(c) for c in (task / "children").read_text().split()]
            except (FileNotFoundError, ProcessLookupError):
                continue
            found += children
            todo += children
    return found


def status_field(pid: int, name: str) -> int:
    """A numeric field of /proc/PID/status (VmRSS in kB, Threads, ...)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key == name:
            return int(value.split()[0])
    raise KeyError(name)


def rss_kb(pid: int) -> int:
    return status_field(pid, "VmRSS")


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def socket_fds(pid: int) -> int:
    """How many of the process's descriptors are sockets."""
    count = 0
    for name in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            if os.readlink(f"/proc/{pid}/fd/{name}").startswith("socket:"):
                count += 1
    return count


def holds_socket(pid: int, inode: str) -> bool:
    """True if process `pid` has the socket with this inode open (False once it is gone:
    a process listed a moment ago as a child may have exited since)."""
    try:
        fds = list(Path(f"/proc/{pid}/fd").iterdir())
    except FileNotFoundError:
        return False
    for fd in fds:
        try:
            if os.readlink(fd) == f"socket:[{inode}]":
                return True
        except OSError:  # closed meanwhile
            continue
    return False


def all_exit(pidfds: list[int], timeout: float) -> bool:
    """Wait at most `timeout` s for every process behind `pidfds` (opened before it was
    signalled, so no pid can be reused meanwhile) to exit; closes them; True if all did."""
    end = time.monotonic() + timeout
    left = list(pidfds)
    while left and time.monotonic() < end:
        ready, _, _ = select.select(left, [], [], end - time.monotonic())
        left = [fd for fd in left if fd not in ready]
    for fd in pidfds:
        os.close(fd)
    return not left


def _stat_fields(pid: int) -> list[str]:
    """/proc/PID/stat split after the command name (which may hold spaces)."""
    text = Path(f"/proc/{pid}/stat").read_text()
    return text[text.rindex(")") + 2 :].split()


def children(pid: int) -> dict[int, str]:
    """The child processes of *pid* and their states (R, S, Z, ...)."""
    found: dict[int, str] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = _stat_fields(int(entry))
        except (OSError, ValueError):
            continue
        if int(fields[1]) == pid:
            found[int(entry)] = fields[0]
    return found


def zombies(pid: int) -> list[int]:
    return [child for child, state in children(pid).items() if state == "Z"]


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time the process has used so far."""
    fields = _stat_fields(pid)
    ticks = int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15)
    return ticks / os.sysconf("SC_CLK_TCK")


def log_count(read_log: Callable[[], str], text: str) -> int:
    """How many lines of the log contain *text*."""
    return sum(1 for line in read_log().splitlines() if text in line)


async def async_pid(conn: AsyncConnection) -> None:
    """Async form that answers with the pid of the process serving it, then echoes."""
    conn.write(f"{os.getpid()}\n".encode())
    await conn.drain()
    while line := await conn.readline():
        conn.write(line)
        await conn.drain()


LATE_ANSWERS = 100
"""How many 64 KiB writes `async_pid_answer_late` tries into a closed connection at most."""


async def async_pid_answer_late(conn: AsyncConnection) -> None:
    """Async form that sends its pid, reads to EOF, then answers a client that has gone.

    The client closed its socket, so the first write draws a RST from the client's kernel
    and a later one fails with EPIPE: that must end this connection (a ConnectionError
    here), never the worker process and every other connection it serves.
    """
    conn.write(f"{os.getpid()}\n".encode())
    await conn.drain()
    while await conn.read(65536):
        pass
    with contextlib.suppress(ConnectionError):
        for _ in range(LATE_ANSWERS):
            conn.write(b"x" * 65536)
            await conn.drain()
