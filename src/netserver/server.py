"""The supervisor: binds, accepts, asks the gates, hands off, stops cleanly.

`Server` is listeners + gates + a mode + TLS + limits. Every mode shares one accept
path: a connection is accepted and passed to the gates in order (netserver.admit.gate):
each gate's cheap `quick` on the accept path, then the limits gate, which counts it in;
the gates that could not tell without a lookup or a side effect `judge` it in one task,
off the accept path. Then it is given to the mode (or to the mode a gate diverted it
to), which reports its end. SIGTERM/SIGINT stop accepting and wait `limits.grace`
seconds for running handlers before ending them; a second signal ends them at once.
SIGHUP reloads the gates' rules and the TLS context.

Behind a load balancer, a `ProxyGate` among the gates is asked before all others:
a trusted source's connection starts with a PROXY header, read in a task before
anything else (see admit.proxy); from then on the connection is judged, limited,
logged and served as the client the header names. With `tls`, the handshake comes
after the gates (see listen.tls), and reloads on SIGHUP.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import signal
import socket
import ssl
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from .accepted import Accepted, FdRegistry
from .admit.access_gate import AccessGate
from .admit.gate import PASS, Divert, Gate, Refusal, quick_judge
from .admit.limits import Admission
from .admit.proxy import ProxyGate
from .connlog import ConnRecord, ServerLog
from .endpoint import Endpoint
from .errors import ConfigError, NetserverError
from .handlers import Command, HandlerLike, LoopHandler, as_handler, check_mode
from .limits import Limits
from .linger import Lingerer
from .listen.accept import AcceptLoop, accepted_ends
from .listen.listeners import Listener, open_listeners, parse_listen
from .listen.tls import TlsTerminator, harden
from .modes.base import Mode, ModeContext
from .modes.direct import DirectService
from .modes.eventloop import EventLoopMode
from .modes.execute import EXEC_SEATS, ExecMode, resolve_program
from .modes.fork import ForkMode
from .modes.prefork import PoolSize, PreforkMode
from .modes.shared import SharedLimits
from .modes.thread import ThreadMode
from .modes.workers import PoolMode, ProxyAnswer, WorkerPool
from .readiness import sd_notify
from .refusals import RefusalCause, RefusalLines, refusal_lines

MODES = ("fork", "prefork", "thread", "async")
RELAY_FLUSH = 2.0  # at exit, how long TLS relays may go on flushing to their clients
TlsSource = ssl.SSLContext | Callable[[], ssl.SSLContext]


@dataclass(frozen=True)
class ModeSpec:
    """How handlers run: the mode's name (None: async for an async handler, else fork),
    the prefork pool's size, and for async handlers, worker processes -- a count makes
    a pool of the server's own; a `WorkerPool` may be shared by several servers, each
    as a named `service`."""

    name: str | None = None
    pool: PoolSize | None = None
    workers: int | WorkerPool = 0
    service: str = "main"


@dataclass(frozen=True)
class RunOptions:
    """How the server runs in its process: the event loop ("auto": uvloop if installed),
    a callback once it listens, whether it handles TERM/INT/HUP itself, and the line a
    refused client is sent before it is closed: one for every refusal, or one per cause
    (`RefusalLines`: a limit, a rule, an error); none by default."""

    loop: str = "auto"
    on_ready: Callable[[list[Endpoint]], None] | None = None
    signals: bool = True
    refuse_message: str | RefusalLines | None = None


class Server:
    """A configured server; `run()` blocks, `await serve()` runs in a running loop.

    ``Server(handler, ["127.0.0.1:7000"], mode="thread", gates=[AccessGate(policy)])``;
    `tls` is a context, or a function that loads one (called again on SIGHUP).
    """

    def __init__(
        self,
        handler: HandlerLike,
        listen: str | Sequence[str] = "127.0.0.1:0",
        *,
        mode: str | ModeSpec | None = None,
        gates: Sequence[Gate] = (),
        tls: TlsSource | None = None,
        limits: Limits | None = None,
        log: ServerLog | None = None,
        options: RunOptions | None = None,
    ) -> None:
        self.handler = as_handler(handler)
        spec = mode if isinstance(mode, ModeSpec) else ModeSpec(mode)
        self.mode_name = spec.name or ("async" if isinstance(self.handler, LoopHandler) else "fork")
        if self.mode_name not in MODES:
            raise ConfigError(f"unknown mode {self.mode_name!r} (use: {', '.join(MODES)})")
        check_mode(self.handler, self.mode_name)
        # A missing program is a configuration error found before anything is bound.
        self.program = (
            resolve_program(self.handler.argv) if isinstance(self.handler, Command) else ""
        )
        self.options = options or RunOptions()
        self.refusals = refusal_lines(self.options.refuse_message)
        if self.options.loop not in ("auto", "asyncio", "uvloop"):
            raise ConfigError(
                f"unknown event loop {self.options.loop!r} (use: auto, asyncio, uvloop)"
            )
        self.specs = [parse_listen(s) for s in ([listen] if isinstance(listen, str) else listen)]
        self.limits = limits or Limits()
        self.pool = spec.pool or PoolSize()
        self.log = log or ServerLog()
        self.on_stopping: Callable[[], None] | None = None  # the listeners are closed
        # TLS is terminated in every mode (see listen.tls); a loader re-reads on SIGHUP.
        self.tls_loader = None if tls is None or isinstance(tls, ssl.SSLContext) else tls
        context = self.tls_loader() if self.tls_loader is not None else tls
        assert context is None or isinstance(context, ssl.SSLContext)
        self.tls = harden(context) if context is not None else None
        if self.tls is not None:
            # A refusal is made before the handshake, so its line would reach the client
            # as plaintext where a TLS record belongs ("wrong version number"): a server
            # that terminates TLS refuses with the close alone.
            self.refusals = RefusalLines()
        # The PROXY gate says who the client is, so it comes first (and at most once).
        self.proxy = next((g for g in gates if isinstance(g, ProxyGate) and g), None)
        self.gates = [g for g in gates if not isinstance(g, ProxyGate)]
        self._proxying = 0  # connections whose PROXY header is being read
        # The local end is the same for every connection to a listener: connections
        # share one Endpoint (a log record lives as long as its connection).
        self._local = Endpoint()
        self.listeners: list[Listener] = []
        self.ready = threading.Event()
        self.admission = Admission(self.limits)
        self._quick = (*self.gates, self.admission)  # the limits gate is asked last
        # Async mode with worker processes (modes.workers): a count makes a pool of our
        # own; a pool may also be shared by several servers, each as a named service.
        if spec.workers and self.mode_name != "async":
            raise ConfigError("worker processes (--workers) need the async mode")
        self.workers = spec.workers
        self.service = spec.service
        # Made when serving starts (they need the running loop); None until then, so a
        # reload or new limits that arrive earlier apply to what exists.
        self.mode_context: ModeContext | None = None
        self.mode: Mode | None = None
        self._extra: list[Mode] = []  # modes the gates divert connections to
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._stop_requested = threading.Event()
        self._signals = 0

    # -- set-up ------------------------------------------------------------------------
    def bind(self) -> list[Endpoint]:
        """Open the listening sockets now (idempotent); returns the bound endpoints."""
        if not self.listeners:
            _ensure_standard_fds()
            _close_on_exec_inherited()
            self.listeners = open_listeners(self.specs)
        return self.addresses

    @property
    def addresses(self) -> list[Endpoint]:
        """Where the server listens, with the ports the kernel chose for port 0."""
        return [listener.endpoint for listener in self.listeners]

    def _make_mode(self, ctx: ModeContext) -> Mode:
        handler = self.handler
        if isinstance(handler, Command):
            return ExecMode(ctx, handler, self.program, self._exec_direct(), self._refuse_unserved)
        if isinstance(handler, LoopHandler) and self.workers:
            pool, owned = self.workers, False
            if not isinstance(pool, WorkerPool):
                factory = loop_factory(self.options.loop)
                pool = WorkerPool(pool, log=self.log, limits=self.limits, loop_factory=factory)
                owned = True
            return PoolMode(ctx, pool, self.service, owned=owned, direct=self._direct(pool))
        if isinstance(handler, LoopHandler):
            return EventLoopMode(ctx, handler)
        if self.mode_name == "thread":
            return ThreadMode(ctx)
        if self.mode_name == "prefork":
            return PreforkMode(ctx, self.pool)
        return ForkMode(ctx)

    def _direct(self, pool: WorkerPool) -> DirectService | None:
        """Let the workers accept themselves when no gate needs the supervisor (see
        modes.direct); None to keep the supervisor's accept path."""
        if not self._quick_only():
            return None
        table = SharedLimits(self.limits, pool.seats)
        judge = quick_judge(tuple(self.gates))
        return DirectService(self.listeners, table, self.refusals, judge)

    def _exec_direct(self) -> DirectService | None:
        """Let the spawners accept themselves (modes.spawner) when no gate needs the
        supervisor and there is no TLS to relay; None to keep our accept path."""
        if self.tls is not None or not self._quick_only():
            return None
        table = SharedLimits(self.limits, EXEC_SEATS)
        judge = quick_judge(tuple(self.gates))
        return DirectService(self.listeners, table, self.refusals, judge)

    def _quick_only(self) -> bool:
        """Every gate decides at once: no PROXY header, only address rules, and no
        per-source rate (its buckets are not shared)."""
        if self.proxy is not None or self.limits.rate_per_source:
            return False
        return all(isinstance(g, AccessGate) and not g.policy.has_name_rules for g in self.gates)

    # -- running -----------------------------------------------------------------------
    def run(self) -> None:
        """Bind, serve until stopped by a signal or `stop()`, then clean up."""
        self.bind()
        runner = loop_factory(self.options.loop)
        with asyncio.Runner(loop_factory=runner) as r:
            r.run(self.serve())

    async def serve(self) -> None:
        """Serve on the running loop until `stop()` or SIGTERM/SIGINT."""
        self.bind()
        try:
            await self._serve_bound()
        finally:
            for listener in self.listeners:
                listener.close()

    async def _serve_bound(self) -> None:
        loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        self._loop = loop
        if self._stop_requested.is_set():
            self._stop.set()
        fds = self.fds = FdRegistry()
        ctx = self.mode_context = ModeContext(
            self.handler, self.limits, self.log, loop, fds, self._finished, self.mode_name, self.tls
        )
        main = self.mode = self._make_mode(ctx)
        if isinstance(main, PoolMode):
            main.namer = self._name_proxied
        self._extra = [
            mode
            for gate in (*([self.proxy] if self.proxy else []), *self.gates)
            for mode in gate.start(ctx, main)
        ]
        self.acceptor = AcceptLoop(loop, self.listeners, self._accepted, self.log)
        self.acceptor.gate = lambda: not self._full()
        self.terminator = TlsTerminator(fds, self.limits, self.log)
        self.lingerer = Lingerer(loop, fds)  # refused clients, until they read the refusal
        # Thread and event-loop modes terminate TLS themselves; processes need the relay.
        self._relay_tls = not isinstance(main, ThreadMode | EventLoopMode | PoolMode)
        for listener in self.listeners:
            fds.add(listener.sock.fileno())
        installed = self._install_signals(loop)
        # Announce before the mode starts: prefork workers must not inherit --ready-fd.
        self._announce()
        for mode in self._modes():
            mode.start()
        if not (isinstance(main, PoolMode | ExecMode) and main.direct):
            self.acceptor.resume()
        try:
            await self._stop.wait()
        finally:
            await self._shutdown()
            for sig in installed:
                loop.remove_signal_handler(sig)

    def stop(self) -> None:
        """Ask for a graceful stop; safe from any thread, even before `run()`."""
        self._stop_requested.set()
        loop, event = self._loop, self._stop
        if loop is not None and event is not None:
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(event.set)

    def reload(self) -> None:
        """Re-read the TLS files and access rules; on an error keep the old ones, log why."""
        if self.tls_loader is not None:
            try:
                self.reload_tls(self.tls_loader())
            except NetserverError as exc:
                self.log.error(
                    "TLS reload failed, keeping the previous certificate", error=str(exc)
                )
        # Last gate first: the allow/deny gate's "access rules reloaded" line, which
        # operators and scripts wait for, then still ends a reload, as it always has.
        for gate in reversed(self.gates):
            gate.reload(self.log)
        mode = self.mode
        if isinstance(mode, PoolMode | ExecMode) and mode.direct is not None and self.gates:
            self._redirect(mode)

    def _redirect(self, mode: PoolMode | ExecMode) -> None:
        """The workers accepting directly hold the rules they were forked with: start
        new ones with the reloaded rules, or, when a rule now needs a name lookup,
        ones that take their connections from us again."""
        direct = mode.direct
        assert direct is not None
        if self._quick_only():
            mode.set_direct(dataclasses.replace(direct, judge=quick_judge(tuple(self.gates))))
        else:
            self.log.info("access rules need name lookups: the supervisor accepts again")
            mode.set_direct(None)
            self.acceptor.resume()
        if isinstance(mode, PoolMode):
            mode.pool.replace()

    def set_limits(self, limits: Limits) -> None:
        """Apply `limits` to connections accepted from now on (a pool's workers: to
        those of the next generation, see `WorkerPool.replace`)."""
        self.limits = self.admission.limits = limits
        if isinstance(self.mode, PoolMode | ExecMode) and self.mode.direct is not None:
            self.mode.direct.table.limits = limits

    def reload_tls(self, context: ssl.SSLContext) -> None:
        """Serve new connections with `context` (connections already running keep theirs)."""
        self.tls = harden(context)
        if self.mode_context is not None:
            self.mode_context.tls = self.tls
        if isinstance(self.mode, PoolMode):
            self.mode.pool.set_tls(self.service, self.tls)
            self.mode.pool.replace()  # workers hold the context: new ones get the new one
        self.log.info("TLS context reloaded")

    def _install_signals(self, loop: asyncio.AbstractEventLoop) -> list[int]:
        if not self.options.signals or threading.current_thread() is not threading.main_thread():
            return []
        loop.add_signal_handler(signal.SIGTERM, self._on_stop_signal)
        loop.add_signal_handler(signal.SIGINT, self._on_stop_signal)
        loop.add_signal_handler(signal.SIGHUP, self.reload)
        return [signal.SIGTERM, signal.SIGINT, signal.SIGHUP]

    def _on_stop_signal(self) -> None:
        self._signals += 1
        if self._signals == 1:
            self.stop()
        else:
            self.log.info("second stop signal: ending connections now")
            for mode in self._modes():
                mode.terminate()

    def _announce(self) -> None:
        addresses = " ".join(str(a) for a in self.addresses)
        self.log.info("listening", mode=self.mode_name, on=addresses)
        self.ready.set()
        if self.options.on_ready is not None:
            self.options.on_ready(self.addresses)
        sd_notify(b"READY=1")

    def _modes(self) -> list[Mode]:
        """The mode, and the modes the gates divert connections to (tcpd's twist)."""
        return [*([] if self.mode is None else [self.mode]), *self._extra]

    def _active(self) -> int:
        return sum(mode.active() for mode in self._modes())

    async def _all_closed(self) -> None:
        for mode in self._modes():
            await mode.closed()

    async def _shutdown(self) -> None:
        self.acceptor.close()
        if self.on_stopping is not None:  # `netserver run` waits for this in a reload
            self.on_stopping()
        for mode in self._modes():
            mode.begin_stop()
        active = self._active()
        if active:
            self.log.info("stopping: waiting for connections", active=active)
        try:
            await asyncio.wait_for(self._all_closed(), self.limits.grace)
        except TimeoutError:
            self.log.info("grace period over: ending connections", active=self._active())
            for mode in self._modes():
                mode.terminate()
            try:
                await asyncio.wait_for(self._all_closed(), 10.0)
            except TimeoutError:
                self.log.error("connections still running at exit", active=self._active())
        await self.terminator.closed(RELAY_FLUSH)
        self.lingerer.close()
        self.log.info("stopped")

    # -- the accept path ---------------------------------------------------------------
    def _accepted(self, sock: socket.socket, addr: object, listener: Listener) -> None:
        ends = accepted_ends(listener, sock, addr, self._local)
        if ends is None:
            return
        peer, local = ends
        self._local = local
        proxy = self.proxy
        if proxy is not None and proxy.quick(peer, local) is None:
            self._proxied(sock, peer, local, proxy)
            return
        self._admit(sock, peer, local)

    def _proxied(
        self, sock: socket.socket, peer: Endpoint, local: Endpoint, proxy: ProxyGate
    ) -> None:
        """A trusted balancer's connection: its PROXY header first, then the other gates.

        With worker processes the worker reads the header: the supervisor never reads
        client bytes (it may be root). It counts the connection against the global cap
        now and hands it over as the balancer; the worker asks `_name_proxied` before
        serving.
        """
        if isinstance(self.mode, PoolMode):
            sock.setblocking(True)
            self.admission.hold()
            conn = Accepted(sock, ConnRecord(peer, local, self.mode_name), awaiting_proxy=True)
            self.fds.add(conn.fd)
            with contextlib.suppress(OSError):  # the mode accounts for a connection it failed
                self.mode.dispatch(conn)
            return
        self._proxying += 1
        sock.setblocking(False)  # read_header peeks after readiness; never block the loop
        self.fds.add(sock.fileno())
        assert self._loop is not None
        self._loop.create_task(
            self._read_proxy(Accepted(sock, ConnRecord(peer, local, self.mode_name)), proxy)
        )

    async def _read_proxy(self, conn: Accepted, proxy: ProxyGate) -> None:
        """Take the PROXY header off, then judge the connection as the client it names.

        Every rule, limit and log line after this sees the real client; a trusted
        source that sends no valid header in time is dropped (a lingering close, with
        no line) and logged as itself.
        """
        sock, peer = conn.sock, conn.record.peer
        try:
            ruling = await proxy.judge(conn)
        finally:
            self._proxying -= 1
            self.fds.discard(conn.fd)
            self._resume_if_room()
        if isinstance(ruling, Refusal):
            # No line: the peer is a balancer, not a client, and the refusal message
            # speaks of the client (leafmail's names a connection limit). The PROXY
            # protocol's receivers drop such a connection, as HAProxy's spec asks.
            self.log.refused(peer, ruling.reason)
            self.lingerer.refuse(sock, None)
            return
        sock.setblocking(True)
        with contextlib.suppress(OSError):  # the mode accounts for a connection it failed
            self._admit(sock, conn.record.peer, conn.record.local)

    def _name_proxied(
        self, conn: Accepted, peer: Endpoint, local: Endpoint, verdict: ProxyAnswer
    ) -> None:
        """A worker read the header: ask the gates and count the client it names.

        `verdict` gets None (serve it as `peer`), or for a refusal (logged here) the
        line the worker sends before it closes ("" for none). As in `_admit`, every
        gate's `quick` comes first and the client is counted next; the gates that need
        a lookup then `judge` it in a task (`_judge_proxied`), so the pool's loop never
        waits for DNS, and the verdict follows.
        """
        later: list[Gate] = []
        for gate in self.gates:
            ruling = gate.quick(peer, local)
            if ruling is None:
                later.append(gate)
            elif isinstance(ruling, Refusal):
                verdict(self._refuse_proxied(peer, ruling.reason, ruling.cause))
                return
        why = self.admission.name(peer)
        if why is not None:
            verdict(self._refuse_proxied(peer, why, RefusalCause.LIMIT))
            return
        conn.record.peer, conn.record.local = peer, local
        conn.awaiting_proxy = False  # counted against `peer` from now on (`_finished`)
        if not later:
            verdict(None)
            return
        assert self._loop is not None
        self._loop.create_task(self._judge_proxied(conn, later, verdict))

    async def _judge_proxied(self, conn: Accepted, gates: list[Gate], verdict: ProxyAnswer) -> None:
        """`_judge` for a client a worker named. The connection is the worker's by now,
        so a ruling that must act on it here (tcpd's twist, setenv) cannot be carried out:
        it refuses (fail closed) and says why."""
        peer = conn.record.peer
        try:
            for gate in gates:
                ruling = await gate.judge(conn)
                if isinstance(ruling, Refusal):
                    verdict(self._refuse_proxied(peer, ruling.reason, ruling.cause))
                    return
                if isinstance(ruling, Divert):
                    why = "a rule that diverts (twist, setenv) cannot apply behind PROXY"
                    why = f"{why} with worker processes"
                    verdict(self._refuse_proxied(peer, why, RefusalCause.ERROR))
                    return
        except Exception as exc:  # never leave the worker without a verdict
            self.log.error("access check failed", peer=str(peer), error=repr(exc))
            verdict(self._refuse_proxied(peer, "access check failed", RefusalCause.ERROR))
            return
        verdict(None)

    def _refuse_proxied(self, peer: Endpoint, why: str, cause: RefusalCause) -> str:
        """Log a refused client a worker named; the line the worker sends it."""
        self.log.refused(peer, why)
        return self.refusals.line(cause) or ""

    def _full(self) -> bool:
        """True when accept should pause: admitted plus PROXY-pending reach max_conns."""
        cap = self.limits.max_conns
        return self.admission.full or bool(cap and self.admission.total + self._proxying >= cap)

    def _admit(self, sock: socket.socket, peer: Endpoint, local: Endpoint) -> None:
        """Ask every gate's `quick`, the limits last; judge the undecided in a task."""
        later: list[Gate] | None = None
        for gate in self._quick:
            ruling = gate.quick(peer, local)
            if ruling is PASS:
                continue
            if ruling is None:
                later = [gate] if later is None else [*later, gate]
            elif isinstance(ruling, Refusal):
                self._refuse(sock, peer, ruling.reason, ruling.cause)
                return
        conn = Accepted(sock, ConnRecord(peer, local, self.mode_name))
        # Until it ends, no forked child (another client's, or a new worker) may keep it.
        self.fds.add(conn.fd)
        if later is not None:
            assert self._loop is not None
            self._loop.create_task(self._judge(conn, later))
            return
        assert self.mode is not None  # connections are accepted only while serving
        self._start(conn, self.mode.dispatch, self._relay_tls)

    async def _judge(self, conn: Accepted, gates: list[Gate]) -> None:
        """The gates that need lookups or side effects, in order; then the hand-off."""
        divert: Divert | None = None
        try:
            for gate in gates:
                ruling = await gate.judge(conn)
                if isinstance(ruling, Refusal):
                    self._drop(conn, ruling.reason, ruling.cause)
                    return
                if isinstance(ruling, Divert):
                    divert = ruling
                    break
        except Exception as exc:  # never leak an admitted connection
            self.log.error("access check failed", peer=str(conn.record.peer), error=repr(exc))
            self._drop(conn, "access check failed", RefusalCause.ERROR)
            return
        # The mode accounts for the connection even when starting it fails.
        with contextlib.suppress(OSError):
            if divert is None:
                assert self.mode is not None
                self._start(conn, self.mode.dispatch, self._relay_tls)
            else:
                self._start(conn, divert.start, True)

    def _start(self, conn: Accepted, start: Callable[[Accepted], None], relay: bool) -> None:
        """Hand over to the mode; with TLS for a process, through a relay (listen.tls)."""
        tls = self.tls
        if tls is None or not relay:
            start(conn)
            return
        assert self._loop is not None
        self._loop.create_task(self._start_relayed(conn, tls, start))

    async def _start_relayed(
        self, conn: Accepted, tls: ssl.SSLContext, start: Callable[[Accepted], None]
    ) -> None:
        """Handshake first; only a client that completes it reaches the mode."""
        relayed = await self.terminator.terminate(conn, tls)
        if relayed is None:
            self._finished(conn)
            return
        self.fds.add(relayed.fd)
        with contextlib.suppress(OSError):  # the mode accounts for a connection it failed
            start(relayed)

    def _drop(self, conn: Accepted, reason: str, cause: RefusalCause) -> None:
        """Refuse a connection that was already admitted and registered."""
        self.admission.release(conn.record.peer)
        self.fds.discard(conn.fd)
        self._refuse(conn.sock, conn.record.peer, reason, cause)
        self._resume_if_room()

    def _refuse(
        self, sock: socket.socket, peer: Endpoint, reason: str, cause: RefusalCause
    ) -> None:
        """Tell the client (if a message is configured) and close once it has read that
        (netserver.linger); the server goes on."""
        self.log.refused(peer, reason)
        self.lingerer.refuse(sock, self.refusals.line(cause))

    def _refuse_unserved(self, sock: socket.socket) -> None:
        """The refusal line and a lingering close, for an admitted client the mode could
        not serve (an exec server with no spawner process); the mode logged it."""
        self.lingerer.refuse(sock, self.refusals.error)

    def _finished(self, conn: Accepted) -> None:
        self.fds.discard(conn.fd)
        if conn.awaiting_proxy:
            self.admission.release_held()
        else:
            self.admission.release(conn.record.peer)
        self.log.connection(conn.record)
        self._resume_if_room()

    def _resume_if_room(self) -> None:
        if self.acceptor.paused and not self.admission.full:
            self.acceptor.resume()


