"""MTA-STS (RFC 8461): a domain's published promise that its MX hosts speak verified TLS.

Discovery is a TXT record at ``_mta-sts.<domain>`` (``v=STSv1; id=...``); the policy
itself is a small text file fetched over HTTPS with a verified certificate from
``https://mta-sts.<domain>/.well-known/mta-sts.txt``. The HTTPS leg is the trust anchor
(DNS alone is not authenticated), so it is strict: the certificate must verify for the
policy host, redirects are not followed, the media type must be text/plain, and size
and time are bounded so a hostile policy host cannot hold or flood a worker.

Policies are cached in memory per domain for their max_age, keyed by the id in the TXT
record: an unchanged id costs one DNS query and no fetch, a new id refetches. When a
fetch fails, a cached policy stays in force (RFC 8461 5.1), which is what stops an
attacker who can block the fetch from downgrading an enforced domain to plaintext; with
nothing cached the sender goes on as if there were no policy (RFC 8461 5). A failed
fetch is not repeated for the same id for FETCH_RETRY seconds, so a queue full of mail
to one domain with a broken policy host does not pay the fetch timeout per message.

The policy host's name is resolved with leafmail's own resolver (injected as
`resolve`), never the system's, so tests and operators see one view of DNS.
"""

from __future__ import annotations

import asyncio
import re
import ssl
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from enum import StrEnum
from typing import TypeVar

import dns.asyncresolver
import dns.exception
import dns.rdtypes.ANY.TXT

from netserver.connlog import ServerLog

MAX_POLICY_BYTES = 64 * 1024  # RFC 8461 3.3 suggests 64 KiB
MAX_HEADER_BYTES = 16 * 1024
FETCH_TIMEOUT = 20.0  # seconds for the whole fetch, connection included
MAX_AGE_LIMIT = 31557600  # RFC 8461 3.2: at most about one year
MAX_POLICY_ADDRESSES = 4  # addresses of mta-sts.<domain> tried before giving up
FETCH_RETRY = 300.0  # seconds before a failed fetch for the same policy id is tried again
MAX_CACHED = 10000  # domains whose policy is kept in memory
WELL_KNOWN = "/.well-known/mta-sts.txt"

_ID = re.compile(r"[A-Za-z0-9]{1,32}")
_STATUS_LINE = re.compile(rb"HTTP/1\.[01] (\d{3})(?: [^\r\n]*)?")

Resolve = Callable[[str], Awaitable[list[str]]]
_K = TypeVar("_K")
_V = TypeVar("_V")


class StsMode(StrEnum):
    ENFORCE = "enforce"
    TESTING = "testing"
    NONE = "none"


class PolicyError(Exception):
    """The policy could not be fetched or is not a valid policy; the reason says which."""


@dataclass(frozen=True)
class StsPolicy:
    """A parsed policy file, tagged with the TXT id it was fetched for."""

    id: str
    mode: StsMode
    mx: tuple[str, ...]
    max_age: int

    def allows(self, host: str) -> bool:
        """True when the MX host name matches one of the policy's mx patterns."""
        return any(mx_matches(pattern, host) for pattern in self.mx)


def mx_matches(pattern: str, host: str) -> bool:
    """RFC 8461 4.1: an exact name, or "*." that stands for exactly one leftmost label."""
    pattern = pattern.lower().rstrip(".")
    host = host.lower().rstrip(".")
    if pattern.startswith("*."):
        label, dot, rest = host.partition(".")
        return bool(label) and bool(dot) and rest == pattern[2:]
    return bool(pattern) and host == pattern


def parse_txt(records: Iterable[str]) -> str | None:
    """The policy id from the ``_mta-sts`` TXT strings, or None when there is no usable one.

    Records that do not start with ``v=STSv1`` belong to something else and are skipped;
    more than one STS record is an error and counts as none (RFC 8461 3.1).
    """
    found = [r for r in records if re.match(r"v=STSv1\s*(;|$)", r)]
    if len(found) != 1:
        return None
    fields: dict[str, str] = {}
    for part in found[0].split(";"):
        key, eq, value = part.strip().partition("=")
        if eq:
            fields.setdefault(key.strip(), value.strip())
    policy_id = fields.get("id", "")
    return policy_id if _ID.fullmatch(policy_id) else None


