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

from netserver.smtp.addresses import xtext_encode

from ..config import Config, delivery_problem, smarthost_password, split_hostport
from ..envelope import Envelope, Recipient
from . import LinkDown, Result, all_results

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
    def from_config(cls, config: Config, env: Mapping[str, str] | None = None) -> SmarthostSettings:
        """Settings from the [delivery] table; ValueError if there is no usable smarthost."""
        d = config.delivery
        if not d.smarthost:
            raise ValueError("no smarthost configured (delivery.smarthost or --smarthost)")
        problem = delivery_problem(d)
        if problem:
            raise ValueError(problem)
        host, port = split_hostport(d.smarthost, d.tls)
        return cls(
            host=host,
            port=port,
            helo=config.hostname,
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
        self, envelope: Envelope, data: bytes, rcpts: Sequence[int]
    ) -> dict[int, Result]:
        conn = await self._acquire()
        results: dict[int, Result] = {}
        reusable = False
        remote = self.settings.remote
        try:
            async with asyncio.timeout(self.settings.deadline):
                reusable = await _transaction(conn.smtp, envelope, data, rcpts, results, remote)
        except TimeoutError:
            lost = Result.deferred("4.4.2", f"{remote} did not finish within the deadline", remote)
            results = {**all_results(rcpts, lost), **results}
        except (aiosmtplib.SMTPException, OSError) as exc:
            lost = Result.deferred("4.4.2", f"connection to {remote} lost: {_why(exc)}", remote)
            results = {**all_results(rcpts, lost), **results}
        finally:
            self._release(conn, reusable)
        return results

    async def close(self) -> None:
        """Say QUIT on every idle connection (briefly: a dead peer must not hold us)."""
        idle, self._idle = self._idle, []
        for conn in idle:
            with contextlib.suppress(aiosmtplib.SMTPException, OSError, TimeoutError):
                async with asyncio.timeout(5):
                    await conn.smtp.quit()
            conn.smtp.close()

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
                await _greet(smtp)
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
            raise LinkDown(f"{s.remote}: {_why(exc)}") from None
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
        await _greet(smtp)

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
            raise LinkDown(
                f"{s.remote} refused the login for {s.username!r}: {_why(exc)}"
            ) from None


async def _greet(smtp: aiosmtplib.SMTP) -> None:
    """EHLO, falling back to HELO for a server that does not know EHLO."""
    try:
        await smtp.ehlo()
    except aiosmtplib.SMTPHeloError:
        await smtp.helo()


async def _transaction(
    smtp: aiosmtplib.SMTP,
    envelope: Envelope,
    data: bytes,
    rcpts: Sequence[int],
    results: dict[int, Result],
    remote: str,
) -> bool:
    """MAIL, RCPT for each recipient, DATA; fills `results`; True if the connection is reusable.

    A recipient's result is recorded as soon as it is final for this attempt (a RCPT
    refusal), and the accepted ones after the reply to DATA, so if the connection dies
    half-way the caller defers exactly the recipients that have no result yet.
    """
    refusal = cannot_carry(smtp, envelope, data, remote)
    if refusal is not None:
        results.update(all_results(rcpts, refusal))
        return True
    utf8 = envelope.smtputf8 and needs_smtputf8(envelope, data)
    encoding = "utf-8" if utf8 else "ascii"
    reply = await _path_command(
        smtp,
        b"MAIL",
        b"FROM:",
        envelope.sender,
        mail_options(smtp, envelope, data, utf8=utf8),
        encoding,
    )
    if reply.code != 250:
        results.update(all_results(rcpts, Result.refused(reply.code, reply.message, remote)))
        return await _reset(smtp)
    dsn = smtp.supports_extension("dsn")
    accepted = []
    for index in rcpts:
        rcpt = envelope.recipients[index]
        options = rcpt_options(rcpt, dsn)
        reply = await _path_command(smtp, b"RCPT", b"TO:", rcpt.address, options, encoding)
        if reply.code in (250, 251):
            accepted.append(index)
        else:
            results[index] = Result.refused(reply.code, reply.message, remote)
    if not accepted:
        return await _reset(smtp)
    try:
        reply = await smtp.data(data)
    except aiosmtplib.SMTPDataError as exc:
        results.update(all_results(accepted, Result.refused(exc.code, exc.message, remote)))
        return await _reset(smtp)
    results.update(all_results(accepted, Result.from_reply(reply.code, reply.message, remote)))
    return True


