"""The ``netserver run`` configuration: ``[[service]]`` tables in one TOML file, strictly.

Every key is checked before anything is bound: an unknown key, a wrong type, a bad
address or rule, a file that is not there, an unknown user -- each is one ConfigError
(exit 78) naming the file, the line, the service and the key, because an inetd
replacement that silently ignored ``per_sourse = 5`` would run a service unprotected.

tomllib reports line numbers only for syntax errors, so the line of a key is found
by scanning the text of the service's table (see `_KeyLines`); a key written in an
inline table is reported without a line.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..admit.access import AccessPolicy
from ..errors import ConfigError, NetserverError
from ..limits import Limits
from ..listen.listeners import parse_listen
from ..privileges import Identity, resolve
from ..refusals import RefusalLines, per_cause, refusal_problem
from ..server import MODES
from ..strictconf import (
    Invalid,
    Unfit,
    at_least,
    boolean,
    duration,
    integer,
    read_file,
    refuse_unknown,
    value_of,
)

SERVICE_KEYS = frozenset(
    {
        "name", "listen", "mode", "handler", "command", "user", "group", "groups",
        "instances", "per_source", "cps", "cps_wait", "timeout", "allow", "deny",
        "hosts_allow", "hosts_deny", "daemon_name", "banner", "banner_file", "banner_limit",
        "banner_access", "banner_error", "env", "tls_cert", "tls_key", "proxy_from", "quiet",
    }
)  # fmt: skip
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*\Z")
DEFAULT_CPS_WAIT = 10.0


@dataclass(frozen=True)
class ServiceConfig:
    """One ``[[service]]`` table, checked and with relative paths made absolute."""

    name: str
    listen: tuple[str, ...]
    handler: str = ""
    command: tuple[str, ...] = ()
    mode: str | None = None
    identity: Identity | None = None
    limits: Limits = field(default_factory=Limits)
    allow: tuple[str, ...] = ()
    deny: tuple[str, ...] = ()
    hosts_allow: str | None = None
    hosts_deny: str | None = None
    daemon_name: str = ""
    banner: RefusalLines = field(default_factory=RefusalLines)
    env: Mapping[str, str] = field(default_factory=dict)
    tls_cert: str = ""
    tls_key: str = ""
    proxy_from: tuple[str, ...] = ()
    quiet: bool = False  # no line per served connection (as `netserver run --quiet`)
    path: str = ""
    lines: Mapping[str, int] = field(default_factory=dict)

    def error(self, key: str, reason: str) -> ConfigError:
        """A one-line ConfigError naming this service's file, line and `key`."""
        line = self.lines.get(key) or self.lines.get("")
        where = f"{self.path}:{line}" if line else self.path
        return ConfigError(f"{where}: service {self.name!r}: {key}: {reason}")


@dataclass(frozen=True)
class RunConfig:
    """The whole file: its path and its services, in file order."""

    path: str
    services: tuple[ServiceConfig, ...]


def load_run_config(path: str | os.PathLike[str]) -> RunConfig:
    """Read and check CONFIG.toml; ConfigError (one line, exit 78) on any problem."""
    name = os.fspath(path)
    text, data = read_file(name)
    return RunConfig(name, parse_services(name, text, data))


def parse_services(path: str, text: str, data: Mapping[str, Any]) -> tuple[ServiceConfig, ...]:
    """Check the top level (only ``service``) and every service table."""
    for key in data:
        if key != "service":
            raise ConfigError(f"{path}: unknown key {key!r} (only [[service]] tables)")
    tables = data.get("service")
    if not isinstance(tables, list) or not tables:
        raise ConfigError(f"{path}: no [[service]] table")
    lines = _KeyLines(text)
    base = Path(path).resolve().parent
    services: list[ServiceConfig] = []
    for index, table in enumerate(tables):
        services.append(_service(path, index, table, lines, base))
    _check_unique(services)
    return tuple(services)


def _check_unique(services: Sequence[ServiceConfig]) -> None:
    seen: set[str] = set()
    for service in services:
        if service.name in seen:
            raise service.error("name", "another service has this name")
        seen.add(service.name)


def _service(path: str, index: int, table: object, lines: _KeyLines, base: Path) -> ServiceConfig:
    label = f"#{index + 1}"
    if isinstance(table, dict) and isinstance(table.get("name"), str):
        label = repr(table["name"])
    try:
        if not isinstance(table, dict):
            raise Invalid("service", "must be a table")
        return _build(table, base, path, lines.keys_of(index))
    except Invalid as bad:
        where = _where(path, lines, index, bad.key)
        raise ConfigError(f"{where}: service {label}: {bad.key}: {bad.reason}") from None


