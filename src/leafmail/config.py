"""leafmail's configuration: a TOML file, with LEAFMAIL_* variables and flags over it.

Where it comes from: ``--config FILE``, else ``$LEAFMAIL_CONFIG``, else
``$XDG_CONFIG_HOME/leafmail/leafmail.toml`` if that exists, else
``/etc/leafmail/leafmail.toml`` if that exists, else built-in defaults.
Flags beat variables and variables beat the file. Unknown keys and wrong types are
errors naming the key (exit 78), because a typo in a mail server's config should never
silently fall back to a default such as an open relay.
"""

from __future__ import annotations

import math
import os
import re
import socket
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from netserver.access import AccessPolicy, parse_rule
from netserver.errors import AccessSpecError, ConfigError, UsageError
from netserver.listeners import parse_listen
from netserver.smtp.addresses import parse_forward_path
from netserver.smtp.replies import RemoteProtocolError

from .states import DeliveryMode, Route

DEFAULT_LISTEN = ("127.0.0.1:2525",)
DEFAULT_RELAY_NETWORKS = ("127.0.0.0/8", "::1")
DEFAULT_MAX_SIZE = 25 * 1024 * 1024


@dataclass(frozen=True)
class SmtpConfig:
    """The ``[smtp]`` table."""

    listen: tuple[str, ...] = DEFAULT_LISTEN
    submission_listen: tuple[str, ...] = ()
    smtps_listen: tuple[str, ...] = ()
    tls_cert: str = ""
    tls_key: str = ""
    max_message_size: int = DEFAULT_MAX_SIZE
    max_recipients: int = 100
    max_errors: int = 10
    max_junk_commands: int = 100
    max_sessions: int = 20000
    # None: 50 (Postfix's smtpd_client_connection_count_limit), at most half of
    # max_sessions, so that no one address can take every session.
    max_sessions_per_source: int | None = None
    allow_plaintext_auth: bool = False
    bare_lf: str = "reject"
    # Postfix's header_size_limit; a field count limit too, both applied before parsing.
    max_header_size: int = 102400
    max_header_fields: int = 1000
    # Postfix's smtpd_min_data_rate: DATA/BDAT must average this many octets a second
    # once `data_rate_grace` has passed (0: no minimum).
    min_data_rate: int = 500
    data_rate_grace: float = 30.0
    # Load balancers whose connections start with a PROXY v1/v2 header naming the real
    # client (netserver's --proxy-from); nobody else is ever asked for one.
    proxy_from: tuple[str, ...] = ()
    # On SIGTERM: how long sessions in a transaction may go on after accept stops.
    shutdown_grace: float = 30.0

    @property
    def per_source_sessions(self) -> int:
        """Sessions one client address may hold at once (0: no limit)."""
        if self.max_sessions_per_source is not None:
            return self.max_sessions_per_source
        return min(50, max(1, self.max_sessions // 2))


@dataclass(frozen=True)
class RelayConfig:
    """The ``[relay]`` table; empty `local_domains` means [hostname]."""

    local_domains: tuple[str, ...] = ()
    relay_networks: tuple[str, ...] = DEFAULT_RELAY_NETWORKS


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

    users_file: str = ""
    senders: tuple[tuple[str, tuple[str, ...]], ...] = ()
    failure_delay: float = 1.0
    max_failures: int = 5
    block_time: float = 600.0


@dataclass(frozen=True)
class PickupConfig:
    """The ``[pickup]`` table: the local submission socket (leafmail.pickup).

    `enabled` None means: on when `leafmail serve` starts as root (a system daemon, whose
    spool other users cannot write), off for an ordinary user's own daemon, whose
    smarthost account other local users must not get to use.
    """

    enabled: bool | None = None


TLS_MODES = ("starttls", "smtps", "opportunistic", "none")
CHECK_ACTIONS = ("off", "tag", "reject")
MAILBOX_KINDS = ("maildir", "mbox")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


@dataclass(frozen=True)
class DeliveryConfig:
    """The ``[delivery]`` table: where spooled mail goes, and the retry schedule.

    `mode` "" means "smarthost" when a smarthost is set, else "offline". With "offline"
    the daemon only spools, and `leafmail flush` still delivers to the smarthost: that is
    the dial-up set-up. The password is never part of the config object (see
    `smarthost_password`), so it cannot end up in a repr or a log line.
    """

    mode: str = ""
    smarthost: str = ""
    tls: str = "starttls"
    ca_file: str = ""
    username: str = ""
    password_file: str = ""
    concurrency: int = 4
    retry_initial: float = 300.0
    retry_max: float = 4 * 3600.0
    max_queue_lifetime: float = 5 * 86400.0
    delay_warning: float = 0.0
    connect_timeout: float = 30.0
    command_timeout: float = 300.0
    deadline: float = 900.0
    double_bounce_to: str = "postmaster"  # "": undeliverable bounces are dropped (logged)

    @property
    def effective_mode(self) -> DeliveryMode:
        if self.mode:
            return DeliveryMode(self.mode)
        return DeliveryMode.SMARTHOST if self.smarthost else DeliveryMode.OFFLINE


def parse_duration(value: object, what: str) -> float:
    """Seconds from an integer/float or a string such as "90s", "5m", "4h", "5d"."""
    if isinstance(value, bool):
        raise ConfigError(f'{what} must be a duration such as 300, "5m" or "4h"')
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str) and re.fullmatch(r"\s*\d+(\.\d+)?\s*[smhd]?\s*", value):
        text = value.strip()
        unit = text[-1] if text[-1] in _UNITS else "s"
        seconds = float(text.rstrip("smhd").strip()) * _UNITS[unit]
    else:
        raise ConfigError(f'{what} must be a duration such as 300, "5m" or "4h"')
    if not math.isfinite(seconds):
        raise ConfigError(f"{what} must be a finite duration")
    if seconds < 0:
        raise ConfigError(f"{what} must not be negative")
    return seconds


_SPANS = (("day", 86400), ("h", 3600), ("min", 60), ("s", 1))


def format_duration(seconds: float) -> str:
    """A duration for people, at most two units: "3 s", "1 min 30 s", "5 days", "1 day 6 h"."""
    left = max(0, round(seconds))
    parts: list[str] = []
    for unit, size in _SPANS:
        count, left = divmod(left, size)
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

    nameservers: tuple[str, ...] = ()
    port: int = 53
    timeout: float = 5.0


@dataclass(frozen=True)
class MxConfig:
    """The ``[mx]`` table: direct delivery to the recipient domain's MX hosts."""

    port: int = 25
    mta_sts: bool = True  # honour RFC 8461 policies
    https_port: int = 443  # where MTA-STS policies are fetched
    ca_file: str = ""  # CAs for MTA-STS (policy host and MX certificates); default system


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

    enabled: bool = False
    mailbox: str = "maildir"
    path: str = ""
    users: tuple[str, ...] = ()
    aliases: str = ""
    command_timeout: float = 60.0
    virtual_user: str = "leafmail"
    default_user: str = "nobody"

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

    origin: str = ""
    masquerade_domains: tuple[str, ...] = ()


@dataclass(frozen=True)
class ChecksConfig:
    """The ``[checks]`` table: each check is "off", "tag" (add a header) or "reject"."""

    rfc5322: str = "tag"
    received: str = "tag"
    dnsbl: str = "off"
    spf: str = "tag"
    dkim: str = "tag"
    dnsbl_zones: tuple[str, ...] = ()
    dnswl_zones: tuple[str, ...] = ()
    authserv_id: str = ""  # default: the hostname
    # The check pool: worker processes, and each message's CPU and wall-clock budget.
    workers: int = 2
    cpu_limit: float = 10.0
    time_limit: float = 30.0


@dataclass(frozen=True)
class ProcessConfig:
    """``[process]``: how `leafmail serve` splits into processes (see leafmail.daemon).

    `user` is whom the processes that read the network run as when started as root
    (Postfix's mail_owner); `workers` how many SMTP worker processes (0: one per CPU).
    `in_flow_queue` is the queue size above which acceptance slows down (0: never); it
    applies while the queue manager delivers (not offline, where mail waits on purpose).
    """

    user: str = "leafmail"
    workers: int = 0
    in_flow_queue: int = 200

    @property
    def worker_count(self) -> int:
        return self.workers or os.cpu_count() or 1


@dataclass(frozen=True)
class Config:
    """Everything `leafmail serve` and the queue tools need."""

    hostname: str = field(default_factory=socket.gethostname)
    spool: str = ""
    smtp: SmtpConfig = field(default_factory=SmtpConfig)
    relay: RelayConfig = field(default_factory=RelayConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)
    delivery: DeliveryConfig = field(default_factory=DeliveryConfig)
    dns: DnsConfig = field(default_factory=DnsConfig)
    mx: MxConfig = field(default_factory=MxConfig)
    local: LocalConfig = field(default_factory=LocalConfig)
    pickup: PickupConfig = field(default_factory=PickupConfig)
    checks: ChecksConfig = field(default_factory=ChecksConfig)
    sendmail: SendmailConfig = field(default_factory=SendmailConfig)
    process: ProcessConfig = field(default_factory=ProcessConfig)
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
        if self.local.enabled and domain in self.local_domains:
            return Route.LOCAL
        return self.default_route

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
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    return _build(raw, str(path), check=check)


def _build(raw: dict[str, Any], where: str, *, check: bool = True) -> Config:
    top = _Table(raw, where)
    config = Config(
        hostname=top.string("hostname", socket.gethostname()),
        spool=top.string("spool", ""),
        smtp=_smtp(top.table("smtp")),
        relay=_relay(top.table("relay")),
        auth=_auth(top.table("auth")),
        delivery=_delivery(top.table("delivery")),
        dns=_dns(top.table("dns")),
        mx=_mx(top.table("mx")),
        local=_local(top.table("local"), enabled="local" in raw),
        pickup=_pickup(top.table("pickup")),
        checks=_checks(top.table("checks")),
        sendmail=_sendmail(top.table("sendmail")),
        process=_process(top.table("process")),
        routes=_routes(top.table("routes")),
        source=where,
    )
    top.finish()
    if check:
        _check(config, where)
    return config


def _process(t: _Table) -> ProcessConfig:
    d = ProcessConfig()
    process = ProcessConfig(
        user=t.string("user", d.user),
        workers=t.integer("workers", d.workers),
        in_flow_queue=t.integer("in_flow_queue", d.in_flow_queue),
    )
    t.finish()
    if not process.user or process.workers < 0 or process.in_flow_queue < 0:
        raise ConfigError(f"{t.where}: [process] needs a user and counts of 0 or more")
    return process


def _smtp(t: _Table) -> SmtpConfig:
    d = SmtpConfig()
    smtp = SmtpConfig(
        listen=t.strings("listen", d.listen),
        submission_listen=t.strings("submission_listen", d.submission_listen),
        smtps_listen=t.strings("smtps_listen", d.smtps_listen),
        tls_cert=t.string("tls_cert", d.tls_cert),
        tls_key=t.string("tls_key", d.tls_key),
        max_message_size=t.integer("max_message_size", d.max_message_size),
        max_recipients=t.integer("max_recipients", d.max_recipients),
        max_errors=t.integer("max_errors", d.max_errors),
        max_junk_commands=t.integer("max_junk_commands", d.max_junk_commands),
        max_sessions=t.integer("max_sessions", d.max_sessions),
        max_sessions_per_source=t.optional_integer("max_sessions_per_source"),
        allow_plaintext_auth=t.boolean("allow_plaintext_auth", d.allow_plaintext_auth),
        bare_lf=t.choice("bare_lf", d.bare_lf, ("reject", "replace")),
        max_header_size=t.integer("max_header_size", d.max_header_size),
        max_header_fields=t.integer("max_header_fields", d.max_header_fields),
        min_data_rate=t.integer("min_data_rate", d.min_data_rate),
        data_rate_grace=t.duration("data_rate_grace", d.data_rate_grace),
        proxy_from=t.strings("proxy_from", d.proxy_from),
        shutdown_grace=t.duration("shutdown_grace", d.shutdown_grace),
    )
    t.finish()
    return smtp


def _auth(t: _Table) -> AuthConfig:
    d = AuthConfig()
    senders = t.table("senders")
    owned = tuple((user, senders.strings(user, ())) for user in list(senders.data))
    senders.finish()
    for user, addresses in owned:
        for address in addresses:
            local, at, domain = address.rpartition("@")
            if not at or not domain or "@" in local:
                raise ConfigError(
                    f"{t.where}: auth.senders.{user}: {address!r} is not an address "
                    "(local@domain) or a domain (@domain)"
                )
    auth = AuthConfig(
        users_file=t.string("users_file", d.users_file),
        senders=owned,
        failure_delay=t.duration("failure_delay", d.failure_delay),
        max_failures=t.integer("max_failures", d.max_failures),
        block_time=t.duration("block_time", d.block_time),
    )
    t.finish()
    return auth


def _relay(t: _Table) -> RelayConfig:
    relay = RelayConfig(
        local_domains=t.strings("local_domains", ()),
        relay_networks=t.strings("relay_networks", DEFAULT_RELAY_NETWORKS),
    )
    t.finish()
    return relay


def _delivery(t: _Table) -> DeliveryConfig:
    d = DeliveryConfig()
    delivery = DeliveryConfig(
        mode=t.choice("mode", d.mode, ("", *DeliveryMode)),
        smarthost=t.string("smarthost", d.smarthost),
        tls=t.choice("tls", d.tls, TLS_MODES),
        ca_file=t.string("ca_file", d.ca_file),
        username=t.string("username", d.username),
        password_file=t.string("password_file", d.password_file),
        concurrency=t.integer("concurrency", d.concurrency),
        retry_initial=t.duration("retry_initial", d.retry_initial),
        retry_max=t.duration("retry_max", d.retry_max),
        max_queue_lifetime=t.duration("max_queue_lifetime", d.max_queue_lifetime),
        delay_warning=t.duration("delay_warning", d.delay_warning),
        connect_timeout=t.duration("connect_timeout", d.connect_timeout),
        command_timeout=t.duration("command_timeout", d.command_timeout),
        deadline=t.duration("deadline", d.deadline),
        double_bounce_to=t.string("double_bounce_to", d.double_bounce_to),
    )
    t.finish()
    return delivery


def _dns(t: _Table) -> DnsConfig:
    d = DnsConfig()
    dns = DnsConfig(
        nameservers=t.strings("nameservers", d.nameservers),
        port=t.integer("port", d.port),
        timeout=t.duration("timeout", d.timeout),
    )
    t.finish()
    return dns


def _mx(t: _Table) -> MxConfig:
    d = MxConfig()
    mx = MxConfig(
        port=t.integer("port", d.port),
        mta_sts=t.boolean("mta_sts", d.mta_sts),
        https_port=t.integer("https_port", d.https_port),
        ca_file=t.string("ca_file", d.ca_file),
    )
    t.finish()
    return mx


def _local(t: _Table, *, enabled: bool) -> LocalConfig:
    d = LocalConfig()
    local = LocalConfig(
        enabled=enabled,
        mailbox=t.choice("mailbox", d.mailbox, MAILBOX_KINDS),
        path=t.string("path", d.path),
        users=t.strings("users", d.users),
        aliases=t.string("aliases", d.aliases),
        command_timeout=t.duration("command_timeout", d.command_timeout),
        virtual_user=t.string("virtual_user", d.virtual_user),
        default_user=t.string("default_user", d.default_user),
    )
    t.finish()
    return local


_DOMAIN = re.compile(r"\A[a-z0-9]([a-z0-9-]*[a-z0-9])?(\.[a-z0-9]([a-z0-9-]*[a-z0-9])?)*\Z")


def _sendmail(t: _Table) -> SendmailConfig:
    sendmail = SendmailConfig(
        origin=t.string("origin", "").strip().rstrip(".").lower(),
        masquerade_domains=tuple(
            d.strip().strip(".").lower() for d in t.strings("masquerade_domains", ())
        ),
    )
    for domain in (sendmail.origin, *sendmail.masquerade_domains):
        if domain and not _DOMAIN.match(domain):
            raise ConfigError(f"{t.where}: sendmail: {domain!r} is not a domain name")
    t.finish()
    return sendmail


def _checks(t: _Table) -> ChecksConfig:
    d = ChecksConfig()
    checks = ChecksConfig(
        rfc5322=t.choice("rfc5322", d.rfc5322, CHECK_ACTIONS),
        received=t.choice("received", d.received, CHECK_ACTIONS),
        dnsbl=t.choice("dnsbl", d.dnsbl, CHECK_ACTIONS),
        spf=t.choice("spf", d.spf, CHECK_ACTIONS),
        dkim=t.choice("dkim", d.dkim, CHECK_ACTIONS),
        dnsbl_zones=t.strings("dnsbl_zones", d.dnsbl_zones),
        dnswl_zones=t.strings("dnswl_zones", d.dnswl_zones),
        authserv_id=t.string("authserv_id", d.authserv_id),
        workers=t.integer("workers", d.workers),
        cpu_limit=t.duration("cpu_limit", d.cpu_limit),
        time_limit=t.duration("time_limit", d.time_limit),
    )
    t.finish()
    return checks


def _routes(t: _Table) -> tuple[tuple[str, str], ...]:
    routes = tuple((domain, t.choice(domain, "", tuple(Route))) for domain in list(t.data))
    t.finish()
    return routes


def _pickup(t: _Table) -> PickupConfig:
    enabled = t.boolean("enabled", False) if "enabled" in t.data else None
    t.finish()
    return PickupConfig(enabled=enabled)


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
    """Cross-field rules: TLS needs both files, submission and smtps need TLS."""
    smtp = config.smtp
    if bool(smtp.tls_cert) != bool(smtp.tls_key):
        raise ConfigError(f"{where}: smtp.tls_cert and smtp.tls_key go together")
    if smtp.smtps_listen and not smtp.tls_cert:
        raise ConfigError(f"{where}: smtp.smtps_listen needs smtp.tls_cert and smtp.tls_key")
    if smtp.submission_listen and not config.auth.users_file:
        raise ConfigError(f"{where}: smtp.submission_listen needs auth.users_file")
    if smtp.max_message_size <= 0 or smtp.max_recipients <= 0:
        raise ConfigError(f"{where}: smtp.max_message_size and max_recipients must be > 0")
    if smtp.max_errors < 0 or smtp.max_junk_commands < 0 or smtp.max_sessions <= 0:
        raise ConfigError(
            f"{where}: smtp.max_errors and max_junk_commands must be >= 0, max_sessions > 0"
        )
    if smtp.max_sessions_per_source is not None and smtp.max_sessions_per_source < 0:
        raise ConfigError(f"{where}: smtp.max_sessions_per_source must be >= 0 (0: no limit)")
    if smtp.max_header_size <= 0 or smtp.max_header_fields <= 0 or smtp.min_data_rate < 0:
        raise ConfigError(
            f"{where}: smtp.max_header_size and max_header_fields must be > 0, min_data_rate >= 0"
        )
    if config.auth.max_failures <= 0:
        raise ConfigError(f"{where}: auth.max_failures must be > 0")
    checks = config.checks
    if checks.workers <= 0 or checks.cpu_limit <= 0 or checks.time_limit <= 0:
        raise ConfigError(f"{where}: checks.workers, cpu_limit and time_limit must be > 0")
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
    if local.command_timeout <= 0:
        return "local.command_timeout must be > 0"
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
    """Routes that name a way of delivery that is not set up, and bad ports."""
    used = {route for _key, route in config.routes} | {config.delivery.effective_mode}
    if Route.LOCAL in used and not config.local.enabled:
        return "a route is local but there is no [local] table"
    if (
        Route.SMARTHOST in {route for _key, route in config.routes}
        and not config.delivery.smarthost
    ):
        return "a route is smarthost but delivery.smarthost is not set"
    for name, port in (("dns.port", config.dns.port), ("mx.port", config.mx.port)):
        if not 0 < port < 65536:
            return f"{name} {port} out of range"
    if not 0 < config.mx.https_port < 65536:
        return f"mx.https_port {config.mx.https_port} out of range"
    return None


class _Table:
    """Typed reads from one TOML table that remember which keys were used."""

    def __init__(self, data: object, where: str, name: str = "") -> None:
        if not isinstance(data, dict):
            raise ConfigError(f"{where}: {name or 'top level'} must be a table")
        self.data: dict[str, Any] = data
        self.where = where
        self.name = name
        self.used: set[str] = set()

    def _key(self, key: str) -> str:
        return f"{self.name}.{key}" if self.name else key

    def _get(self, key: str, kind: type | tuple[type, ...], what: str) -> Any:
        self.used.add(key)
        value = self.data[key]
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise ConfigError(f"{self.where}: {self._key(key)} must be {what}")
        return value

    def string(self, key: str, default: str) -> str:
        return str(self._get(key, str, "a string")) if key in self.data else default

    def done_string(self, key: str, default: str) -> str:
        value = self.string(key, default)
        self.finish()
        return value

    def integer(self, key: str, default: int) -> int:
        value = self.optional_integer(key)
        return default if value is None else value

    def optional_integer(self, key: str) -> int | None:
        return int(self._get(key, int, "an integer")) if key in self.data else None

    def duration(self, key: str, default: float) -> float:
        if key not in self.data:
            return default
        self.used.add(key)
        return parse_duration(self.data[key], f"{self.where}: {self._key(key)}")

    def boolean(self, key: str, default: bool) -> bool:
        return bool(self._get(key, bool, "true or false")) if key in self.data else default

    def choice(self, key: str, default: str, allowed: tuple[str, ...]) -> str:
        value = self.string(key, default)
        if value not in allowed:
            raise ConfigError(f"{self.where}: {self._key(key)} must be one of {', '.join(allowed)}")
        return value

    def strings(self, key: str, default: tuple[str, ...]) -> tuple[str, ...]:
        if key not in self.data:
            return default
        value = self._get(key, (list, str), "a list of strings")
        items = [value] if isinstance(value, str) else value
        if not all(isinstance(v, str) for v in items):
            raise ConfigError(f"{self.where}: {self._key(key)} must be a list of strings")
        return tuple(items)

    def table(self, key: str) -> _Table:
        self.used.add(key)
        return _Table(self.data.get(key, {}), self.where, self._key(key))

    def finish(self) -> None:
        """Refuse keys nobody asked for: they are typos or options we do not have."""
        unknown = sorted(set(self.data) - self.used)
        if unknown:
            raise ConfigError(f"{self.where}: unknown key {self._key(unknown[0])!r}")
