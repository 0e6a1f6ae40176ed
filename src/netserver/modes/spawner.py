"""The spawner: a small process that starts, watches and reaps the commands of `ExecMode`.

Why a process of its own: `posix_spawn` is vfork-based, so its caller is suspended until
the child has exec'd, and CPython holds the GIL meanwhile. In the supervisor that wait
sat on the accept path of every connection (67 % of its wall time under load, see
bench/RESULTS.md); here it stalls only this process, while the supervisor goes on
accepting and judging. tcpserver's `fork()` returns at once; this is the same split.

The supervisor forks its spawners (execute.SPAWNERS) when the mode starts. Each closes
every descriptor but its channel and stdio (it holds nothing of the supervisor's: no
listener, no other client's socket), then serves the channel, a SOCK_SEQPACKET pair:

* supervisor -> spawner: `CONN_TCP`/`CONN_UNIX` + connection id + the ucspi variables
  as ``NAME=value`` separated by NUL, with the socket attached (SCM_RIGHTS);
  `TERMINATE` (end every command now); end of file (no more connections: exit once
  the last command has ended).
* spawner -> supervisor: `END` records, several to a packet: id, exit code, bytes in
  and out (-1: unknown), and how the connection ended (`OUTCOMES`).

For each connection the spawner builds the environment (the supervisor's, filtered of
stale ucspi names, plus the variables sent), spawns the command with the socket on fd 0
and 1, watches it through a pidfd, and when it exits reaps it and reports. The
supervisor closed its own copy of the socket when it sent it. With an idle timeout the
spawner keeps a copy, to read the idle time from TCP_INFO, and reads the byte counts
from it at the end; without one (``--timeout 0``) it closes its copy at once, so the
client sees the end the moment the command exits, as with tcpserver, and the log line
has no byte counts (proposal D in bench/RESULTS.md: waiting for the spawner to wake up
and close cost a quarter of the connection rate on a busy machine).

Which command serves which connection is also written in a `Roster`, memory shared
with the supervisor: if the spawner dies, its commands go on (they now belong to init)
and the supervisor reads the roster to watch them itself until they end, so their
connections stay counted (limits, ``--max-conns``) and are logged when they really end.

The spawner reads no byte a client sends and runs as whatever user the supervisor
already is (after ``--user``). It ignores SIGINT, SIGTERM and SIGHUP, which a terminal
or a service manager sends the whole group: the supervisor decides when commands end.
"""

from __future__ import annotations

import contextlib
import heapq
import mmap
import os
import select
import signal
import socket
import struct
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

from .. import tcpinfo
from ..children import kill_and_reap, receive_ready
from ..connlog import ServerLog
from .base import DEFAULT_SIGNALS, KILL_AFTER, RESET_SIGNALS

CONN_TCP, CONN_UNIX, TERMINATE = b"C", b"U", b"T"
CONN_HEAD = struct.Struct("=cQH")  # kind, connection id, socket family; then the variables
END = struct.Struct("=QiqqB")  # connection id, exit code, bytes in, bytes out, outcome
OUTCOMES = ("", "idle-timeout", "terminated", "spawn-failed")  # "": by the exit code
IDLE, TERMINATED, SPAWN_FAILED = 1, 2, 3
MAX_MSG = 65536
MAX_RECORDS = 4096 // END.size  # per report packet
_PEERCRED = struct.Struct("3i")
SLOT = struct.Struct("=Qi4x")  # a roster entry: connection id, pid (0: free)
UNBOUNDED_SLOTS = 65536  # roster size when the server has no connection cap


class Roster:
    """Which command serves which connection: a table of slots in anonymous shared
    memory, written only by the spawner (free lists stay on its side) and read by the
    supervisor once the spawner is dead (`entries`).

    No message per command: a slot is written after the spawn and cleared before the
    reap, so an entry names a process that has not been reaped by the spawner (its pid
    cannot have been reused). With every slot taken a command is simply not listed:
    if its spawner dies it is counted out at once, as it ends unwatched.
    """

    def __init__(self, slots: int) -> None:
        self.slots = max(1, slots)
        self.mem = mmap.mmap(-1, self.slots * SLOT.size)  # MAP_SHARED | MAP_ANONYMOUS
        self.used = 0  # slots below this have been handed out at least once
        self.free: list[int] = []  # cleared ones, handed out again first

    def put(self, cid: int, pid: int) -> int:
        """List `pid` as serving connection `cid`; its slot, or -1 when none is free."""
        if self.free:
            slot = self.free.pop()
        elif self.used < self.slots:
            slot = self.used
            self.used += 1
        else:
            return -1
        SLOT.pack_into(self.mem, slot * SLOT.size, cid, pid)
        return slot

    def clear(self, slot: int) -> None:
        if slot >= 0:
            SLOT.pack_into(self.mem, slot * SLOT.size, 0, 0)
            self.free.append(slot)

    def entries(self) -> Iterator[tuple[int, int]]:
        """(connection id, pid) of every listed command."""
        for cid, pid in SLOT.iter_unpack(self.mem):
            if pid > 0:
                yield cid, pid

    def close(self) -> None:
        self.mem.close()


