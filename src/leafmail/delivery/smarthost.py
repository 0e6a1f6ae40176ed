"""Delivery to one smarthost (a provider's submission server), with aiosmtplib.

A small pool of connections is kept while there is work: each message borrows one,
runs MAIL/RCPT/DATA on it and gives it back, so a queue run costs one TCP, TLS and AUTH
handshake per connection rather than per message. The number of connections is bounded
by the queue runner's concurrency.

Security defaults: STARTTLS is required unless configured otherwise; the certificate is
verified against the system CAs or `ca_file`; a password is never sent without TLS, and
never logged. Everything a transaction does runs under one hard deadline, so a server
that stops answering cannot hold a worker for longer than that.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import ssl
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import aiosmtplib

from ..config import DeliveryConfig, delivery_problem, smarthost_password, split_hostport
from ..envelope import Envelope
from . import Expansions, LinkDown, Result, all_results
from .session import drop, greet, transaction, why

MAX_USES = 1000  # messages per connection before a fresh one (bounds any server-side state)


@dataclass(frozen=True)
class SmarthostSettings:
    """Everything needed to reach the smarthost; the password is kept out of repr()."""

    host: str
    port: int
    helo: str
    tls: str = "starttls"
    ca_file: str = ""
    username: str = ""
    password: str = field(default="", repr=False)
    connect_timeout: float = 30.0
    command_timeout: float = 300.0
    deadline: float = 900.0

    @classmethod
    def from_config(
        cls, d: DeliveryConfig, helo: str, env: Mapping[str, str] | None = None
    ) -> SmarthostSettings:
        """Settings from the [delivery] table, greeting as `helo`; ValueError if there is
        no usable smarthost."""
        if not d.smarthost:
            raise ValueError("no smarthost configured (delivery.smarthost or --smarthost)")
        problem = delivery_problem(d)
        if problem:
            raise ValueError(problem)
        host, port = split_hostport(d.smarthost, d.tls)
        return cls(
            host=host,
            port=port,
            helo=helo,
            tls=d.tls,
            ca_file=d.ca_file,
            username=d.username,
            password=smarthost_password(d, env) if d.username else "",
            connect_timeout=d.connect_timeout,
            command_timeout=d.command_timeout,
            deadline=d.deadline,
        )

    @property
    def remote(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def client_tls_context(settings: SmarthostSettings) -> ssl.SSLContext:
    """Verifying context (system CAs or ca_file); opportunistic TLS verifies nothing.

    Opportunistic TLS (RFC 7435) only defends against passive listeners, which is all it
    can promise to a server whose certificate nobody configured; it is refused together
    with a password by the config check.
    """
    try:
        cafile = os.path.expanduser(settings.ca_file) if settings.ca_file else None
        context = ssl.create_default_context(cafile=cafile)
    except (OSError, ssl.SSLError) as exc:
        raise ValueError(f"delivery.ca_file {settings.ca_file}: {exc}") from None
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if settings.tls == "opportunistic":
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


@dataclass
class _Conn:
    smtp: aiosmtplib.SMTP
    uses: int = 0


class SmarthostAgent:
    """Deliver messages to one smarthost over a pool of reused connections."""

    def __init__(self, settings: SmarthostSettings) -> None:
        self.settings = settings
        self.tls_context = client_tls_context(settings)
        self._idle: list[_Conn] = []
        self.connections = 0  # opened so far; tests and benchmarks read it

    async def deliver(
        self,
        envelope: Envelope,
        data: bytes,
        rcpts: Sequence[int],
        expansions: Expansions | None = None,  # no aliases on this route
    ) -> dict[int, Result]:
        conn = await self._acquire()
        results: dict[int, Result] = {}
        reusable = False
        remote = self.settings.remote
        try:
            async with asyncio.timeout(self.settings.deadline):
                reusable = await transaction(conn.smtp, envelope, data, rcpts, results, remote)
        except TimeoutError:
            lost = Result.deferred("4.4.2", f"{remote} did not finish within the deadline", remote)
            results = {**all_results(rcpts, lost), **results}
        except (aiosmtplib.SMTPException, OSError) as exc:
            lost = Result.deferred("4.4.2", f"connection to {remote} lost: {why(exc)}", remote)
            results = {**all_results(rcpts, lost), **results}
        finally:
            self._release(conn, reusable)
        return results

    async def close(self) -> None:
        """Say QUIT on every idle connection (briefly: a dead peer must not hold us)."""
        idle, self._idle = self._idle, []
        for conn in idle:
            transport = conn.smtp.transport  # the TLS one after STARTTLS; QUIT forgets it
            with contextlib.suppress(aiosmtplib.SMTPException, OSError, TimeoutError):
                async with asyncio.timeout(5):
                    await conn.smtp.quit()
            drop(conn.smtp, transport)

    async def _acquire(self) -> _Conn:
        while self._idle:
            conn = self._idle.pop()
            if conn.smtp.is_connected and conn.uses < MAX_USES:
                return conn
            conn.smtp.close()
        return await self._connect()

    def _release(self, conn: _Conn, reusable: bool) -> None:
        conn.uses += 1
        if reusable and conn.smtp.is_connected:
            self._idle.append(conn)
        else:
            conn.smtp.close()

    async def _connect(self) -> _Conn:
        """Connect, greet, secure and log in, all within connect_timeout, or LinkDown."""
        s = self.settings
        smtp = aiosmtplib.SMTP(
            hostname=s.host,
            port=s.port,
            local_hostname=s.helo,
            timeout=s.command_timeout,
            use_tls=s.tls == "smtps",
            start_tls=False,
            tls_context=self.tls_context if s.tls == "smtps" else None,
        )
        try:
            async with asyncio.timeout(s.connect_timeout):
                await smtp.connect()
                await greet(smtp)
                await self._secure(smtp)
                await self._login(smtp)
        except LinkDown:
            smtp.close()
            raise
        except TimeoutError:
            smtp.close()
            raise LinkDown(f"{s.remote}: no answer within {s.connect_timeout:g}s") from None
        except (aiosmtplib.SMTPException, OSError) as exc:
            smtp.close()
            raise LinkDown(f"{s.remote}: {why(exc)}") from None
        self.connections += 1
        return _Conn(smtp)

    async def _secure(self, smtp: aiosmtplib.SMTP) -> None:
        s = self.settings
        if s.tls not in ("starttls", "opportunistic"):
            return
        if not smtp.supports_extension("starttls"):
            if s.tls == "starttls":
                raise LinkDown(f"{s.remote} does not offer STARTTLS, which tls = starttls requires")
            return
        await smtp.starttls(tls_context=self.tls_context, server_hostname=s.host)
        await greet(smtp)

    async def _login(self, smtp: aiosmtplib.SMTP) -> None:
        s = self.settings
        if not s.username:
            return
        if smtp.get_transport_info("sslcontext") is None:
            raise LinkDown(f"{s.remote}: not sending a password without TLS")
        methods = {m.lower() for m in smtp.server_auth_methods}
        try:
            if "plain" in methods:
                await smtp.auth_plain(s.username, s.password)
            elif "login" in methods:
                await smtp.auth_login(s.username, s.password)
            else:
                raise LinkDown(f"{s.remote} offers neither AUTH PLAIN nor AUTH LOGIN")
        except aiosmtplib.SMTPAuthenticationError as exc:
            raise LinkDown(f"{s.remote} refused the login for {s.username!r}: {why(exc)}") from None
