"""Run a command per connection, as tcpserver and inetd do.

The command is started with posix_spawn (vfork + exec: no copy of the server's memory),
with the socket as its stdin and stdout, the server's stderr (the log) as its stderr,
every signal at its default disposition (SIGPIPE included), and no other descriptor:
everything the server opens is close-on-exec. Its environment is the server's plus the
ucspi-tcp variables, so programs written for tcpserver run unchanged.

The spawning, watching and reaping is done by spawner processes (see spawner), not by
the supervisor: the supervisor sends each admitted socket to one of them, in turn, and
closes its own copy, and writes the log line and counts the connection out when the
spawner reports the end.
That keeps posix_spawn's wait for the exec off the accept path. A spawner that dies is
replaced at once, and the commands it left behind are adopted: the supervisor finds them
in the dead spawner's roster (spawner.Roster) and watches each through a pidfd until it
ends, so its connection stays counted against the limits, is ended at the stop like any
other, and is logged (``spawner-died``) when it really ends. Its exit code and its idle
timeout went with the spawner: a pidfd tells a process that is not the parent that the
command ended but not how, and the idle time was read from the spawner's socket copy
(README.md, "spawner", says why neither is recovered). If no spawner can be started,
the connection is refused and the accept loop backs off (a resource error): the server
never takes connections it cannot serve.

When no gate needs the supervisor (`Server._exec_direct`), the spawners accept on the
listeners themselves instead (see spawner), counting in the table of modes.shared; a
dead one's seat is given back once the last command it left has ended.

A command is run this way in every mode: forking a Python worker only to exec would
cost a process copy and buy nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import gc
import os
import shutil
import signal
import socket
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping

from ..accepted import Accepted
from ..children import fork_with_channel, kill_and_reap, run_child, send_fd, watch_child
from ..connlog import ConnRecord
from ..errors import ConfigError
from ..handlers import Command
from ..limits import restart_wait
from .base import KILL_AFTER, ModeContext, status_for_exit
from .direct import DirectService
from .spawner import (
    CONN_HEAD,
    CONN_TCP,
    CONN_UNIX,
    END,
    OUTCOMES,
    STOP_ACCEPTING,
    TERMINATE,
    UNBOUNDED_SLOTS,
    Program,
    Roster,
    peer_credentials,
    spawner_main,
    ucspi_variables,
)

# Every ucspi variable is dropped from the inherited environment first, so a command
# never sees a stale value from the server's own environment or the other family.
_UCSPI = frozenset(
    [
        "PROTO",
        "TCPLOCALIP",
        "TCPLOCALPORT",
        "TCPLOCALHOST",
        "TCPREMOTEIP",
        "TCPREMOTEPORT",
        "TCPREMOTEHOST",
        "TCPREMOTEINFO",
        "UNIXLOCALPATH",
        "UNIXREMOTEPID",
        "UNIXREMOTEUID",
        "UNIXREMOTEGID",
    ]
)
_UCSPI_BYTES = frozenset(os.fsencode(name) for name in _UCSPI)
YOUNG = 1.0  # a spawner that dies sooner than this after its start died young
RESTART_FIRST = 0.4  # the wait after a second young death in a row, doubling after each
RESTART_MAX = 5.0  # the longest wait before starting a spawner again (Limits.restart_max)
REPORTS = 65536
STOP_WAIT = 10.0
# Spawners per command service: posix_spawn holds a spawner until the child has exec'd,
# and on a busy machine that wait is most of its time (sampled: 61 % in the vfork wait,
# 39 % running, 0.5 % idle with one); two overlap their waits.
SPAWNERS = 2
# Seats in the shared limits table for spawners that accept themselves: a dead one's
# seat stays taken while a command it left runs, and its replacement takes another.
EXEC_SEATS = 8 * SPAWNERS
_SPAWNER_GONE = frozenset({errno.EPIPE, errno.ECONNRESET, errno.ECONNREFUSED, errno.ENOTCONN})


def tcp_environ(base: Mapping[str, str], sock: socket.socket, record: ConnRecord) -> dict[str, str]:
    """The whole environment of a command run on `sock` (ucspi-tcp names)."""
    env = {k: v for k, v in base.items() if k not in _UCSPI}
    for item in ucspi_variables(record).split("\0"):
        name, _, value = item.partition("=")
        env[name] = value
    if record.peer.ip is None or record.local.ip is None:
        env.update({os.fsdecode(k): os.fsdecode(v) for k, v in peer_credentials(sock).items()})
    return env


def resolve_program(argv: tuple[str, ...]) -> str:
    """The path of argv[0] (searched in $PATH once, at start-up), or ConfigError."""
    path = shutil.which(argv[0])
    if path is None:
        raise ConfigError(f"command {argv[0]!r} not found or not executable")
    return path


def packet(chan: socket.socket) -> bytes | None:
    """One packet from a non-blocking SOCK_SEQPACKET channel: None when none waits,
    b"" when the other end is gone."""
    try:
        return chan.recv(REPORTS)
    except (BlockingIOError, InterruptedError):
        return None
    except OSError:
        return b""


def packets(chan: socket.socket) -> Iterator[bytes]:
    """What the channel holds now, a packet at a time; b"" (last) when the other end is
    gone."""
    while (data := packet(chan)) is not None:
        yield data
        if not data:
            return


class _SpawnerProc:
    """The supervisor's handle on one spawner process: pid, pidfd, channel, roster."""

    def __init__(
        self, pid: int, chan: socket.socket, pidfd: int, roster: Roster, seat: int = -1
    ) -> None:
        self.seat = seat  # in the shared limits table, when it accepts itself
        self.retiring = False  # told to stop accepting (a reload): not replaced
        self.pid = pid
        self.chan = chan
        self.pidfd = pidfd
        self.roster = roster
        self.started = time.monotonic()
        self.sent: dict[int, Accepted] = {}  # connections it serves, by id