@dataclass
class _Running:
    """One command: its connection id, pid and pidfd, our copy of its socket if kept,
    and its slot in the roster."""

    cid: int
    pid: int
    pidfd: int
    sock: socket.socket | None
    slot: int = -1
    outcome: int = 0


@dataclass(frozen=True)
class Program:
    """What the spawner runs, fixed when it is forked."""

    path: str
    argv: tuple[str, ...]
    env: Mapping[bytes, bytes]  # the supervisor's environment without ucspi names
    timeout: float | None  # idle timeout for TCP connections; None or 0: none


class Spawner:
    """The spawner's loop: one `poll` over the channel and the commands' pidfds."""

    def __init__(
        self, chan: socket.socket, command: Program, log: ServerLog, roster: Roster
    ) -> None:
        self.chan = chan
        self.command = command
        self.log = log
        self.roster = roster
        self.poll = select.poll()
        self.running: dict[int, _Running] = {}  # by pidfd
        # when, sequence, pidfd and connection id (a pidfd number is reused), what
        self.timers: list[tuple[float, int, int, int, str]] = []
        self._seq = 0
        self.reports: list[bytes] = []
        self.listening = True

    def run(self) -> int:
        """Serve until the channel is closed and every command has ended."""
        self.chan.setblocking(False)
        self.poll.register(self.chan.fileno(), select.POLLIN)
        while self.listening or self.running:
            for fd, _events in self.poll.poll(self._poll_timeout()):
                if fd == self.chan.fileno():
                    self._messages()
                else:
                    self._exited(fd)
            self._run_timers()
            self._report()
        return 0

    # -- messages from the supervisor -----------------------------------------------------
    def _messages(self) -> None:
        while self.listening:
            received = receive_ready(self.chan, MAX_MSG, 2)
            if received is None:
                return
            data, fds = received
            if not data:  # the supervisor is done (or gone): finish what runs
                self.listening = False
                self.poll.unregister(self.chan.fileno())
                for fd in fds:
                    os.close(fd)
                return
            kind = data[:1]
            if kind == TERMINATE:
                self._terminate()
            elif fds and kind in (CONN_TCP, CONN_UNIX) and len(data) >= CONN_HEAD.size:
                _kind, cid, family = CONN_HEAD.unpack_from(data)
                self._spawn(cid, kind == CONN_UNIX, data[CONN_HEAD.size :], fds[0], family)
                fds = fds[1:]
            for fd in fds:
                os.close(fd)

    def _spawn(self, cid: int, unix: bool, variables: bytes, fd: int, family: int) -> None:
        # A socket object only when one is needed (credentials, the idle timeout), built
        # with family, type and protocol given: no system call to find them out.
        keep = bool(self.command.timeout) and family != socket.AF_UNIX
        sock = socket.socket(family, socket.SOCK_STREAM, 0, fd) if keep or unix else None
        env = dict(self.command.env)
        for item in variables.split(b"\0"):
            name, _, value = item.partition(b"=")
            if name:
                env[name] = value
        if sock is not None and unix:
            env.update(peer_credentials(sock))
        pidfd = slot = -1
        try:
            pid = spawn(self.command, env, fd)
        except OSError as exc:
            self._failed(cid, exc)
        else:
            slot = self.roster.put(cid, pid)  # at once: the supervisor's view if we die
            try:
                pidfd = os.pidfd_open(pid)
            except OSError as exc:
                self.roster.clear(slot)
                kill_and_reap(pid)
                self._failed(cid, exc)
        if not keep or pidfd < 0:  # the client sees the end as soon as the command exits
            if sock is not None:
                sock.close()
            else:
                os.close(fd)
            sock = None
        if pidfd < 0:
            return
        run = self.running[pidfd] = _Running(cid, pid, pidfd, sock, slot)
        self.poll.register(pidfd, select.POLLIN)
        if sock is not None:
            self._after(self.command.timeout or 0.0, run, "idle")

    def _failed(self, cid: int, exc: OSError) -> None:
        self.log.error("cannot start a process", error=str(exc))
        self.reports.append(END.pack(cid, 0, -1, -1, SPAWN_FAILED))

    # -- commands that end -----------------------------------------------------------------
    def _exited(self, pidfd: int) -> None:
        run = self.running.get(pidfd)
        if run is None:
            return
        self.roster.clear(run.slot)  # before the reap: a listed pid is never a reused one
        run.slot = -1
        try:
            got, status = os.waitpid(run.pid, os.WNOHANG)
        except ChildProcessError:
            got, status = run.pid, 0
        if got == 0:  # not ended after all: listed again
            run.slot = self.roster.put(run.cid, run.pid)
            return
        del self.running[pidfd]
        self.poll.unregister(pidfd)
        os.close(pidfd)
        stats = None
        if run.sock is not None:
            stats = tcpinfo.read(run.sock)
            run.sock.close()
        sent, received = (-1, -1) if stats is None else (stats.bytes_sent, stats.bytes_received)
        code = os.waitstatus_to_exitcode(status)
        self.reports.append(END.pack(run.cid, code, received, sent, run.outcome))

    def _report(self) -> None:
        """Send what ended since the last pass, in as few packets as it takes."""
        while self.reports:
            packet = b"".join(self.reports[:MAX_RECORDS])
            del self.reports[:MAX_RECORDS]
            try:
                self._send(packet)
            except OSError:  # the supervisor is gone: nobody to tell
                self.reports.clear()

    def _send(self, packet: bytes) -> None:
        """Send, waiting while the channel is full (the supervisor reads it soon)."""
        while True:
            try:
                self.chan.send(packet)
                return
            except (BlockingIOError, InterruptedError):
                select.select([], [self.chan], [], 1.0)

    # -- timeouts and termination ----------------------------------------------------------
    def _after(self, delay: float, run: _Running, what: str) -> None:
        self._seq += 1
        when = time.monotonic() + delay
        heapq.heappush(self.timers, (when, self._seq, run.pidfd, run.cid, what))

    def _poll_timeout(self) -> int | None:
        if not self.timers:
            return None
        return max(0, int((self.timers[0][0] - time.monotonic()) * 1000) + 1)

    def _run_timers(self) -> None:
        now = time.monotonic()
        while self.timers and self.timers[0][0] <= now:
            _when, _seq, pidfd, cid, what = heapq.heappop(self.timers)
            run = self.running.get(pidfd)
            if run is None or run.cid != cid:
                continue  # ended (the pidfd number may be another command's now)
            if what == "kill":
                with contextlib.suppress(ProcessLookupError):
                    os.kill(run.pid, signal.SIGKILL)
            else:
                self._check_idle(run)

    def _check_idle(self, run: _Running) -> None:
        """End a command whose connection saw no data either way for the timeout."""
        timeout = self.command.timeout or 0.0
        stats = None if run.sock is None else tcpinfo.read(run.sock)
        idle = 0.0 if stats is None else stats.idle_ms / 1000.0
        if idle >= timeout:
            run.outcome = run.outcome or IDLE
            self._end(run)
        else:
            self._after(timeout - idle, run, "idle")

    def _end(self, run: _Running) -> None:
        """TERM now (the client sees the end at once), KILL after KILL_AFTER seconds."""
        if run.sock is not None:
            with contextlib.suppress(OSError):
                run.sock.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(ProcessLookupError):
            os.kill(run.pid, signal.SIGTERM)
        self._after(KILL_AFTER, run, "kill")

    def _terminate(self) -> None:
        for run in self.running.values():
            run.outcome = TERMINATED
            self._end(run)