async def _path_command(
    smtp: aiosmtplib.SMTP,
    verb: bytes,
    keyword: bytes,
    address: str,
    options: list[str],
    encoding: str,
) -> aiosmtplib.SMTPResponse:
    """MAIL FROM:<path> or RCPT TO:<path>, with the path exactly as it was received.

    aiosmtplib's mail() and rcpt() re-parse the address as an RFC 5322 header address,
    which can rewrite a valid RFC 5321 path (quoted local parts, comments); the spool
    holds paths our server already checked, so they are sent as they are.
    """
    path = b"<" + address.encode(encoding) + b">"
    return await smtp.execute_command(verb, keyword + path, *(o.encode("ascii") for o in options))


async def _reset(smtp: aiosmtplib.SMTP) -> bool:
    """RSET after a transaction that did not end with DATA; False if that failed too."""
    try:
        await smtp.rset()
    except (aiosmtplib.SMTPException, OSError):
        return False
    return True


def cannot_carry(
    smtp: aiosmtplib.SMTP, envelope: Envelope, data: bytes, remote: str
) -> Result | None:
    """A permanent failure when the next hop lacks an extension this message needs.

    Nothing is ever downgraded silently: an internationalized message to a server
    without SMTPUTF8 bounces 5.6.7 (RFC 6531 3.2), 8-bit content to a server without
    8BITMIME bounces 5.6.3 (RFC 6152 3 allows only conversion or a bounce), and a
    message over the server's declared SIZE bounces 5.3.4 (RFC 1870).
    """
    utf8 = envelope.smtputf8 and needs_smtputf8(envelope, data)
    if utf8 and not smtp.supports_extension("smtputf8"):
        return Result.failed(
            "5.6.7", f"{remote} does not support SMTPUTF8, which this message needs", remote
        )
    if not smtp.supports_extension("8bitmime") and has_8bit(data):
        return Result.failed(
            "5.6.3", f"{remote} does not support 8BITMIME and the message has 8-bit data", remote
        )
    limit = smtp.esmtp_extensions.get("size", "").strip()
    if limit.isdigit() and int(limit) > 0 and len(data) > int(limit):
        return Result.failed(
            "5.3.4",
            f"message of {len(data)} bytes exceeds the {limit} bytes {remote} takes",
            remote,
        )
    return None


def mail_options(
    smtp: aiosmtplib.SMTP, envelope: Envelope, data: bytes, *, utf8: bool
) -> list[str]:
    """MAIL FROM parameters passed onward: SIZE, BODY, SMTPUTF8, and DSN's RET/ENVID."""
    options = []
    if smtp.supports_extension("size"):
        options.append(f"SIZE={len(data)}")
    if envelope.body.upper() != "7BIT" and smtp.supports_extension("8bitmime"):
        options.append("BODY=8BITMIME")
    if utf8:
        options.append("SMTPUTF8")
    if smtp.supports_extension("dsn"):
        if envelope.ret:
            options.append(f"RET={envelope.ret}")
        if envelope.envid:
            options.append(f"ENVID={xtext_encode(envelope.envid)}")
    return options


def rcpt_options(rcpt: Recipient, dsn: bool) -> list[str]:
    """RCPT TO parameters passed onward when the next hop speaks DSN: NOTIFY and ORCPT."""
    if not dsn:
        return []
    options = []
    if rcpt.notify:
        options.append("NOTIFY=" + ",".join(rcpt.notify))
    if rcpt.orcpt:
        addr_type, _, address = rcpt.orcpt.partition(";")
        if address.isascii():
            options.append(f"ORCPT={addr_type};{xtext_encode(address)}")
    return options


def needs_smtputf8(envelope: Envelope, data: bytes) -> bool:
    """True when an address or the header section is not ASCII (RFC 6531's test)."""
    addresses = [envelope.sender, *(r.address for r in envelope.recipients)]
    if not all(a.isascii() for a in addresses):
        return True
    end = data.find(b"\r\n\r\n")
    return not data[: end if end >= 0 else len(data)].isascii()


def has_8bit(data: bytes) -> bool:
    return not data.isascii()


def _why(exc: BaseException) -> str:
    """A one-line reason for a log or a DSN, never including credentials."""
    if isinstance(exc, aiosmtplib.SMTPResponseException):
        return f"{exc.code} {' '.join(exc.message.split())}"
    text = " ".join(str(exc).split())
    return text or type(exc).__name__
