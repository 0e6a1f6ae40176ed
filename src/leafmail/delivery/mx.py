"""Direct delivery to each recipient domain's MX hosts (RFC 5321 5.1, RFC 7505, RFC 8461).

For each domain of a message (all at once): look up MX, order it by preference with
equal preferences shuffled (spreading load as RFC 5321 5.1 asks), and try the hosts in
order, each address of each host, until one takes the transaction. A connection that
fails, a 4xx/5xx greeting or a failed TLS handshake moves on to the next address; the
first server that answers MAIL decides every recipient of that domain, as a smarthost
would (5xx RCPT fails, 4xx defers), and no other MX is tried after it.

DNS answers map to results: a null MX (RFC 7505) fails 5.1.10 with no connection, a
domain that does not exist fails 5.1.2, no MX means the domain's own address (the
implicit MX), and a lookup that was not answered defers 4.4.3. All MX hosts unreachable
is a deferral of that domain's recipients (4.4.1), never `LinkDown`: other domains of
the same queue run may be fine, so there is no single link to rest.

TLS is opportunistic (RFC 7435: STARTTLS when offered, certificate not checked, and a
failed handshake is retried in plaintext only after every host was tried with TLS),
unless the domain publishes an MTA-STS policy in enforce mode: then only hosts matching
the policy are used, STARTTLS is required and the certificate must verify for the MX
name, and when no host qualifies the mail waits (4.7.5), never falling back to
plaintext. Exchange names are always resolved through DNS, so an MX that names an IP
address (which RFC 5321 forbids) is just a name that does not resolve.
"""

from __future__ import annotations

import asyncio
import random
import ssl
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from enum import StrEnum

import dns.asyncresolver
import dns.exception
import dns.name
import dns.rdtypes.ANY.MX
import dns.resolver

from netserver.connlog import ServerLog

from ..config import DeliveryConfig, DnsConfig, MxConfig
from ..dns import make_resolver
from ..envelope import Envelope
from . import Expansions, Result, all_results, domain_of, each_settled
from .mta_sts import PolicyCache, StsMode, StsPolicy, verified_context
from .session import defer_tls_refusals, greet, quit_and_drop, transaction, why
from .wire import ClientLink, WireError, open_connection

MAX_MX_HOSTS = 10  # MX hosts considered per domain (the rest are never resolved)
MAX_ADDRESSES = 4  # addresses tried per MX host
MAX_CONNECTIONS = 10  # connection attempts per domain and message
DOMAIN_CONCURRENCY = 8  # domains of one message delivered at the same time
QUIT_TIMEOUT = 5.0


class TlsLevel(StrEnum):
    """How one connection attempt treats STARTTLS."""

    MAY = "may"  # opportunistic: when offered, certificate not checked
    VERIFY = "verify"  # MTA-STS enforce: required, verified for the MX name
    TEST = "test"  # MTA-STS testing: verified, a failure reported, then as MAY
    NONE = "none"  # plaintext: the last resort after an opportunistic TLS failure


@dataclass(frozen=True)
class MxHost:
    """One exchange (A-label form, lower case, no final dot) and its preference."""

    name: str
    preference: int
    implicit: bool = False  # the domain itself, standing in when it has no MX


@dataclass(frozen=True)
class MxTarget:
    """One connection attempt: a host of `domain`, one of its addresses, the TLS level."""

    domain: str
    host: MxHost
    address: str
    tls: TlsLevel

    @property
    def where(self) -> str:
        return f"{self.host.name}[{self.address}]"


class Unusable(Exception):
    """This address cannot take the mail now (nothing was sent); try the next one."""

    def __init__(self, reason: str, *, tls: bool = False) -> None:
        super().__init__(reason)
        self.tls = tls  # the failure was STARTTLS itself, not the connection


def order_hosts(records: Iterable[tuple[int, str]], rng: random.Random) -> list[MxHost]:
    """(preference, name) records in the order to try: by preference, equals shuffled.

    Names are deduplicated at their best preference and sorted before shuffling, so a
    seeded `rng` gives the same order whatever order the DNS answer had. At most
    MAX_MX_HOSTS are kept. The answer is the domain owner's: over TCP it holds some
    3,500 records, so the names are grouped in one pass (a scan of all names for each
    preference cost 0.9 s of the delivery loop for such an answer).
    """
    best: dict[str, int] = {}
    for preference, name in records:
        key = name.lower().rstrip(".")
        best[key] = min(preference, best.get(key, preference))
    groups: dict[int, list[str]] = {}
    for name, preference in best.items():
        groups.setdefault(preference, []).append(name)
    ordered: list[MxHost] = []
    for preference in sorted(groups):
        group = sorted(groups[preference])
        rng.shuffle(group)
        ordered.extend(MxHost(name, preference) for name in group)
    return ordered[:MAX_MX_HOSTS]


