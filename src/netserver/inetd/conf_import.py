"""``netserver import-inetd FILE``: an inetd.conf turned into ``netserver run`` TOML.

Each line is ``service socket-type protocol wait|nowait[.max] user[.group] server args``
(inetd(8)). TCP ``nowait`` services become ``[[service]]`` tables; a server run
through tcpd becomes the real server plus hosts.allow/hosts.deny and tcpd's daemon
name, so the existing rules keep working. What has no equivalent (UDP, RPC, ``wait``
services, inetd's ``internal`` services) is skipped with a warning naming the line:
the output must never claim to serve something it does not.
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from ..errors import ConfigError

TCPD = "/usr/sbin/tcpd"
TCPD_DIR = "/usr/sbin"  # tcpd's REAL_DAEMON_DIR, for a server named without a path
TCP_PROTOS = {"tcp": "0.0.0.0:{port}", "tcp4": "0.0.0.0:{port}", "tcp6": "[::]:{port}"}


@dataclass(frozen=True)
class ImportOptions:
    """Where tcpd's files are, and which services file maps names to ports."""

    hosts_allow: str = "/etc/hosts.allow"
    hosts_deny: str = "/etc/hosts.deny"
    services: Mapping[str, int] | None = None  # None: the system's (getservbyname)


@dataclass
class Imported:
    """The TOML tables made so far and the warnings for what was left out."""

    tables: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    names: set[str] = field(default_factory=set)


def read_services(path: str) -> dict[str, int]:
    """A services(5) file: ``name port/proto [aliases]``; the TCP entries by every name."""
    ports: dict[str, int] = {}
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                fields = line.split("#", 1)[0].split()
                if len(fields) >= 2 and fields[1].endswith("/tcp"):
                    port = fields[1].split("/")[0]
                    for name in [fields[0], *fields[2:]]:
                        ports.setdefault(name, int(port))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path}: cannot read the services file: {exc}") from None
    return ports


def import_inetd(path: str, options: ImportOptions) -> Imported:
    """Convert the file; ConfigError only if it cannot be read at all."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read: {exc}") from None
    result = Imported()
    for number, line in enumerate(_joined(lines), 1):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        try:
            result.tables.append(_convert(text, options, result.names))
        except _Skip as skip:
            result.warnings.append(f"{path}:{number}: skipped: {skip}")
    return result


def _joined(lines: list[str]) -> list[str]:
    """Lines with backslash continuations joined (numbered by their last line)."""
    out: list[str] = []
    pending = ""
    for line in lines:
        if line.endswith("\\"):
            pending += line[:-1] + " "
            out.append("")
            continue
        out.append(pending + line)
        pending = ""
    return out


class _Skip(Exception):
    """A line with no netserver equivalent; the message says why."""


def _convert(text: str, options: ImportOptions, names: set[str]) -> str:
    fields = text.split()
    if len(fields) < 6:
        raise _Skip(f"{text!r}: expected at least 6 fields")
    service, socktype, proto, wait, owner, server = fields[:6]
    args = fields[6:]
    if socktype != "stream" or proto not in TCP_PROTOS:
        raise _Skip(f"{service}: {socktype}/{proto} (netserver serves TCP streams only)")
    instances, per_source, note = _wait(wait, service)
    if server == "internal":
        raise _Skip(f"{service}: inetd internal service (use examples.echo, examples.daytime)")
    listen = _listen(service, proto, options)
    name = _unique(service.rpartition(":")[2], proto, names)
    user, _, group = owner.replace(":", ".").partition(".")
    lines = [f"# inetd.conf: {text}", "[[service]]", f"name = {_q(name)}"]
    lines += [f"listen = [{_q(listen)}]", 'mode = "fork"']
    lines += _command(server, args, options)
    lines.append(f"user = {_q(user)}")
    if group:
        lines.append(f"group = {_q(group)}")
    if instances:
        lines.append(f"instances = {instances}")
    if per_source:
        lines.append(f"per_source = {per_source}")
    if note:
        lines.insert(0, note)
    return "\n".join(lines) + "\n"


def _wait(field_text: str, service: str) -> tuple[int, int, str]:
    """``nowait``, ``nowait.MAX`` (Debian: starts a minute) or FreeBSD ``nowait/C/R/P``."""
    if "/" in field_text:
        kind, *numbers = field_text.split("/")
        if not all(n.isdigit() for n in numbers):
            raise _Skip(f"{service}: bad wait field {field_text!r}")
        values = [*map(int, numbers), 0, 0, 0]
        per_ip_rate = f"# inetd: {values[1]} connections a minute per address (not converted)"
        _need_nowait(kind, service)
        return values[0], values[2], per_ip_rate if values[1] else ""
    kind, _, most = field_text.partition(".")
    _need_nowait(kind, service)
    if most and not most.isdigit():
        raise _Skip(f"{service}: bad wait field {field_text!r}")
    note = f"# inetd: at most {most} starts a minute (not converted; see cps)" if most else ""
    return 0, 0, note


def _need_nowait(kind: str, service: str) -> None:
    if kind != "nowait":
        raise _Skip(f"{service}: '{kind}' service (the server would take the listening socket)")


def _listen(service: str, proto: str, options: ImportOptions) -> str:
    host, _, name = service.rpartition(":")
    port = _port(name, options.services)
    if host and host != "*":
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return TCP_PROTOS[proto].format(port=port)


def _port(name: str, services: Mapping[str, int] | None) -> int:
    if name.isdigit():
        return int(name)
    if services is not None:
        if name in services:
            return services[name]
    else:
        try:
            return socket.getservbyname(name, "tcp")
        except OSError:
            pass
    raise _Skip(f"{name}: unknown service name (not in the services file)")


def _unique(name: str, proto: str, names: set[str]) -> str:
    candidate = name if name not in names else f"{name}-{proto}"
    counter = 2
    while candidate in names:
        candidate, counter = f"{name}-{proto}-{counter}", counter + 1
    names.add(candidate)
    return candidate


def _command(server: str, args: list[str], options: ImportOptions) -> list[str]:
    """The argv to run; through tcpd, the real server and tcpd's files and daemon name."""
    if server != TCPD:
        return [f"command = {_list([server, *args[1:]])}"]
    if not args:
        raise _Skip("tcpd without a server to run")
    real = args[0] if os.path.isabs(args[0]) else os.path.join(TCPD_DIR, args[0])
    return [
        f"command = {_list([real, *args[1:]])}",
        f"daemon_name = {_q(os.path.basename(args[0]))}",
        f"hosts_allow = {_q(options.hosts_allow)}",
        f"hosts_deny = {_q(options.hosts_deny)}",
    ]


def _q(text: str) -> str:
    """A TOML basic string (JSON's escapes are a subset of TOML's)."""
    return json.dumps(text)


def _list(items: Iterable[str]) -> str:
    return "[" + ", ".join(_q(i) for i in items) + "]"


def render(result: Imported, source: str) -> str:
    """The whole TOML document."""
    head = f"# netserver run configuration, imported from {source}\n"
    return head + "".join("\n" + table for table in result.tables)
