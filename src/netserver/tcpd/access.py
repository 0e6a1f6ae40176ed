"""hosts.allow and hosts.deny (hosts_access(5)), decided exactly as tcpd decides.

Access is granted when a (daemon, client) pair matches a rule of hosts.allow, else
denied when it matches one of hosts.deny, else granted; a missing file counts as empty.
The options of the matching rule (hosts_options(5)) may then change the verdict, run
commands, send a banner or replace the service (``twist``).

The pieces:

* `netserver.tcpd.parse` reads the files (`HostsSyntaxError` names FILE:LINE);
* `netserver.tcpd.match` matches patterns, looking names up lazily (`NameNeeded`);
* `netserver.tcpd.options` turns the matching rule's options into a `Plan`;
* `netserver.tcpd.gate` carries a plan out for a real connection.

This module ties them together: `HostsAccess.load` is the loader API (the CLI uses it,
and so can a config file); `HostsAccess.decide` runs one evaluation pass.  Decisions are
pure: a pass that needs a host name raises `NameNeeded`, the caller looks the name up
(off the accept path, bounded in time) and runs the pass again.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from ..endpoint import Endpoint
from ..handlers import CallbackHandler, Command, Handler
from .match import HostInfo, NameNeeded, Request, client_match, list_match, server_match
from .options import BannerReader, Plan, plan_options
from .parse import HostsRule, HostsSyntaxError, HostsTable, read_table

__all__ = [
    "DEFAULT_ALLOW",
    "DEFAULT_DENY",
    "HostsAccess",
    "HostsLoader",
    "HostsSyntaxError",
    "NameNeeded",
    "Plan",
    "Request",
    "default_daemon_name",
    "load_hosts",
    "make_request",
    "no_banners",
    "read_banner_file",
]

DEFAULT_ALLOW = "/etc/hosts.allow"
DEFAULT_DENY = "/etc/hosts.deny"
MAX_BANNER = 1 << 20


def no_banners(path: str) -> bytes | None:
    """A banner reader for decisions that must not touch the disk (the accept path)."""
    return None


def read_banner_file(path: str) -> bytes | None:
    """The contents of a banner file, or None if it cannot be read (tcpd skips it)."""
    try:
        with open(path, "rb") as stream:
            return stream.read(MAX_BANNER)
    except OSError:
        return None


@dataclass(frozen=True)
class HostsAccess:
    """The two tables, immutable once loaded; build with `load_hosts`."""

    allow: HostsTable
    deny: HostsTable

    @property
    def warnings(self) -> tuple[str, ...]:
        return self.allow.warnings + self.deny.warnings

    @functools.cached_property
    def patterns(self) -> Mapping[str, Sequence[str]]:
        """The contents of every ``/file`` pattern of both tables, read at load time."""
        return {**self.allow.patterns, **self.deny.patterns}

    def describe(self) -> str:
        """One line for the startup and reload logs."""
        return (
            f"{self.allow.path} ({len(self.allow.rules)} rules), "
            f"{self.deny.path} ({len(self.deny.rules)} rules)"
        )

    def match(self, request: Request) -> tuple[str, HostsRule] | None:
        """The first matching rule, hosts.allow before hosts.deny; may raise NameNeeded."""
        for table_name, table in (("allow", self.allow), ("deny", self.deny)):
            for rule in table.rules:
                if _rule_matches(rule, request):
                    return table_name, rule
        return None

    def decide(self, request: Request, read_banner: BannerReader = no_banners) -> Plan:
        """One evaluation pass from the start; may raise NameNeeded (then retry)."""
        request.new_pass()
        request.patterns = self.patterns
        found = self.match(request)
        if found is None:
            return Plan("granted")
        table, rule = found
        return plan_options(rule, table, request, read_banner)

    def quick(self, request: Request) -> Plan | None:
        """A plan with no lookups and no disk access, or None if that cannot be had."""
        try:
            request.new_pass()
            request.patterns = self.patterns
            found = self.match(request)
        except NameNeeded:
            return None
        if found is None:
            return Plan("granted")
        table, rule = found
        if rule.options:
            return None
        return Plan("granted" if table == "allow" else "denied", rule, table)


def _rule_matches(rule: HostsRule, request: Request) -> bool:
    return list_match(rule.daemons, lambda p: server_match(p, request)) and list_match(
        rule.clients, lambda p: client_match(p, request)
    )


HostsLoader = Callable[[], HostsAccess]


def load_hosts(
    allow: str | os.PathLike[str] | None = DEFAULT_ALLOW,
    deny: str | os.PathLike[str] | None = DEFAULT_DENY,
) -> HostsAccess:
    """Read both files (None: no such table); HostsSyntaxError names FILE:LINE."""
    return HostsAccess(_table(allow, "hosts.allow"), _table(deny, "hosts.deny"))


def _table(path: str | os.PathLike[str] | None, label: str) -> HostsTable:
    return read_table(path) if path is not None else HostsTable(f"(no {label})")


def make_request(daemon: str, peer: Endpoint, local: Endpoint, pid: int | None = None) -> Request:
    """The request for a TCP connection; names unknown until looked up."""
    return Request(
        daemon=daemon,
        client=HostInfo("client", peer.host, peer.port or 0),
        server=HostInfo("server", local.host, local.port or 0),
        pid=os.getpid() if pid is None else pid,
    )


def default_daemon_name(handler: Handler) -> str:
    """The process name tcpd would see: a command's basename, a handler's module.

    ``-- /usr/sbin/in.fingerd`` is ``in.fingerd``; ``--handler examples.echo:main`` is
    ``echo`` (the last part of the module, since ``main`` says nothing).
    """
    if isinstance(handler, Command):
        return os.path.basename(handler.argv[0]) or handler.argv[0]
    target = handler.factory if isinstance(handler, CallbackHandler) else handler.func
    module = getattr(target, "__module__", None) or "netserver"
    return module.rsplit(".", 1)[-1]
