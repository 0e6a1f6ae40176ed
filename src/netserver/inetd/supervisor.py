"""``netserver run CONFIG.toml``: many services from one config, inetd style.

The supervisor (this process) reads and checks the whole config, builds each service's
`Server` and binds every listener itself; then it forks one process per service, which
drops to the service's user and serves. The supervisor keeps the listening sockets, so
a service that crashes is restarted (with backoff) on the same sockets and clients
queue in the backlog meanwhile. A service that cannot bind, or that keeps crashing, is
logged and left out; the others go on.

Signals: HUP re-reads CONFIG.toml (see inetd.reload: services are added, removed and
changed; unchanged ones keep running, and get the HUP to reload their rules and
certificate); a file that does not load changes nothing, with a log line. TERM/INT are
forwarded as TERM and the supervisor exits once every service has stopped.
Readiness: once every service has bound and reported ready (or failed), one
``READY ADDR ...`` line on --ready-fd and ``READY=1`` to systemd; a reload says
``RELOADING=1`` to systemd, and ``READY=1`` with a "reload done" log line once every
service it started is ready (or failed) and every process it retired has closed its
listeners (a byte on the process's stop pipe, or its end), as ``Type=notify-reload``
expects: from then on, the new configuration alone answers new clients.

Waiting is one `select` over a signal wake-up pipe and the services' ready pipes, so
a signal, a ready service or a restart that falls due each wake the loop at once.
"""

from __future__ import annotations

import contextlib
import errno
import os
import selectors
import signal
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from ..connlog import ServerLog
from ..endpoint import Endpoint
from ..errors import EX_CONFIG, EX_NOPERM, EX_OK, EX_UNAVAILABLE, ConfigError, NetserverError
from ..readiness import ReadyCallback, sd_notify
from ..server import Server
from .config import RunConfig, ServiceConfig, load_run_config
from .reload import Changes, ListenerPool, compare
from .service import FORWARDED, build_server, run_child

QUICK_EXIT = 10.0  # a service that ran less than this long counts as a crash loop
BACKOFF_FIRST = 0.1
BACKOFF_MAX = 30.0
NOT_RESTARTED = frozenset({EX_CONFIG, EX_NOPERM})  # restarting cannot fix these


@dataclass
class Service:
    """A service as the supervisor tracks it across restarts."""

    config: ServiceConfig
    server: Server
    pid: int = 0
    started: float = 0.0
    quick_exits: int = 0
    restart_at: float | None = None
    ready_fd: int = -1
    stop_fd: int = -1  # a byte comes once the process no longer accepts (see _retire)
    settled: bool = False  # reported ready, or failed, at start-up
    failed: bool = False
    addresses: list[Endpoint] = field(default_factory=list)


def check_users(config: RunConfig) -> None:
    """Root runs a service only with ``user = "root"``; a non-root supervisor cannot switch."""
    root = os.geteuid() == 0
    for service in config.services:
        identity = service.identity
        if identity is None and root:
            raise service.error(
                "user", 'missing: netserver run is root; say user = "root" to run it as root'
            )
        if identity is not None and not root and os.geteuid() != identity.uid:
            raise service.error("user", f"cannot switch to {identity.user!r}: not running as root")