def parse_policy(text: str, policy_id: str) -> StsPolicy:
    """A StsPolicy from the policy file's text (RFC 8461 3.2), or PolicyError naming the fault.

    Keys are "key: value" lines ending in CRLF or LF; unknown keys are ignored so a
    future version of the format can add some; mx may repeat.
    """
    values: dict[str, str] = {}
    patterns: list[str] = []
    for line in text.splitlines():
        key, colon, value = line.partition(":")
        if not colon:
            continue
        key, value = key.strip(), value.strip()
        if key == "mx":
            patterns.append(value)
        else:
            values.setdefault(key, value)
    if values.get("version") != "STSv1":
        raise PolicyError("policy version is not STSv1")
    try:
        mode = StsMode(values.get("mode", ""))
    except ValueError:
        raise PolicyError(f"policy mode {values.get('mode', '')!r} is not valid") from None
    age = values.get("max_age", "")
    if not age.isdigit() or len(age) > 10:
        raise PolicyError(f"policy max_age {age!r} is not a number of seconds")
    if mode is not StsMode.NONE and not patterns:
        raise PolicyError(f"a {mode} policy without mx patterns")
    return StsPolicy(policy_id, mode, tuple(patterns), min(int(age), MAX_AGE_LIMIT))


def verified_context(ca_file: str) -> ssl.SSLContext:
    """A client context that checks the chain and the host name (ca_file or system CAs)."""
    try:
        context = ssl.create_default_context(cafile=ca_file or None)
    except (OSError, ssl.SSLError) as exc:
        raise ValueError(f"mx.ca_file {ca_file}: {exc}") from None
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


@dataclass
class _Cached:
    policy: StsPolicy
    expires: float


class PolicyCache:
    """Finds the MTA-STS policy of a domain: TXT, cache, then HTTPS fetch."""

    def __init__(
        self,
        resolver: dns.asyncresolver.Resolver,
        resolve: Resolve,
        *,
        https_port: int,
        context: ssl.SSLContext,
        timeout: float = FETCH_TIMEOUT,
        clock: Callable[[], float] = time.monotonic,
        log: ServerLog | None = None,
    ) -> None:
        self.resolver = resolver
        self.resolve = resolve
        self.https_port = https_port
        self.context = context
        self.timeout = timeout
        self.clock = clock
        self.log = log
        self.fetches = 0  # HTTPS fetches started; tests read it
        self._cache: dict[str, _Cached] = {}
        self._failed: dict[tuple[str, str], float] = {}  # (domain, id) -> when to try again

    async def policy(self, domain: str) -> StsPolicy | None:
        """The policy in force for `domain`, or None to deliver as without one.

        A mode "none" policy is returned as it is (the caller treats it as none); it
        is still cached, because it is how a domain withdraws an enforce policy.
        """
        cached = self._valid(domain)
        policy_id = await self._txt_id(domain)
        if policy_id is None or (cached is not None and cached.id == policy_id):
            return cached  # no record: a cached policy still holds (RFC 8461 5.1)
        if self._failed.get((domain, policy_id), 0.0) > self.clock():
            return cached  # failed a moment ago: do not refetch for every message
        try:
            policy = await self._fetch(domain, policy_id)
        except PolicyError as exc:
            self._note(domain, f"MTA-STS policy fetch failed: {exc}", cached)
            self._remember(self._failed, (domain, policy_id), self.clock() + FETCH_RETRY)
            return cached
        self._failed.pop((domain, policy_id), None)
        self._remember(self._cache, domain, _Cached(policy, self.clock() + policy.max_age))
        return policy

    @staticmethod
    def _remember(table: dict[_K, _V], key: _K, value: _V) -> None:
        """Store, first dropping the oldest entries so the table stays under MAX_CACHED.

        Dicts keep insertion order, and re-storing a key moves it to the end, so the
        first keys are the least recently stored.
        """
        table.pop(key, None)
        while len(table) >= MAX_CACHED:
            del table[next(iter(table))]
        table[key] = value

    def _valid(self, domain: str) -> StsPolicy | None:
        entry = self._cache.get(domain)
        if entry is None:
            return None
        if entry.expires <= self.clock():
            del self._cache[domain]
            return None
        return entry.policy

    def _note(self, domain: str, text: str, cached: StsPolicy | None) -> None:
        if self.log is not None:
            kept = f"cached {cached.mode} policy {cached.id}" if cached else "no policy"
            self.log.info(text, domain=domain, using=kept)

    async def _txt_id(self, domain: str) -> str | None:
        """The id in ``_mta-sts.<domain>``; None when absent, invalid or not answered."""
        try:
            answer = await self.resolver.resolve(f"_mta-sts.{domain}.", "TXT")
        except dns.exception.DNSException:
            return None
        strings = []
        for rdata in answer:
            if isinstance(rdata, dns.rdtypes.ANY.TXT.TXT):
                strings.append(b"".join(rdata.strings).decode("ascii", "replace"))
        return parse_txt(strings)

    async def _fetch(self, domain: str, policy_id: str) -> StsPolicy:
        """Fetch and parse the policy file, bounded by `timeout` as a whole."""
        self.fetches += 1
        host = f"mta-sts.{domain}"
        try:
            async with asyncio.timeout(self.timeout):
                text = await self._fetch_text(host)
        except TimeoutError:
            raise PolicyError(f"{host} did not answer within {self.timeout:g}s") from None
        return parse_policy(text, policy_id)

    async def _fetch_text(self, host: str) -> str:
        try:
            addresses = await self.resolve(host)
        except dns.exception.DNSException as exc:
            raise PolicyError(f"{host}: {exc}") from None
        if not addresses:
            raise PolicyError(f"{host} has no address")
        reason = ""
        for address in addresses[:MAX_POLICY_ADDRESSES]:
            try:
                return await https_get(address, self.https_port, host, self.context)
            except (OSError, ssl.SSLError) as exc:  # try the next address
                reason = f"{host}[{address}]: {' '.join(str(exc).split()) or type(exc).__name__}"
        raise PolicyError(reason)


