"""`leafmail serve`: the privileged parent, its smtpd workers and its queue manager.

The model is Postfix's and OpenSMTPD's privilege separation (README, "Processes"):

    parent   reads the config, binds every listener, opens the spool, forks and
             supervises; it never reads a byte a client sends (the workers accept and
             share one table of session limits; behind a balancer, proxy_from, the
             parent accepts and hands each connection to a worker)
    smtpd xN one event loop each ([process] workers, default one per CPU): sessions,
             checks and their own group commit (leafmail.smtpd); each forks its check
             pool's workers (leafmail.checks.pool) at its first pooled check
    qmgr     the queue runner, remote delivery and the control socket (leafmail.qmgr)
    local    only with [local]: stays root, and delivers the local recipients the
             queue manager hands it as each recipient's user (leafmail.localsvc)

Up to three kinds of listener are served: plain SMTP (``smtp.listen``), submission with
AUTH required (``smtp.submission_listen``) and implicit TLS (``smtp.smtps_listen``); one
pool of workers serves them all. Started as root, the workers and the queue manager run
as ``[process] user``; otherwise everything runs as the user who started it.

SIGTERM/SIGINT stop everything gracefully: mail already answered 250 is in the spool, a
commit in progress finishes first, and a delivery cut short is tried again later. SIGHUP
reloads: the parent reads the config again and, if it is valid, starts new workers with
it (TLS files, users, aliases, relay networks and checks) while the old ones finish
their sessions; what needs a restart is logged.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import os
import signal
import ssl
from collections.abc import Callable
from pathlib import Path

from netserver import CallbackConnection, CallbackHandler, Callbacks, Endpoint, Limits, Server
from netserver.accepted import FdRegistry
from netserver.admit.proxy import ProxyGate
from netserver.connlog import ServerLog
from netserver.errors import CantCreateError, ConfigError, NetserverError
from netserver.listen.tls import harden
from netserver.modes.workers import WorkerApp, WorkerPool
from netserver.refusals import RefusalLines
from netserver.server import ModeSpec, RunOptions, loop_factory

from .auth import Users, load_users
from .config import AuthConfig, Config, SmtpConfig
from .localsvc import LocalClient, LocalService, LocalSocket, client_uid
from .privsep import (
    Announcer,
    Backlog,
    Inherited,
    SpoolHandle,
    adopt_spool,
    process_identity,
)
from .qmgr import Qmgr
from .queue import build_runner
from .smtpd import Role, Smtpd, roles, smtpd_settings
from .spool import Spool
from .spoolcheck import check_spool
from .throttle import SourceTable


def tls_context(smtp: SmtpConfig) -> ssl.SSLContext | None:
    """The server TLS context from smtp.tls_cert/tls_key, or None when not configured."""
    if not smtp.tls_cert:
        return None
    cert, key = smtp.tls_cert, smtp.tls_key
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    # OpenSSL's errors name neither file, so each is checked first for what can be told
    # apart: it cannot be read, or holds no PEM block of the kind it should.
    _check_pem("smtp.tls_cert", cert, "TLS certificate", b"CERTIFICATE-----")
    _check_pem("smtp.tls_key", key or cert, "TLS private key", b"PRIVATE KEY-----")
    try:
        context.load_cert_chain(cert, key or None)
    except (OSError, ssl.SSLError) as exc:
        reason = getattr(exc, "reason", None) or exc
        raise ConfigError(
            f"cannot load TLS certificate {cert} with key {key or cert}: {reason}"
        ) from None
    return context


def _check_pem(setting: str, path: str, kind: str, marker: bytes) -> None:
    """ConfigError naming `setting` and `path` if the file cannot be read or lacks `marker`."""
    try:
        with open(path, "rb") as f:
            data = f.read(1 << 20)
    except OSError as exc:
        raise ConfigError(f"{setting} {path}: cannot read the {kind}: {exc.strerror}") from None
    if marker not in data:
        raise ConfigError(f"{setting} {path}: no PEM {kind} in it")


def _users(auth: AuthConfig) -> Users | None:
    return load_users(auth.users_file) if auth.users_file else None


class Daemon:
    """The parent of `leafmail serve`, built from a `Config`."""

    def __init__(
        self,
        config: Config,
        *,
        log: ServerLog | None = None,
        on_ready: Callable[[list[Endpoint]], None] | None = None,
        reload: Callable[[], Config] | None = None,
        loop: str = "auto",
    ) -> None:
        self.config = config
        self.log = log or ServerLog(program="leafmail")
        self.on_ready = on_ready
        self.reload_config = reload
        self.loop_kind = loop
        self.identity = process_identity(config.process)
        self.settings = smtpd_settings(
            config, tls_context(config.smtp), _users(config.auth), self.log
        )
        self.fds = FdRegistry()  # no child keeps another's channel, nor a listener
        pool = functools.partial(
            WorkerPool,
            log=self.log,
            limits=self._limits(config),
            loop_factory=loop_factory(loop),
            fds=self.fds,
        )
        self.pool = pool(config.process.worker_count, self._setup_smtpd, name="smtpd")
        self.qmgr_pool = pool(1, self._setup_qmgr, name="qmgr")
        # Local delivery stays root (it becomes each recipient): only with [local].
        self.local_pool = pool(1, self._setup_local, name="local")
        self._ready: list[Endpoint] = []
        self._bound = asyncio.Event()
        self._reloading: asyncio.Future[None] | None = None
        # The listeners first: a bad or taken address is the one line the user sees.
        has_tls = self.settings.tls is not None
        self.servers = [self._server(role) for role in roles(config.smtp, has_tls=has_tls)]
        if not self.servers:
            raise ConfigError("nothing to listen on: smtp.listen is empty")
        self.bind()
        for server in self.servers:
            for listener in server.listeners:
                self.fds.add(listener.sock.fileno())
        if self.identity is not None and adopt_spool(Path(config.spool), self.identity):
            self.log.info("spool given to the daemon user", path=config.spool)
        owner = self.identity.uid if self.identity is not None else os.geteuid()
        try:
            repaired = check_spool(config.spool, owner)  # refused: ConfigError, exit 78
            spool = Spool(config.spool)
        except OSError as exc:
            raise CantCreateError(f"cannot use spool {config.spool}: {exc.strerror}") from None
        for note in repaired:
            self.log.info(f"spool repaired: {note}")
        self.spool = spool
        build_runner(config.queue, spool)  # delivery settings that cannot work fail here, at start
        self.handle = SpoolHandle(spool.root)
        inherited = Inherited(
            self.handle.path, self.identity, Announcer(), Backlog(), self.log, SourceTable()
        )
        self.smtpd = Smtpd(self.settings, inherited)
        local = LocalSocket()
        self.qmgr = Qmgr(
            config.queue, config.submit, config.pickup, inherited, LocalClient(local.name)
        )
        max_size = config.smtp.max_message_size
        self.local = LocalService(config.queue, max_size, inherited, local, client_uid(inherited))

    def _session(self, role: str, conn: CallbackConnection) -> Callbacks:
        """A session, in a worker (its services were made by `Smtpd.setup` there): a
        callback handler, so an idle session holds no task (`leafmail.session`)."""
        return self.smtpd.session(role, conn)

    def _setup_smtpd(self) -> WorkerApp:
        return self.smtpd.setup()

    def _setup_qmgr(self) -> WorkerApp:
        return self.qmgr.setup()

    def _setup_local(self) -> WorkerApp:
        return self.local.setup()

    def _limits(self, config: Config) -> Limits:
        smtp = config.smtp
        trusted = config.relay_policy()
        return Limits(
            max_conns=smtp.max_sessions,
            max_per_source=smtp.per_source_sessions,
            timeout=smtp.timeout,  # idle; a line's deadline is the session's (same value)
            # relay_networks are ours (a web app, a NAT): exempt, as Postfix exempts
            # mynetworks from its per-client limits.
            exempt=lambda peer: peer.ip is not None and trusted.decide(peer.ip).allowed,
            ipv6_source_prefix=64,
            grace=smtp.shutdown_grace,
        )

    def _server(self, role: Role) -> Server:
        # Behind a balancer the header names the client (read in the worker, never
        # here): limits, checks and logs see that client (modes.workers).
        proxy = self.config.smtp.proxy_from
        return Server(
            CallbackHandler(functools.partial(self._session, role.name)),
            list(role.listen),
            mode=ModeSpec("async", workers=self.pool, service=role.name),
            gates=[ProxyGate(proxy)] if proxy else [],
            tls=self.settings.tls if role.implicit_tls else None,
            limits=self._limits(self.config),
            log=self.log,
            options=RunOptions(
                on_ready=self._one_ready,
                signals=False,
                refuse_message=refusal_replies(self.config.hostname),
            ),
        )

    def _one_ready(self, addresses: list[Endpoint]) -> None:
        self._ready.extend(addresses)
        if len(self._ready) == sum(len(s.addresses) for s in self.servers):
            self._bound.set()

    def bind(self) -> list[Endpoint]:
        """Open every listener now (errors surface before anything runs)."""
        return [a for server in self.servers for a in server.bind()]

    async def serve(self) -> None:
        """Run until SIGTERM/SIGINT (or `stop`)."""
        removed = self.spool.clean_tmp()
        if removed:
            self.log.info("removed unanswered partial messages from tmp/", count=removed)
        if kept := self.spool.tmp_leftovers():
            self.log.error(
                "kept files in tmp/ that are also committed under one counted link:"
                " run e2fsck on the spool's file system",
                count=len(kept),
            )
        for qid, state in self.spool.settle_duplicates():
            self.log.info("removed a crash's second name of a message", qid=qid, state=state)
        self.spool.clean_status()
        loop = asyncio.get_running_loop()
        self._install_signals(loop)
        self.qmgr_pool.start(loop)
        if self.config.local.enabled:
            self.local_pool.start(loop)
        announce = asyncio.ensure_future(self._announce_when_ready())
        try:
            await asyncio.gather(*(server.serve() for server in self.servers))
        finally:
            announce.cancel()
            await self.pool.closed()
            await self.qmgr_pool.closed()
            await self.local_pool.closed()

    async def _announce_when_ready(self) -> None:
        """READY once the listeners are bound and every worker has dropped privileges."""
        await self._bound.wait()
        self.pool.start(asyncio.get_running_loop())  # every role's server is set up now
        await self.pool.wait_ready()
        await self.qmgr_pool.wait_ready()
        if self.config.local.enabled:
            await self.local_pool.wait_ready()
        self.log.info(
            "processes ready",
            smtpd=" ".join(map(str, self.pool.pids)),
            qmgr=" ".join(map(str, self.qmgr_pool.pids)),
            local=" ".join(map(str, self.local_pool.pids)),
            user=self.identity.user if self.identity else "(unchanged)",
        )
        if self.on_ready is not None:
            self.on_ready(self._ready)

    def _install_signals(self, loop: asyncio.AbstractEventLoop) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop)
        loop.add_signal_handler(signal.SIGHUP, self.reload)

    def stop(self) -> None:
        """Stop every listener gracefully; the workers finish, then the queue manager.
        From now on no process that exits is replaced: pkill and service managers signal
        them all at once, and a queue manager started now would only be stopped again."""
        for pool in (self.pool, self.qmgr_pool, self.local_pool):
            pool.stop_replacing()
        for server in self.servers:
            server.stop()

    # -- SIGHUP ----------------------------------------------------------------------------
    def reload(self) -> None:
        """Read the config again; if it is valid, replace the workers with ones using it."""
        if self.reload_config is None:
            self.log.info("reload: nothing to reload from")
            return
        try:
            config = self.reload_config()
            settings = smtpd_settings(
                config, tls_context(config.smtp), _users(config.auth), self.log
            )
        except (NetserverError, OSError) as exc:
            self.log.error("reload failed, keeping the running configuration", error=str(exc))
            return
        for name in _restart_needed(self.config, config):
            self.log.info("reload: this setting changes only with a restart", setting=name)
        config = _keep_restart_settings(self.config, config)
        self.config = config
        self.settings = settings
        self.smtpd.settings = settings
        self._hand_sections(config)
        limits = self._limits(config)
        for server in self.servers:
            server.set_limits(limits)
            if server.tls is not None and settings.tls is not None:  # smtps
                server.tls = harden(settings.tls)
                self.pool.set_tls(server.service, server.tls)
        self.pool.limits = self.qmgr_pool.limits = limits
        self.pool.replace()
        self.qmgr_pool.replace(overlap=False)  # one queue manager at a time, always
        self.local_pool.replace()
        self._reloading = asyncio.ensure_future(self._reloaded(config.source))

    def _hand_sections(self, config: Config) -> None:
        """Give the queue manager and the local service their sections of `config`
        (the workers started next are built from them)."""
        self.qmgr.queue, self.qmgr.submit = config.queue, config.submit
        self.qmgr.pickup_config = config.pickup
        self.local.queue, self.local.max_message_size = config.queue, config.smtp.max_message_size

    async def _reloaded(self, source: str) -> None:
        """Log once every new worker has started (the old ones drain meanwhile)."""
        for pool in (self.pool, self.qmgr_pool, self.local_pool):
            await pool.wait_ready()
        self.log.info("reloaded", config=source, smtpd=" ".join(map(str, self.pool.pids)))


def _restart_needed(old: Config, new: Config) -> list[str]:
    """The settings that differ but cannot change while running."""
    pairs: dict[str, tuple[object, object]] = {
        "spool": (old.spool, new.spool),
        "smtp.listen": (old.smtp.listen, new.smtp.listen),
        "smtp.submission_listen": (old.smtp.submission_listen, new.smtp.submission_listen),
        "smtp.smtps_listen": (old.smtp.smtps_listen, new.smtp.smtps_listen),
        "process": (old.process, new.process),
    }
    return [name for name, (before, after) in pairs.items() if before != after]


def _keep_restart_settings(old: Config, new: Config) -> Config:
    """`new`, with what needs a restart kept as it runs now."""
    smtp = dataclasses.replace(
        new.smtp,
        listen=old.smtp.listen,
        submission_listen=old.smtp.submission_listen,
        smtps_listen=old.smtp.smtps_listen,
    )
    return dataclasses.replace(new, spool=old.spool, smtp=smtp, process=old.process)


def refusal_replies(hostname: str) -> RefusalLines:
    """The reply a client turned away at connect time reads, for each cause, with the
    enhanced codes Postfix's smtpd uses: a connection limit (4.7.0), an access rule
    (4.7.1), a failure of ours (4.3.0). Each is a 421 and a close: RFC 5321 (3.1) lets a
    554 at connect only with the session kept open until QUIT, answering 503 meanwhile,
    and a refusal here is made before any worker has the client, where reading its
    commands would mean reading network input in the parent. Today leafmail refuses at
    connect for its per-source limit (`smtp.max_sessions_per_source`), or when admission
    itself fails (a defect); it has no connection access rule (relay control is per
    recipient), so the access line is for a rule it may be given (README, "Refused at
    connect")."""
    return RefusalLines(
        limit=f"421 4.7.0 {hostname} Too many connections from your address, try again later",
        access=f"421 4.7.1 {hostname} Access denied, closing connection",
        error=f"421 4.3.0 {hostname} Local error in processing, try again later",
    )
