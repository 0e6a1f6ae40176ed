"""leafmail's configuration: a TOML file, with LEAFMAIL_* variables and flags over it.

Where it comes from: ``--config FILE``, else ``$LEAFMAIL_CONFIG``, else
``$XDG_CONFIG_HOME/leafmail/leafmail.toml`` if that exists, else
``/etc/leafmail/leafmail.toml`` if that exists, else built-in defaults.
Flags beat variables and variables beat the file. Unknown keys and wrong types are
errors naming the key (exit 78), because a typo in a mail server's config should never
silently fall back to a default such as an open relay.

Each TOML table is one frozen dataclass (a section), and each part of leafmail is
handed the sections it needs, not the whole `Config`. A setting is written once: a
field made by `setting(kind, default)`, which one generic loader (`read_section`)
reads with netserver's strict reader (netserver.strictconf), the same that reads
`netserver run` files, so durations ("5m") and sizes ("25M") mean the same in both.
A table is written once too: a field of `Config` with metadata TABLE. Adding a setting
is one line in its section, plus its use. What relates two settings (TLS needs both
files, a route needs its table) is checked once the sections are built, in `_check`.
"""

from __future__ import annotations

import os
import re
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, TypeVar, cast, overload

from netserver.admit.access import AccessPolicy, parse_rule
from netserver.errors import AccessSpecError, ConfigError, UsageError
from netserver.listen.listeners import parse_listen
from netserver.smtp import BareNewline, ServerConfig
from netserver.smtp.addresses import parse_forward_path
from netserver.smtp.replies import RemoteProtocolError
from netserver.strictconf import (
    Invalid,
    Kind,
    Table,
    Unfit,
    at_least,
    boolean,
    choice,
    duration,
    integer,
    positive,
    read_file,
    size,
    string,
    strings,
)

from .states import DeliveryMode, Route

T = TypeVar("T")
S = TypeVar("S")

DEFAULT_LISTEN = ("127.0.0.1:2525",)
DEFAULT_RELAY_NETWORKS = ("127.0.0.0/8", "::1")
DEFAULT_MAX_SIZE = 25 * 1024 * 1024


@overload
def setting(kind: Kind[T], default: T) -> T: ...
@overload
def setting(kind: Kind[T], *, factory: Callable[[], T]) -> T: ...
def setting(kind: Kind[T], default: Any = None, *, factory: Callable[[], T] | None = None) -> T:
    """A field that is a key of the file: how it is read, and its default (or the
    function that makes the default, when it depends on the machine).

    This is the only place a setting is written: the generic loader (`read_section`)
    reads every field made by `setting` with its kind and refuses keys that are not
    one; a field made otherwise (`enabled` of [local], `senders` of [auth]) is not a
    key of its table and is filled by that table's own reader.
    """
    if factory is not None:
        return field(default_factory=factory, metadata={_KIND: kind})
    return cast(T, field(default=default, metadata={_KIND: kind}))


_KIND = "leafmail.config.kind"
# The metadata of a field of `Config` that is a TOML table, its default_factory the
# section's class: `read_section` reads that class from the table of the field's name.
TABLE = {"leafmail.config.table": True}
_COUNT = at_least(integer, 0)
_POSITIVE = positive(integer)
_DOMAIN = re.compile(r"\A[a-z0-9]([a-z0-9-]*[a-z0-9])?(\.[a-z0-9]([a-z0-9-]*[a-z0-9])?)*\Z")


def _port(value: object) -> int:
    port = integer(value)
    if not 0 < port < 65536:
        raise Unfit(f"{port} out of range")
    return port


def _domain_name(text: str) -> str:
    """`text` lower-case; Unfit unless it is a domain name (or "")."""
    domain = text.lower()
    if domain and not _DOMAIN.match(domain):
        raise Unfit(f"{domain!r} is not a domain name")
    return domain


def _origin(value: object) -> str:
    """A domain name without the final dot ("" stays "")."""
    return _domain_name(string(value).strip().rstrip("."))


def _domains(value: object) -> tuple[str, ...]:
    """Domain names; a leading dot (".example.org", as in Postfix) is dropped too."""
    return tuple(_domain_name(item.strip().strip(".")) for item in strings(value))


def _user(value: object) -> str:
    name = string(value)
    if not name:
        raise Unfit("must not be empty")
    return name