def spawn(command: Program, env: Mapping[bytes, bytes], fd: int) -> int:
    """Start `command` on the socket `fd` (its stdin and stdout); its pid, or OSError."""
    return os.posix_spawn(
        command.path,
        command.argv,
        env,
        file_actions=[(os.POSIX_SPAWN_DUP2, fd, 0), (os.POSIX_SPAWN_DUP2, fd, 1)],
        setsigdef=DEFAULT_SIGNALS,
        setsigmask=(),
    )


def peer_credentials(sock: socket.socket) -> dict[bytes, bytes]:
    """UNIXREMOTEPID/UID/GID of a unix-socket client (none if the kernel has no pid)."""
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
    except OSError:
        return {}
    pid, uid, gid = _PEERCRED.unpack(raw)
    if pid <= 0:
        return {}
    return {
        b"UNIXREMOTEPID": str(pid).encode(),
        b"UNIXREMOTEUID": str(uid).encode(),
        b"UNIXREMOTEGID": str(gid).encode(),
    }


def spawner_main(chan: socket.socket, command: Program, log: ServerLog, roster: Roster) -> int:
    """Everything the forked spawner does; returns its exit code (never raises)."""
    signal.set_wakeup_fd(-1)
    for sig in RESET_SIGNALS:
        signal.signal(sig, signal.SIG_DFL)
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_SETMASK, ())
    keep = chan.fileno()
    os.closerange(3, keep)
    os.closerange(keep + 1, os.sysconf("SC_OPEN_MAX"))
    return Spawner(chan, command, log, roster).run()
