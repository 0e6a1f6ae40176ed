"""The options of a matched rule (hosts_options(5)) and tcpd's % expansions.

`plan_options` turns the options of the rule that matched into a `Plan`: the verdict
and, in order, the side effects to carry out (banners to send, shell commands to
spawn, socket options), the command a ``twist`` replaces the service with, and the
``setenv`` variables.  It performs no I/O except through the *read_banner* callback, so
the same plan serves ``netserver check`` (which only shows it) and the server (which
carries it out, see `netserver.tcpd.gate`).

Expansions are tcpd's percent_x: every character of an expanded value outside
``[A-Za-z0-9!@%-_=+:,./]`` becomes ``_``.  That is what keeps a PTR record such as
``x;rm -rf /`` or ``$(reboot)`` from ever reaching a shell as syntax; the template
itself, written by the administrator, is left alone.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from .match import UNKNOWN, Request
from .parse import HostsRule, Option, c_strip

__all__ = [
    "Banner",
    "Keepalive",
    "Linger",
    "OptionStep",
    "Plan",
    "Spawn",
    "percent_x",
    "plan_options",
    "sanitize",
]

SAFE_CHARS = frozenset("1234567890!@%-_=+:,./abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
# percent_x works in an 8192-byte buffer and gives up beyond 8190 characters.
MAX_EXPANSION = 8190
BannerReader = Callable[[str], bytes | None]


class OptionError(Exception):
    """An option cannot be carried out for this client; tcpd then denies access."""


@dataclass(frozen=True)
class Spawn:
    """A shell command to run with stdio on /dev/null; *env* is setenv so far."""

    command: str
    env: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class Banner:
    """Bytes to send the client before anything else (already expanded, CRLF lines)."""

    data: bytes


@dataclass(frozen=True)
class Keepalive:
    """Turn on SO_KEEPALIVE on the client socket."""


@dataclass(frozen=True)
class Linger:
    """Set SO_LINGER on the client socket (0 turns lingering off)."""

    seconds: int


OptionStep = Spawn | Banner | Keepalive | Linger


@dataclass(frozen=True)
class Plan:
    """What hosts_access decided for one request, and what to do about it.

    *verdict* is "granted", "denied" or "twist" (tcpdmatch says "delegated");
    *rule* and *table* ("allow"/"deny") name the matching rule, None if none matched;
    *shown* holds tcpdmatch's "option:" lines; *error* says why an option failed.
    """

    verdict: str
    rule: HostsRule | None = None
    table: str | None = None
    steps: tuple[OptionStep, ...] = ()
    twist: str | None = None
    env: tuple[tuple[str, str], ...] = ()
    severity: str | None = None
    shown: tuple[str, ...] = ()
    error: str | None = None

    @property
    def granted(self) -> bool:
        return self.verdict == "granted"


# --------------------------------------------------------------------------- expansion


def sanitize(text: str) -> str:
    """Replace every character outside tcpd's safe set by '_' (one per byte, as in C)."""
    return "".join(
        char if char in SAFE_CHARS else "_" * len(char.encode("utf-8", "surrogateescape"))
        for char in text
    )


def expand_letter(letter: str, request: Request) -> str:
    """The raw value of one %<letter> (before sanitizing); unknown letters are empty."""
    client, server = request.client, request.server
    values: dict[str, Callable[[], str]] = {
        "a": lambda: client.addr,
        "A": lambda: server.addr,
        "c": lambda: _client_info(request),
        "d": lambda: request.daemon or UNKNOWN,
        "h": client.info,
        "H": server.info,
        "n": client.name,
        "N": server.name,
        "p": lambda: str(request.pid),
        "r": lambda: str(client.port),
        "R": lambda: str(server.port),
        "s": lambda: _server_info(request),
        "u": lambda: request.user,
        "%": lambda: "%",
    }
    value = values.get(letter)
    return value() if value is not None else ""


def _client_info(request: Request) -> str:
    """%c: user@host when the user is known, else the host (name or address)."""
    host = request.client.info()
    return host if request.user == UNKNOWN else f"{request.user}@{host}"


def _server_info(request: Request) -> str:
    """%s: daemon@host when the server host is known, else the daemon."""
    host = request.server.info()
    daemon = request.daemon or UNKNOWN
    return daemon if host == UNKNOWN else f"{daemon}@{host}"