def before_self(hosts: list[MxHost], own_name: str) -> list[MxHost]:
    """Only the hosts more preferred than us, when we are one of the MX hosts.

    RFC 5321 5.1: a host that finds itself in the list must only try better ones,
    or two backup MX hosts would pass the mail back and forth.
    """
    own = own_name.lower().rstrip(".")
    mine = [h.preference for h in hosts if h.name == own]
    return [h for h in hosts if h.preference < min(mine)] if mine else hosts


def dns_name(domain: str) -> dns.name.Name | None:
    """The domain as an absolute DNS name (IDNA for Unicode), or None if it is not one.

    Address literals ("[192.0.2.1]") are not routed by MX: they would let any client
    that may relay aim this server at an arbitrary address.
    """
    if not domain or domain.startswith("["):
        return None
    try:
        return dns.name.from_text(domain)
    except (dns.exception.DNSException, UnicodeError, ValueError):
        return None


async def find_hosts(
    resolver: dns.asyncresolver.Resolver, name: dns.name.Name, rng: random.Random
) -> list[MxHost] | Result:
    """The MX hosts of `name` in the order to try, or the final result for the domain."""
    domain = name.to_text(omit_final_dot=True)
    try:
        answer = await resolver.resolve(name, "MX")
    except dns.resolver.NXDOMAIN:
        return Result.failed("5.1.2", f"domain {domain} does not exist")
    except dns.resolver.NoAnswer:  # no MX: the domain is its own mail host (RFC 5321 5.1)
        return [MxHost(domain.lower(), 0, implicit=True)]
    except dns.exception.DNSException as exc:
        return Result.deferred("4.4.3", f"MX lookup for {domain} failed: {exc}")
    records = [r for r in answer if isinstance(r, dns.rdtypes.ANY.MX.MX)]
    usable = [
        (r.preference, r.exchange.to_text(omit_final_dot=True))
        for r in records
        if r.exchange != dns.name.root
    ]
    if records and not usable:  # RFC 7505: "MX 0 ." says the domain takes no mail
        return Result.failed("5.1.10", f"{domain} does not accept mail (null MX)")
    return order_hosts(usable, rng)


async def host_addresses(resolver: dns.asyncresolver.Resolver, name: str) -> list[str]:
    """IPv4 then IPv6 addresses of `name`; [] if it has none; DNSException if not answered.

    IPv4 goes first because a server with an IPv6 address but no IPv6 route is more
    common than the reverse. One type answered is enough.
    """
    answers = await asyncio.gather(
        _addresses_of(resolver, name, "A"),
        _addresses_of(resolver, name, "AAAA"),
        return_exceptions=True,
    )
    found = [address for answer in answers if isinstance(answer, list) for address in answer]
    for answer in answers:
        if isinstance(answer, BaseException) and not found:
            raise answer
    return found


async def _addresses_of(resolver: dns.asyncresolver.Resolver, name: str, rdtype: str) -> list[str]:
    try:
        answer = await resolver.resolve(dns.name.from_text(name), rdtype)
    except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
        return []
    return [rdata.to_text() for rdata in answer]


@dataclass
class _Attempt:
    """What one domain's delivery has done so far (results survive a deadline)."""

    domain: str
    envelope: Envelope
    data: bytes
    rcpts: Sequence[int]
    results: dict[int, Result] = field(default_factory=dict)
    began: bool = False  # a server greeted us and the transaction started
    connections: int = 0
    reasons: list[str] = field(default_factory=list)
    dns_trouble: bool = False
    policy_refused: bool = False  # an MTA-STS enforce requirement was not met
    fallback: list[MxTarget] = field(default_factory=list)

    def leftover(self) -> Result:
        """The result of recipients that have none: why no host took them (first reasons).

        After a transaction every recipient has its own result and this goes unused.
        """
        reasons = "; ".join(self.reasons[:3]) or "no usable MX host"
        if self.policy_refused:
            text = f"no MX host of {self.domain} meets its MTA-STS policy: {reasons}"
            return Result.deferred("4.7.5", text)
        status = "4.4.3" if self.dns_trouble and not self.connections else "4.4.1"
        return Result.deferred(status, f"no MX host of {self.domain} could be used: {reasons}")