def _where(path: str, lines: _KeyLines, index: int, key: str = "") -> str:
    line = lines.find(index, key)
    return f"{path}:{line}" if line else path


def _build(t: dict[str, Any], base: Path, path: str, lines: Mapping[str, int]) -> ServiceConfig:
    refuse_unknown(t, SERVICE_KEYS)
    name = _str(t, "name", required=True)
    if not NAME_RE.match(name):
        raise Invalid("name", "use letters, digits, '.', '_' and '-'")
    handler, command = _handler(t)
    return ServiceConfig(
        name=name,
        listen=_listen(t),
        handler=handler,
        command=command,
        mode=_mode(t),
        identity=_identity(t),
        limits=_limits(t),
        allow=_rules(t, "allow"),
        deny=_rules(t, "deny"),
        hosts_allow=_file(t, "hosts_allow", base),
        hosts_deny=_file(t, "hosts_deny", base),
        daemon_name=_str(t, "daemon_name") or name,
        banner=per_cause(
            _refusal(t, "banner", _banner(t, base)),
            limit=_refusal(t, "banner_limit", _str(t, "banner_limit") or None),
            access=_refusal(t, "banner_access", _str(t, "banner_access") or None),
            error=_refusal(t, "banner_error", _str(t, "banner_error") or None),
        ),
        env=_env(t),
        tls_cert=_file(t, "tls_cert", base) or "",
        tls_key=_file(t, "tls_key", base) or "",
        proxy_from=_rules(t, "proxy_from"),
        quiet=value_of(boolean, t.get("quiet", False), "quiet"),
        path=path,
        lines=lines,
    )


# -- one check per key ---------------------------------------------------------------
def _str(t: Mapping[str, Any], key: str, *, required: bool = False) -> str:
    value = t.get(key)
    if value is None:
        if required:
            raise Invalid(key, "missing")
        return ""
    if not isinstance(value, str) or not value:
        raise Invalid(key, "must be a non-empty string")
    return value


def _str_list(t: Mapping[str, Any], key: str) -> tuple[str, ...]:
    value = t.get(key, [])
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise Invalid(key, "must be a list of non-empty strings")
    return tuple(value)


def _listen(t: Mapping[str, Any]) -> tuple[str, ...]:
    if "listen" not in t:
        raise Invalid("listen", "missing")
    addresses = _str_list(t, "listen")
    if not addresses:
        raise Invalid("listen", "give at least one address")
    for address in addresses:
        try:
            parse_listen(address)
        except NetserverError as exc:
            raise Invalid("listen", str(exc)) from None
    return addresses


def _handler(t: Mapping[str, Any]) -> tuple[str, tuple[str, ...]]:
    handler = _str(t, "handler")
    command = _str_list(t, "command")
    if handler and command:
        raise Invalid("command", "give either handler or command, not both")
    if not handler and not command:
        raise Invalid("handler", "missing (give handler = 'MODULE:CALLABLE' or command = [...])")
    if handler and ":" not in handler:
        raise Invalid("handler", f"{handler!r}: expected MODULE:CALLABLE")
    return handler, command


def _mode(t: Mapping[str, Any]) -> str | None:
    mode = _str(t, "mode")
    if mode and mode not in MODES:
        raise Invalid("mode", f"{mode!r} is not one of {', '.join(MODES)}")
    return mode or None


def _identity(t: Mapping[str, Any]) -> Identity | None:
    user, group = _str(t, "user"), _str(t, "group")
    groups = _str_list(t, "groups") if "groups" in t else None
    if not user:
        for key in ("group", "groups"):
            if key in t:
                raise Invalid(key, "needs user as well")
        return None
    try:
        return resolve(user, group or None, groups)
    except ConfigError as exc:
        key = "user" if "user" in str(exc) else ("group" if group else "groups")
        raise Invalid(key, str(exc)) from None


_COUNT = at_least(integer, 0)


def _count(t: Mapping[str, Any], key: str) -> int:
    return value_of(_COUNT, t.get(key, 0), key)


