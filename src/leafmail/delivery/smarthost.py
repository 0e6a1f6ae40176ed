"""Delivery to one smarthost (a provider's submission server).

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
import base64
import os
import ssl
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from netserver.smtp.client import Awaited

from ..config import DeliveryConfig, delivery_problem, smarthost_password, split_hostport
from ..envelope import Envelope
from . import Expansions, LinkDown, Result
from .session import (
    SessionSpent,
    command,
    defer_tls_refusals,
    greet,
    quit_and_drop,
    transaction,
    why,
)
from .wire import ClientLink, WireError, describe, open_connection

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
    link: ClientLink
    uses: int = 0
    # Why this connection is in plaintext although the server offered STARTTLS (its
    # handshake failed, opportunistic TLS went on without it); "" otherwise.
    fallback: str = ""


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
        """Send to `rcpts` on a pooled connection; their results.

        A reused connection whose session is spent (SessionSpent: the server takes no
        more mail on it) is dropped and the recipients left go on a new connection. On
        a new connection only a transaction after the first can find the session spent,
        and a later transaction comes only after one that delivered to someone, so each
        new connection delivers to at least one recipient: at most one more connection
        than recipients.
        """
        results: dict[int, Result] = {}
        pending = rcpts
        conn = await self._acquire()
        while await self._attempt(conn, envelope, data, pending, results):
            pending = [i for i in pending if i not in results]
            try:
                conn = await self._connect()
            except LinkDown as exc:
                if not results:
                    raise
                self._defer(pending, results, str(exc))
                break
        return results

    async def _attempt(
        self,
        conn: _Conn,
        envelope: Envelope,
        data: bytes,
        rcpts: Sequence[int],
        results: dict[int, Result],
    ) -> bool:
        """One `transaction` on `conn`, under the deadline; True if its session was spent
        (the recipients left then have no result)."""
        reusable = spent = False
        remote = self.settings.remote
        try:
            async with asyncio.timeout(self.settings.deadline):
                reusable = await transaction(
                    conn.link,
                    envelope,
                    data,
                    rcpts,
                    results,
                    remote,
                    hostname=self.settings.helo,
                    reused=conn.uses > 0,
                )
        except TimeoutError:
            self._defer(rcpts, results, f"{remote} did not finish within the deadline")
        except SessionSpent:
            spent = True
        except (WireError, OSError) as exc:
            self._defer(rcpts, results, f"connection to {remote} lost: {why(exc)}")
        finally:
            if conn.fallback and defer_tls_refusals(rcpts, results, conn.fallback):
                reusable = False  # its MAIL is refused for as long as it lasts
            self._release(conn, reusable)
        return spent

    def _defer(self, rcpts: Sequence[int], results: dict[int, Result], reason: str) -> None:
        """Defer (4.4.2) the recipients of `rcpts` that have no result yet."""
        lost = Result.deferred("4.4.2", reason, self.settings.remote)
        for index in rcpts:
            results.setdefault(index, lost)

    async def close(self) -> None:
        """Say QUIT on every idle connection (briefly: a dead peer must not hold us)."""
        idle, self._idle = self._idle, []
        for conn in idle:
            await quit_and_drop(conn.link, 5)

    async def _acquire(self) -> _Conn:
        while self._idle:
            conn = self._idle.pop()
            if conn.link.is_connected and conn.uses < MAX_USES:
                return conn
            conn.link.abort()
        return await self._connect()

    def _release(self, conn: _Conn, reusable: bool) -> None:
        conn.uses += 1
        if reusable and conn.link.is_connected:
            self._idle.append(conn)
        else:
            conn.link.abort()

    async def _connect(self) -> _Conn:
        """Connect, greet, secure and log in, or LinkDown.

        With opportunistic TLS a STARTTLS handshake that fails costs that connection
        only: the next one goes without STARTTLS (RFC 7435: encrypt when possible, else
        send in clear; the MX route does the same). A server can offer STARTTLS and fail
        every handshake (Debian 12's OpenSMTPD 6.8 with OpenSSL 3 does); without this
        its mail waited until it expired. No password is at stake: the config refuses a
        username with opportunistic TLS.
        """
        try:
            return await self._open(secure=True)
        except _HandshakeFailed as exc:
            conn = await self._open(secure=False)
            conn.fallback = str(exc)
            return conn

    async def _open(self, *, secure: bool) -> _Conn:
        """Connect, greet, secure (if `secure`) and log in, all within connect_timeout."""
        s = self.settings
        link: ClientLink | None = None
        try:
            async with asyncio.timeout(s.connect_timeout):
                link = await open_connection(
                    s.host,
                    s.port,
                    timeout=s.command_timeout,
                    context=self.tls_context if s.tls == "smtps" else None,
                )
                await greet(link, s.helo)
                if secure:
                    await self._secure(link)
                await self._login(link)
        except BaseException as exc:
            if link is not None:
                link.abort()
            if isinstance(exc, TimeoutError):
                raise LinkDown(f"{s.remote}: no answer within {s.connect_timeout:g}s") from None
            if isinstance(exc, (WireError, OSError)):
                raise LinkDown(f"{s.remote}: {why(exc)}") from None
            raise
        self.connections += 1
        return _Conn(link)

    async def _secure(self, link: ClientLink) -> None:
        s = self.settings
        if s.tls not in ("starttls", "opportunistic"):
            return
        if not link.supports("starttls"):
            if s.tls == "starttls":
                raise LinkDown(f"{s.remote} does not offer STARTTLS, which tls = starttls requires")
            return
        try:
            await link.starttls(self.tls_context, s.host)
            await greet(link, s.helo)  # with TLS 1.3 a refused handshake shows here
        except (WireError, OSError) as exc:  # ssl.SSLError is an OSError
            if s.tls == "opportunistic":
                raise _HandshakeFailed(why(exc)) from None
            raise

    async def _login(self, link: ClientLink) -> None:
        """AUTH PLAIN (RFC 4616) or LOGIN, over TLS only; LinkDown when refused."""
        s = self.settings
        if not s.username:
            return
        if not link.encrypted:
            raise LinkDown(f"{s.remote}: not sending a password without TLS")
        methods = set(link.engine.extensions.get("auth", "").upper().split())
        if "PLAIN" in methods:
            token = f"\0{s.username}\0{s.password}".encode()
            steps = [command(b"AUTH", b"PLAIN", base64.b64encode(token))]
        elif "LOGIN" in methods:
            steps = [b"AUTH LOGIN\r\n", *(_b64_line(v) for v in (s.username, s.password))]
        else:
            raise LinkDown(f"{s.remote} offers neither AUTH PLAIN nor AUTH LOGIN")
        for number, line in enumerate(steps, start=1):
            reply = await link.command(Awaited.AUTH, line)
            if reply.code != 334 or number == len(steps):
                break  # 334 asks for the next step; anything else ends the exchange
        if reply.code != 235:
            refusal = describe(reply)
            raise LinkDown(f"{s.remote} refused the login for {s.username!r}: {refusal}")


class _HandshakeFailed(Exception):
    """Opportunistic STARTTLS failed after the server offered it: try in clear."""


def _b64_line(value: str) -> bytes:
    return base64.b64encode(value.encode()) + b"\r\n"