def read_section(kind: type[S], table: Table, **others: Any) -> S:
    """`kind` from its TOML table: each `setting` field read with its kind (absent: its
    default), each field marked TABLE from its own table, the rest from `others`.

    Keys of the table that are neither are refused (UnknownKey).
    """
    values = dict(others)
    names = []
    for item in fields(cast(Any, kind)):
        reader = item.metadata.get(_KIND)
        if item.name in others:
            continue
        if item.metadata == TABLE:
            section = cast(type[Any], item.default_factory)
            values[item.name] = read_section(section, table.table(item.name))
        elif reader is None:
            continue
        elif item.name in table:
            values[item.name] = table.read(item.name, reader)
        names.append(item.name)
    table.finish(names)
    return kind(**values)


@dataclass(frozen=True)
class SmtpConfig:
    """The ``[smtp]`` table."""

    listen: tuple[str, ...] = setting(strings, DEFAULT_LISTEN)
    submission_listen: tuple[str, ...] = setting(strings, ())
    smtps_listen: tuple[str, ...] = setting(strings, ())
    tls_cert: str = setting(string, "")
    tls_key: str = setting(string, "")
    max_message_size: int = setting(positive(size), DEFAULT_MAX_SIZE)
    max_recipients: int = setting(_POSITIVE, 100)
    max_errors: int = setting(_COUNT, 10)
    max_junk_commands: int = setting(_COUNT, 100)
    # Recipients refused with 5xx in one session before 421 (a directory harvest), as
    # Postfix's smtpd_hard_error_limit (20) counts them.
    max_refused_recipients: int = setting(_COUNT, 20)
    # RCPTs answered 452 past max_recipients in one transaction before each further one
    # counts toward max_errors, as Postfix's smtpd_recipient_overshoot_limit (1000).
    max_recipient_overshoot: int = setting(_COUNT, 1000)
    max_sessions: int = setting(_POSITIVE, 20000)
    # None: 50 (Postfix's smtpd_client_connection_count_limit), at most half of
    # max_sessions, so that no one address can take every session.
    max_sessions_per_source: int | None = setting(_COUNT, None)
    allow_plaintext_auth: bool = setting(boolean, False)
    bare_lf: str = setting(choice("reject", "replace"), "reject")
    # Postfix's header_size_limit; a field count limit too, both applied before parsing.
    max_header_size: int = setting(positive(size), 102400)
    max_header_fields: int = setting(_POSITIVE, 1000)
    # Postfix's smtpd_min_data_rate: DATA/BDAT must average this many octets a second
    # once `data_rate_grace` has passed (0: no minimum).
    min_data_rate: int = setting(_COUNT, 500)
    data_rate_grace: float = setting(duration, 30.0)
    # Postfix's smtpd_timeout: a client silent this long is closed, and a command line
    # must arrive whole within this long of its first octet (smtpd_per_record_deadline).
    timeout: float = setting(positive(duration), 300.0)
    # Load balancers whose connections start with a PROXY v1/v2 header naming the real
    # client (netserver's --proxy-from); nobody else is ever asked for one.
    proxy_from: tuple[str, ...] = setting(strings, ())
    # On SIGTERM: how long sessions in a transaction may go on after accept stops.
    shutdown_grace: float = setting(duration, 30.0)

    @property
    def per_source_sessions(self) -> int:
        """Sessions one client address may hold at once (0: no limit)."""
        if self.max_sessions_per_source is not None:
            return self.max_sessions_per_source
        return min(50, max(1, self.max_sessions // 2))

    def server_config(
        self, hostname: str, *, tls_available: bool = False, auth_enabled: bool = False
    ) -> ServerConfig:
        """The SMTP engine's settings from this table: the one place they are mapped,
        for the network service and for `sendmail -bs` alike."""
        return ServerConfig(
            hostname=hostname,
            max_message_size=self.max_message_size,
            max_recipients=self.max_recipients,
            max_errors=self.max_errors,
            max_junk_commands=self.max_junk_commands,
            max_refused_recipients=self.max_refused_recipients,
            max_recipient_overshoot=self.max_recipient_overshoot,
            tls_available=tls_available,
            auth_enabled=auth_enabled,
            auth_plaintext_allowed=self.allow_plaintext_auth,
            bare_newline=BareNewline.REPLACE if self.bare_lf == "replace" else BareNewline.REJECT,
            command_timeout=self.timeout,
            data_timeout=self.timeout,
        )


@dataclass(frozen=True)
class RelayConfig:
    """The ``[relay]`` table; empty `local_domains` means [hostname]."""

    local_domains: tuple[str, ...] = setting(strings, ())
    relay_networks: tuple[str, ...] = setting(strings, DEFAULT_RELAY_NETWORKS)


@dataclass(frozen=True)
class AuthConfig:
    """The ``[auth]`` table.

    `senders` maps a login to the sender addresses (``a@b``) and domains (``@b``) it
    may use in MAIL FROM; a login not listed owns its own name at each local domain
    (or itself, when the login is an address). The throttle keys bound password
    guessing per client address: each failure waits longer (`failure_delay`, doubled
    each time), and `max_failures` within `block_time` block the address for
    `block_time`.
    """

    users_file: str = setting(string, "")
    senders: tuple[tuple[str, tuple[str, ...]], ...] = ()  # [auth.senders]: see _senders
    failure_delay: float = setting(duration, 1.0)
    max_failures: int = setting(_POSITIVE, 5)
    block_time: float = setting(duration, 600.0)


@dataclass(frozen=True)
class PickupConfig:
    """The ``[pickup]`` table: the local submission socket (leafmail.pickup).

    `enabled` None means: on when `leafmail serve` starts as root (a system daemon, whose
    spool other users cannot write), off for an ordinary user's own daemon, whose
    smarthost account other local users must not get to use.
    `message_rate_limit` messages per `rate_time_unit` is what one uid may submit.
    """

    enabled: bool | None = setting(boolean, None)
    # Postfix's smtpd_client_message_rate_limit per anvil_rate_time_unit, counted per
    # submitting uid (leafmail.submitrate); 0: no limit. Root and the daemon's user
    # are not counted.
    message_rate_limit: int = setting(_COUNT, 120)
    rate_time_unit: float = setting(positive(duration), 60.0)


TLS_MODES = ("starttls", "smtps", "opportunistic", "none")
CHECK_ACTIONS = ("off", "tag", "reject")
MAILBOX_KINDS = ("maildir", "mbox")
_CHECK = choice(*CHECK_ACTIONS)


@dataclass(frozen=True)
class DeliveryConfig:
    """The ``[delivery]`` table: where spooled mail goes, and the retry schedule.

    `mode` "" means "smarthost" when a smarthost is set, else "offline". With "offline"
    the daemon only spools, and `leafmail flush` still delivers to the smarthost: that is
    the dial-up set-up. The password is never part of the config object (see
    `smarthost_password`), so it cannot end up in a repr or a log line. The rules
    between these keys (checked again when the CLI changed them) are `delivery_problem`.
    """

    mode: str = setting(choice("", *DeliveryMode), "")
    smarthost: str = setting(string, "")
    tls: str = setting(choice(*TLS_MODES), "starttls")
    ca_file: str = setting(string, "")
    username: str = setting(string, "")
    password_file: str = setting(string, "")
    concurrency: int = setting(integer, 4)
    retry_initial: float = setting(duration, 300.0)
    retry_max: float = setting(duration, 4 * 3600.0)
    max_queue_lifetime: float = setting(duration, 5 * 86400.0)
    delay_warning: float = setting(duration, 0.0)
    connect_timeout: float = setting(duration, 30.0)
    command_timeout: float = setting(duration, 300.0)
    deadline: float = setting(duration, 900.0)
    # "": undeliverable bounces are dropped (logged)
    double_bounce_to: str = setting(string, "postmaster")

    @property
    def effective_mode(self) -> DeliveryMode:
        if self.mode:
            return DeliveryMode(self.mode)
        return DeliveryMode.SMARTHOST if self.smarthost else DeliveryMode.OFFLINE


_SPANS = (("day", 86400), ("h", 3600), ("min", 60), ("s", 1))


def format_duration(seconds: float) -> str:
    """A duration for people, at most two units: "3 s", "1 min 30 s", "5 days", "1 day 6 h"."""
    left = max(0, round(seconds))
    parts: list[str] = []
    for unit, span in _SPANS:
        count, left = divmod(left, span)
        if count and len(parts) < 2:
            parts.append(f"{count} {unit}{'s' if unit == 'day' and count != 1 else ''}")
        elif parts:
            break  # "1 day 0 h 5 min" would mislead; two adjacent units or one
    return " ".join(parts) or "0 s"


@dataclass(frozen=True)
class DnsConfig:
    """The ``[dns]`` table: the resolver for MX, SPF, DKIM and DNSBL lookups.

    No nameservers means the system's (/etc/resolv.conf); tests point it at a server
    of their own on loopback.
    """

    nameservers: tuple[str, ...] = setting(strings, ())
    port: int = setting(_port, 53)
    timeout: float = setting(duration, 5.0)


@dataclass(frozen=True)
class MxConfig:
    """The ``[mx]`` table: direct delivery to the recipient domain's MX hosts."""

    port: int = setting(_port, 25)
    mta_sts: bool = setting(boolean, True)  # honour RFC 8461 policies
    https_port: int = setting(_port, 443)  # where MTA-STS policies are fetched
    # CAs for MTA-STS (policy host and MX certificates); default: the system's
    ca_file: str = setting(string, "")


@dataclass(frozen=True)
class LocalConfig:
    """The ``[local]`` table; its presence turns on local delivery for local_domains.

    `path` is a template with {user} (and {home}, the account's home directory); the
    default is {home}/Maildir for maildir and /var/mail/{user} for mbox. `users` lists
    the mailboxes that exist; empty means this system's accounts (passwd). A listed
    user without an account is written, when we are root, as `virtual_user` (an account
    name or "uid:gid", never root), as Postfix's virtual_uid_maps does. Commands and
    files named in a root-owned aliases or include file run as `default_user` (never
    root), Postfix's default_privs.
    """

    enabled: bool = False  # the table is there (see _build)
    mailbox: str = setting(choice(*MAILBOX_KINDS), "maildir")
    path: str = setting(string, "")
    users: tuple[str, ...] = setting(strings, ())
    aliases: str = setting(string, "")
    command_timeout: float = setting(positive(duration), 60.0)
    virtual_user: str = setting(string, "leafmail")
    default_user: str = setting(string, "nobody")

    @property
    def path_template(self) -> str:
        if self.path:
            return self.path
        return "{home}/Maildir" if self.mailbox == "maildir" else "/var/mail/{user}"


@dataclass(frozen=True)
class SendmailConfig:
    """The ``[sendmail]`` table: how locally submitted addresses are completed.

    `origin` is the domain added to bare names (``root``) in the envelope and in the
    address headers, as Postfix's myorigin with append_at_myorigin (default: the
    hostname). `masquerade_domains` hides host names: ``user@host.example.org``
    becomes ``user@example.org`` in the envelope sender and the address headers, as
    Postfix's masquerade_domains (the first listed domain that matches wins).
    """

    origin: str = setting(_origin, "")
    masquerade_domains: tuple[str, ...] = setting(_domains, ())


@dataclass(frozen=True)
class ChecksConfig:
    """The ``[checks]`` table: each check is "off", "tag" (add a header) or "reject"."""

    rfc5322: str = setting(_CHECK, "tag")
    received: str = setting(_CHECK, "tag")
    dnsbl: str = setting(_CHECK, "off")
    spf: str = setting(_CHECK, "tag")
    dkim: str = setting(_CHECK, "tag")
    dnsbl_zones: tuple[str, ...] = setting(strings, ())
    dnswl_zones: tuple[str, ...] = setting(strings, ())
    authserv_id: str = setting(string, "")  # default: the hostname
    # The check pool: worker processes, and each message's CPU and wall-clock budget.
    workers: int = setting(_POSITIVE, 2)
    cpu_limit: float = setting(positive(duration), 10.0)
    time_limit: float = setting(positive(duration), 30.0)


@dataclass(frozen=True)
class ProcessConfig:
    """``[process]``: how `leafmail serve` splits into processes (see leafmail.daemon).

    `user` is whom the processes that read the network run as when started as root
    (Postfix's mail_owner); `workers` how many SMTP worker processes (0: one per CPU).
    `in_flow_queue` is the queue size above which acceptance slows down (0: never); it
    applies while the queue manager delivers (not offline, where mail waits on purpose).
    """

    user: str = setting(_user, "leafmail")
    workers: int = setting(_COUNT, 0)
    in_flow_queue: int = setting(_COUNT, 200)

    @property
    def worker_count(self) -> int:
        return self.workers or os.cpu_count() or 1


@dataclass(frozen=True)
class Config:
    """The whole file: the top-level keys, one section per table, and where it came from.

    Only the entry points (the daemon and its process builders, the CLI, sendmail) hold
    it whole; they hand each part the sections it needs (a delivery agent its
    [delivery] table, the check pool its [checks] table, the queue side `queue`, local
    submission `submit`). What derives from several tables (local domains, routes) is
    computed here, once (`routing`).
    """

    hostname: str = setting(string, factory=socket.gethostname)
    spool: str = setting(string, "")
    smtp: SmtpConfig = field(default_factory=SmtpConfig, metadata=TABLE)
    relay: RelayConfig = field(default_factory=RelayConfig, metadata=TABLE)
    auth: AuthConfig = field(default_factory=AuthConfig)  # with [auth.senders]: see _auth
    delivery: DeliveryConfig = field(default_factory=DeliveryConfig, metadata=TABLE)
    dns: DnsConfig = field(default_factory=DnsConfig, metadata=TABLE)
    mx: MxConfig = field(default_factory=MxConfig, metadata=TABLE)
    local: LocalConfig = field(default_factory=LocalConfig)  # on when present: see _build
    pickup: PickupConfig = field(default_factory=PickupConfig, metadata=TABLE)
    checks: ChecksConfig = field(default_factory=ChecksConfig, metadata=TABLE)
    sendmail: SendmailConfig = field(default_factory=SendmailConfig, metadata=TABLE)
    process: ProcessConfig = field(default_factory=ProcessConfig, metadata=TABLE)
    routes: tuple[tuple[str, str], ...] = ()  # (domain or .suffix, route), as written
    source: str = "defaults"

    @property
    def local_domains(self) -> tuple[str, ...]:
        """Domains delivered here, lower-case; the hostname when none is configured."""
        domains = self.relay.local_domains or (self.hostname,)
        return tuple(d.lower().rstrip(".") for d in domains)

    @property
    def double_bounce_address(self) -> str:
        """Where undeliverable bounces go: delivery.double_bounce_to, a bare name
        qualified with our first local domain ("" when switched off)."""
        target = self.delivery.double_bounce_to.strip()
        if not target or "@" in target:
            return target
        return f"{target}@{self.local_domains[0]}"

    def route_for(self, domain: str) -> Route:
        """The route of a recipient domain (see `Routing.route_for`)."""
        return self.routing.route_for(domain)

    @property
    def routing(self) -> Routing:
        """Which route each recipient domain takes, for the router and the RCPT check."""
        return Routing(
            hostname=self.hostname,
            local_domains=self.local_domains,
            local_enabled=self.local.enabled,
            default=self.default_route,
            routes=self.routes,
        )

    @property
    def queue(self) -> QueueConfig:
        """The sections the queue manager's side is built from (runner, router, agents)."""
        return QueueConfig(
            hostname=self.hostname,
            postmaster=self.double_bounce_address,
            routing=self.routing,
            delivery=self.delivery,
            mx=self.mx,
            dns=self.dns,
            local=self.local,
        )

    @property
    def submit(self) -> SubmitConfig:
        """The sections local submission is built from (sendmail, the pickup socket)."""
        return SubmitConfig(
            hostname=self.hostname, spool=self.spool, smtp=self.smtp, sendmail=self.sendmail
        )

    @property
    def default_route(self) -> Route:
        """Where mail with no route of its own goes ("offline" means the smarthost, once
        flushed)."""
        return self.delivery.effective_mode.route

    def relay_policy(self) -> AccessPolicy:
        """The networks allowed to relay, as an allow-only access policy.

        An empty list trusts nobody (relaying needs AUTH). AccessPolicy reads "no allow
        rules" as "allow all", so that case is spelled out as a deny.
        """
        if not self.relay.relay_networks:
            return AccessPolicy(deny=("ALL",))
        return AccessPolicy(allow=self.relay.relay_networks)


@dataclass(frozen=True)
class Routing:
    """Which route each recipient domain takes (`Config.routing`).

    It derives from four tables ([routes], [local], relay.local_domains, the delivery
    mode) and the hostname, so it is computed once, here, and handed whole to the parts
    that route (the router, the RCPT check) instead of the whole `Config`.
    """

    hostname: str
    local_domains: tuple[str, ...]  # lower-case, without the final dot
    local_enabled: bool  # a [local] table is there
    default: Route  # the delivery mode's route ("offline": the smarthost, once flushed)
    routes: tuple[tuple[str, str], ...] = ()  # (domain or .suffix, route), as written

    def route_for(self, domain: str) -> Route:
        """The route of a recipient domain: [routes], else local, else delivery.mode.

        A route key "example.org" matches that domain only; ".example.org" matches its
        subdomains. Local domains go to local delivery when [local] is configured. The
        default for everything else is the delivery mode ("offline" delivers through
        the smarthost when flushed).
        """
        domain = domain.lower().rstrip(".")
        for key, route in self.routes:
            key = key.lower().rstrip(".")
            if domain == key or (key.startswith(".") and domain.endswith(key)):
                return Route(route)
        if self.local_enabled and domain in self.local_domains:
            return Route.LOCAL
        return self.default

    @property
    def in_use(self) -> set[Route]:
        """Every route some recipient can take: those of [routes], the default, local."""
        used = {Route(route) for _key, route in self.routes} | {self.default}
        if self.local_enabled:
            used.add(Route.LOCAL)
        return used


@dataclass(frozen=True)
class QueueConfig:
    """What the queue manager's side is built from (`Config.queue`): the queue runner,
    the router and its agents, in `leafmail serve` and in `leafmail flush` alike.

    Each agent then takes its own tables from it (the smarthost agent [delivery], the
    MX agent [mx], [delivery] and [dns], the local agent [local]).
    """

    hostname: str  # HELO name and bounce sender's domain
    postmaster: str  # where undeliverable bounces go ("" to drop them)
    routing: Routing
    delivery: DeliveryConfig
    mx: MxConfig
    dns: DnsConfig
    local: LocalConfig


@dataclass(frozen=True)
class SubmitConfig:
    """What local submission is built from (`Config.submit`): `leafmail sendmail` and the
    daemon's pickup socket complete and spool a message with the same settings."""

    hostname: str
    spool: str
    smtp: SmtpConfig  # the size limit, and the engine's settings for sendmail -bs
    sendmail: SendmailConfig


SYSTEM_CONFIG = Path("/etc/leafmail/leafmail.toml")


def default_config_path(env: Mapping[str, str]) -> Path:
    base = env.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return Path(base) / "leafmail" / "leafmail.toml"


def default_spool(env: Mapping[str, str]) -> str:
    """The user's data directory, as the XDG base directory spec says."""
    base = env.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return os.path.join(base, "leafmail", "spool")


def load(
    path: str | None = None,
    env: Mapping[str, str] | None = None,
    *,
    system: Path = SYSTEM_CONFIG,
) -> Config:
    """Read the config file (if any) and apply LEAFMAIL_* variables over it.

    The file: `path` (--config), else $LEAFMAIL_CONFIG, else the user's own
    (~/.config/leafmail/leafmail.toml), else the system's (/etc/leafmail/leafmail.toml),
    else none. The system file comes last so that a user's `sendmail` on a machine with
    a system daemon reaches that daemon (and its spool) instead of filling a personal
    spool nobody delivers, while a user who set up their own leafmail keeps it.
    """
    env = os.environ if env is None else env
    chosen = path or env.get("LEAFMAIL_CONFIG")
    if chosen:
        config = _from_file(Path(chosen), check=False)
    elif _present(default_config_path(env)):
        config = _from_file(default_config_path(env), check=False)
    elif _present(system):
        config = _from_file(system, check=False)
    else:
        config = Config()
    config = _apply_env(config, env)
    _check(config, config.source)  # again: variables may have changed what the file said
    return config


def _present(path: Path) -> bool:
    """True if `path` exists, or may: one in a directory this user cannot search
    (/etc/leafmail 0750) is reported by the read that follows, never skipped silently."""
    try:
        path.stat()
    except (FileNotFoundError, NotADirectoryError):
        return False
    except OSError:
        return True
    return True


def _apply_env(config: Config, env: Mapping[str, str]) -> Config:
    if env.get("LEAFMAIL_HOSTNAME"):
        config = replace(config, hostname=env["LEAFMAIL_HOSTNAME"])
    if env.get("LEAFMAIL_SPOOL"):
        config = replace(config, spool=env["LEAFMAIL_SPOOL"])
    if env.get("LEAFMAIL_LISTEN"):
        listen = tuple(a.strip() for a in env["LEAFMAIL_LISTEN"].split(",") if a.strip())
        config = replace(config, smtp=replace(config.smtp, listen=listen))
    if env.get("LEAFMAIL_SMARTHOST"):
        config = replace(
            config, delivery=replace(config.delivery, smarthost=env["LEAFMAIL_SMARTHOST"])
        )
    if not config.spool:
        config = replace(config, spool=default_spool(env))
    return config


def smarthost_password(delivery: DeliveryConfig, env: Mapping[str, str] | None = None) -> str:
    """The smarthost password: $LEAFMAIL_SMARTHOST_PASSWORD, else delivery.password_file."""
    env = os.environ if env is None else env
    if env.get("LEAFMAIL_SMARTHOST_PASSWORD"):
        return env["LEAFMAIL_SMARTHOST_PASSWORD"]
    if not delivery.password_file:
        return ""
    try:
        with open(os.path.expanduser(delivery.password_file), encoding="utf-8") as f:
            return f.readline().rstrip("\r\n")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"delivery.password_file: cannot read: {exc}") from None


def _from_file(path: Path, *, check: bool = True) -> Config:
    _text, raw = read_file(path)
    return _build(raw, str(path), check=check)


def _build(raw: dict[str, Any], where: str, *, check: bool = True) -> Config:
    """The Config of a parsed file; ConfigError starting with `where` on any problem."""
    top = Table(raw)
    try:
        config = read_section(
            Config,
            top,
            auth=_auth(top.table("auth")),
            local=read_section(LocalConfig, top.table("local"), enabled="local" in top),
            routes=_routes(top.table("routes")),
            source=where,
        )
    except Invalid as exc:
        raise ConfigError(f"{where}: {exc}") from None
    if check:
        _check(config, where)
    return config


def _auth(auth: Table) -> AuthConfig:
    return read_section(AuthConfig, auth, senders=_senders(auth.table("senders")))


def _senders(table: Table) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """[auth.senders]: LOGIN = [ADDRESS or @DOMAIN, ...]."""
    owned = tuple((user, table.read(user, strings)) for user in list(table.data))
    for user, addresses in owned:
        for address in addresses:
            local, at, domain = address.rpartition("@")
            if not at or not domain or "@" in local:
                raise Invalid(
                    table.dotted(user),
                    f"must list addresses (local@domain) or domains (@domain), not {address!r}",
                )
    return owned


def _routes(t: Table) -> tuple[tuple[str, str], ...]:
    routes = tuple((domain, t.read(domain, choice(*Route))) for domain in list(t.data))
    t.finish()
    return routes


def delivery_problem(delivery: DeliveryConfig) -> str | None:
    """Why these delivery settings cannot work or would be unsafe, or None."""
    if delivery.mode == DeliveryMode.SMARTHOST and not delivery.smarthost:
        return "delivery.mode = smarthost needs delivery.smarthost"
    if delivery.smarthost:
        try:
            split_hostport(delivery.smarthost, delivery.tls)
        except ValueError as exc:
            return f"delivery.smarthost: {exc}"
    if delivery.username and delivery.tls in ("none", "opportunistic"):
        return (
            f"delivery.username with tls = {delivery.tls} would send the password "
            "unprotected; use tls = starttls or smtps"
        )
    if delivery.concurrency <= 0:
        return "delivery.concurrency must be > 0"
    if delivery.retry_initial <= 0 or delivery.retry_max < delivery.retry_initial:
        return "delivery.retry_initial must be > 0 and <= retry_max"
    if min(delivery.connect_timeout, delivery.command_timeout, delivery.deadline) <= 0:
        return "delivery timeouts must be > 0"
    return None


def split_hostport(text: str, tls: str = "starttls") -> tuple[str, int]:
    """("host", port) from "host:port", "[v6]:port" or "host" (port from the TLS mode)."""
    default = 465 if tls == "smtps" else 587 if tls == "starttls" else 25
    match = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\](?::(\d+))?|([^\s:\[\]]+)(?::(\d+))?", text)
    if not match:
        raise ValueError(f"{text!r} is not HOST:PORT")
    host = match.group(1) or match.group(3)
    port_text = match.group(2) or match.group(4)
    port = int(port_text) if port_text else default
    if not 0 < port < 65536:
        raise ValueError(f"port {port} out of range")
    return host, port


