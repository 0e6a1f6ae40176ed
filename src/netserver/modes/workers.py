"""Async mode with worker processes: every core serves connections, one supervisor decides.

When every gate of a server decides at once, the workers accept its connections
themselves and count them in a table they share (modes.direct, modes.shared): no
message and no supervisor wake-up per connection. Otherwise (a PROXY header to read, a
rule that needs a lookup, a per-source rate) the supervisor (`Server`) accepts every
connection and judges access and limits in one place, then passes the descriptor
(SCM_RIGHTS) to the worker process with the fewest connections; each worker runs its
own event loop and serves the connection with the async handler, and reports the end
(bytes, outcome) so the supervisor counts it out.

A worker is started with `fork` from the supervisor: `setup` runs in the child before it
takes a connection (drop privileges there, open per-process resources); connections
carry the name of the server they came to, so one pool serves several servers (leafmail's
smtp, submission and smtps listeners), each with its own handler. A worker that dies is
replaced, with a back-off that grows while workers keep dying young, so a crash loop
does not spin. A worker dies with its supervisor, even one killed by SIGKILL: the kernel
sends it SIGKILL (PR_SET_PDEATHSIG), and the end of its channel tells it too.

`replace` starts a new generation of workers (a reload: new TLS files, new settings)
and lets the old ones finish the connections they have, then exit.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import json
import os
import signal
import socket
import ssl
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from ..accepted import Accepted, FdRegistry
from ..children import (
    fork_with_channel,
    kill_and_reap,
    receive_ready,
    run_child,
    send_fd,
    watch_child,
)
from ..connlog import ServerLog
from ..endpoint import Endpoint
from ..errors import EX_OK, EX_SOFTWARE
from ..handlers import LoopHandler
from ..limits import Limits, restart_wait
from .base import ModeContext, status_for_exit
from .direct import DirectService
from .fork import reset_child_signals
from .handoff import decode_conn, encode_conn
from .worker import (
    CONN,
    END_HEAD,
    MAX_MSG,
    NAME,
    PROXIED,
    READY,
    RETIRE,
    STOP,
    TERMINATE,
    VERDICT,
    PoolService,
    Worker,
    WorkerApp,
    die_with_parent,
)

__all__ = ["PoolMode", "ProxyAnswer", "WorkerApp", "WorkerPool"]

LoopFactory = Callable[[], asyncio.AbstractEventLoop]
# The verdict on a client a worker read from a PROXY header: None to serve it, else the
# line (maybe "") to refuse it with.
ProxyAnswer = Callable[["str | None"], None]
# Judges that client (Server._name_proxied) and gives the verdict, at once or, when a
# gate must look a name up first, later from a task: the pool's loop never waits.
Namer = Callable[[Accepted, Endpoint, Endpoint, ProxyAnswer], None]

RESTART_FIRST = 0.1  # seconds before replacing a worker that died young
RESTART_MAX = 30.0  # the cap of that back-off unless `Limits.restart_max` sets another
YOUNG = 10.0  # a worker that dies before this age counts towards the back-off


Setup = Callable[[], WorkerApp]


@functools.cache
def _handed_off() -> socket.socket:
    """The closed socket that stands for every connection handed to a worker."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.close()
    return sock


@dataclass(slots=True)
class _Live:
    conn: Accepted
    finished: Callable[[Accepted], None]
    service: str
    name: Namer | None = None  # for a connection whose PROXY header the worker reads


@dataclass
class _Proc:
    pid: int
    chan: socket.socket
    generation: int
    started: float
    seat: int = -1  # its place in the limits tables of services it accepts for itself
    pidfd: int = -1
    conns: dict[int, _Live] = field(default_factory=dict)
    retiring: bool = False
    ready: bool = False