class MxAgent:
    """Deliver each recipient domain to its own MX hosts."""

    def __init__(
        self,
        mx: MxConfig,
        delivery: DeliveryConfig,
        *,
        dns: DnsConfig,
        helo: str,
        rng: random.Random | None = None,
        log: ServerLog | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.delivery = delivery  # its timeouts
        self.helo = helo
        self.rng = rng or random.SystemRandom()
        self.log = log if log is not None else ServerLog(program="leafmail")
        self.resolver = make_resolver(dns)
        self.port = mx.port
        self.verified = verified_context(mx.ca_file)
        self.opportunistic = _opportunistic_context()
        self.policies: PolicyCache | None = None
        if mx.mta_sts:
            self.policies = PolicyCache(
                self.resolver,
                self._addresses,
                https_port=mx.https_port,
                context=self.verified,
                clock=clock,
                log=self.log,
            )

    async def deliver(
        self,
        envelope: Envelope,
        data: bytes,
        rcpts: Sequence[int],
        expansions: Expansions | None = None,  # no aliases here: records early results
    ) -> dict[int, Result]:
        groups: dict[str, list[int]] = {}
        for index in rcpts:
            domain = domain_of(envelope.recipients[index].address) or self.helo
            groups.setdefault(domain.lower().rstrip("."), []).append(index)
        slots = asyncio.Semaphore(DOMAIN_CONCURRENCY)  # per call: no loop binding to outlive
        parts = [
            self._domain(_Attempt(domain, envelope, data, idx), slots)
            for domain, idx in groups.items()
        ]
        return await each_settled(parts, expansions)

    async def close(self) -> None:
        """Nothing to close: every connection is closed when its transaction ends."""

    async def _addresses(self, name: str) -> list[str]:
        return await host_addresses(self.resolver, name)

    # -- one domain ---------------------------------------------------------------------
    async def _domain(self, attempt: _Attempt, slots: asyncio.Semaphore) -> dict[int, Result]:
        """Every recipient's result for one domain, all within the delivery deadline."""
        deadline = self.delivery.deadline
        async with slots:
            try:
                async with asyncio.timeout(deadline):
                    final = await self._route(attempt)
            except TimeoutError:
                what = "did not finish" if attempt.began else "found no usable MX host"
                status = "4.4.2" if attempt.began else "4.4.1"
                final = Result.deferred(status, f"{attempt.domain} {what} within {deadline:g}s")
        return {**all_results(attempt.rcpts, final), **attempt.results}

    async def _route(self, attempt: _Attempt) -> Result:
        """Find the hosts, apply the policy and try them; the result for recipients left over."""
        name = dns_name(attempt.domain)
        if name is None:
            return Result.failed("5.1.2", f"{attempt.domain!r} is not a domain MX can route")
        found = await find_hosts(self.resolver, name, self.rng)
        if isinstance(found, Result):
            return found
        hosts = before_self(found, self.helo)
        if not hosts:
            return Result.failed("5.4.6", f"mail for {attempt.domain} loops back to myself")
        policy = await self._policy(attempt.domain)
        plan = self._plan(attempt, hosts, policy)
        if not plan:
            return attempt.leftover()
        return await self._try_plan(attempt, plan)

    async def _policy(self, domain: str) -> StsPolicy | None:
        if self.policies is None:
            return None
        policy = await self.policies.policy(domain)
        return None if policy is None or policy.mode is StsMode.NONE else policy

    def _plan(
        self, attempt: _Attempt, hosts: list[MxHost], policy: StsPolicy | None
    ) -> list[tuple[MxHost, TlsLevel]]:
        """Which hosts to try, and how, under the domain's MTA-STS policy (if any)."""
        if policy is None:
            return [(host, TlsLevel.MAY) for host in hosts]
        for host in hosts:
            if not policy.allows(host.name):
                reason = f"{host.name} does not match the MTA-STS policy {policy.id}"
                if policy.mode is StsMode.TESTING:
                    self._sts_report(attempt.domain, host.name, reason)
                else:
                    attempt.reasons.append(reason)
                    attempt.policy_refused = True
        if policy.mode is StsMode.TESTING:
            return [(host, TlsLevel.TEST) for host in hosts]
        return [(host, TlsLevel.VERIFY) for host in hosts if policy.allows(host.name)]

    async def _try_plan(self, attempt: _Attempt, plan: list[tuple[MxHost, TlsLevel]]) -> Result:
        """Each host's addresses in order, then the plaintext fallbacks; stop at a taker."""
        for host, level in plan:
            if attempt.connections >= MAX_CONNECTIONS:
                break  # the budget is spent: do not even resolve the rest
            addresses = await self._resolve(attempt, host)
            if addresses is None:
                return Result.failed("5.1.2", f"{host.name} has no MX and no address records")
            for address in addresses[:MAX_ADDRESSES]:
                if await self._try(attempt, MxTarget(attempt.domain, host, address, level)):
                    return attempt.leftover()
        for target in attempt.fallback:
            if await self._try(attempt, target):
                return attempt.leftover()
        return attempt.leftover()

    async def _resolve(self, attempt: _Attempt, host: MxHost) -> list[str] | None:
        """The host's addresses ([] when unusable); None for an implicit MX with none."""
        try:
            addresses = await host_addresses(self.resolver, host.name)
        except dns.exception.DNSException as exc:
            attempt.dns_trouble = True
            attempt.reasons.append(f"{host.name}: address lookup failed: {exc}")
            return []
        if not addresses and host.implicit:
            return None
        if not addresses:
            attempt.reasons.append(f"{host.name} has no address")
        return addresses

    async def _try(self, attempt: _Attempt, target: MxTarget) -> bool:
        """One connection attempt; True when a server took the transaction."""
        if attempt.connections >= MAX_CONNECTIONS:
            return False
        attempt.connections += 1
        try:
            link = await self._open(target)
        except Unusable as exc:
            return await self._unusable(attempt, target, exc)
        await self._send(attempt, link, target)
        return True

    async def _unusable(self, attempt: _Attempt, target: MxTarget, exc: Unusable) -> bool:
        """Record why, and queue what a TLS failure still allows (never under enforce)."""
        attempt.reasons.append(f"{target.where}: {exc}")
        self.log.info("mx host unusable", domain=target.domain, host=target.where, reason=str(exc))
        if exc.tls and target.tls is TlsLevel.VERIFY:
            attempt.policy_refused = True
        elif exc.tls and target.tls is TlsLevel.MAY:
            attempt.fallback.append(replace(target, tls=TlsLevel.NONE))
        elif exc.tls and target.tls is TlsLevel.TEST:
            self._sts_report(target.domain, target.where, str(exc))
            return await self._try(attempt, replace(target, tls=TlsLevel.MAY))
        return False

    # -- one connection -----------------------------------------------------------------
    async def _open(self, target: MxTarget) -> ClientLink:
        """Connect, greet and secure within connect_timeout, or Unusable."""
        timeout = self.delivery.connect_timeout
        link: ClientLink | None = None
        ready = False
        try:
            async with asyncio.timeout(timeout):
                link = await open_connection(
                    target.address, self.port, timeout=self.delivery.command_timeout
                )
                await greet(link, self.helo)
                await self._secure(link, target)
            ready = True
            return link
        except TimeoutError:
            raise Unusable(f"no answer within {timeout:g}s") from None
        except (WireError, OSError) as exc:
            raise Unusable(why(exc)) from None
        finally:
            if not ready and link is not None:
                link.abort()

    async def _secure(self, link: ClientLink, target: MxTarget) -> None:
        """STARTTLS as the target's level says; Unusable(tls=True) when it fails."""
        level = target.tls
        if level is TlsLevel.NONE:
            return
        if not link.supports("starttls"):
            if level is TlsLevel.VERIFY:
                raise Unusable("no STARTTLS, which the MTA-STS policy requires", tls=True)
            if level is TlsLevel.TEST:
                self._sts_report(target.domain, target.where, "no STARTTLS")
            return
        verify = level in (TlsLevel.VERIFY, TlsLevel.TEST)
        context = self.verified if verify else self.opportunistic
        try:  # with TLS 1.3 a refused handshake only shows at the first reply: EHLO's
            await link.starttls(context, target.host.name)
            await greet(link, self.helo)
        except (WireError, OSError) as exc:  # ssl.SSLError is an OSError
            raise Unusable(f"STARTTLS failed: {why(exc)}", tls=True) from None

    async def _send(self, attempt: _Attempt, link: ClientLink, target: MxTarget) -> None:
        """The transaction; recipients left without a result when it breaks defer 4.4.2."""
        remote = f"{target.host.name}:{self.port}"
        attempt.began = True
        try:
            await transaction(
                link,
                attempt.envelope,
                attempt.data,
                attempt.rcpts,
                attempt.results,
                remote,
                hostname=self.helo,
            )
            await quit_and_drop(link, QUIT_TIMEOUT)
        except (WireError, OSError) as exc:
            lost = Result.deferred("4.4.2", f"connection to {remote} lost: {why(exc)}", remote)
            for index in attempt.rcpts:
                attempt.results.setdefault(index, lost)
        finally:
            link.abort()
            if target.tls is TlsLevel.NONE:  # the last resort after a failed handshake
                failed = [r for r in attempt.reasons if r.startswith(target.where)]
                defer_tls_refusals(attempt.rcpts, attempt.results, ", ".join(failed))

    def _sts_report(self, domain: str, host: str, reason: str) -> None:
        """MTA-STS testing mode: what enforce would have refused, for the operator."""
        self.log.info(
            "MTA-STS testing: enforce would have refused", domain=domain, host=host, reason=reason
        )


def _opportunistic_context() -> ssl.SSLContext:
    """TLS without certificate checks (RFC 7435): protects against passive listening only.

    Nobody configured what an arbitrary MX's certificate should be, and refusing
    unverifiable TLS would push the mail to plaintext, which is worse.
    """
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context