def hostname_problem(name: str) -> str | None:
    """Why `name` cannot be this server's name in greetings and headers, or None."""
    if not name:
        return "empty"
    if not name.isprintable() or any(c.isspace() for c in name) or len(name) > 253:
        return "must be one printable word of at most 253 characters"
    return None


def _check(config: Config, where: str) -> None:
    """Rules between settings (TLS needs both files, submission and smtps need TLS ...),
    and the values LEAFMAIL_* variables may have changed after the file was read."""
    smtp = config.smtp
    if bool(smtp.tls_cert) != bool(smtp.tls_key):
        raise ConfigError(f"{where}: smtp.tls_cert and smtp.tls_key go together")
    if smtp.smtps_listen and not smtp.tls_cert:
        raise ConfigError(f"{where}: smtp.smtps_listen needs smtp.tls_cert and smtp.tls_key")
    if smtp.submission_listen and not config.auth.users_file:
        raise ConfigError(f"{where}: smtp.submission_listen needs auth.users_file")
    problem = hostname_problem(config.hostname)
    if problem:
        raise ConfigError(f"{where}: hostname {config.hostname!r}: {problem}")
    listeners = {
        "listen": smtp.listen,
        "submission_listen": smtp.submission_listen,
        "smtps_listen": smtp.smtps_listen,
    }
    for key, addresses in listeners.items():
        for address in addresses:
            try:
                parse_listen(address)
            except UsageError as exc:
                raise ConfigError(f"{where}: smtp.{key}: {exc}") from None
    try:
        config.relay_policy()
    except AccessSpecError as exc:
        raise ConfigError(f"{where}: relay.relay_networks: {exc}") from None
    problem = proxy_problem(smtp.proxy_from)
    if problem:
        raise ConfigError(f"{where}: smtp.proxy_from: {problem}")
    problem = (
        delivery_problem(config.delivery)
        or double_bounce_problem(config)
        or routing_problem(config)
        or local_domains_problem(config)
        or local_problem(config.local)
    )
    if problem:
        raise ConfigError(f"{where}: {problem}")


