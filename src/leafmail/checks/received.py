"""Received-chain taint: signs that a client lies about where its mail comes from.

The 1998 plan called them "indications of spam tainting in the Received: line". Each
is cheap to see and rarely wrong:

* a HELO that claims to be this host or one of our domains, from a client that is
  not one of ours (only a forger names us to us);
* an address-literal HELO, ``[192.0.2.1]``, that is not the client's address;
* a topmost Received field that claims to be by this host: a message arriving from
  elsewhere always carries the sending host's Received on top, so a "by us" on top
  was written by the client to make the mail look internal. (Mail that went out
  through us and comes back legitimately has the foreign hop's Received above ours.)
* many hops: more than `HOP_TAG_THRESHOLD` Received fields is tagged, never refused
  here (the loops check refuses above 100, RFC 5321 6.3);
* reverse DNS that is not forward-confirmed (the PTR name does not resolve back to
  the client's address); a temporary DNS failure never refuses.

The HELO and reverse-DNS checks run at MAIL, not at CONNECT or HELO, so that an
authenticated client is known and exempt like any trusted one (the reject is
delayed, as Postfix's smtpd_delay_reject does). The message checks run at end of data.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable

from netserver.admit.access import AccessPolicy
from netserver.dnsresolver import DnsResolver
from netserver.endpoint import IPAddress, unmap
from netserver.resolver import Resolver, confirmed_names
from netserver.smtp.replies import Reply

from . import (
    ACCEPT,
    AsyncCheck,
    Check,
    CheckContext,
    Verdict,
    ascii_line,
    header_field,
    is_trusted,
    tag_or_reject,
)
from .headers import Header, parse_header, without_comments
from .jobs import JobRunner, over_budget
from .lookup import DnsClient, within

TAG_FIELD = "X-Leafmail-Received"
HOP_TAG_THRESHOLD = 30
MAX_PTR_NAMES = 10  # forward-confirm at most this many PTR names (RFC 7208 4.6.4 style)
_BY = re.compile(r"\bby\s+([^\s;()]+)", re.IGNORECASE)


def _names(hostname: str, local_domains: Iterable[str]) -> frozenset[str]:
    return frozenset(_norm(n) for n in (hostname, *local_domains))


def _norm(name: str) -> str:
    return name.strip().lower().rstrip(".")


# --- HELO (at MAIL) ------------------------------------------------------------------


def helo_problems(helo: str | None, client_ip: IPAddress | None, ours: frozenset[str]) -> list[str]:
    """Why this HELO name is a lie about the client, as short reasons."""
    if not helo:
        return []
    if _norm(helo) in ours:
        return [f"HELO {ascii_line(helo, 100)} claims to be us"]
    literal = helo_address(helo)
    if literal is None and not helo.strip().startswith("["):
        return []  # a name, not an address
    if client_ip is None or literal != unmap(client_ip):
        return [f"HELO {ascii_line(helo, 100)} is not the client's address"]
    return []


def helo_address(helo: str) -> IPAddress | None:
    """The address of an address-literal HELO ("[192.0.2.1]", "[IPv6:...]", a bare IP)."""
    text = helo.strip()
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
        if text[:5].lower() == "ipv6:":
            text = text[5:]
    try:
        return unmap(ipaddress.ip_address(text))
    except ValueError:
        return None


def helo_check(
    mode: str, hostname: str, local_domains: Iterable[str], relay_networks: AccessPolicy
) -> Check:
    """The MAIL-stage check of the HELO name."""
    ours = _names(hostname, local_domains)

    def check(session: CheckContext) -> Verdict:
        if is_trusted(session, relay_networks):
            return ACCEPT
        found = helo_problems(session.helo, session.client_ip, ours)
        if not found:
            return ACCEPT
        return _taint(mode, found, found[0], (550, "5.7.1"))

    return check


# --- the Received chain (at end of data) ---------------------------------------------


def forged_received(header: Header, hostname: str) -> bool:
    """True when the topmost Received field claims to be by `hostname`."""
    received = header.named("received")
    if not received:
        return False
    match = _BY.search(without_comments(received[0].value).split(";", 1)[0])
    return match is not None and _norm(match.group(1)) == _norm(hostname)


def chain_problems(data: bytes, hostname: str) -> list[str]:
    """A forged topmost Received, and too many hops."""
    header = parse_header(data)
    found = []
    if forged_received(header, hostname):
        found.append(f"Received field claims to be by {ascii_line(hostname, 100)}")
    hops = len(header.named("received"))
    if hops > HOP_TAG_THRESHOLD:
        found.append(f"{hops} hops")
    return found


def chain_check(mode: str, hostname: str, relay_networks: AccessPolicy) -> Check:
    """The end-of-data check of the message's Received fields."""

    def check(session: CheckContext) -> Verdict:
        if is_trusted(session, relay_networks):
            return ACCEPT
        return _chain_verdict(mode, chain_problems(session.data, hostname))

    return check


def chain_pool_check(
    mode: str, hostname: str, relay_networks: AccessPolicy, pool: JobRunner
) -> AsyncCheck:
    """`chain_check` with the header parsed in the check pool, within its budget."""

    async def check(session: CheckContext) -> Verdict:
        if is_trusted(session, relay_networks):
            return ACCEPT
        answer = await pool.run("received", {"hostname": hostname}, session.data)
        if answer is None:
            return over_budget(mode, TAG_FIELD)
        return _chain_verdict(mode, [str(p) for p in answer["problems"]])

    return check


def _chain_verdict(mode: str, found: list[str]) -> Verdict:
    if not found:
        return ACCEPT
    forged = [f for f in found if f.startswith("Received")]
    if not forged:  # a long chain alone is only ever tagged
        return _taint("tag", found, "", (550, "5.7.1"))
    return _taint(mode, found, forged[0], (550, "5.7.1"))


# --- reverse DNS (at MAIL) -----------------------------------------------------------


async def forward_confirmed(resolver: Resolver, ip: IPAddress) -> bool | None:
    """True if a PTR name of `ip` resolves back to `ip`; None if DNS could not tell."""
    names = await confirmed_names(resolver, unmap(ip), MAX_PTR_NAMES)
    return None if names is None else bool(names)


def rdns_check(
    mode: str, resolver: DnsClient, timeout: float, relay_networks: AccessPolicy
) -> AsyncCheck:
    """The MAIL-stage reverse-DNS check; one lookup per connection, bounded by timeout."""

    lookups = DnsResolver(client=resolver)

    async def check(session: CheckContext) -> Verdict:
        ip = session.client_ip
        if ip is None or is_trusted(session, relay_networks):
            return ACCEPT
        if "rdns" not in session.cache:
            confirmed = await within(timeout, forward_confirmed(lookups, ip), None)
            session.cache["rdns"] = _rdns_verdict(mode, ip, confirmed)
        return session.cache["rdns"]

    return check


def _rdns_verdict(mode: str, ip: IPAddress, confirmed: bool | None) -> Verdict:
    if confirmed is not False:  # confirmed, or a temporary failure: never refuse for that
        return ACCEPT
    reason = f"reverse DNS of {ip} is not forward-confirmed"
    return _taint(mode, [reason], reason, (550, "5.7.25"))


def _taint(mode: str, reasons: list[str], refusal: str, code: tuple[int, str]) -> Verdict:
    """Tag with every reason, or refuse naming the one that decided."""
    field = header_field(TAG_FIELD, f"tainted ({'; '.join(reasons)})")
    reply = Reply(code[0], code[1], ascii_line(f"Refused: {refusal}"))
    return tag_or_reject(mode, field, reply)