def percent_x(template: str, request: Request) -> str:
    """Expand every %<letter> of *template*, sanitizing each expansion (never the rest)."""
    parts: list[str] = []
    index = 0
    while index < len(template):
        if template[index] == "%" and index + 1 < len(template):
            parts.append(sanitize(expand_letter(template[index + 1], request)))
            index += 2
        else:
            parts.append(template[index])
            index += 1
    result = "".join(parts)
    if len(result) > MAX_EXPANSION:
        raise OptionError(f"percent_x: expansion too long: {result[:30]}...")
    return result


# --------------------------------------------------------------------------- options


@dataclass
class _Run:
    """The state of carrying out one rule's options, in order."""

    request: Request
    read_banner: BannerReader
    verdict: str
    steps: list[OptionStep] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    shown: list[str] = field(default_factory=list)
    twist: str | None = None
    severity: str | None = None

    def env_items(self) -> tuple[tuple[str, str], ...]:
        return tuple(self.env.items())


def plan_options(rule: HostsRule, table: str, request: Request, read_banner: BannerReader) -> Plan:
    """Carry out (on paper) the options of *rule*, matched in *table*, for *request*.

    May raise NameNeeded (an expansion needs a host name not yet looked up).
    """
    run = _Run(request, read_banner, "granted" if table == "allow" else "denied")
    error: str | None = None
    for option in rule.options:
        try:
            _apply(option, run)
        except OptionError as exc:
            run.verdict, run.twist, error = "denied", None, str(exc)
            break
    return Plan(
        verdict=run.verdict,
        rule=rule,
        table=table,
        steps=tuple(run.steps),
        twist=run.twist,
        env=run.env_items(),
        severity=run.severity,
        shown=tuple(run.shown),
        error=error,
    )


def _apply(option: Option, run: _Run) -> None:
    """One option: expand its value if tcpd does, record it, then do what it says."""
    value = option.value
    if value is not None and option.name in ("spawn", "twist", "setenv"):
        value = c_strip(percent_x(value, run.request))
    run.shown.append(option.name if value is None else f"{option.name} {value}")
    handler = _HANDLERS.get(option.name)
    if handler is not None:
        handler(value, run)


def _allow(value: str | None, run: _Run) -> None:
    run.verdict = "granted"


def _deny(value: str | None, run: _Run) -> None:
    run.verdict = "denied"


def _spawn(value: str | None, run: _Run) -> None:
    run.steps.append(Spawn(value or "", run.env_items()))


def _twist(value: str | None, run: _Run) -> None:
    run.verdict, run.twist = "twist", value or ""


def _setenv(value: str | None, run: _Run) -> None:
    """``setenv NAME VALUE``: the name ends at the first blank; both are trimmed."""
    text = value or ""
    cut = next((i for i, char in enumerate(text) if char in " \t\r\n"), len(text))
    name, rest = c_strip(text[:cut]), c_strip(text[cut + 1 :])
    if not name or "=" in name:
        raise OptionError(f"setenv: bad variable name {name!r}")
    run.env[name] = rest


def _banners(value: str | None, run: _Run) -> None:
    """Send DIR/DAEMON with each line ending CRLF and its % sequences expanded."""
    data = run.read_banner(f"{value}/{run.request.daemon}")
    if data is not None:
        run.steps.append(Banner(render_banner(data, run.request)))


def render_banner(data: bytes, request: Request) -> bytes:
    """A banner file as tcpd sends it: leading NULs kept, LF -> CRLF, % expanded."""
    stripped = data.lstrip(b"\0")
    out = [b"\0" * (len(data) - len(stripped))]
    pieces = stripped.decode("utf-8", "surrogateescape").split("\n")
    for index, piece in enumerate(pieces):
        last = index == len(pieces) - 1
        if last and not piece:
            break
        line = piece if last else piece + "\r\n"
        out.append(percent_x(line, request).encode("utf-8", "surrogateescape"))
    return b"".join(out)


def _severity(value: str | None, run: _Run) -> None:
    run.severity = value


def _keepalive(value: str | None, run: _Run) -> None:
    run.steps.append(Keepalive())


def _linger(value: str | None, run: _Run) -> None:
    run.steps.append(Linger(int(value or "0")))


_HANDLERS: dict[str, Callable[[str | None, _Run], None]] = {
    "allow": _allow,
    "deny": _deny,
    "spawn": _spawn,
    "twist": _twist,
    "setenv": _setenv,
    "banners": _banners,
    "severity": _severity,
    "keepalive": _keepalive,
    "linger": _linger,
}