class WorkerPool:
    """N worker processes with an event loop each; connections go to the least busy."""

    def __init__(
        self,
        count: int,
        setup: Setup | None = None,
        *,
        log: ServerLog,
        limits: Limits,
        loop_factory: LoopFactory,
        name: str = "worker",
        fds: FdRegistry | None = None,
    ) -> None:
        self.count = max(1, count)
        # Seats in the shared limits tables (modes.direct): one per worker, enough for
        # two generations being replaced (their sessions end) while the next one starts.
        self.seats = 4 * self.count + 4
        self._free_seats = list(range(self.seats - 1, -1, -1))
        self.setup = setup
        self.log = log
        self.limits = limits
        self.loop_factory = loop_factory
        self.name = name
        self.procs: dict[int, _Proc] = {}
        self.services: dict[str, PoolService] = {}
        self.pending: deque[tuple[int, _Live]] = deque()
        self.generation = 0
        self.stopping = False
        self.replacing = True  # a worker that exits is replaced (see `stop_replacing`)
        self.started = False
        # Descriptors no worker may keep: our channels and pidfds, and (shared with
        # other pools of the same supervisor) theirs and the listeners.
        self._fds = fds if fds is not None else FdRegistry()
        self._other_fds: list[FdRegistry] = []
        self._ready = asyncio.Event()
        self._next_id = 0
        self._young_deaths = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._empty = asyncio.Event()
        self._changed = asyncio.Event()  # a connection ended (see service_closed)

    # -- set-up ------------------------------------------------------------------------
    def add_service(
        self,
        name: str,
        handler: LoopHandler,
        tls: ssl.SSLContext | None,
        fds: FdRegistry,
        direct: DirectService | None = None,
    ) -> None:
        """A server that hands its connections to this pool (its fds close in workers),
        or with `direct`, whose connections the workers accept themselves."""
        self.services[name] = PoolService(handler, tls, fds, direct)

    def set_tls(self, name: str, tls: ssl.SSLContext | None) -> None:
        """New workers serve `name` with this context (see `replace`)."""
        self.services[name].tls = tls

    def close_in_workers(self, registry: FdRegistry) -> None:
        """Descriptors of another server that workers of this pool must close too."""
        self._other_fds.append(registry)

    async def wait_ready(self) -> None:
        """Until every worker now running has finished its set-up (at once if none)."""
        if self.started:
            await self._ready.wait()

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Fork the workers (once; later calls do nothing)."""
        if self.started:
            return
        self.started = True
        self._loop = loop
        self._spawn_batch(self.count)
        self._drain_pending()

    @property
    def pids(self) -> list[int]:
        return sorted(self.procs)

    # -- the worker processes -------------------------------------------------------------
    def _spawn_batch(self, count: int) -> bool:
        """Start `count` workers; False if one could not be started.

        Every seat is marked as watching the listeners before the first fork: the first
        worker may be serving while we still fork the others, and a worker leaves a client
        only to a seat so marked, so it would otherwise take each client until the next
        seat is (CI saw both of two clients served by the first worker).
        """
        seats = [self._reserve_seat() for _ in range(count)]
        for at, seat in enumerate(seats):
            if self._spawn(seat) is None:
                for rest in seats[at + 1 :]:
                    self._give_back(rest)
                return False
        return True

    def _reserve_seat(self) -> int:
        """A free seat, marked as watching the listeners (clients are left to it from
        now on), or -1 when none is free."""
        seat = self._free_seats.pop() if self._free_seats else -1
        if seat >= 0:
            for direct in self._direct():
                direct.table.accepting(True, seat)
        return seat

    def _spawn(self, seat: int) -> _Proc | None:
        assert self._loop is not None
        parent_pid = os.getpid()
        # Objects made so far stay out of the collector's way in both processes, so a
        # collection does not touch (and copy) the pages the child shares with us.
        gc.freeze()
        if seat < 0 and self._direct():
            self.log.error(f"no seat free in the shared limits: this {self.name} accepts nothing")
        try:
            pid, channel = fork_with_channel(socket.SOCK_SEQPACKET)
        except OSError as exc:
            self._give_back(seat)
            self._cannot_spawn(exc)
            return None
        if pid == 0:
            run_child(lambda: self._child(channel, parent_pid, seat))
        channel.setblocking(False)
        proc = _Proc(pid, channel, self.generation, time.monotonic(), seat)
        try:
            proc.pidfd = watch_child(self._loop, pid, lambda code: self._exited(proc, code))
        except OSError as exc:
            kill_and_reap(pid)
            channel.close()
            self._give_back(seat)
            self._cannot_spawn(exc)
            return None
        self._fds.add(channel.fileno())
        self._fds.add(proc.pidfd)
        self._loop.add_reader(channel.fileno(), self._report, proc)
        self.procs[pid] = proc
        self._empty.clear()
        self._ready.clear()
        self.log.info(f"{self.name} started", pid=pid)
        return proc

    def _child(self, chan: socket.socket, parent_pid: int, seat: int) -> int:
        """In the new process: detach from the parent's loop, set up, then serve."""
        reset_child_signals()
        # Unlike a forked handler, a worker serves many clients from one process: a write
        # to one that has gone must fail with EPIPE for that connection alone (Python's
        # own setting), not raise SIGPIPE, which would end every session in the worker
        # and let any client that closes early kill workers at will.
        signal.signal(signal.SIGPIPE, signal.SIG_IGN)
        asyncio.events._set_running_loop(None)
        die_with_parent(parent_pid)
        # A worker with a seat keeps the listeners it accepts on itself.
        keep = {chan.fileno()}
        if seat >= 0:
            keep.update(fd for direct in self._direct() for fd in direct.fds())
        self._fds.close_in_child(keep)
        for registry in [s.fds for s in self.services.values()] + self._other_fds:
            registry.close_in_child(keep)
        app = self.setup() if self.setup is not None else WorkerApp()
        worker = Worker(chan, app, self.services, self.limits, self.log, seat)
        with asyncio.Runner(loop_factory=self.loop_factory) as runner:
            runner.run(worker.run())
        return EX_SOFTWARE if worker.failed else EX_OK

    def _direct(self) -> list[DirectService]:
        return [s.direct for s in self.services.values() if s.direct is not None]

    def _give_back(self, seat: int) -> None:
        """A worker's seat is free again: count out whatever it left in the tables."""
        if seat < 0:
            return
        left = sum(direct.table.clear_seat(seat) for direct in self._direct())
        if left:
            self.log.info(f"{self.name}'s connections counted out", seat=seat, count=left)
        self._free_seats.append(seat)

    def _cannot_spawn(self, exc: OSError) -> None:
        self.log.error(f"cannot start a {self.name}", error=str(exc))
        self._young_deaths += 1  # the system said no: try again later, not at once
        self._schedule_restart()

    def _exited(self, proc: _Proc, code: int) -> None:
        self.procs.pop(proc.pid, None)
        self._fds.discard(proc.pidfd)
        self._fds.discard(proc.chan.fileno())
        assert self._loop is not None
        self._loop.remove_reader(proc.chan.fileno())
        proc.chan.close()
        self._give_back(proc.seat)
        for live in proc.conns.values():
            if live.conn.record.status == "ok":
                live.conn.record.status = status_for_exit(code)
            live.finished(live.conn)
        proc.conns.clear()
        self._changed.set()
        expected = self.stopping or proc.retiring or not self.replacing
        if expected and self.replacing and self._current() < self.count:
            self._schedule_restart()  # a replacement without overlap: the old one is gone
        if not (self.replacing or self.stopping or proc.retiring):
            self.log.info(f"{self.name} exited while stopping; not replaced", pid=proc.pid)
        if not expected:
            self.log.error(f"{self.name} died; replacing it", pid=proc.pid, status=code)
            if time.monotonic() - proc.started < YOUNG:
                self._young_deaths += 1
            else:
                self._young_deaths = 0
            self._schedule_restart()
        if not self.procs and self.stopping:
            self._empty.set()
        if all(p.ready for p in self.procs.values()):
            self._ready.set()
        self._drain_pending()

    def _schedule_restart(self) -> None:
        """Start the missing workers now, or later when workers keep dying young."""
        if not self.replacing or self._loop is None:
            return
        # (the limits are read now: a reload may have changed them)
        delay = restart_wait(self.limits, self._young_deaths, RESTART_FIRST, RESTART_MAX)
        self._loop.call_later(delay, self._restart)

    def _restart(self) -> None:
        if not self.replacing:
            return
        if self._spawn_batch(self.count - self._current()):
            self._drain_pending()

    def _current(self) -> int:
        return sum(1 for p in self.procs.values() if not p.retiring)

    # -- connections ------------------------------------------------------------------------
    def dispatch(
        self,
        conn: Accepted,
        service: str,
        finished: Callable[[Accepted], None],
        name: Namer | None = None,
    ) -> None:
        """Hand `conn` to the least busy worker; it is queued while none can take it.

        With `name`, the worker first reads a PROXY header and asks `name(conn, client,
        local, verdict)` whether to serve the client it names (None) or the line to
        refuse with; `verdict` passes the answer on whenever it comes.
        """
        self._next_id += 1
        self.pending.append((self._next_id, _Live(conn, finished, service, name)))
        self._drain_pending()

    def _drain_pending(self) -> None:
        while self.pending and not self.stopping:
            cid, live = self.pending[0]
            least = self._least_busy()
            if least is None:
                return
            # The least busy first; the others (most connections last) only when it
            # cannot take one (its channel full), which is rare: no sort per connection.
            if not self._send(cid, live, least) and not self._send_elsewhere(cid, live, least):
                return
            self.pending.popleft()

    def _least_busy(self) -> _Proc | None:
        least: _Proc | None = None
        for proc in self.procs.values():
            if not proc.retiring and (least is None or len(proc.conns) < len(least.conns)):
                least = proc
        return least

    def _send_elsewhere(self, cid: int, live: _Live, tried: _Proc) -> bool:
        others = [p for p in self.procs.values() if not p.retiring and p is not tried]
        return any(self._send(cid, live, p) for p in sorted(others, key=lambda p: len(p.conns)))

    def _send(self, cid: int, live: _Live, proc: _Proc) -> bool:
        """Hand `live` to `proc`; False when its channel is full or gone."""
        record = live.conn.record
        kind = PROXIED if live.name is not None else CONN
        message = kind + encode_conn(cid, live.service, record.peer, record.local)
        try:
            send_fd(proc.chan, message, live.conn.sock.fileno())
        except OSError:
            return False
        proc.conns[cid] = live
        self._release_parent_copy(live.conn)
        return True

    def _release_parent_copy(self, conn: Accepted) -> None:
        """Close our descriptor; the record stays until the worker reports the end.

        The closed socket object is replaced by one shared closed socket: the
        supervisor holds a record per connection for as long as it lasts, and the
        socket object was most of that (about 120 bytes a connection).
        """
        for service in self.services.values():
            service.fds.discard(conn.fd)
        conn.sock.close()
        conn.sock = _handed_off()
        # The number is free now (the kernel may give it to the next client), and a
        # number past 256 is an object of its own: forget it.
        conn.fd = -1

    def _report(self, proc: _Proc) -> None:
        """A worker's message: a connection ended."""
        while True:
            received = receive_ready(proc.chan, MAX_MSG, 1)
            if received is None:
                return
            data, fds = received
            if data[:1] == NAME:
                self._name(proc, data[1:], fds)
                continue
            for fd in fds:  # only a NAME carries one
                os.close(fd)
            if data == READY:
                proc.ready = True
                if all(p.ready for p in self.procs.values()):
                    self._ready.set()
                continue
            if len(data) < END_HEAD.size:
                assert self._loop is not None
                self._loop.remove_reader(proc.chan.fileno())
                return
            _kind, cid, bytes_in, bytes_out = END_HEAD.unpack_from(data)
            live = proc.conns.pop(cid, None)
            if live is None:
                continue
            record = live.conn.record
            record.bytes_in, record.bytes_out = bytes_in, bytes_out
            record.status = data[END_HEAD.size :].decode("ascii", "replace") or "ok"
            live.finished(live.conn)
            self._changed.set()
            if proc.retiring and not proc.conns:
                self._tell(proc, STOP)

    def _name(self, proc: _Proc, data: bytes, fds: list[int]) -> None:
        """A worker read a PROXY header: the supervisor judges the client it names.

        The worker sends the connection back with the name: a rule may act on the
        socket (tcpd's banners, keepalive, linger), which only writes to it. Our copy
        is closed when the verdict is given, which is when every gate is done with it.
        """
        cid, _service, peer, local = decode_conn(data)
        live = proc.conns.get(cid)
        held = self._hold_copy(live, fds)

        def verdict(refusal: str | None) -> None:
            if held is not None:
                self._release_parent_copy(held)
            self._tell(proc, VERDICT + json.dumps([cid, refusal]).encode())

        if live is None or live.name is None:
            verdict("")
            return
        live.name(live.conn, peer, local, verdict)

    def _hold_copy(self, live: _Live | None, fds: list[int]) -> Accepted | None:
        """The connection a worker sent back with a NAME, as `live`'s socket until the
        verdict (None, with the descriptor closed, when it cannot be used)."""
        if not fds:
            return None
        if live is None or live.name is None:
            os.close(fds[0])
            return None
        try:
            sock = socket.socket(fileno=fds[0])
        except OSError:  # not a socket
            os.close(fds[0])
            return None
        conn = live.conn
        conn.sock, conn.fd = sock, sock.fileno()
        self.services[live.service].fds.add(conn.fd)
        return conn

    def active(self, service: str | None = None) -> int:
        """Connections being served (or waiting for a worker), of `service` or all;
        with those the workers accepted themselves, which the shared table counts (they
        end unreported: the count drops, at the latest, when their worker exits)."""
        lives = [live for p in self.procs.values() for live in p.conns.values()]
        lives += [live for _cid, live in self.pending]
        handed = sum(1 for live in lives if service is None or live.service == service)
        tables = [
            s.direct.table
            for name, s in self.services.items()
            if s.direct is not None and (service is None or name == service)
        ]
        return handed + sum(table.total for table in tables)

    # -- reload and stop ---------------------------------------------------------------------
    def replace(self, *, overlap: bool = True) -> None:
        """Start a new generation; the old one serves what it has, then exits.

        Without `overlap` the new workers start only once the old ones are gone (a
        queue manager: two must never run at once).
        """
        if not self.replacing or self._loop is None:
            return
        old = [p for p in self.procs.values() if not p.retiring]
        self.generation += 1
        for proc in old:
            proc.retiring = True
        if overlap or not old:
            self._spawn_batch(self.count)
        for proc in old:
            self._tell(proc, RETIRE if proc.conns else STOP)
        self._drain_pending()

    def _tell(self, proc: _Proc, what: bytes) -> None:
        with contextlib.suppress(OSError):
            proc.chan.send(what)

    def stop_replacing(self) -> None:
        """From now on a worker that exits is not replaced, nor the pool renewed by a
        reload: the owner is stopping and will `begin_stop` this pool in its turn, and a
        worker may leave before that (pkill signals every process at once)."""
        self.replacing = False

    def begin_stop(self) -> None:
        """Stop handing out connections and ask every worker to end its sessions."""
        if self.stopping:
            return
        self.stopping = True
        self.replacing = False
        while self.pending:
            _cid, live = self.pending.popleft()
            live.conn.record.status = "not-served"
            self._release_parent_copy(live.conn)
            live.finished(live.conn)
        self._changed.set()
        for proc in self.procs.values():
            self._tell(proc, STOP)
        if not self.procs:
            self._empty.set()

    def terminate(self) -> None:
        """Grace is over: workers cancel what they still serve."""
        for proc in self.procs.values():
            self._tell(proc, TERMINATE)

    async def closed(self, timeout: float = 10.0) -> None:
        """Wait for every worker to exit (SIGKILL for one that is still there)."""
        self.begin_stop()
        try:
            await asyncio.wait_for(self._empty.wait(), timeout)
        except TimeoutError:
            for pid in list(self.procs):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            await self._empty.wait()

    async def service_closed(self, service: str) -> None:
        """Wait until no connection of `service` is being served."""
        while self.active(service):
            self._changed.clear()
            await self._changed.wait()