class Supervisor:
    """Binds, forks, watches, restarts, forwards signals; `run()` returns an exit code."""

    def __init__(
        self, config: RunConfig, log: ServerLog, loop: str, on_ready: ReadyCallback | None
    ) -> None:
        check_users(config)
        self.log = log
        self.path = config.path
        self.loop = loop
        self.services = [Service(c, build_server(c, log, loop)) for c in config.services]
        for c in config.services:
            if c.identity is not None and c.identity.uid == 0:
                log.info("service runs as root, as its config says", service=c.name)
        self.retiring: list[Service] = []  # replaced or removed, finishing their connections
        self.reloading = False  # a reload's new services have not all reported yet
        self.on_ready = on_ready
        self.keep_out: list[int] = []  # descriptors no service process may keep
        self.parent_fds: list[int] = []  # the caller's (--ready-fd): emptied once closed
        self.selector = selectors.DefaultSelector()
        self.stopping = False
        self.announced = False

    # -- start-up ------------------------------------------------------------------------
    def bind_all(self) -> list[Service]:
        """Bind every service's listeners; one that fails is logged and left out."""
        bound: list[Service] = []
        for service in self.services:
            try:
                service.addresses = service.server.bind()
            except NetserverError as exc:
                service.failed = service.settled = True
                self.log.error("service not started", service=service.config.name, error=str(exc))
                continue
            bound.append(service)
        return bound

    def run(self) -> int:
        """Serve every service until TERM/INT; 69 if none could even bind."""
        if not self.bind_all():
            return EX_UNAVAILABLE
        wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.keep_out += [wake_r, wake_w]
        self.selector.register(wake_r, selectors.EVENT_READ, None)
        signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
        for sig in FORWARDED:
            signal.signal(sig, _no_op)
        try:
            for service in self.services:
                if not service.failed:
                    self.start(service, with_ready=True)
            self._maybe_announce()
            self._loop(wake_r)
        finally:
            signal.set_wakeup_fd(-1)
            self._close_all()
        return EX_OK

    def start(self, service: Service, *, with_ready: bool = False) -> None:
        """Fork the service's process; `with_ready` gives it a pipe to report ready on."""
        ready_r, ready_w = os.pipe2(os.O_CLOEXEC) if with_ready else (-1, -1)
        stop_r, stop_w = os.pipe2(os.O_CLOEXEC)
        others = [fd for s in self.services if s is not service for fd in _socket_fds(s.server)]
        close = [*self.keep_out, *self.parent_fds, *others, *self._pipe_fds(), ready_r, stop_r]
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, FORWARDED)
        pid = os.fork()
        if pid == 0:
            on_ready, on_stopping = _ready_writer(ready_w), _byte_writer(stop_w, b"S")
            run_child(service.config, service.server, close, on_ready, on_stopping)
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        os.close(stop_w)
        service.stop_fd = stop_r
        service.pid, service.started, service.restart_at = pid, time.monotonic(), None
        self.log.info("service started", service=service.config.name, pid=pid)
        if with_ready:
            os.close(ready_w)
            service.ready_fd = ready_r
            self.selector.register(ready_r, selectors.EVENT_READ, service)

    def _pipe_fds(self) -> list[int]:
        """The supervisor's ends of every process's ready and stop pipes."""
        services = [*self.services, *self.retiring]
        return [fd for s in services for fd in (s.ready_fd, s.stop_fd) if fd >= 0]

    # -- the loop ------------------------------------------------------------------------
    def _loop(self, wake_r: int) -> None:
        while not (self.stopping and not any(s.pid for s in [*self.services, *self.retiring])):
            for key, _ in self.selector.select(self._timeout()):
                if key.data is None:
                    self._signals(_drain(wake_r))
                elif key.fd == key.data.ready_fd:
                    self._ready_report(key.data)
                else:
                    self._stop_report(key.data)
            self._start_due()
            self._maybe_announce()
            self._maybe_reloaded()

    def _timeout(self) -> float | None:
        due = [s.restart_at for s in self.services if s.restart_at is not None]
        return max(0.0, min(due) - time.monotonic()) if due else None

    def _signals(self, numbers: Sequence[int]) -> None:
        for number in numbers:
            if number == signal.SIGCHLD:
                self._reap()
            elif number == signal.SIGHUP and not self.stopping:
                self.reload()
            elif number in (signal.SIGTERM, signal.SIGINT):
                self._stop()

    def _stop(self) -> None:
        again = self.stopping
        if not again:
            self.log.info("stopping: forwarding SIGTERM to the services")
            sd_notify(b"STOPPING=1")
        self.stopping = True
        for service in self.services:
            service.restart_at = None
        # A second stop makes the services end connections; retired ones had their first.
        self._forward(signal.SIGTERM, self.services + (self.retiring if again else []))

    def _forward(self, sig: int, services: list[Service]) -> None:
        for service in services:
            if service.pid:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(service.pid, sig)

    def _ready_report(self, service: Service) -> None:
        """A byte means ready; end of file first means it died before listening."""
        data = b""
        with contextlib.suppress(OSError):
            data = os.read(service.ready_fd, 16)
        self.selector.unregister(service.ready_fd)
        os.close(service.ready_fd)
        service.ready_fd = -1
        service.settled = True
        if data:
            service.quick_exits = 0
            self.log.info("service ready", service=service.config.name)

    def _maybe_announce(self) -> None:
        if self.announced or not all(s.settled for s in self.services):
            return
        self.announced = True
        up = [a for s in self.services if not s.failed for a in s.addresses]
        self.log.info("all services started", on=" ".join(str(a) for a in up))
        if self.on_ready is not None:
            self.on_ready(up)
        sd_notify(b"READY=1")

    # -- reloading ---------------------------------------------------------------------
    def reload(self) -> None:
        """Re-read the file and apply it; if it does not load, change nothing and say why."""
        sd_notify(b"RELOADING=1\nMONOTONIC_USEC=%d" % (time.monotonic_ns() // 1000))
        self.log.info("reload: reading the configuration", path=self.path)
        try:
            config, changes, built = self._read_again()
        except NetserverError as exc:
            self.log.error("reload failed, the services run as before", error=str(exc))
            if not self.reloading:  # READY=1 must follow RELOADING=1 all the same
                sd_notify(b"READY=1")
            return
        self.log.info("reload", **changes.describe())
        kept = {s.config.name: s for s in self.services if s.config.name in changes.kept}
        self._retire([s for s in self.services if s.config.name in changes.retired], built)
        for c in config.services:
            if c.name in kept:
                kept[c.name].config = c  # the same table; its lines may have moved
        by_name = {**kept, **{s.config.name: s for s in built}}
        self.services = [by_name[c.name] for c in config.services]
        for service in built:
            if not service.failed:
                self.start(service, with_ready=True)
        self._forward(signal.SIGHUP, list(kept.values()))
        self.reloading = True

    def _read_again(self) -> tuple[RunConfig, Changes, list[Service]]:
        """The file, what it changes, and the services to start; nothing is touched yet."""
        config = load_run_config(self.path)
        check_users(config)
        failed = [s.config.name for s in self.services if s.failed]
        changes = compare([s.config for s in self.services], config.services, failed)
        built = [
            Service(c, build_server(c, self.log, self.loop))
            for c in config.services
            if c.name in changes.started
        ]
        return config, changes, built

    def _retire(self, retired: list[Service], starting: list[Service]) -> None:
        """Hand retired services' sockets on, bind the rest, TERM the retired processes."""
        pool = ListenerPool((s.config.name, s.server.listeners) for s in retired)
        for service in retired:
            service.server.listeners = []  # no longer theirs: never closed in a new child
            service.restart_at = None
            if service.ready_fd >= 0:
                self.selector.unregister(service.ready_fd)
                os.close(service.ready_fd)
                service.ready_fd = -1
        claims = [(s, pool.claim(s.config.name, s.server)) for s in starting]
        pool.close()
        for service, claim in claims:
            try:
                service.addresses = claim.bind()
            except NetserverError as exc:
                service.failed = service.settled = True
                self.log.error("service not started", service=service.config.name, error=str(exc))
        self.retiring += [service for service in retired if service.pid]
        for service in self.retiring:
            if service.stop_fd >= 0 and service.stop_fd not in self.selector.get_map():
                self.selector.register(service.stop_fd, selectors.EVENT_READ, service)
        self._forward(signal.SIGTERM, retired)

    def _stop_report(self, service: Service) -> None:
        """A retired process closed its listeners (a byte), or ended (end of file)."""
        with contextlib.suppress(OSError):
            os.read(service.stop_fd, 16)
        self._close_stop_fd(service)

    def _close_stop_fd(self, service: Service) -> None:
        if service.stop_fd < 0:
            return
        if service.stop_fd in self.selector.get_map():
            self.selector.unregister(service.stop_fd)
        os.close(service.stop_fd)
        service.stop_fd = -1

    def _maybe_reloaded(self) -> None:
        """Done once every new service listens and every retired one stopped accepting."""
        if not self.reloading or not all(s.settled for s in self.services):
            return
        if any(s.stop_fd >= 0 for s in self.retiring):
            return
        self.reloading = False
        up = [a for s in self.services if not s.failed for a in s.addresses]
        self.log.info("reload done", on=" ".join(str(a) for a in up))
        sd_notify(b"READY=1")

    # -- children that end -----------------------------------------------------------------
    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            for service in [*self.services, *self.retiring]:
                if service.pid == pid:
                    self._ended(service, os.waitstatus_to_exitcode(status))

    def _ended(self, service: Service, code: int) -> None:
        name = service.config.name
        service.pid = 0
        self._close_stop_fd(service)
        if service in self.retiring:
            self.retiring.remove(service)
            self.log.info("retired service stopped", service=name, status=code)
            return
        if self.stopping:
            self.log.info("service stopped", service=name, status=code)
            return
        ran = time.monotonic() - service.started
        service.quick_exits = service.quick_exits + 1 if ran < QUICK_EXIT else 0
        if code in NOT_RESTARTED:
            service.failed = service.settled = True
            self.log.error("service failed, not restarted", service=name, status=code)
            return
        delay = min(BACKOFF_MAX, BACKOFF_FIRST * 2 ** max(0, service.quick_exits - 1))
        service.restart_at = time.monotonic() + delay
        self.log.error("service exited, restarting", service=name, status=code, after=delay)

    def _start_due(self) -> None:
        now = time.monotonic()
        for service in self.services:
            if service.restart_at is not None and service.restart_at <= now and not self.stopping:
                self.start(service)

    def _close_all(self) -> None:
        for service in self.services:
            for listener in service.server.listeners:
                listener.close()
        for fd in [*self.keep_out, *self._pipe_fds()]:
            with contextlib.suppress(OSError):
                os.close(fd)


def _socket_fds(server: Server) -> list[int]:
    return [listener.sock.fileno() for listener in server.listeners if listener.sock.fileno() >= 0]


def _ready_writer(fd: int) -> ReadyCallback | None:
    """In the service: one byte on its ready pipe once its Server listens."""
    if fd < 0:
        return None
    write = _byte_writer(fd, b"R")
    return lambda _addresses: write()


def _byte_writer(fd: int, byte: bytes) -> Callable[[], None]:
    """In the service: write `byte` to `fd` and close it, the first time it is called."""
    pending = [fd]

    def write() -> None:
        if pending:
            out = pending.pop()
            with contextlib.suppress(OSError):
                os.write(out, byte)
            os.close(out)

    return write


def _drain(fd: int) -> list[int]:
    """The signal numbers the wake-up pipe holds."""
    numbers: list[int] = []
    while True:
        try:
            chunk = os.read(fd, 512)
        except OSError as exc:
            if exc.errno in (errno.EAGAIN, errno.EINTR):
                return numbers
            raise
        if not chunk:
            return numbers
        numbers.extend(chunk)


def _no_op(_signum: int, _frame: object) -> None:
    """The handler that lets the wake-up pipe see a signal; the loop does the work."""


def run_config(
    path: str,
    log: ServerLog,
    loop: str = "auto",
    on_ready: ReadyCallback | None = None,
    parent_fds: list[int] | None = None,
) -> int:
    """Load CONFIG.toml and supervise its services; returns the exit code."""
    config = load_run_config(path)
    supervisor = Supervisor(config, log, loop, on_ready)
    supervisor.parent_fds = parent_fds if parent_fds is not None else []
    return supervisor.run()


__all__ = ["ConfigError", "Supervisor", "check_users", "run_config"]