def proxy_problem(specs: tuple[str, ...]) -> str | None:
    """What is wrong with the trusted balancers' addresses (names are not allowed)."""
    for spec in specs:
        try:
            rule = parse_rule(spec)
        except AccessSpecError as exc:
            return str(exc)
        if rule.is_name_rule:
            return f"{spec!r}: give an address or network, not a name"
    return None


def local_problem(local: LocalConfig) -> str | None:
    """A [local] table that could only fail at delivery time, every time."""
    if not local.enabled:
        return None
    template = local.path_template
    if not template.startswith(("/", "{home}")):
        return f"local.path {template!r} must be absolute or start with {{home}}"
    try:
        template.format(user="u", home="/h")
    except (KeyError, IndexError, ValueError) as exc:
        return f"local.path {template!r}: only {{user}} and {{home}} may be used ({exc})"
    return None


def double_bounce_problem(config: Config) -> str | None:
    """delivery.double_bounce_to must be an address mail can be sent to (or "")."""
    address = config.double_bounce_address
    if not address:
        return None
    try:
        parse_forward_path(f"<{address}>", utf8=False)
    except RemoteProtocolError:
        return f"delivery.double_bounce_to {config.delivery.double_bounce_to!r} is not an address"
    return None


def local_domains_problem(config: Config) -> str | None:
    """A local domain that would be delivered by MX without a [local] table.

    relay.local_domains says "mail for these is ours": it is accepted from anyone. With
    no [local] table and no route of its own it takes the default route, and by MX our
    own domain's MX is this host (or whoever it points to): the mail loops back or
    leaves for a host that did not expect it. That is never what was meant, so it is
    refused here, as Postfix refuses mail for $mydestination it has no local transport
    for. Through a smarthost it is the null-client set-up (the provider's server holds
    the mailboxes), which is allowed.
    """
    if config.local.enabled or not config.relay.local_domains:
        return None
    for domain in config.local_domains:
        if config.route_for(domain) is Route.MX:
            return (
                f"relay.local_domains has {domain!r} but there is no [local] table, so its "
                "mail would go out by MX (to ourselves); add [local], or give it a route "
                f'such as [routes] "{domain}" = "smarthost"'
            )
    return None


def routing_problem(config: Config) -> str | None:
    """Routes that name a way of delivery that is not set up."""
    used = {route for _key, route in config.routes} | {config.delivery.effective_mode}
    if Route.LOCAL in used and not config.local.enabled:
        return "a route is local but there is no [local] table"
    if (
        Route.SMARTHOST in {route for _key, route in config.routes}
        and not config.delivery.smarthost
    ):
        return "a route is smarthost but delivery.smarthost is not set"
    return None
