"""The ``leafmail`` command.

``serve`` accepts mail by SMTP, spools it durably and (with a smarthost) delivers it;
``flush`` delivers everything now; ``queue``, ``show``, ``delete``, ``hold`` and
``release`` look after the spool; ``passwd USER`` prints a users-file line for SMTP AUTH;
``sendmail`` is the sendmail(8) command (also run by that name, e.g. through a symlink).
Configuration comes from ``--config``, else ``$LEAFMAIL_CONFIG``, else the default
location; flags beat LEAFMAIL_* variables, which beat the file. Errors print one line and
exit with a sysexits code.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import getpass
import json
import os
import sys
from collections.abc import Callable, Sequence

from netserver.cli import UsageParser, add_runtime_flags, exit_status
from netserver.connlog import ServerLog
from netserver.errors import EX_OK, CantCreateError, NetserverError, UsageError
from netserver.readiness import ready_fd_writer
from netserver.server import loop_factory

from . import config as configuration
from . import control, sendmail, tools
from .auth import hash_password
from .daemon import Daemon
from .flush import flush
from .spool import Spool
from .spoolcheck import check_spool

PROG = "leafmail"


def build_parser() -> argparse.ArgumentParser:
    parser = UsageParser(
        prog=PROG,
        description="leafmail: a durable store-and-forward mail spooler.",
        epilog="Exit codes: 0 ok, 64 usage, 65 bad data (e.g. a malformed queue id), "
        "67 no such message, 69 unavailable, 75 temporary failure (mail still queued), "
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
        help="accept mail by SMTP, spool it, and deliver it as [delivery] says",
        description="Accept mail by SMTP and spool it; each message is on disk (fsync'd) "
        "before the client gets its 250. Never an open relay: mail for other domains is "
        "taken only from relay_networks (default loopback) or authenticated clients. "
        "With delivery.mode smarthost or mx it also delivers, retrying on a schedule; "
        "offline it delivers only locally and waits for `leafmail flush`.",
    )
    s.add_argument(
        "--listen",
        action="append",
        metavar="HOST:PORT",
        help="SMTP listener, repeatable (default 127.0.0.1:2525)",
    )
    s.add_argument("--hostname", help="this server's name in the greeting and Received headers")
    s.add_argument(
        "--offline",
        action="store_true",
        help="only spool; deliver when `leafmail flush` says so (delivery.mode = offline)",
    )
    add_runtime_flags(s)
    f = sub.add_parser(
        "flush",
        parents=[common],
        help="deliver everything queued now",
        description="Deliver every queued and deferred message now, ignoring retry times "
        "(run it from a network-up hook). If a leafmail daemon runs on the spool it does "
        "the work; otherwise flush delivers by itself. Exit 0 when nothing is left "
        "deferred, 75 when something is (it stays queued and will be retried).",
    )
    f.add_argument(
        "--smarthost", metavar="HOST:PORT", help="deliver here (over delivery.smarthost)"
    )
    f.add_argument("--tls", choices=configuration.TLS_MODES, help="over delivery.tls")
    f.add_argument("--ca-file", metavar="FILE", help="CA certificates to verify the smarthost")
    f.add_argument(
        "--no-daemon",
        action="store_true",
        help="deliver in this process even if a daemon runs "
        "(implied by --smarthost, --tls and --ca-file)",
    )
    q = sub.add_parser(
        "queue",
        parents=[common],
        help="list queued mail (like mailq)",
        description="List every message in the spool: id, state (active, deferred, held, "
        "corrupt), size, age, sender, each recipient's state and the last error.",
    )
    q.add_argument("--json", action="store_true", help="print a JSON list instead")
    sh = sub.add_parser(
        "show",
        parents=[common],
        help="print a message's envelope, status and content",
        description="Print the envelope and delivery status (as JSON), a blank line, then "
        "the message exactly as spooled.",
    )
    sh.add_argument("id")
    sh.add_argument("--envelope", action="store_true", help="only the envelope and status")
    for name, what in (
        ("delete", "remove messages from the spool (no bounce is sent)"),
        ("hold", "hold messages: they stay queued but are not delivered"),
        ("release", "release held messages for delivery now"),
    ):
        tool = sub.add_parser(
            name, parents=[common], help=what, description=what.capitalize() + "."
        )
        tool.add_argument("ids", nargs="+", metavar="ID")
    p = sub.add_parser(
        "passwd",
        help="print a users-file line for SMTP AUTH",
        description="Read a password (from the terminal, or one line of stdin) and print "
        "USER:HASH for auth.users_file. The password itself is never stored.",
    )
    p.add_argument("user")
    sm = sub.add_parser(
        "sendmail",
        add_help=False,
        help="submit a message like sendmail(8) (-t, -i, -f, -bs, -bp, -q ...)",
        description="sendmail(8)-compatible submission: into the spool if it is this "
        "user's, else through the running daemon's submission socket. "
        "Run `leafmail sendmail --help` for its options.",
    )
    # Never parsed here: main() hands sendmail's getopt-style words over before argparse.
    sm.add_argument("words", nargs=argparse.REMAINDER)
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
    config = _config(args)
    if args.offline:
        config = dataclasses.replace(
            config, delivery=dataclasses.replace(config.delivery, mode="offline")
        )
    daemon = Daemon(
        config,
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


def cmd_flush(args: argparse.Namespace) -> int:
    config = _config(args)
    delivery = config.delivery
    if args.smarthost:
        delivery = dataclasses.replace(delivery, smarthost=args.smarthost)
    if args.tls:
        delivery = dataclasses.replace(delivery, tls=args.tls)
    if args.ca_file:
        delivery = dataclasses.replace(delivery, ca_file=args.ca_file)
    alone = args.no_daemon or bool(args.smarthost or args.tls or args.ca_file)
    return flush(dataclasses.replace(config, delivery=delivery), use_daemon=not alone)


def _spool(args: argparse.Namespace) -> Spool:
    config = _config(args)
    try:
        check_spool(config.spool, os.geteuid(), create=False)  # the daemon's user: see daemon
        return Spool(config.spool, create=False)
    except FileNotFoundError:
        raise CantCreateError(f"no leafmail spool at {config.spool}") from None


def cmd_queue(args: argparse.Namespace) -> int:
    entries = tools.list_queue(_spool(args))
    if args.json:
        print(json.dumps([e.to_json() for e in entries], indent=2))
    else:
        sys.stdout.write(tools.format_queue(entries))
    return EX_OK


def cmd_show(args: argparse.Namespace) -> int:
    info, data = tools.show(_spool(args), args.id)
    sys.stdout.write(json.dumps(info, indent=2) + "\n")
    if not args.envelope:
        sys.stdout.flush()
        sys.stdout.buffer.write(b"\n" + data)
    return EX_OK


DONE = {"delete": "deleted", "hold": "held", "release": "released"}


def cmd_change(args: argparse.Namespace) -> int:
    """delete / hold / release each id; every id is tried, the first failure sets the exit."""
    spool = _spool(args)
    action: Callable[[Spool, str], bool | None] = {
        "delete": tools.delete,
        "hold": tools.hold,
        "release": tools.release,
    }[args.command]
    status = EX_OK
    released = False
    for qid in args.ids:
        try:
            changed = action(spool, qid)
        except NetserverError as exc:
            print(f"{PROG}: {exc}", file=sys.stderr)
            status = status or exc.exit_code
            continue
        if changed is False:
            print(f"{qid}: {'already held' if args.command == 'hold' else 'not held'}")
        else:
            print(f"{qid}: {DONE[args.command]}")
            released = released or args.command == "release"
    if released:  # a running daemon takes released mail at once, not at its next scan
        control.wake(spool.control_path)
    return status


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "serve": cmd_serve,
    "flush": cmd_flush,
    "queue": cmd_queue,
    "show": cmd_show,
    "delete": cmd_change,
    "hold": cmd_change,
    "release": cmd_change,
    "passwd": cmd_passwd,
}


def main(argv: Sequence[str] | None = None) -> int:
    if argv is None and os.path.basename(sys.argv[0]) == "sendmail":
        return sendmail.main(sys.argv[1:], prog="sendmail")  # installed as sendmail
    words = list(sys.argv[1:] if argv is None else argv)
    if words[:1] == ["sendmail"]:  # argparse cannot parse -fADDR, -oi, -bs and friends
        return sendmail.main(words[1:], prog="leafmail sendmail")
    args = build_parser().parse_args(words)
    return exit_status(PROG, lambda: COMMANDS[args.command](args))


if __name__ == "__main__":
    sys.exit(main())