def serve(
    handler: HandlerLike, listen: str | Sequence[str] = "127.0.0.1:0", **options: Any
) -> None:
    """Run until SIGTERM/SIGINT: ``serve(main, "127.0.0.1:7000", mode="fork")``.

    The options are those of `Server`.
    """
    Server(handler, listen, **options).run()


def loop_factory(kind: str) -> Callable[[], asyncio.AbstractEventLoop]:
    if kind in ("auto", "uvloop"):
        try:
            import uvloop
        except ImportError:
            if kind == "uvloop":
                raise ConfigError(
                    "uvloop is not installed: pip install netserver[uvloop]"
                ) from None
        else:
            factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
            return factory
    return asyncio.new_event_loop


def _ensure_standard_fds() -> None:
    """Open /dev/null on closed fds 0-2, so no socket can land there and be dup2'd onto itself."""
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            null = os.open(os.devnull, os.O_RDWR)
            if null != fd:
                os.dup2(null, fd)
                os.close(null)


def _close_on_exec_inherited() -> None:
    """Mark every descriptor above 2 that we inherited close-on-exec.

    A command run per connection must get only the socket and stderr; descriptors the
    server's own parent leaked to it would otherwise pass straight through.
    """
    try:
        names = os.listdir("/proc/self/fd")
    except OSError:
        return
    for name in names:
        fd = int(name)
        if fd > 2:
            with contextlib.suppress(OSError):
                os.set_inheritable(fd, False)
