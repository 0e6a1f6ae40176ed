"""The supervisor: binds, accepts, judges access and limits, hands off, stops cleanly.

Every mode shares this one path. A connection is accepted, checked against the access
rules (a name lookup, when a rule needs one, runs in a thread, never on the accept
path), counted against the limits, then given to the mode, which reports its end.
SIGTERM/SIGINT stop accepting and wait `grace` seconds for running handlers before
ending them; a second signal ends them at once. SIGHUP reloads the access rules.

With hosts.allow/hosts.deny (`hosts`), a `HostsGate` decides after the allow/deny
rules: a verdict that needs nothing is taken on the accept path, anything that needs a
lookup, a banner, a spawned command or a twist is done in a task (see tcpd.gate).

Behind a load balancer (`proxy_from`), a trusted source's connection starts with a PROXY
header, read in a task before anything else (see proxy); from then on the connection is
judged, limited, logged and served as the client the header names. With `tls`, the
handshake comes after access and limits (see listen.tls), and reloads on SIGHUP.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import ssl
import threading
from collections.abc import Callable, Sequence
from typing import Any

from .admit.access import AccessPolicy, NameResolver, SystemResolver
from .admit.limits import Admission, Limits
from .connlog import ConnRecord, ServerLog
from .endpoint import Endpoint
from .errors import ConfigError, NetserverError
from .handlers import AsyncHandler, Command, HandlerLike, as_handler, check_mode
from .listen.accept import AcceptLoop
from .listen.listeners import Listener, open_listeners, parse_listen
from .listen.proxy import ProxyError, ProxyTrust, read_header
from .listen.proxy import apply as proxy_endpoints
from .listen.tls import TlsTerminator, harden
from .modes.base import Accepted, FdRegistry, Mode, ModeContext
from .modes.eventloop import EventLoopMode
from .modes.execute import ExecMode, resolve_program
from .modes.fork import ForkMode
from .modes.prefork import PoolSize, PreforkMode
from .modes.thread import ThreadMode
from .modes.workers import PoolMode, WorkerPool
from .readiness import sd_notify
from .tcpd.access import HostsLoader, Plan, Request, default_daemon_name
from .tcpd.envnames import ConnNames, NameOptions, confirmed_choice
from .tcpd.gate import HostsExecMode, HostsGate, TwistMode
from .tcpd.names import HostNames, SystemHostNames

MODES = ("fork", "prefork", "thread", "async")
LOOKUP_TIMEOUT = 5.0
PROXY_TIMEOUT = 5.0  # for the whole PROXY header (or the idle timeout, if shorter)
RELAY_FLUSH = 2.0  # at exit, how long TLS relays may go on flushing to their clients
AccessLoader = Callable[[], AccessPolicy]


class Server:
    """A configured server; `run()` blocks, `await serve()` runs in a running loop."""

    def __init__(
        self,
        handler: HandlerLike,
        listen: str | Sequence[str] = "127.0.0.1:0",
        *,
        mode: str | None = None,
        allow: Sequence[str] = (),
        deny: Sequence[str] = (),
        access: AccessLoader | None = None,
        limits: Limits | None = None,
        pool: PoolSize | None = None,
        resolver: NameResolver | None = None,
        log: ServerLog | None = None,
        refuse_message: str | None = None,
        loop: str = "auto",
        on_ready: Callable[[list[Endpoint]], None] | None = None,
        tls: ssl.SSLContext | None = None,
        tls_loader: Callable[[], ssl.SSLContext] | None = None,
        proxy_from: Sequence[str] = (),
        signals: bool = True,
        hosts: HostsLoader | None = None,
        daemon_name: str | None = None,
        host_names: HostNames | None = None,
        names: NameOptions | None = None,
        workers: int | WorkerPool = 0,
        service: str = "main",
    ) -> None:
        self.handler = as_handler(handler)
        self.mode_name = mode or ("async" if isinstance(self.handler, AsyncHandler) else "fork")
        if self.mode_name not in MODES:
            raise ConfigError(f"unknown mode {self.mode_name!r} (use: {', '.join(MODES)})")
        check_mode(self.handler, self.mode_name)
        # A missing program is a configuration error found before anything is bound.
        self.program = (
            resolve_program(self.handler.argv) if isinstance(self.handler, Command) else ""
        )
        if loop not in ("auto", "asyncio", "uvloop"):
            raise ConfigError(f"unknown event loop {loop!r} (use: auto, asyncio, uvloop)")
        self.specs = [parse_listen(s) for s in ([listen] if isinstance(listen, str) else listen)]
        self.load_access: AccessLoader = access or (lambda: AccessPolicy(allow, deny))
        self.access = self.load_access()
        self.limits = limits or Limits()
        self.pool = pool or PoolSize()
        self.resolver = resolver or SystemResolver()
        self.log = log or ServerLog()
        self.refuse_message = refuse_message
        self.loop_kind = loop
        self.on_ready = on_ready
        self.on_stopping: Callable[[], None] | None = None  # the listeners are closed
        # TLS is terminated in every mode (see listen.tls); `tls_loader` re-reads on SIGHUP.
        self.tls_loader = tls_loader
        if tls is None and tls_loader is not None:
            tls = tls_loader()
        self.tls = harden(tls) if tls is not None else None
        self.proxy = ProxyTrust(proxy_from)
        self._proxying = 0  # connections whose PROXY header is being read
        self.handle_signals = signals
        self.hosts: HostsGate | None = None
        host_names = host_names or SystemHostNames()
        if hosts is not None:
            daemon = daemon_name or default_daemon_name(self.handler)
            self.hosts = HostsGate(hosts, daemon, host_names, self.log)
        names = names or NameOptions()
        if names != NameOptions() and not isinstance(self.handler, Command):
            raise ConfigError("host name lookups and local names are for commands (TCPREMOTEHOST)")
        self.names = ConnNames(names, host_names)
        self.twist: TwistMode | None = None
        self.listeners: list[Listener] = []
        self.ready = threading.Event()
        self.admission = Admission(self.limits)
        # Async mode with worker processes (modes.workers): a count makes a pool of our
        # own; a pool may also be shared by several servers, each as a named service.
        if workers and self.mode_name != "async":
            raise ConfigError("worker processes (--workers) need the async mode")
        self.workers = workers
        self.service = service
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
            if self.hosts is not None:
                return HostsExecMode(ctx, handler, self.program)
            return ExecMode(ctx, handler, self.program)
        if isinstance(handler, AsyncHandler) and self.workers:
            pool, owned = self.workers, False
            if not isinstance(pool, WorkerPool):
                factory = loop_factory(self.loop_kind)
                pool = WorkerPool(pool, log=self.log, limits=self.limits, loop_factory=factory)
                owned = True
            return PoolMode(ctx, pool, self.service, owned=owned)
        if isinstance(handler, AsyncHandler):
            return EventLoopMode(ctx, handler)
        if self.mode_name == "thread":
            return ThreadMode(ctx)
        if self.mode_name == "prefork":
            return PreforkMode(ctx, self.pool)
        return ForkMode(ctx)

    # -- running -----------------------------------------------------------------------
    def run(self) -> None:
        """Bind, serve until stopped by a signal or `stop()`, then clean up."""
        self.bind()
        runner = loop_factory(self.loop_kind)
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
        self.mode = self._make_mode(ctx)
        if isinstance(self.mode, PoolMode):
            self.mode.namer = self._name_proxied
        if self.hosts is not None:
            self.twist = TwistMode(ctx)
            self.hosts.announce()
        self.acceptor = AcceptLoop(loop, self.listeners, self._accepted, self.log)
        self.acceptor.gate = lambda: not self._full()
        self.terminator = TlsTerminator(fds, self.limits, self.log)
        # Thread and event-loop modes terminate TLS themselves; processes need the relay.
        self._relay_tls = not isinstance(self.mode, ThreadMode | EventLoopMode | PoolMode)
        for listener in self.listeners:
            fds.add(listener.sock.fileno())
        installed = self._install_signals(loop)
        # Announce before the mode starts: prefork workers must not inherit --ready-fd.
        self._announce()
        self.mode.start()
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
        if self.hosts is not None:
            self.hosts.reload()
        try:
            self.access = self.load_access()
        except NetserverError as exc:
            self.log.error("reload failed, keeping the previous rules", error=str(exc))
            return
        self.log.info("access rules reloaded", rules=self.access.describe())

    def reload_tls(self, context: ssl.SSLContext) -> None:
        """Serve new connections with `context` (connections already running keep theirs)."""
        self.tls = harden(context)
        if hasattr(self, "mode_context"):
            self.mode_context.tls = self.tls
        mode = getattr(self, "mode", None)
        if isinstance(mode, PoolMode):
            mode.pool.set_tls(self.service, self.tls)
            mode.pool.replace()  # workers hold the context: new ones get the new one
        self.log.info("TLS context reloaded")

    def _install_signals(self, loop: asyncio.AbstractEventLoop) -> list[int]:
        if not self.handle_signals or threading.current_thread() is not threading.main_thread():
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
        if self.on_ready is not None:
            self.on_ready(self.addresses)
        sd_notify(b"READY=1")

    def _modes(self) -> list[Mode]:
        """The mode, and the twist mode that serves connections a hosts rule twisted."""
        return [self.mode] if self.twist is None else [self.mode, self.twist]

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
        self.log.info("stopped")

    # -- the accept path ---------------------------------------------------------------
    def _accepted(self, sock: socket.socket, addr: object, listener: Listener) -> None:
        peer = Endpoint.from_sockaddr(sock.family, addr)
        try:
            local = Endpoint.from_sockaddr(sock.family, sock.getsockname())
        except OSError:
            sock.close()
            return
        if self.proxy and self.proxy.trusts(peer) and isinstance(self.mode, PoolMode):
            self._hand_to_worker_unnamed(sock, peer, local)
            return
        if self.proxy and self.proxy.trusts(peer):
            self._proxying += 1
            sock.setblocking(False)  # read_header peeks after readiness; never block the loop
            self.fds.add(sock.fileno())
            assert self._loop is not None
            self._loop.create_task(self._read_proxy(sock, peer, local))
            return
        sock.setblocking(True)
        self._admit(sock, peer, local)

    async def _read_proxy(self, sock: socket.socket, peer: Endpoint, local: Endpoint) -> None:
        """Take the PROXY header off, then judge the connection as the client it names.

        Every rule, limit and log line after this sees the real client; a trusted
        source that sends no valid header in time is dropped (and logged as itself).
        """
        fd = sock.fileno()
        try:
            info = await read_header(sock, min(PROXY_TIMEOUT, self.limits.timeout or PROXY_TIMEOUT))
        except (ProxyError, OSError) as exc:
            self.log.refused(peer, f"PROXY protocol: {exc}")
            sock.close()
            return
        finally:
            self._proxying -= 1
            self.fds.discard(fd)
            self._resume_if_room()
        real, dest = proxy_endpoints(info, peer, local)
        sock.setblocking(True)
        with contextlib.suppress(OSError):  # the mode accounts for a connection it failed
            self._admit(sock, real, dest)

    def _hand_to_worker_unnamed(self, sock: socket.socket, peer: Endpoint, local: Endpoint) -> None:
        """A balancer's connection, with worker processes: the worker reads the header.

        The supervisor never reads client bytes (it may be root). It counts the
        connection against the global cap now and hands it over as the balancer; the
        worker reads the PROXY header and asks `_name_proxied` before serving.
        """
        sock.setblocking(True)
        self.admission.hold()
        conn = Accepted(sock, ConnRecord(peer, local, self.mode_name), awaiting_proxy=True)
        self.fds.add(conn.fd)
        with contextlib.suppress(OSError):  # the mode accounts for a connection it failed
            self.mode.dispatch(conn)

    def _name_proxied(self, conn: Accepted, peer: Endpoint, local: Endpoint) -> str | None:
        """A worker read the header: judge and count the client it names, as `_admit` would.

        Returns None (serve it as `peer`), or for a refusal (logged here) the line the
        worker sends before it closes ("" for none). Rules that need the client's host
        name are decided without one (no lookup on this path).
        """
        decision = self.access.decide(peer.ip) if peer.ip is not None else None
        why = decision.reason if decision is not None and not decision.allowed else None
        why = why or self.admission.name(peer)
        if why is not None:
            self.log.refused(peer, why)
            return self.refuse_message or ""
        conn.record.peer, conn.record.local = peer, local
        conn.awaiting_proxy = False
        return None

    def _full(self) -> bool:
        """True when accept should pause: admitted plus PROXY-pending reach max_conns."""
        cap = self.limits.max_conns
        return self.admission.full or bool(cap and self.admission.total + self._proxying >= cap)

    def _admit(self, sock: socket.socket, peer: Endpoint, local: Endpoint) -> None:
        """Judge a connection by its client's address, then hand it to the mode."""
        policy = self.access
        by_name = policy.needs_names(peer.ip)
        if not by_name:
            decision = policy.decide(peer.ip)
            if not decision.allowed:
                self._refuse(sock, peer, decision.reason)
                return
        request, plan = self._hosts_quick(peer, local)
        if plan is not None and not plan.granted and self.hosts is not None:
            self.hosts.record(peer, plan)
            self._refuse(sock, peer, self.hosts.reason(plan))
            return
        why = self.admission.admit(peer)
        if why is not None:
            self._refuse(sock, peer, why)
            return
        conn = Accepted(sock, ConnRecord(peer, local, self.mode_name))
        self.names.start(conn.record)
        # Until it ends, no forked child (another client's, or a new worker) may keep it.
        self.fds.add(conn.fd)
        if by_name or (request is not None and plan is None):
            assert self._loop is not None
            self._loop.create_task(self._judge(conn, policy, by_name, request))
            return
        if plan is not None and self.hosts is not None:
            self.hosts.record(peer, plan)
        if self.names.wanted(peer):  # decided; only the names to look up, in a task
            assert self._loop is not None
            self._loop.create_task(self._judge(conn, policy, False, None))
            return
        self._start(conn, self.mode.dispatch, self._relay_tls)

    def _hosts_quick(self, peer: Endpoint, local: Endpoint) -> tuple[Request | None, Plan | None]:
        """The hosts request and, if it needs no lookup or side effect, its plan."""
        if self.hosts is None or peer.ip is None:
            return None, None
        request = self.hosts.request(peer, local)
        return request, self.hosts.quick(request)

    async def _judge(
        self, conn: Accepted, policy: AccessPolicy, by_name: bool, request: Request | None
    ) -> None:
        """Names, hosts options and the hand-off, in a task; the accept loop goes on."""
        plan: Plan | None = None
        try:
            if by_name and not await self._judge_by_name(conn, policy):
                return
            if request is not None and self.hosts is not None:
                plan = await self._judge_by_hosts(conn, request, self.hosts)
            self.names.take(conn.record, request)
            if plan is None or plan.granted:
                await self.names.fill(conn.record)
        except Exception as exc:  # never leak an admitted connection
            self.log.error("access check failed", peer=str(conn.record.peer), error=repr(exc))
            self._drop(conn, "access check failed")
            return
        # The mode accounts for the connection even when starting it fails.
        with contextlib.suppress(OSError):
            self._hand_off(conn, plan)

    async def _judge_by_name(self, conn: Accepted, policy: AccessPolicy) -> bool:
        """Look the client's name up in a thread, then decide; False if refused."""
        ip = conn.record.peer.ip
        assert ip is not None and self._loop is not None
        names: frozenset[str] = frozenset()
        with contextlib.suppress(TimeoutError):
            names = await asyncio.wait_for(
                self._loop.run_in_executor(None, self.resolver.confirmed_names, ip),
                LOOKUP_TIMEOUT,
            )
        decision = policy.decide(ip, names)
        if not decision.allowed:
            self._drop(conn, decision.reason)
        conn.record.remote_host = confirmed_choice(names)
        return decision.allowed

    async def _judge_by_hosts(self, conn: Accepted, request: Request, gate: HostsGate) -> Plan:
        """Decide by hosts.allow/hosts.deny and carry out the options before the hand-off."""
        plan = await gate.judge(request, gate.access)
        gate.record(conn.record.peer, plan)
        await gate.prepare(plan, conn.sock, self.mode_context)
        return plan

    def _hand_off(self, conn: Accepted, plan: Plan | None) -> None:
        """Serve the connection as the plan says: the service, a twist, or a refusal."""
        if plan is None:
            self._start(conn, self.mode.dispatch, self._relay_tls)
        elif plan.twist is not None and self.twist is not None:
            twist, command, env = self.twist, plan.twist, dict(plan.env)
            self._start(conn, lambda c: twist.twist(c, command, env), True)
        elif not plan.granted and self.hosts is not None:
            self._drop(conn, self.hosts.reason(plan))
        else:
            if plan.env and isinstance(self.mode, HostsExecMode):
                self.mode.set_env(conn, dict(plan.env))
            elif plan.env:
                self.log.info("setenv applies only to commands", peer=str(conn.record.peer))
            self._start(conn, self.mode.dispatch, self._relay_tls)

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

    def _drop(self, conn: Accepted, reason: str) -> None:
        """Refuse a connection that was already admitted and registered."""
        self.admission.release(conn.record.peer)
        self.fds.discard(conn.fd)
        self._refuse(conn.sock, conn.record.peer, reason)
        self._resume_if_room()

    def _refuse(self, sock: socket.socket, peer: Endpoint, reason: str) -> None:
        """Tell the client (if a message is configured) and close; the server goes on."""
        self.log.refused(peer, reason)
        if self.refuse_message:
            sock.setblocking(False)
            with contextlib.suppress(OSError):
                sock.send(self.refuse_message.encode() + b"\r\n")
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
        sock.close()

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
