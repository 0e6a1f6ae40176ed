"""The ``netserver`` command: ``serve`` a handler or a command, ``check`` access rules.

``check ADDRESS`` judges the --allow/--deny rules; ``check DAEMON CLIENT`` prints what
tcpdmatch(8) would for hosts.allow/hosts.deny (and exits 0 whatever the verdict).

Errors in flags, addresses, rules or handlers print one line and exit with a sysexits
code (64 usage, 78 configuration); nothing prints a traceback at the user.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import math
import ssl
import sys
from collections.abc import Callable, Iterator, Sequence

from . import errors
from .admit.access import AccessPolicy
from .connlog import ServerLog
from .endpoint import unmap
from .gates import standard_gates
from .handlers import Command, Handler, cwd_searched_last, load_handler
from .inetd.cli import COMMANDS as INETD_COMMANDS
from .inetd.cli import add_inetd_commands, add_user_flags, drop_for_serve, run_inetd_command
from .limits import Limits
from .listen.tls import load_context
from .modes.prefork import PoolSize
from .readiness import ready_fd_writer
from .refusals import MAX_LINE_OCTETS, per_cause, refusal_problem
from .resolver import Resolver, SystemResolver, confirmed_names
from .server import MODES, ModeSpec, RunOptions, Server
from .tcpd.access import DEFAULT_ALLOW, DEFAULT_DENY, HostsAccess, HostsLoader, load_hosts
from .tcpd.check import check_lines
from .tcpd.envnames import NameOptions
from .tcpd.names import ResolverNames
from .usage import UsageParser, add_quiet_flag, add_runtime_flags, count, exit_status

PROG = "netserver"


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} must not be negative")
    return value


def _seconds(text: str) -> float:
    """A wait that must be more than nothing (0 would mean no wait at all: a fork loop)."""
    value = _positive_float(text)
    if not math.isfinite(value):  # (nan passed the test below and inf never ends)
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds")
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be more than 0")
    return value


_REFUSAL_FLAGS = (
    ("--refuse-message", "the line for every refusal, unless its cause has a line below"),
    (
        "--refuse-limit",
        "the line when a limit refuses (--max-per-source, --rate-per-source), "
        "e.g. '421 4.7.0 too many connections, try later'",
    ),
    (
        "--refuse-access",
        "the line when a rule refuses (--allow/--deny, --access-file, hosts.allow/"
        "hosts.deny), e.g. '554 5.7.1 access denied'",
    ),
    (
        "--refuse-error",
        "the line when the server cannot decide or serve (a failed access check, no "
        "process to run the command), e.g. '421 4.3.0 try again later'",
    ),
)


def _refusal_line(text: str) -> str:
    """A refusal line as given, or a usage error saying why it cannot be one."""
    problem = refusal_problem(text)
    if problem is not None:
        raise argparse.ArgumentTypeError(problem)
    return text


def _add_refusal_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group(
        "refusal lines (sent to a refused client before the close; default: none)",
        f"Each is UTF-8 text of at most {MAX_LINE_OCTETS} octets with no control "
        "character but CR, LF and TAB; CRLF is added.",
    )
    for flag, text in _REFUSAL_FLAGS:
        g.add_argument(flag, metavar="TEXT", type=_refusal_line, help=text)


def _add_access_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group(
        "access control (deny rules first; then, if any allow rule exists, one must match)"
    )
    g.add_argument(
        "--allow",
        action="append",
        default=[],
        metavar="SPEC",
        help="allow clients matching SPEC: 192.0.2.7, 10.0.0.0/8, [2001:db8::]/32, "
        "host.example.com, .example.com, ALL",
    )
    g.add_argument(
        "--deny", action="append", default=[], metavar="SPEC", help="refuse clients matching SPEC"
    )
    g.add_argument(
        "--access-file",
        metavar="FILE",
        help="more rules, one per line: 'allow SPEC ...' or 'deny SPEC ...'; re-read on SIGHUP",
    )
    g.add_argument(
        "--dns-server",
        metavar="IP[:PORT]",
        help="resolve client names with this DNS server instead of the system resolver",
    )


def _add_hosts_flags(p: argparse.ArgumentParser, defaults: str) -> None:
    g = p.add_argument_group(
        "hosts.allow / hosts.deny (hosts_access(5), as tcpd; checked after --allow/--deny)"
    )
    g.add_argument(
        "--hosts-allow",
        metavar="FILE",
        help=f"grant access to clients a rule matches; re-read on SIGHUP ({defaults})",
    )
    g.add_argument(
        "--hosts-deny",
        metavar="FILE",
        help=f"then deny access to clients a rule matches; else grant ({defaults})",
    )


def _add_name_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group(
        "host names for commands (TCPREMOTEHOST, TCPLOCALHOST; set only when known)"
    )
    g.add_argument(
        "--lookup-names",
        action="store_true",
        help="look up the client's and the local address's names per connection, "
        "forward-confirmed (as tcpserver -h -p; the default is no lookup, as tcpserver -H); "
        "asks --dns-server if given. A name an access rule confirmed is always passed on",
    )
    g.add_argument(
        "--local-name",
        metavar="NAME",
        help="TCPLOCALHOST for every connection, without a lookup (as tcpserver -l)",
    )


def _add_tls_proxy_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("TLS termination and PROXY protocol")
    g.add_argument("--tls-cert", metavar="FILE", help="serve TLS with this certificate chain")
    g.add_argument("--tls-key", metavar="FILE", help="the key for --tls-cert (both reload on HUP)")
    g.add_argument(
        "--proxy-from",
        action="append",
        default=[],
        metavar="SPEC",
        help="clients at SPEC (address or network; repeatable) must start with a PROXY "
        "v1/v2 header, and are then seen as the client it names",
    )


def _tls_loader(args: argparse.Namespace) -> Callable[[], ssl.SSLContext] | None:
    """A loader for --tls-cert/--tls-key (re-run on SIGHUP), or None without them."""
    cert, key = args.tls_cert, args.tls_key
    if cert is None and key is None:
        return None
    if cert is None or key is None:
        raise errors.UsageError("give both --tls-cert and --tls-key")
    return lambda: load_context(cert, key)


def build_parser() -> argparse.ArgumentParser:
    parser = UsageParser(
        prog=PROG,
        description="Write a TCP server as a function that reads stdin and writes stdout, "
        "or run a command per connection (like inetd, tcpserver).",
        epilog="Each command's --help says more. Exit codes (sysexits): 0 ok, 64 usage, "
        "69 unavailable (e.g. an address that cannot be bound), 78 configuration; "
        "`check ADDRESS` exits 1 for a refused client.",
    )
    sub = parser.add_subparsers(dest="command", required=True, parser_class=UsageParser)
    s = sub.add_parser(
        "serve",
        help="serve a Python handler or a command",
        description="Serve connections with a Python handler (--handler MODULE:CALLABLE) or with "
        "a command given after '--', run once per connection with the socket on stdin/stdout "
        "and the ucspi-tcp environment (PROTO, TCPREMOTEIP, ...).",
        epilog="examples:\n  netserver serve --listen 127.0.0.1:7000 --handler examples.echo:main\n"
        "  netserver serve --listen :7000 --allow 10.0.0.0/8 -- /bin/cat\n"
        "Signals: TERM/INT stop gracefully (twice: at once), HUP reloads access rules and TLS.\n"
        "Exit codes: 0 ok, 64 usage, 69 unavailable, 78 configuration.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    s.add_argument(
        "--listen",
        action="append",
        metavar="ADDR",
        help="HOST:PORT, [IPV6]:PORT, :PORT (all, dual stack), unix:PATH, fd:N or systemd; "
        "repeatable (default 127.0.0.1:7000)",
    )
    s.add_argument(
        "--mode",
        choices=MODES,
        help="fork (default), prefork, thread, or async (for async handlers, the default for them)",
    )
    s.add_argument(
        "--handler", metavar="MODULE:CALLABLE", help="the Python handler to run per connection"
    )
    _add_access_flags(s)
    _add_hosts_flags(s, "default: not used")
    _add_name_flags(s)
    s.add_argument(
        "--daemon-name",
        metavar="NAME",
        help="the daemon name hosts.allow/hosts.deny rules see (default: the command's "
        "basename, or the handler's module)",
    )
    _add_refusal_flags(s)
    _add_tls_proxy_flags(s)
    lim = s.add_argument_group("limits")
    lim.add_argument(
        "--max-conns",
        type=count,
        default=1024,
        metavar="N",
        help="connections at once; more wait in the backlog (default 1024, 0 = no limit)",
    )
    lim.add_argument(
        "--max-per-source",
        type=count,
        default=0,
        metavar="N",
        help="connections at once from one address (default no limit)",
    )
    lim.add_argument(
        "--rate-per-source",
        type=_positive_float,
        default=0.0,
        metavar="PER_SEC",
        help="new connections per second from one address (default no limit)",
    )
    lim.add_argument(
        "--timeout",
        type=_positive_float,
        default=300.0,
        metavar="SECONDS",
        help="close a connection idle this long (default 300, 0 = never)",
    )
    lim.add_argument(
        "--max-line",
        type=count,
        default=65536,
        metavar="BYTES",
        help="longest line a handler may read (default 65536)",
    )
    lim.add_argument(
        "--restart-max",
        type=_seconds,
        default=None,
        metavar="SECONDS",
        help="longest wait before starting again worker or spawner processes that keep "
        "dying young; the wait doubles with each such death up to this (default 30 for "
        "--workers, 5 for a command's spawners, which refuse clients meanwhile)",
    )
    lim.add_argument(
        "--grace",
        type=_positive_float,
        default=10.0,
        metavar="SECONDS",
        help="how long a stop waits for running connections (default 10)",
    )
    s.add_argument(
        "--workers",
        type=count,
        default=0,
        metavar="N",
        help="async mode: serve in N worker processes, one event loop each, so a handler "
        "uses N cores; the supervisor still applies every limit (default 0: one process)",
    )
    pre = s.add_argument_group("prefork pool")
    pre.add_argument(
        "--workers-min",
        type=count,
        default=2,
        metavar="N",
        help="workers kept running (default 2)",
    )
    pre.add_argument(
        "--workers-max",
        type=count,
        default=32,
        metavar="N",
        help="most workers under load (default 32)",
    )
    pre.add_argument(
        "--recycle",
        type=count,
        default=1000,
        metavar="N",
        help="replace a worker after N connections (default 1000)",
    )
    logging = s.add_argument_group("logging and start-up")
    add_runtime_flags(logging)
    add_quiet_flag(logging)
    add_user_flags(s)

    c = sub.add_parser(
        "check",
        help="show the access decision for an address (like tcpdmatch)",
        description="With one argument, print whether the client address would be allowed "
        "by --allow/--deny/--access-file, and the rule that decides; exit 0 if allowed, "
        "1 if refused. With DAEMON[@SERVER] and [USER@]CLIENT, print what tcpdmatch(8) "
        "would for hosts.allow and hosts.deny (a client address is judged as if its name "
        "lookup failed, unless --name gives the name) and exit 0.",
        usage="%(prog)s [options] address\n       %(prog)s [options] DAEMON[@SERVER] [USER@]CLIENT",
    )
    _add_access_flags(c)
    _add_hosts_flags(c, f"default: {DEFAULT_ALLOW}, {DEFAULT_DENY}")
    c.add_argument(
        "--name",
        action="append",
        default=[],
        metavar="NAME",
        help="treat NAME as the client's confirmed host name (skips the DNS lookup)",
    )
    c.add_argument("address", help="client IP address (or DAEMON, with CLIENT after it)")
    c.add_argument("client", nargs="?", help=argparse.SUPPRESS)
    add_inetd_commands(sub, add_runtime_flags)
    return parser


def _split_command(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    args = list(argv)
    if "--" in args:
        i = args.index("--")
        return args[:i], args[i + 1 :]
    return args, []


def _resolver(spec: str | None) -> Resolver:
    """--dns-server if given (dnspython is loaded only then), else the system resolver."""
    if not spec:
        return SystemResolver()
    host, port = _dns_server(spec)
    with _needs_dnspython():
        from .dnsresolver import DnsResolver

    return DnsResolver([host], port)


@contextlib.contextmanager
def _needs_dnspython() -> Iterator[None]:
    """--dns-server needs dnspython, an optional dependency (netserver[dns]): without it,
    one line that says what to install (exit 69), not an ImportError traceback."""
    try:
        yield
    except ModuleNotFoundError as exc:
        if exc.name is None or exc.name.partition(".")[0] != "dns":
            raise
        raise errors.UnavailableError(
            "--dns-server needs dnspython: pip install 'netserver[dns]'"
        ) from None


def _dns_server(spec: str) -> tuple[str, int]:
    host, _, port = spec.rpartition(":") if spec.count(":") == 1 else (spec, "", "53")
    if not port.isdigit():
        raise errors.UsageError(f"--dns-server {spec!r}: expected IP or IP:PORT")
    return host.strip("[]"), int(port)


def _hosts_loader(args: argparse.Namespace) -> HostsLoader | None:
    """A loader for --hosts-allow/--hosts-deny, or None when neither is given."""
    allow, deny = args.hosts_allow, args.hosts_deny
    if allow is None and deny is None:
        return None
    return lambda: load_hosts(allow, deny)


def _access_loader(args: argparse.Namespace) -> AccessPolicy:
    policy = AccessPolicy(args.allow, args.deny)
    if args.access_file:
        policy = policy.merged(AccessPolicy.from_file(args.access_file))
    return policy


def _handler(args: argparse.Namespace, command: list[str]) -> Handler:
    if command and args.handler:
        raise errors.UsageError("give either --handler or a command after '--', not both")
    if command:
        return Command(tuple(command))
    if args.handler:
        return load_handler(args.handler)
    raise errors.UsageError("nothing to serve: give --handler MODULE:CALLABLE or '-- COMMAND ...'")


def cmd_serve(args: argparse.Namespace, command: list[str]) -> int:
    handler = _handler(args, command)
    limits = Limits(
        max_conns=args.max_conns,
        max_per_source=args.max_per_source,
        rate_per_source=args.rate_per_source,
        timeout=args.timeout or None,
        max_line=args.max_line or 65536,
        grace=args.grace,
        restart_max=args.restart_max,
    )
    pool = PoolSize(
        max(1, args.workers_min), max(1, args.workers_max, args.workers_min), max(1, args.recycle)
    )
    hosts = _hosts_loader(args)
    resolver = _resolver(args.dns_server)
    gates = standard_gates(
        handler,
        lambda: _access_loader(args),
        resolver=resolver,
        proxy_from=args.proxy_from,
        hosts=hosts,
        daemon_name=args.daemon_name,
        host_names=ResolverNames(resolver) if hosts or args.lookup_names else None,
        names=NameOptions(args.lookup_names, args.local_name),
    )
    server = Server(
        handler,
        args.listen or ["127.0.0.1:7000"],
        mode=ModeSpec(args.mode, pool, args.workers),
        gates=gates,
        tls=_tls_loader(args),
        limits=limits,
        log=ServerLog(json_lines=args.log_format == "json", connections=not args.quiet),
        options=RunOptions(
            loop=args.loop,
            on_ready=ready_fd_writer(args.ready_fd),
            refuse_message=per_cause(
                args.refuse_message,
                limit=args.refuse_limit,
                access=args.refuse_access,
                error=args.refuse_error,
            ),
        ),
    )
    drop_for_serve(args, server)
    server.run()
    return errors.EX_OK


def cmd_check(args: argparse.Namespace) -> int:
    if args.client is not None:
        return cmd_check_hosts(args)
    if args.hosts_allow is not None or args.hosts_deny is not None:
        raise errors.UsageError("with --hosts-allow/--hosts-deny, give DAEMON and CLIENT")
    policy = _access_loader(args)
    try:
        ip = unmap(ipaddress.ip_address(args.address.strip("[]")))
    except ValueError:
        raise errors.UsageError(f"{args.address!r} is not an IP address") from None
    names: frozenset[str] | None = frozenset(n.lower().rstrip(".") for n in args.name)
    if not names and policy.needs_names(ip):
        names = asyncio.run(confirmed_names(_resolver(args.dns_server), ip))
    names = names or frozenset()  # none confirmed, or DNS could not tell
    decision = policy.decide(ip, names)
    verdict = "allowed" if decision.allowed else "refused"
    print(f"client: {ip}" + (f" ({', '.join(sorted(names))})" if names else ""))
    print(f"{verdict}: {decision.reason}")
    return 0 if decision.allowed else 1


def cmd_check_hosts(args: argparse.Namespace) -> int:
    """tcpdmatch-style: the --allow/--deny verdict first (if any rule), then the files."""
    hosts: HostsAccess = load_hosts(
        args.hosts_allow or DEFAULT_ALLOW, args.hosts_deny or DEFAULT_DENY
    )
    policy = _access_loader(args)
    names = ResolverNames(_resolver(args.dns_server))
    lines = check_lines(hosts, args.address, args.client, names, args.name)
    if policy.allow or policy.deny:
        ip = _client_ip(args.client)
        decision = policy.decide(ip, frozenset(n.lower().rstrip(".") for n in args.name))
        if not decision.allowed:
            lines = [line for line in lines if not line.startswith(("matched:", "option:"))]
            lines[-1:] = [f"rules:    {decision.reason}", "access:   denied"]
    print("\n".join(lines))
    return errors.EX_OK


def _client_ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The address part of [USER@]CLIENT if it is an address (for --allow/--deny)."""
    host = text.rpartition("@")[2].strip("[]")
    try:
        return unmap(ipaddress.ip_address(host))
    except ValueError:
        return None


def main(argv: Sequence[str] | None = None) -> int:
    cwd_searched_last()  # before anything is imported lazily (uvloop, dnspython)
    own, command = _split_command(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(own)

    def dispatch() -> int:
        if args.command == "serve":
            return cmd_serve(args, command)
        if command:
            raise errors.UsageError("'--' COMMAND is only for 'serve'")
        if args.command in INETD_COMMANDS:
            return run_inetd_command(args)
        return cmd_check(args)

    return exit_status(PROG, dispatch)


if __name__ == "__main__":
    sys.exit(main())
