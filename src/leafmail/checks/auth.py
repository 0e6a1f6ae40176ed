"""Authentication-Results (RFC 8601): one field with the SPF and DKIM results.

SPF ran at MAIL (`spf`) and left its result in `CheckContext.auth_results`; at end of
data `auth_results_check` verifies the DKIM signatures (`dkim`) and writes every
result into one field, prepended to the message::

    Authentication-Results: mx.example;
    \tspf=pass smtp.mailfrom=a@example.org;
    \tdkim=pass header.d=example.org header.s=sel

Incoming Authentication-Results fields that carry our authserv-id were not written
by us (we are the first hop that could have): they are forgeries meant to fool
whoever reads the message later, and are removed (RFC 8601 5). Fields of other
authserv-ids are left alone.

Trusted clients (relay_networks, authenticated) are neither checked nor stripped:
RFC 8601 5 lets a field from "another trusted MTA" stand (a content filter
re-injecting mail, say), and local programs must work without DNS.
"""

from __future__ import annotations

import asyncio

import dns.resolver

from netserver.admit.access import AccessPolicy

from . import ACCEPT, AsyncCheck, CheckContext, Defer, Tag, Verdict, ascii_line, is_trusted
from .dkim import dkim_refusal, verify_dkim
from .headers import parse_header, without_comments
from .jobs import OVER_BUDGET, JobRunner
from .lookup import within

FIELD = "Authentication-Results"


def authserv_id_of(value: str) -> str:
    """The authserv-id of an Authentication-Results value, lower case ("" if none)."""
    words = without_comments(value).split(";", 1)[0].split()
    return words[0].strip('"').lower().rstrip(".") if words else ""


def forged_results(data: bytes, authserv_id: str) -> tuple[bytes, ...]:
    """The raw Authentication-Results fields of `data` that claim to be ours."""
    ours = authserv_id.lower().rstrip(".")
    fields = parse_header(data).named(FIELD)
    return tuple(f.raw for f in fields if authserv_id_of(f.value) == ours)


def results_field(authserv_id: str, results: list[str]) -> bytes:
    """The Authentication-Results field, one result per line."""
    body = ";\r\n\t".join(ascii_line(r, 900) for r in results) if results else "none"
    return f"{FIELD}: {ascii_line(authserv_id)};\r\n\t{body}\r\n".encode("ascii")


def auth_results_check(
    authserv_id: str,
    dkim_mode: str,
    resolver: dns.resolver.Resolver,
    timeout: float,
    relay_networks: AccessPolicy,
    pool: JobRunner | None = None,
    dns: dict[str, object] | None = None,
) -> AsyncCheck:
    """The end-of-data check: verify DKIM, add our field, drop forged ones.

    With a `pool` (and `dns`, its resolver settings as plain data) the DKIM work and
    the header parsing run there, within its budget; past it the result is
    dkim=temperror and nothing is dropped.
    """

    async def in_thread(session: CheckContext) -> tuple[list[str], tuple[bytes, ...]]:
        results = ["dkim=none"]
        if dkim_mode != "off":
            work = asyncio.to_thread(verify_dkim, session.data, resolver, timeout)
            results = await within(timeout + 1.0, work, ["dkim=temperror"])
        return results, forged_results(session.data, authserv_id)

    async def in_pool(
        pool: JobRunner, session: CheckContext
    ) -> tuple[list[str], tuple[bytes, ...]] | None:
        args = {"authserv_id": authserv_id, "verify": dkim_mode != "off", "dns": dns}
        answer = await pool.run("dkim", args, session.data)
        if answer is None:
            return None
        forged = tuple(str(f).encode("latin-1") for f in answer["forged"])
        return [str(r) for r in answer["results"]], forged

    async def check(session: CheckContext) -> Verdict:
        if is_trusted(session, relay_networks):
            return ACCEPT
        results = list(session.auth_results)
        if pool is None:
            dkim_results, forged = await in_thread(session)
        else:
            found = await in_pool(pool, session)
            if found is None and dkim_mode == "reject":
                return Defer(OVER_BUDGET)  # over budget: try again later
            dkim_results, forged = found or (["dkim=temperror"], ())
        if dkim_mode != "off":
            refusal = dkim_refusal(dkim_mode, dkim_results)
            if refusal is not None:
                return refusal
            results.extend(dkim_results)
        return Tag((results_field(authserv_id, results),), forged)

    return check
