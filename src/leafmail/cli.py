"""The ``leafmail`` command.

``leafmail serve`` accepts mail by SMTP and spools it durably; ``leafmail passwd USER``
prints a users-file line for SMTP AUTH. Configuration comes from ``--config``, else
``$LEAFMAIL_CONFIG``, else the default location; flags beat LEAFMAIL_* variables, which
beat the file. Errors print one line and exit with a sysexits code.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import getpass
import sys
from collections.abc import Sequence

from netserver.cli import UsageParser, add_runtime_flags
from netserver.connlog import ServerLog
from netserver.errors import EX_OK, NetserverError, UsageError
from netserver.readiness import ready_fd_writer
from netserver.server import loop_factory

from . import config as configuration
from .auth import hash_password
from .daemon import Daemon

PROG = "leafmail"


def build_parser() -> argparse.ArgumentParser:
    parser = UsageParser(
        prog=PROG,
        description="leafmail: a durable store-and-forward mail spooler.",
        epilog="Exit codes: 0 ok, 64 usage, 69 unavailable, 75 temporary failure, "
        "78 configuration.",
    )
    common = UsageParser(add_help=False)
    common.add_argument(
        "--config",
        metavar="FILE",
        help="TOML config (default: $LEAFMAIL_CONFIG, else ~/.config/leafmail/leafmail.toml)",
    )
    common.add_argument("--spool", metavar="DIR", help="spool directory (over $LEAFMAIL_SPOOL)")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=UsageParser)
    s = sub.add_parser(
        "serve",
        parents=[common],
        help="accept mail by SMTP and spool it",
        description="Accept mail by SMTP and spool it; each message is on disk (fsync'd) "
        "before the client gets its 250. Never an open relay: mail for other domains is "
        "taken only from relay_networks (default loopback) or authenticated clients.",
    )
    s.add_argument(
        "--listen",
        action="append",
        metavar="HOST:PORT",
        help="SMTP listener, repeatable (default 127.0.0.1:2525)",
    )
    s.add_argument("--hostname", help="this server's name in the greeting and Received headers")
    add_runtime_flags(s)
    p = sub.add_parser(
        "passwd",
        help="print a users-file line for SMTP AUTH",
        description="Read a password (from the terminal, or one line of stdin) and print "
        "USER:HASH for auth.users_file. The password itself is never stored.",
    )
    p.add_argument("user")
    return parser


def _config(args: argparse.Namespace) -> configuration.Config:
    config = configuration.load(args.config)
    if args.spool:
        config = dataclasses.replace(config, spool=args.spool)
    hostname = getattr(args, "hostname", None)
    if hostname:
        problem = configuration.hostname_problem(hostname)
        if problem:
            raise UsageError(f"--hostname {hostname!r}: {problem}")
        config = dataclasses.replace(config, hostname=hostname)
    listen = getattr(args, "listen", None)
    if listen:
        config = dataclasses.replace(
            config, smtp=dataclasses.replace(config.smtp, listen=tuple(listen))
        )
    return config


def cmd_serve(args: argparse.Namespace) -> int:
    daemon = Daemon(
        _config(args),
        log=ServerLog(json_lines=args.log_format == "json"),
        on_ready=ready_fd_writer(args.ready_fd),
    )
    with asyncio.Runner(loop_factory=loop_factory(args.loop)) as runner:
        runner.run(daemon.serve())
    return EX_OK


def cmd_passwd(args: argparse.Namespace) -> int:
    if sys.stdin.isatty():
        password = getpass.getpass(f"password for {args.user}: ")
    else:
        password = sys.stdin.readline().rstrip("\r\n")
    if not password:
        raise UsageError("empty password")
    if ":" in args.user or not args.user.isprintable():
        raise UsageError(f"bad user name {args.user!r}")
    print(f"{args.user}:{hash_password(password)}")
    return EX_OK


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "serve":
            return cmd_serve(args)
        return cmd_passwd(args)
    except NetserverError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