async def https_get(address: str, port: int, host: str, context: ssl.SSLContext) -> str:
    """GET the well-known policy from `address`, verifying the certificate for `host`.

    HTTP/1.0 keeps the reply simple: no chunked encoding and the end of the body is the
    end of the connection. Only "200" with text/plain is a policy; a redirect is an
    error, never followed (RFC 8461 3.3).
    """
    reader, writer = await asyncio.open_connection(
        address, port, ssl=context, server_hostname=host, limit=MAX_HEADER_BYTES
    )
    try:
        authority = host if port == 443 else f"{host}:{port}"
        request = (
            f"GET {WELL_KNOWN} HTTP/1.0\r\nHost: {authority}\r\n"
            "User-Agent: leafmail\r\nAccept: text/plain\r\nConnection: close\r\n\r\n"
        )
        writer.write(request.encode("ascii"))
        await writer.drain()
        head = await _read_head(reader, host)
        length = _check_head(head, host)
        return (await _read_body(reader, length, host)).decode("utf-8", "replace")
    finally:
        # Everything needed was read (or the reply was refused): drop the connection
        # rather than wait for a TLS close_notify exchange a hostile server can stall.
        writer.transport.abort()


async def _read_head(reader: asyncio.StreamReader, host: str) -> bytes:
    try:
        return await reader.readuntil(b"\r\n\r\n")
    except asyncio.LimitOverrunError:
        raise PolicyError(f"{host}: reply headers over {MAX_HEADER_BYTES} bytes") from None
    except asyncio.IncompleteReadError:
        raise PolicyError(f"{host}: connection closed before the reply headers") from None


def _check_head(head: bytes, host: str) -> int | None:
    """The Content-Length (None if absent) of a 200 text/plain reply, else PolicyError."""
    status_line, *lines = head.decode("latin-1").split("\r\n")
    match = _STATUS_LINE.fullmatch(status_line.encode("latin-1"))
    if not match:
        raise PolicyError(f"{host}: not an HTTP reply: {status_line[:80]!r}")
    if match[1] != b"200":
        raise PolicyError(f"{host}: HTTP {match[1].decode()} (redirects are not followed)")
    headers: dict[str, str] = {}
    for line in lines:
        name, colon, value = line.partition(":")
        if colon:
            headers.setdefault(name.strip().lower(), value.strip())
    media = headers.get("content-type", "").split(";")[0].strip().lower()
    if media != "text/plain":
        raise PolicyError(f"{host}: Content-Type {media or 'missing'}, not text/plain")
    if "transfer-encoding" in headers:
        raise PolicyError(f"{host}: unexpected Transfer-Encoding in an HTTP/1.0 reply")
    length = headers.get("content-length")
    if length is None:
        return None
    if not length.isdigit():
        raise PolicyError(f"{host}: bad Content-Length {length!r}")
    return int(length)


async def _read_body(reader: asyncio.StreamReader, length: int | None, host: str) -> bytes:
    if length is not None and length > MAX_POLICY_BYTES:
        raise PolicyError(f"{host}: policy of {length} bytes is over {MAX_POLICY_BYTES}")
    try:
        if length is not None:
            return await reader.readexactly(length)
        body = await reader.read(MAX_POLICY_BYTES + 1)
        while len(body) <= MAX_POLICY_BYTES:
            more = await reader.read(MAX_POLICY_BYTES + 1 - len(body))
            if not more:
                return body
            body += more
    except asyncio.IncompleteReadError:
        raise PolicyError(f"{host}: connection closed inside the policy") from None
    raise PolicyError(f"{host}: policy is over {MAX_POLICY_BYTES} bytes")
