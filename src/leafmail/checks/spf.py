"""SPF with pyspf (RFC 7208), at MAIL: verified, and remembered for the results field.

The identity is MAIL FROM, or the HELO name for the null sender (RFC 7208 2.4). The
result goes into `CheckContext.auth_results`, which `auth.auth_results_check` writes into
the Authentication-Results field at end of data. In "reject" mode a fail is refused
at MAIL with 550 5.7.23 and a temperror deferred with 451 4.7.24 (RFC 7372), unless
a DNSWL lists the client; softfail, neutral and permerror are only reported.

pyspf is blocking and does its own DNS through its module-level `DNSLookup`, with no
per-query hook. So the check runs off the event loop, in a check pool worker process
(`leafmail.checks.pool`; in a thread when no pool is given), and `DNSLookup` is
replaced once, at import, by a function that uses the resolver of the current thread
(set around each evaluation: a synchronous dnspython resolver built from ``[dns]``) and
falls back to pyspf's own lookup for anyone else in the process. The evaluation is
bounded by the DNS timeout, by pyspf's querytime, and again around the thread or by
the pool's budget.
"""

from __future__ import annotations

import asyncio
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import dns.exception
import dns.resolver
import spf

from netserver.admit.access import AccessPolicy
from netserver.endpoint import unmap
from netserver.smtp.addresses import Mailbox
from netserver.smtp.replies import Reply

from . import ACCEPT, AsyncCheck, CheckContext, Defer, Reject, Verdict, ascii_line, is_trusted
from .jobs import JobRunner
from .lookup import within

SPF_FAIL = Reply(550, "5.7.23", "SPF validation failed")
SPF_TEMPERROR = Reply(451, "4.7.24", "SPF validation error, try again later")


class _ThisThread(threading.local):
    """The resolver of the SPF evaluation running in this thread, if any."""

    resolver: dns.resolver.Resolver | None = None


_thread = _ThisThread()
_PYSPF_LOOKUP: Callable[..., Any] = spf.DNSLookup


def _spf_lookup(name: str, qtype: str, strict: object = True, timeout: float = 30) -> list[Any]:
    """pyspf's DNSLookup, through the resolver of this thread's check (if any)."""
    resolver = _thread.resolver
    if resolver is None:
        return list(_PYSPF_LOOKUP(name, qtype, strict, timeout))
    try:
        answer = resolver.resolve(
            name, qtype, search=False, lifetime=min(timeout, resolver.lifetime)
        )
    except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
        return []
    except dns.exception.DNSException as exc:
        raise spf.TempError(f"DNS {exc}") from None
    return [((name, qtype), _spf_value(qtype, rdata)) for rdata in answer]


def _spf_value(qtype: str, rdata: Any) -> Any:
    """A record in the shape pyspf's own dnspython lookup gives it."""
    if qtype in ("A", "AAAA"):
        return rdata.address
    if qtype == "MX":
        return (rdata.preference, rdata.exchange)
    if qtype == "PTR":
        return rdata.target.to_text(True)
    return rdata.strings  # TXT, SPF


spf.DNSLookup = _spf_lookup


@dataclass(frozen=True)
class SpfResult:
    """One SPF evaluation: the result word and the identity it was about."""

    result: str  # pass, fail, softfail, neutral, none, temperror, permerror
    ptype: str  # "smtp.mailfrom" or "smtp.helo"
    identity: str

    @property
    def resinfo(self) -> str:
        return f"spf={self.result} {self.ptype}={self.identity}"


def evaluate_spf(
    resolver: dns.resolver.Resolver, session: CheckContext, timeout: float
) -> SpfResult | None:
    """Run pyspf for this client and sender (blocking: never on the event loop)."""
    sender, helo, ip = session.sender, session.helo or "", session.client_ip
    if ip is None or (sender is None and not helo):
        return None
    ptype, identity = ("smtp.mailfrom", pvalue(sender)) if sender else ("smtp.helo", hvalue(helo))
    _thread.resolver = resolver
    try:
        query = spf.query(
            i=str(unmap(ip)), s=str(sender) if sender else "", h=helo, querytime=timeout
        )
        result: str = query.check()[0]
    except Exception:  # a pyspf bug (DNS trouble is its TempError, caught inside)
        result = "permerror"
    finally:
        _thread.resolver = None
    return SpfResult(result, ptype, ascii_line(identity))


def spf_check(
    mode: str,
    resolver: dns.resolver.Resolver,
    timeout: float,
    relay_networks: AccessPolicy,
    pool: JobRunner | None = None,
    dns_settings: dict[str, object] | None = None,
) -> AsyncCheck:
    """The MAIL-stage SPF check: remembers the result; refuses a fail in "reject" mode.

    With a `pool` the evaluation runs there (`dns_settings` is the resolver's [dns]
    as plain data); past its budget the result is a temperror.
    """

    async def in_pool(pool: JobRunner, session: CheckContext) -> SpfResult | None:
        ip, sender = session.client_ip, session.sender
        args = {
            "ip": str(ip) if ip is not None else None,
            "helo": session.helo,
            "sender": [sender.local, sender.domain] if sender else None,
            "dns": dns_settings,
        }
        answer = await pool.run("spf", args, b"")
        if answer is None:
            return _timed_out(session)
        found = answer["spf"]
        return SpfResult(str(found[0]), str(found[1]), str(found[2])) if found else None

    async def check(session: CheckContext) -> Verdict:
        if is_trusted(session, relay_networks):
            return ACCEPT
        if pool is not None:
            found = await in_pool(pool, session)
        else:
            work = asyncio.to_thread(evaluate_spf, resolver, session, timeout)
            found = await within(timeout + 1.0, work, _timed_out(session))
        if found is None:
            return ACCEPT
        session.auth_results = [*session.auth_results, found.resinfo]
        if mode != "reject" or session.dnswl is not None:
            return ACCEPT
        if found.result == "fail":
            return Reject(SPF_FAIL)
        if found.result == "temperror":
            return Defer(SPF_TEMPERROR)
        return ACCEPT

    return check


def _timed_out(session: CheckContext) -> SpfResult | None:
    if session.sender is not None:
        return SpfResult("temperror", "smtp.mailfrom", ascii_line(pvalue(session.sender)))
    return SpfResult("temperror", "smtp.helo", hvalue(session.helo)) if session.helo else None


def pvalue(mailbox: Mailbox | None) -> str:
    """The address as an RFC 8601 pvalue: local@domain, or @domain if the local part
    would need more than a plain dot-atom (quoting, UTF-8)."""
    if mailbox is None:
        return ""
    domain = mailbox.domain
    if not domain.isascii():
        try:
            domain = domain.encode("idna").decode("ascii")
        except UnicodeError:
            domain = ascii_line(domain)
    if re.fullmatch(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~.-]+", mailbox.local):
        return f"{mailbox.local}@{domain}"
    return f"@{domain}"


def hvalue(helo: str) -> str:
    """The HELO name as an RFC 8601 value: as is if it is a name or an address
    literal, else a quoted-string (a lying client may send anything)."""
    if re.fullmatch(r"[A-Za-z0-9.:\[\]-]+", helo):
        return helo
    text = ascii_line(helo, 100).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{text}"'