class PoolMode:
    """The `Mode` a `Server` uses to hand its connections to a (maybe shared) pool."""

    def __init__(
        self,
        ctx: ModeContext,
        pool: WorkerPool,
        service: str,
        *,
        owned: bool,
        direct: DirectService | None = None,
    ) -> None:
        self.ctx = ctx
        self.pool = pool
        self.service = service
        self.owned = owned
        self.direct = direct
        self.namer: Namer | None = None  # set by a Server with proxy_from (see server.py)
        assert isinstance(ctx.handler, LoopHandler)
        pool.add_service(service, ctx.handler, ctx.tls, ctx.fds, direct)

    def set_direct(self, direct: DirectService | None) -> None:
        """How workers started from now on accept this server's connections."""
        self.direct = direct
        self.pool.services[self.service].direct = direct

    def start(self) -> None:
        """Start our own pool; a shared one is started by its owner once every server
        sharing it has registered its service (workers know only what was there)."""
        if self.owned:
            self.pool.start(self.ctx.loop)

    def dispatch(self, conn: Accepted) -> None:
        name = self.namer if conn.awaiting_proxy else None
        self.pool.dispatch(conn, self.service, self.ctx.finished, name)

    def active(self) -> int:
        return self.pool.active(self.service)

    def begin_stop(self) -> None:
        self.pool.begin_stop()

    def terminate(self) -> None:
        self.pool.terminate()

    async def closed(self) -> None:
        await self.pool.service_closed(self.service)
        if self.owned:
            await self.pool.closed()
