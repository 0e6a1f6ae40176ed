"""``netserver check DAEMON CLIENT``: what tcpdmatch(8) would print, from our own code.

The arguments are tcpdmatch's: ``daemon[@server] [user@]client``.  A client given as an
address is judged as if its name lookup failed (tcpdmatch's rule, so the answer never
depends on DNS) unless ``--name`` says what the name is; a client given as a host name
is looked up and judged once per address; ``unknown`` and ``paranoid`` stand for those
lookup outcomes.  The output is tcpdmatch's, including the lines upstream tcpdmatch
prints for the matching rule and its options::

    client:   address  192.0.2.7
    server:   process  in.fingerd
    matched:  /etc/hosts.deny line 3
    option:   spawn /usr/bin/logger refused_192.0.2.7
    access:   denied
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Sequence

from ..endpoint import IPAddress
from ..errors import UnavailableError
from ..resolver import normalize_ip
from .access import HostsAccess, Request
from .match import UNKNOWN, HostInfo, hostname_known, not_inaddr
from .names import HostNames
from .options import Plan, percent_x
from .parse import split_at

__all__ = ["check_lines", "describe_plan"]

_SHOWN = (
    ("client:   hostname", "%n"),
    ("client:   address ", "%a"),
    ("client:   username", "%u"),
    ("server:   hostname", "%N"),
    ("server:   address ", "%A"),
    ("server:   process ", "%d"),
)


def _address(text: str) -> IPAddress | None:
    try:
        return normalize_ip(text)
    except ValueError:
        return None


async def _server(text: str | None, names: HostNames) -> HostInfo:
    """The server end: unknown, a literal unknown/paranoid, an address or a name."""
    host = HostInfo("server", resolved=UNKNOWN)
    if text is None:
        return host
    address = _address(text)
    if address is None and not_inaddr(text) and not hostname_known(text):
        host.resolved = text
        return host
    found = [address] if address is not None else await names.addresses(text)
    if len(found) != 1:
        raise UnavailableError(f"{text}: server must have exactly one address, has {len(found)}")
    host.addr, host.resolved = str(found[0]), await names.hostname(found[0])
    return host


async def _clients(text: str, names: HostNames, given: Sequence[str]) -> list[HostInfo]:
    """One HostInfo per client address to judge (several for a multi-homed name)."""
    address = _address(text)
    if address is not None:
        name = given[0].lower().rstrip(".") if given else UNKNOWN
        return [HostInfo("client", str(address), resolved=name)]
    if not hostname_known(text):
        return [HostInfo("client", resolved=text)]
    found = await names.addresses(text)
    if not found:
        raise UnavailableError(f"{text}: host address lookup failed")
    return [HostInfo("client", str(ip), resolved=await names.hostname(ip)) for ip in found]


def _daemon(text: str) -> tuple[str, str | None]:
    split = split_at(text, "@")
    daemon, server = (text, None) if split is None else split
    return (os.path.basename(daemon) if daemon.startswith("/") else daemon), server


def check_lines(
    access: HostsAccess,
    daemon_arg: str,
    client_arg: str,
    names: HostNames,
    given_names: Sequence[str] = (),
) -> list[str]:
    """The full tcpdmatch-style report; blocks for several addresses are blank-separated.

    For ``netserver check`` and tests: it runs its own event loop for the lookups.
    """
    return asyncio.run(_check(access, daemon_arg, client_arg, names, given_names))


async def _check(
    access: HostsAccess,
    daemon_arg: str,
    client_arg: str,
    names: HostNames,
    given_names: Sequence[str],
) -> list[str]:
    daemon, server_text = _daemon(daemon_arg)
    split = split_at(client_arg, "@")
    user, client_text = (UNKNOWN, client_arg) if split is None else split
    lines: list[str] = []
    for client in await _clients(client_text, names, given_names):
        if lines:
            lines.append("")
        request = Request(daemon, client, await _server(server_text, names), user, os.getpid())
        request.names_first = True
        lines.extend(_report(access, request))
    return lines


def _report(access: HostsAccess, request: Request) -> list[str]:
    request.new_pass()
    lines = [
        f"{label} {value}"
        for label, template in _SHOWN
        if (value := percent_x(template, request)) != UNKNOWN
    ]
    plan = access.decide(request)
    return lines + describe_plan(plan)


def describe_plan(plan: Plan) -> list[str]:
    """The "matched:", "option:", warning and "access:" lines for one decision."""
    lines: list[str] = []
    if plan.rule is not None:
        lines.append(f"matched:  {plan.rule.path} line {plan.rule.line}")
    lines.extend(f"option:   {shown}" for shown in plan.shown)
    if plan.error is not None and plan.rule is not None:
        lines.append(f"warning:  {plan.rule.path}, line {plan.rule.line}: {plan.error}")
    verdict = "delegated" if plan.verdict == "twist" else plan.verdict
    lines.append(f"access:   {verdict}")
    return lines
