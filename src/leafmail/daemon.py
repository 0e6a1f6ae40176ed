"""`leafmail serve`: the listeners, the shared group committer, the queue runner, signals.

Up to three kinds of listener share one event loop and one spool: plain SMTP
(``smtp.listen``), submission with AUTH required (``smtp.submission_listen``) and
implicit TLS (``smtp.smtps_listen``). When there is somewhere to deliver, the queue
runner delivers on the same loop (modes "smarthost" and "mx"); in mode "offline" only
local delivery goes by itself, and the rest waits for `leafmail flush`, which reaches
the daemon through the control socket in the spool. SIGTERM/SIGINT
stop everything gracefully; mail already answered 250 is in the spool by then, a commit
in progress finishes first, and a delivery cut short is simply tried again later.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from netserver import AsyncHandler, Endpoint, Limits, Server
from netserver.connlog import ServerLog
from netserver.errors import CantCreateError, ConfigError
from netserver.smtp import BareNewline, ServerConfig

from .auth import Users, load_users
from .config import Config
from .control import ControlServer, Reply
from .flush import build_runner
from .pickup import PickupServer
from .policy import check_pool, policy_for
from .queue import QueueRunner
from .receive import ReceiveService
from .spool import GroupCommitter, Spool
from .spoolcheck import check_spool
from .throttle import auth_throttle

SESSION_TIMEOUT = 300.0  # RFC 5321 4.5.3.2: at least five minutes between commands


def tls_context(config: Config) -> ssl.SSLContext | None:
    """The server TLS context from smtp.tls_cert/tls_key, or None when not configured."""
    if not config.smtp.tls_cert:
        return None
    cert, key = config.smtp.tls_cert, config.smtp.tls_key
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


@dataclass
class _Role:
    name: str
    listen: tuple[str, ...]
    service: ReceiveService
    implicit_tls: bool = False


class Daemon:
    """Everything `leafmail serve` runs, built from a `Config`."""

    def __init__(
        self,
        config: Config,
        *,
        log: ServerLog | None = None,
        on_ready: Callable[[list[Endpoint]], None] | None = None,
    ) -> None:
        self.config = config
        self.log = log or ServerLog(program="leafmail")
        self.on_ready = on_ready
        self.tls = tls_context(config)
        self.users: Users | None = (
            load_users(config.auth.users_file) if config.auth.users_file else None
        )
        try:
            # The spool's owner is the user the daemon runs as (its euid until the
            # privileged parent drops to [process] user; then pass that user's uid).
            repaired = check_spool(config.spool, os.geteuid())
            self.spool = Spool(config.spool)
        except OSError as exc:
            raise CantCreateError(f"cannot use spool {config.spool}: {exc.strerror}") from None
        for note in repaired:
            self.log.info(f"spool repaired: {note}")
        # `runner` does flushes; `auto` delivers by itself. Offline, only local delivery
        # goes by itself. They share one pass lock: a flush never overlaps a pass.
        self.runner: QueueRunner | None = build_runner(config, self.spool, log=self.log)
        self.auto: QueueRunner | None = self.runner
        if config.delivery.effective_mode == "offline":
            self.auto = None
            if config.local.enabled and self.runner is not None:
                local_only = frozenset({"local"})
                self.auto = build_runner(config, self.spool, routes=local_only, log=self.log)
                if self.auto is not None:
                    self.auto.share_passes_with(self.runner)
        self.pool = check_pool(config, self.log)  # one per smtpd process; workers start on demand
        self.servers: list[Server] = []
        self._ready: list[Endpoint] = []
        self._stopping = asyncio.Event()

    def _smtp_config(self, *, tls_active_offer: bool) -> ServerConfig:
        smtp = self.config.smtp
        return ServerConfig(
            hostname=self.config.hostname,
            max_message_size=smtp.max_message_size,
            max_recipients=smtp.max_recipients,
            max_errors=smtp.max_errors,
            max_junk_commands=smtp.max_junk_commands,
            tls_available=tls_active_offer,
            auth_enabled=self.users is not None,
            auth_plaintext_allowed=smtp.allow_plaintext_auth,
            bare_newline=BareNewline.REPLACE if smtp.bare_lf == "replace" else BareNewline.REJECT,
        )

    def _roles(self, committer: GroupCommitter) -> list[_Role]:
        smtp, policy = self.config.smtp, policy_for(self.config, self.pool)
        throttle = auth_throttle(self.config)

        def service(*, offer_tls: bool, require_auth: bool) -> ReceiveService:
            return ReceiveService(
                self._smtp_config(tls_active_offer=offer_tls),
                committer,
                policy,
                users=self.users,
                tls=self.tls,
                require_auth=require_auth,
                on_spooled=self.auto.notify if self.auto is not None else None,
                throttle=throttle,
                log=self.log,
                min_data_rate=smtp.min_data_rate,
                data_rate_grace=smtp.data_rate_grace,
            )

        has_tls = self.tls is not None
        roles = [
            _Role("smtp", smtp.listen, service(offer_tls=has_tls, require_auth=False)),
            _Role(
                "submission",
                smtp.submission_listen,
                service(offer_tls=has_tls, require_auth=True),
            ),
            _Role(
                "smtps",
                smtp.smtps_listen,
                service(offer_tls=False, require_auth=False),
                implicit_tls=True,
            ),
        ]
        return [role for role in roles if role.listen]

    def _server(self, role: _Role) -> Server:
        smtp = self.config.smtp
        trusted = self.config.relay_policy()
        limits = Limits(
            max_conns=smtp.max_sessions,
            max_per_source=smtp.per_source_sessions,
            timeout=SESSION_TIMEOUT,
            # relay_networks are ours (a web app, a NAT): exempt, as Postfix exempts
            # mynetworks from its per-client limits.
            exempt=lambda peer: peer.ip is not None and trusted.decide(peer.ip).allowed,
            ipv6_source_prefix=64,
        )
        return Server(
            AsyncHandler(role.service.handle),
            list(role.listen),
            mode="async",
            limits=limits,
            refuse_message=f"421 4.7.0 {self.config.hostname} Too many connections "
            "from your address, try again later",
            log=self.log,
            tls=self.tls if role.implicit_tls else None,
            signals=False,
            on_ready=self._one_ready,
        )

    def _one_ready(self, addresses: list[Endpoint]) -> None:
        self._ready.extend(addresses)
        if len(self._ready) == sum(len(s.addresses) for s in self.servers) and self.on_ready:
            self.on_ready(self._ready)

    def bind(self) -> list[Endpoint]:
        """Open every listener now (errors surface before anything runs)."""
        return [a for server in self.servers for a in server.bind()]

    async def serve(self) -> None:
        """Run until SIGTERM/SIGINT (or `stop`)."""
        removed = self.spool.clean_tmp()
        if removed:
            self.log.info("removed unanswered partial messages from tmp/", count=removed)
        self.spool.clean_status()
        committer = GroupCommitter(self.spool)
        control = ControlServer(self.spool.control_path, self._control, self.log)
        pickup = self._pickup(committer)
        delivery: asyncio.Task[None] | None = None
        try:
            self.servers = [self._server(role) for role in self._roles(committer)]
            if not self.servers:
                raise ConfigError("nothing to listen on: smtp.listen is empty")
            self.bind()
            self._install_signals()
            await control.start()
            if pickup is not None:
                await pickup.start()
            if self.auto is not None:
                delivery = asyncio.create_task(self.auto.serve(self._stopping))
            await asyncio.gather(*(server.serve() for server in self.servers))
        finally:
            self._stopping.set()
            await control.close()
            if pickup is not None:
                await pickup.close()
            await self.pool.close()
            if delivery is not None:
                delivery.cancel()  # a delivery cut short is tried again: at least once
                with contextlib.suppress(asyncio.CancelledError):
                    await delivery
            await asyncio.get_running_loop().run_in_executor(None, committer.close)

    def _pickup(self, committer: GroupCommitter) -> PickupServer | None:
        """The local submission socket (leafmail.pickup), if [pickup] wants it.

        It reads bytes from any local user, so its process must be an unprivileged one
        that can commit to the spool (an smtpd worker's role), never the root parent.
        """
        enabled = self.config.pickup.enabled
        if not (os.geteuid() == 0 if enabled is None else enabled):
            return None
        notify = self.auto.notify if self.auto is not None else None
        return PickupServer(self.config, committer, self.log, on_spooled=notify)

    async def _control(self, command: str, reply: Reply) -> None:
        """Serve one control request (leafmail.control)."""
        if self.runner is None:
            reply({"error": "no smarthost configured (delivery.smarthost)"})
            return
        if command == "wake":
            (self.auto or self.runner).notify_scan()
            reply({"done": True})
            return

        def progress(done: Any) -> None:
            reply({"qid": done.qid, "verdict": done.verdict.value, "error": done.error})

        summary = await self.runner.run_once(
            force=True, progress=progress, on_total=lambda n: reply({"total": n})
        )
        reply(
            {
                "done": True,
                "deferred": summary.deferred,
                "counts": dict(summary.counts),
                "link_error": summary.link_error,
            }
        )

    def _install_signals(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop)

    def stop(self) -> None:
        """Stop every listener gracefully, and the queue runner."""
        self._stopping.set()
        for server in self.servers:
            server.stop()