def _rate(value: object) -> float:
    """Connections a second: a number > 0."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise Unfit("must be a number")
    if not math.isfinite(value) or value <= 0:
        raise Unfit("must be more than 0")
    return float(value)


def _cps(t: Mapping[str, Any]) -> tuple[float, float]:
    """``cps = "50 10"`` (xinetd) or ``cps = 50`` with ``cps_wait = 10``."""
    value = t.get("cps")
    wait = value_of(duration, t["cps_wait"], "cps_wait") if "cps_wait" in t else None
    if value is None:
        if wait is not None:
            raise Invalid("cps_wait", "needs cps as well")
        return 0.0, 0.0
    if isinstance(value, str):
        parts = value.split()
        if len(parts) not in (1, 2) or (len(parts) == 2 and wait is not None):
            raise Invalid("cps", 'expected "RATE WAIT", e.g. "50 10"')
        try:
            numbers = [float(p) for p in parts]
        except ValueError:
            raise Invalid("cps", f'{value!r}: expected numbers, e.g. "50 10"') from None
        value, wait = numbers[0], numbers[1] if len(numbers) == 2 else wait
    rate = value_of(_rate, value, "cps")
    return rate, DEFAULT_CPS_WAIT if wait is None else value_of(duration, wait, "cps")


def _limits(t: Mapping[str, Any]) -> Limits:
    rate, wait = _cps(t)
    timeout = value_of(duration, t["timeout"], "timeout") if "timeout" in t else 300.0
    return Limits(
        max_conns=_count(t, "instances"),
        max_per_source=_count(t, "per_source"),
        service_rate=rate,
        service_pause=wait,
        timeout=timeout or None,
    )


def _rules(t: Mapping[str, Any], key: str) -> tuple[str, ...]:
    rules = _str_list(t, key)
    try:
        AccessPolicy(rules)
    except NetserverError as exc:
        raise Invalid(key, str(exc)) from None
    return rules


def _file(t: Mapping[str, Any], key: str, base: Path) -> str | None:
    name = _str(t, key)
    if not name:
        return None
    path = base / name
    if not path.is_file():
        raise Invalid(key, f"{str(path)!r}: no such file")
    if not os.access(path, os.R_OK):
        raise Invalid(key, f"{str(path)!r}: not readable")
    return str(path)


def _banner(t: Mapping[str, Any], base: Path) -> str | None:
    """The line a refused client gets: ``banner`` text, or ``banner_file``'s text."""
    if "banner" in t and "banner_file" in t:
        raise Invalid("banner_file", "give either banner or banner_file, not both")
    if "banner" in t:
        return _str(t, "banner")
    path = _file(t, "banner_file", base)
    if path is None:
        return None
    try:
        return Path(path).read_text(encoding="utf-8").rstrip("\r\n").replace("\n", "\r\n")
    except (OSError, UnicodeDecodeError) as exc:
        raise Invalid("banner_file", f"{path!r}: {exc}") from None


def _refusal(t: Mapping[str, Any], key: str, line: str | None) -> str | None:
    """`line` if it can be sent as a refusal (`refusals.refusal_problem`)."""
    problem = None if line is None else refusal_problem(line)
    if problem is not None:
        raise Invalid("banner_file" if "banner_file" in t and key == "banner" else key, problem)
    return line


def _env(t: Mapping[str, Any]) -> dict[str, str]:
    value = t.get("env", {})
    if not isinstance(value, dict):
        raise Invalid("env", "must be a table of NAME = 'value'")
    for name, item in value.items():
        if not isinstance(item, str) or not name or "=" in name or "\0" in item:
            raise Invalid(f"env.{name}", "must be a string (and the name must not contain '=')")
    return dict(value)


class _KeyLines:
    """Line numbers of ``key =`` lines inside the N-th ``[[service]]`` table of the text."""

    HEADER = re.compile(r"\s*\[\[\s*service\s*\]\]")
    OTHER = re.compile(r"\s*\[")
    KEY = re.compile(r"\s*[\"']?([A-Za-z0-9_.-]+?)[\"']?\s*=")

    def __init__(self, text: str) -> None:
        self.tables: list[tuple[int, dict[str, int]]] = []
        current: dict[str, int] | None = None
        for number, line in enumerate(text.splitlines(), 1):
            if self.HEADER.match(line):
                current = {}
                self.tables.append((number, current))
            elif self.OTHER.match(line):
                current = None if not line.lstrip().startswith("[service.") else current
            elif current is not None and (m := self.KEY.match(line)):
                current.setdefault(m.group(1), number)

    def keys_of(self, index: int) -> dict[str, int]:
        """Key -> line for the index-th table, with its header's line under ""."""
        if index >= len(self.tables):
            return {}
        header, keys = self.tables[index]
        return {"": header, **keys}

    def find(self, index: int, key: str) -> int:
        """The key's line; else the table's header line; 0 if unknown."""
        if index >= len(self.tables):
            return 0
        header, keys = self.tables[index]
        return keys.get(key.split(".", 1)[0], header)