class _Orphan:
    """A command whose spawner died, watched by the supervisor through its pidfd."""

    def __init__(
        self,
        conn: Accepted | None,
        pidfd: int,
        seat: int = -1,
        entry: int = -1,
        record: ConnRecord | None = None,
    ) -> None:
        self.conn = conn  # None: a connection its spawner accepted (counted at seat, entry)
        self.record = record if conn is None else conn.record
        self.pidfd = pidfd
        self.seat = seat
        self.entry = entry
        self.kill: asyncio.TimerHandle | None = None


class ExecMode:
    """Serves each connection with a fresh process running the command (via the spawner)."""

    def __init__(
        self,
        ctx: ModeContext,
        command: Command,
        path: str,
        direct: DirectService | None = None,
        refuse: Callable[[socket.socket], None] | None = None,
    ) -> None:
        self.ctx = ctx
        # How the server turns a client away (its refusal line, then a lingering close:
        # netserver.linger), for one it accepted and no spawner can serve; None: close.
        self.refuse = refuse
        # Spawners that accept on the listeners themselves (modes.direct's table and
        # judge), each in a seat of its own; a dead one's seat is free again only
        # once the last command it left has ended.
        self.direct = direct
        self.table = direct.table if direct is not None else None
        self.retired: list[_SpawnerProc] = []  # accepted themselves; exit when done
        self._seats = list(range(direct.table.seats))[::-1] if direct is not None else []
        self._orphans_at: dict[int, int] = {}  # seat -> commands left running there
        self.draining = False  # direct: the spawners were told to stop accepting
        # Filtered once: copying the whole environment per connection was measurable.
        env = {k: v for k, v in os.environb.items() if k not in _UCSPI_BYTES}
        self.program = Program(path, command.argv, env, ctx.limits.timeout, ctx.mode_name)
        self.spawners: list[_SpawnerProc] = []
        self.orphans: dict[int, _Orphan] = {}  # by pidfd
        self._slots = ctx.limits.max_conns or UNBOUNDED_SLOTS
        self._turn = 0  # round robin over the spawners
        self.pending: deque[tuple[int, bytes, Accepted]] = deque()  # id, message, conn
        self.stopping = False
        self._next_id = 0
        self._young_deaths = 0
        self._restart_at = 0.0
        self._restart: asyncio.TimerHandle | None = None  # starts missing spawners later
        self._empty = asyncio.Event()
        self._empty.set()
        self._gone: asyncio.Event | None = None  # set when the closed spawners have exited

    # -- the spawner process ---------------------------------------------------------------
    def start(self) -> None:
        """Fork the spawners now, before any connection (OSError if the system refuses)."""
        for _ in range(SPAWNERS):
            self._start_spawner()

    def _start_spawner(self) -> _SpawnerProc:
        loop = self.ctx.loop
        direct = self.direct
        if direct is not None and not self._seats:
            raise OSError(errno.EAGAIN, "no seat free in the shared limits table")
        seat = self._seats.pop() if direct is not None else -1
        if direct is not None:  # what the new spawner takes: no stale hint of its own
            direct.table.clear_seat(seat)
        gc.freeze()  # keep the collector off the pages the spawner shares with us
        roster = Roster(self._slots)
        try:
            pid, chan = fork_with_channel(socket.SOCK_SEQPACKET)
        except OSError:
            roster.close()
            self._give_back(seat)
            raise
        if pid == 0:
            asyncio.events._set_running_loop(None)
            if direct is not None:
                direct.table.take_seat(seat)
            run_child(lambda: spawner_main(chan, self.program, self.ctx.log, roster, direct))
        chan.setblocking(False)
        try:
            pidfd = watch_child(loop, pid, lambda code: self._spawner_exited(proc, code))
        except OSError:
            kill_and_reap(pid)
            chan.close()
            roster.close()
            self._give_back(seat)
            raise
        proc = _SpawnerProc(pid, chan, pidfd, roster, seat)
        self.ctx.fds.add(pidfd)
        self.ctx.fds.add(chan.fileno())
        loop.add_reader(chan.fileno(), self._report, proc)
        self.spawners.append(proc)
        return proc

    def _spawner_exited(self, proc: _SpawnerProc, code: int) -> None:
        """The spawner ended: expected at the stop, a failure otherwise (restart it)."""
        for data in packets(proc.chan):  # what it reported before it went
            self._ended(proc, data)
        self.ctx.loop.remove_reader(proc.chan.fileno())
        self.ctx.loop.remove_writer(proc.chan.fileno())
        self.ctx.fds.discard(proc.pidfd)
        self.ctx.fds.discard(proc.chan.fileno())
        proc.chan.close()
        if proc in self.spawners:
            self.spawners.remove(proc)
        if proc in self.retired:
            self.retired.remove(proc)
        if proc.seat >= 0:
            self._direct_exited(proc, code)
            return
        if self._gone is not None and not proc.sent:
            proc.roster.close()
            if not self.spawners:
                self._gone.set()
            return
        connections = len(proc.sent)
        self._adopt(proc)
        self.ctx.log.error(
            "spawner process died; the server watches its commands until they end",
            pid=proc.pid,
            status=status_for_exit(code),
            connections=connections,
            unwatched=len(proc.sent),
        )
        for conn in proc.sent.values():  # not listed: ended, or never started
            conn.record.status = "spawner-died"
            self._finish(conn)
        proc.sent.clear()
        self._back_off(proc)

    def _adopt(self, proc: _SpawnerProc) -> None:
        """Watch the commands a dead spawner lists, and take their connections off it.

        Its roster lists a command from its spawn until just before its reap, so a
        listed pid is that command's (alive, or a zombie init has not reaped yet): a
        pidfd on it is readable once it has ended, whoever reaps it.
        """
        for cid, pid in proc.roster.entries():
            conn = proc.sent.get(cid)
            if conn is None:
                continue
            try:
                pidfd = os.pidfd_open(pid)
            except OSError:  # reaped already (by init): it has ended
                continue
            del proc.sent[cid]
            conn.record.status = "spawner-died"  # its exit code went with the spawner
            orphan = self.orphans[pidfd] = _Orphan(conn, pidfd)
            self.ctx.fds.add(pidfd)
            self.ctx.loop.add_reader(pidfd, self._orphan_ended, orphan)
            if self.stopping:
                self._end_orphan(orphan)
        proc.roster.close()

    def _direct_exited(self, proc: _SpawnerProc, code: int) -> None:
        """A spawner that accepted itself ended: its seat counted out, but for the
        commands it left running, which we watch (as `_adopt`) until each ends."""
        assert self.table is not None
        left: dict[int, tuple[int, ConnRecord]] = {}  # entry -> pidfd, record
        for entry, pid, record in proc.roster.accepted(self.ctx.mode_name):
            with contextlib.suppress(OSError):  # reaped already: it has ended
                left[entry] = os.pidfd_open(pid), record
        proc.roster.close()
        gone = self.table.clear_seat(proc.seat, keep=left)
        for entry, (pidfd, record) in left.items():
            record.status = "spawner-died"  # its exit code went with the spawner
            orphan = self.orphans[pidfd] = _Orphan(None, pidfd, proc.seat, entry, record)
            self.ctx.fds.add(pidfd)
            self.ctx.loop.add_reader(pidfd, self._orphan_ended, orphan)
            if self.stopping:
                self._end_orphan(orphan)
        self._orphans_at[proc.seat] = len(left)
        self._give_back(proc.seat)
        retired = self.draining or proc.retiring
        if code == 0 and retired and not left:
            self._check_empty()
            return
        self.ctx.log.error(
            "spawner process died; the server watches its commands until they end",
            pid=proc.pid,
            status=status_for_exit(code),
            connections=len(left) + gone,
            unwatched=gone,
        )
        if not retired:
            self._back_off(proc)
        self._check_empty()

    def _give_back(self, seat: int) -> None:
        """The seat is free again once no command a dead spawner left there runs."""
        if seat >= 0 and not self._orphans_at.get(seat):
            self._orphans_at.pop(seat, None)
            self._seats.append(seat)
            if self.direct is not None and len(self.spawners) < SPAWNERS:
                self.ctx.loop.call_soon(self._drain)  # one may have waited for a seat

    def _back_off(self, proc: _SpawnerProc) -> None:
        """A spawner died: replace it at once, or after a back-off if they die young."""
        young = time.monotonic() - proc.started < YOUNG
        self._young_deaths = self._young_deaths + 1 if young else 0
        delay = restart_wait(self.ctx.limits, self._young_deaths, RESTART_FIRST, RESTART_MAX)
        self._restart_at = time.monotonic() + delay
        self._restart_later()  # at once (or after the back-off), not on the next accept

    def _orphan_ended(self, orphan: _Orphan) -> None:
        self.ctx.loop.remove_reader(orphan.pidfd)
        self.ctx.fds.discard(orphan.pidfd)
        os.close(orphan.pidfd)
        del self.orphans[orphan.pidfd]
        if orphan.kill is not None:
            orphan.kill.cancel()
        if orphan.conn is not None:
            self._finish(orphan.conn)
            return
        assert self.table is not None
        self.table.release(orphan.entry, orphan.seat)
        if orphan.record is not None:
            self.ctx.log.connection(orphan.record)
        self._orphans_at[orphan.seat] -= 1
        self._give_back(orphan.seat)
        self._check_empty()

    def _end_orphan(self, orphan: _Orphan) -> None:
        """TERM now, KILL after KILL_AFTER seconds (as the spawner does for its own)."""
        if orphan.record is not None:
            orphan.record.status = "terminated"
        self._signal(orphan, signal.SIGTERM)
        orphan.kill = self.ctx.loop.call_later(KILL_AFTER, self._signal, orphan, signal.SIGKILL)

    @staticmethod
    def _signal(orphan: _Orphan, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):  # ended (its pidfd says so soon)
            signal.pidfd_send_signal(orphan.pidfd, sig)

    def _restart_later(self) -> None:
        """Make sure a timer starts the missing spawners once the back-off is over.

        Checked again when it fires: the loop's clock is cached and rounded to
        milliseconds, so a timer may fire just before `_restart_at`, and a later death
        may have moved `_restart_at` on; either way `_available` asks for a new timer.
        Without one, nothing would start a spawner until the next client came.
        """
        if self.stopping or self._restart is not None:
            return
        wait = max(0.0, self._restart_at - time.monotonic())
        self._restart = self.ctx.loop.call_later(wait, self._restart_due)

    def _restart_due(self) -> None:
        self._restart = None
        self._drain()

    def _available(self) -> _SpawnerProc | None:
        """The next spawner in turn; missing ones started again (unless dying young)."""
        while len(self.spawners) < SPAWNERS and not (self.stopping or self.draining):
            if time.monotonic() < self._restart_at:
                self._restart_later()
                break
            try:
                self._start_spawner()
            except OSError as exc:
                self.ctx.log.error("cannot start the spawner process", error=str(exc))
                self._restart_at = time.monotonic() + 1.0
        if not self.spawners:
            return None
        self._turn = (self._turn + 1) % len(self.spawners)
        return self.spawners[self._turn]

    # -- connections ------------------------------------------------------------------------
    def dispatch(self, conn: Accepted, setenv: Mapping[str, str] | None = None) -> None:
        """Send the connection to the spawner and close our copy of the socket.

        `setenv`: variables a hosts.allow rule adds to the command's environment (last).
        With no spawner to send it to, the connection is refused (logged as
        ``spawn-failed``) and a resource error is raised, so the accept loop backs off.
        """
        self._next_id += 1
        cid = self._next_id
        kind = CONN_UNIX if conn.record.peer.ip is None else CONN_TCP
        text = ucspi_variables(conn.record)
        if setenv:
            text += "\0" + "\0".join(f"{name}={value}" for name, value in setenv.items())
        message = CONN_HEAD.pack(kind, cid, conn.sock.family) + os.fsencode(text)
        self._empty.clear()
        self.pending.append((cid, message, conn))
        if len(self.pending) == 1:
            self._drain()
        if self.pending and not self.spawners:
            self._drop_pending("spawn-failed")
            raise OSError(errno.EAGAIN, "no spawner process to start commands")

    def _drain(self) -> None:
        """Send the waiting connections, in order, while the channel takes them."""
        proc = self._available()
        while proc is not None and self.pending:
            cid, message, conn = self.pending[0]
            try:
                send_fd(proc.chan, message, conn.sock.fileno())
            except BlockingIOError:
                self.ctx.loop.add_writer(proc.chan.fileno(), self._writable, proc)
                return
            except OSError as exc:
                if exc.errno in _SPAWNER_GONE:
                    return  # its pidfd says so soon, and another one is started
                self.pending.popleft()  # this connection cannot be passed on: drop it
                self.ctx.log.error("cannot pass a connection to the spawner", error=str(exc))
                self._end_unsent(conn, "spawn-failed")
                continue
            self.pending.popleft()
            proc.sent[cid] = conn
            self.ctx.fds.discard(conn.fd)
            conn.sock.close()
            conn.fd = -1  # the number is free for others: nothing of ours to forget

    def _writable(self, proc: _SpawnerProc) -> None:
        self.ctx.loop.remove_writer(proc.chan.fileno())
        self._drain()

    def _drop_pending(self, status: str) -> None:
        """End every connection not yet sent to a spawner, logged with `status`."""
        while self.pending:
            self._end_unsent(self.pending.popleft()[2], status)

    def _end_unsent(self, conn: Accepted, status: str) -> None:
        """A connection no spawner took: counted out and logged; when it could not be
        started (not when the server stops), the client reads the refusal line, as
        every other client the server turns away does."""
        conn.record.status = status
        self._finish(conn)  # first: it forgets the descriptor, which `refuse` keeps
        if self.refuse is not None and status == "spawn-failed":
            self.refuse(conn.sock)
        else:
            conn.sock.close()

    def _report(self, proc: _SpawnerProc) -> None:
        """One packet of the spawner's END records, when the channel is readable.

        One, not all that wait: the loop calls again while more do, and reading on to
        EAGAIN cost a failed recv and an exception on nearly every wake-up (the spawner
        sends one packet per pass of its own loop).
        """
        data = packet(proc.chan)
        if data is not None:
            self._ended(proc, data)

    def _ended(self, proc: _SpawnerProc, data: bytes) -> None:
        """END records: fill in each log record, count the connection out."""
        if not data:  # the spawner is gone; its pidfd tells the rest
            self.ctx.loop.remove_reader(proc.chan.fileno())
            return
        for cid, code, bytes_in, bytes_out, outcome in END.iter_unpack(data):
            conn = proc.sent.pop(cid, None)
            if conn is None:
                continue
            record = conn.record
            if bytes_in >= 0:
                record.bytes_in, record.bytes_out = bytes_in, bytes_out
            if record.status == "ok":
                record.status = OUTCOMES[outcome] or status_for_exit(code)
            self._finish(conn)

    def _finish(self, conn: Accepted) -> None:
        self.ctx.finished(conn)
        self._check_empty()

    def _check_empty(self) -> None:
        """No connection of ours left: none waiting, sent, adopted, or (once stopping)
        held by a spawner that accepts itself (it exits when its last one ends)."""
        if self.pending or self.orphans or any(proc.sent for proc in self.spawners):
            return
        if self.retired or (self.draining and any(p.seat >= 0 for p in self.spawners)):
            return
        self._empty.set()

    # -- the Mode contract -------------------------------------------------------------------
    def active(self) -> int:
        running = sum(len(proc.sent) for proc in self.spawners) + len(self.pending)
        if self.table is None:
            return running + len(self.orphans)
        # A spawner that accepts itself counts its own there, and its orphans stay there.
        adopted = sum(1 for orphan in self.orphans.values() if orphan.conn is not None)
        return running + adopted + self.table.total

    def begin_stop(self) -> None:
        """Commands run to their end within the grace period; spawners that accept
        themselves stop accepting, and exit once their last command has ended."""
        if self.table is None:
            return
        self.draining = True
        self._empty.clear()
        for proc in self.spawners:
            if proc.seat >= 0:
                self._retire(proc)
        self._check_empty()

    def _retire(self, proc: _SpawnerProc) -> None:
        with contextlib.suppress(OSError):
            proc.chan.send(STOP_ACCEPTING)
        proc.retiring = True

    def set_direct(self, direct: DirectService | None) -> None:
        """Rules reloaded: the spawners that accept themselves hold the old ones, so
        they stop accepting (and exit when their commands have ended) and new ones
        start with `direct`, or, with None, take their connections from us again."""
        assert self.table is not None and (direct is None or direct.table is self.table)
        self.direct = direct
        for proc in [p for p in self.spawners if p.seat >= 0]:
            self._retire(proc)
            self.spawners.remove(proc)
            self.retired.append(proc)
        self._empty.clear()
        self._check_empty()
        self._drain()  # the new ones, at once

    def terminate(self) -> None:
        """End every command now: TERM, then KILL a few seconds later (in the spawner)."""
        self.stopping = True
        self._drop_pending("terminated")
        for proc in self.spawners + self.retired:
            with contextlib.suppress(OSError):
                proc.chan.send(TERMINATE)
        for orphan in self.orphans.values():
            if orphan.kill is None:
                self._end_orphan(orphan)

    async def closed(self) -> None:
        """Once every connection has ended, close the channels and wait for the spawners."""
        await self._empty.wait()
        self.stopping = True
        if not self.spawners:
            return
        self._gone = asyncio.Event()
        for proc in self.spawners:
            with contextlib.suppress(OSError):
                proc.chan.shutdown(socket.SHUT_WR)
        try:
            await asyncio.wait_for(self._gone.wait(), STOP_WAIT)
        except TimeoutError:
            for proc in self.spawners:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGKILL)
            await self._gone.wait()
