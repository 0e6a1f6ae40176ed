"""The ``run`` and ``import-inetd`` subcommands of ``netserver``, and ``serve --user``.

Kept out of cli.py so the inetd replacement is one import there; the flags shared with
``serve`` (--log-format, --loop, --ready-fd) come from `add_runtime_flags`.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable

from .. import errors, privileges
from ..connlog import ServerLog
from ..endpoint import Endpoint
from ..readiness import ready_fd_writer
from ..server import Server
from ..usage import add_quiet_flag
from .conf_import import ImportOptions, import_inetd, read_services, render
from .supervisor import run_config

COMMANDS = ("run", "import-inetd")


def add_inetd_commands(
    sub: argparse._SubParsersAction,  # type: ignore[type-arg]
    add_runtime_flags: Callable[[argparse._ActionsContainer], None],
) -> None:
    """Add ``run CONFIG.toml`` and ``import-inetd FILE`` to the subcommands."""
    r = sub.add_parser(
        "run",
        help="run many services from one TOML file (like inetd/xinetd)",
        description="Bind every [[service]] in CONFIG.toml, then run each in its own "
        "process as its user; a crashed service is restarted, one that cannot start does "
        "not stop the others. HUP re-reads CONFIG.toml: new services start, removed ones stop, "
        "changed ones restart (open connections finish), unchanged ones keep running; a file "
        "that does not load changes nothing. TERM/INT stop every service. Durations "
        '(timeout, cps_wait) are seconds or a string with a unit: "30s", "5m", "1h", "1d", '
        "read as leafmail reads its own.",
        epilog="Exit codes: 0 ok, 64 usage, 69 nothing could be bound, 78 configuration.",
    )
    r.add_argument("config", metavar="CONFIG.toml", help="the services")
    logging = r.add_argument_group("logging and start-up")
    add_runtime_flags(logging)
    add_quiet_flag(logging, "; for every service ('quiet = true' in a [[service]]: for that one)")
    i = sub.add_parser(
        "import-inetd",
        help="print an inetd.conf as netserver run TOML",
        description="Convert TCP nowait services (tcpd-wrapped ones with their "
        "hosts.allow/hosts.deny) to [[service]] tables on stdout; warn about what is skipped.",
        epilog="Exit codes: 0 ok (skipped lines are only warned about), 64 usage, "
        "78 a file that cannot be read.",
    )
    i.add_argument("file", metavar="FILE", help="the inetd.conf to read")
    i.add_argument("--services", metavar="FILE", help="services(5) file for port names")
    i.add_argument(
        "--hosts-allow",
        default="/etc/hosts.allow",
        metavar="FILE",
        help="the tcpd rules of the wrapped services (default /etc/hosts.allow)",
    )
    i.add_argument(
        "--hosts-deny",
        default="/etc/hosts.deny",
        metavar="FILE",
        help="and their deny rules (default /etc/hosts.deny)",
    )


def add_user_flags(p: argparse.ArgumentParser) -> None:
    """``serve --user U --group G``: drop root once the sockets are bound."""
    g = p.add_argument_group("privileges")
    g.add_argument("--user", metavar="USER", help="after binding, run as this user (needs root)")
    g.add_argument("--group", metavar="GROUP", help="and this group (default: the user's)")


def drop_for_serve(args: argparse.Namespace, server: Server) -> None:
    """Bind as we are, then become --user/--group (no-op without them)."""
    if args.user is None:
        if args.group is not None:
            raise errors.UsageError("--group needs --user")
        return
    identity = privileges.resolve(args.user, args.group)
    server.bind()
    privileges.drop(identity)


def run_inetd_command(args: argparse.Namespace) -> int:
    """Dispatch ``run`` or ``import-inetd``."""
    if args.command == "run":
        return _cmd_run(args)
    return _cmd_import(args)


def _cmd_run(args: argparse.Namespace) -> int:
    keep_out = [args.ready_fd] if args.ready_fd is not None else []
    writer = ready_fd_writer(args.ready_fd)

    def ready(addresses: list[Endpoint]) -> None:
        keep_out.clear()  # closed now: its number may be reused
        if writer is not None:
            writer(addresses)

    log = ServerLog(json_lines=args.log_format == "json", connections=not args.quiet)
    return run_config(args.config, log, args.loop, ready, keep_out)


def _cmd_import(args: argparse.Namespace) -> int:
    services = read_services(args.services) if args.services else None
    options = ImportOptions(args.hosts_allow, args.hosts_deny, services)
    result = import_inetd(args.file, options)
    for warning in result.warnings:
        print(f"netserver: {warning}", file=sys.stderr)
    sys.stdout.write(render(result, os.path.abspath(args.file)))
    return errors.EX_OK
