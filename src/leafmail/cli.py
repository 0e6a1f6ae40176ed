"""The ``leafmail`` command.

``serve`` accepts mail by SMTP, spools it durably and (with a smarthost, MX or local
delivery configured) delivers it; ``flush`` delivers everything now; ``queue``, ``show``,
``delete``, ``hold``, ``release``, ``requeue`` and ``qshape`` look after the spool;
``passwd USER`` prints a users-file line for SMTP AUTH; ``sendmail`` is the sendmail(8)
command; ``newaliases`` checks the aliases file. Run by
the name ``sendmail``, ``mailq`` or ``newaliases`` (a symlink to leafmail, as Postfix
installs them), it is that command. Configuration comes from ``--config``, else
``$LEAFMAIL_CONFIG``, else the default location; flags beat LEAFMAIL_* variables, which
beat the file. Errors print one line and exit with a sysexits code.

Output that came from elsewhere (smarthost replies, envelopes, message text on a
terminal) goes through `printable`, so no control sequence reaches the terminal;
``--json`` stays exact. A reader that goes away (``leafmail queue | head``) ends the
command quietly with status 141, as the shell reports for a tool killed by SIGPIPE.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from collections.abc import Callable, Sequence

from netserver.errors import (
    EX_DATAERR,
    EX_OK,
    CantCreateError,
    ConfigError,
    NetserverError,
    UsageError,
)
from netserver.usage import UsageParser, add_runtime_flags, exit_status

from . import config as configuration
from . import control, fanout, listing
from .printable import printable
from .selection import STATE_BY_SHOWN_NAME, Selection
from .spool import Spool
from .spoolcheck import check_spool, spool_owner
from .states import DeliveryMode, QueueState

PROG = "leafmail"
EX_PIPE = 128 + 13  # the status a shell shows for a process killed by SIGPIPE


def build_parser() -> argparse.ArgumentParser:
    parser = UsageParser(
        prog=PROG,
        description="leafmail: a durable store-and-forward mail spooler.",
        epilog="Exit codes: 0 ok, 64 usage, 65 bad data (e.g. a malformed queue id or a "
        "mistake in the aliases file), 67 no such message, 69 unavailable, 73 cannot "
        "create (e.g. no spool), 75 temporary failure (mail still queued), 78 "
        "configuration, 141 the reader of the output went away.",
    )
    common = common_flags()
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
    add_queue_arguments(
        sub.add_parser(
            "queue",
            parents=[common],
            help="list queued mail (also run as mailq)",
            description=QUEUE_DESCRIPTION,
        )
    )
    sub.add_parser(
        "newaliases",
        parents=[common],
        help="check the aliases file (also run as newaliases)",
        description=NEWALIASES_DESCRIPTION,
    )
    sh = sub.add_parser(
        "show",
        parents=[common],
        help="print a message's envelope, status and content",
        description="Print the envelope and delivery status (as JSON), a blank line, then "
        "the message: exactly as spooled when the output is a file or a pipe, with control "
        "characters escaped (\\x1b) when it is a terminal, as ls(1) does. Exit 0, 65 for a "
        "malformed queue id, 67 when no such message is in the spool.",
    )
    sh.add_argument("id", metavar="ID", help="the queue id, as `leafmail queue` lists it")
    sh.add_argument("--envelope", action="store_true", help="only the envelope and status")
    for name, what, states in (
        ("delete", "remove messages from the spool (no bounce is sent)", "active, deferred, held"),
        ("hold", "hold messages: they stay queued but are not delivered", "active, deferred"),
        ("release", "release held messages for delivery now", "held"),
        (
            "requeue",
            "make messages due now with a fresh retry schedule (postsuper -r); "
            "recipients delivered already are not sent to again; held ones are released",
            "active, deferred, held",
        ),
    ):
        tool = sub.add_parser(
            name,
            parents=[common],
            help=what,
            description=what[0].upper() + what[1:] + ". " + SELECT_HELP,
            epilog=f"Examples: leafmail {name} ID ID ...; leafmail {name} ALL; "
            f"leafmail {name} --to @dead.example --older-than 2d; "
            f"leafmail queue --json | jq -r '.[].id' | leafmail {name} -",
        )
        tool.add_argument(
            "ids", nargs="*", metavar="ID", help="queue ids, ALL, or - to read ids from stdin"
        )
        if name == "delete":
            tool.add_argument(
                "--junk",
                action="store_true",
                help="also remove every junk entry (symlinks, stray files) in the spool's "
                "state directories; a symlink is removed itself, never its target",
            )
        add_selection(tool, states)
    qs = sub.add_parser(
        "qshape",
        parents=[common],
        help="the queue by destination domain and age (like Postfix's qshape)",
        description="Count the recipients still to be delivered by domain (rows) and age "
        "(columns: buckets that double, 5, 10, 20 ... minutes, and one for older), with "
        "totals, as Postfix's qshape does. By default active and deferred mail is counted.",
    )
    qs.add_argument("--sender", action="store_true", help="count messages by sender domain instead")
    qs.add_argument(
        "--bucket-minutes",
        type=_positive(float),
        default=5.0,
        metavar="MIN",
        help="the first bucket's length (default 5)",
    )
    qs.add_argument(
        "--buckets",
        type=_positive(int),
        default=10,
        metavar="N",
        help="how many buckets, the last open-ended (default 10)",
    )
    qs.add_argument("--json", action="store_true", help="print JSON instead of a table")
    add_selection(qs, "active, deferred")
    p = sub.add_parser(
        "passwd",
        help="print a users-file line for SMTP AUTH",
        description="Read a password (from the terminal, or one line of stdin) and print "
        "USER:HASH for auth.users_file. The password itself is never stored. Exit 0, 64 "
        "for an empty password or a user name the users file cannot hold.",
    )
    p.add_argument(
        "user",
        metavar="USER",
        help="the AUTH user name: printable, no ':', no blank at either end, not starting with #",
    )
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


QUEUE_DESCRIPTION = (
    "List the messages in the spool: id, state (active, deferred, held, corrupt), size, "
    "age, sender, each recipient's state and the last error. Control characters in them "
    "are shown escaped (\\x1b); --json gives them exactly, JSON-escaped. The listing "
    "streams in directory order (not sorted), as postqueue's does, so it starts at once "
    "and needs little memory however long the queue is. Anything in the spool's state "
    "directories that is not a message file (a symlink, a stray file) is listed as junk "
    "under STATE/NAME and counted apart from the messages in the last line; it is never "
    "followed, and `leafmail delete STATE/NAME` removes it."
)
NEWALIASES_DESCRIPTION = (
    "Check the aliases file named by local.aliases and print how many aliases it has. "
    "leafmail reads the file again whenever it changes, so there is no database to "
    "rebuild: this only finds mistakes before mail does. Exit 0 when it is good, 65 "
    "with FILE:LINE and the problem when it is not, 78 when there is none to check or "
    "it cannot be read."
)


def common_flags() -> UsageParser:
    """The parent parser of every command's --config and --spool."""
    common = UsageParser(add_help=False)
    common.add_argument(
        "--config",
        metavar="FILE",
        help="TOML config (default: $LEAFMAIL_CONFIG, else ~/.config/leafmail/leafmail.toml)",
    )
    common.add_argument("--spool", metavar="DIR", help="spool directory (over $LEAFMAIL_SPOOL)")
    return common


def add_queue_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of `leafmail queue`, which `mailq` shares."""
    parser.add_argument(
        "--json", action="store_true", help="print a JSON array instead, one message a line"
    )
    parser.add_argument(
        "--jobs",
        type=_positive(int),
        metavar="N",
        help="list with N worker processes (default: one per CPU, at most "
        f"{fanout.MAX_WORKERS}; 1 lists in this process)",
    )
    add_selection(parser, "every state")


def _mailq_parser() -> argparse.ArgumentParser:
    """`mailq`, run by that name: `leafmail queue` with the same flags."""
    parser = UsageParser(prog="mailq", description=QUEUE_DESCRIPTION, parents=[common_flags()])
    add_queue_arguments(parser)
    parser.set_defaults(command="queue")
    return parser


def _newaliases_parser() -> argparse.ArgumentParser:
    """`newaliases`, run by that name."""
    parser = UsageParser(
        prog="newaliases", description=NEWALIASES_DESCRIPTION, parents=[common_flags()]
    )
    parser.set_defaults(command="newaliases")
    return parser


SELECT_HELP = (
    "Name messages by queue id, ALL for every message in the default states, - to read "
    "ids from stdin (one a line), or by filters alone: --from, --to, --older-than, "
    "--younger-than, --state (as Postfix's postsuper and exim's exiqgrep). All filters "
    "given must match; a repeated one matches any of its values. Each message gets a "
    "line, then a summary line; the exit status is the first failure's (65 bad id, 67 "
    "no such message), else 0."
)


def add_selection(parser: argparse.ArgumentParser, default_states: str) -> None:
    """The filters shared by queue, qshape and the changing tools (leafmail.selection)."""
    group = parser.add_argument_group("selecting messages")
    group.add_argument(
        "--from",
        dest="senders",
        action="append",
        metavar="ADDR|@DOMAIN",
        help="the sender is ADDR or in DOMAIN; <> for bounces (repeatable)",
    )
    group.add_argument(
        "--to",
        dest="recipients",
        action="append",
        metavar="ADDR|@DOMAIN",
        help="a recipient still to be delivered is ADDR or in DOMAIN (repeatable)",
    )
    group.add_argument(
        "--older-than", metavar="AGE", help="arrived more than AGE ago: 90s, 15m, 2h, 2d, 1w"
    )
    group.add_argument("--younger-than", metavar="AGE", help="arrived less than AGE ago")
    group.add_argument(
        "--state",
        dest="states",
        action="append",
        choices=list(STATE_BY_SHOWN_NAME),
        help=f"only this state (repeatable; default: {default_states})",
    )


def _positive(kind: Callable[[str], float]) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be more than 0: {text!r}")
        return value

    return parse


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


def _serve_config(args: argparse.Namespace) -> configuration.Config:
    config = _config(args)
    if args.offline:
        config = dataclasses.replace(
            config, delivery=dataclasses.replace(config.delivery, mode=DeliveryMode.OFFLINE)
        )
    return config


def cmd_serve(args: argparse.Namespace) -> int:
    # Here, not at the top: the daemon's modules (asyncio, every server mode) would cost
    # each run of `leafmail sendmail` and of the queue tools some 100 ms of CPU.
    import asyncio

    from netserver.connlog import ServerLog
    from netserver.readiness import ready_fd_writer
    from netserver.server import loop_factory

    from .daemon import Daemon

    daemon = Daemon(
        _serve_config(args),
        log=ServerLog(json_lines=args.log_format == "json", program=PROG),
        on_ready=ready_fd_writer(args.ready_fd),
        reload=lambda: _serve_config(args),  # SIGHUP: the same flags over the file again
        loop=args.loop,
    )
    with asyncio.Runner(loop_factory=loop_factory(args.loop)) as runner:
        runner.run(daemon.serve())
    return EX_OK


def cmd_passwd(args: argparse.Namespace) -> int:
    import getpass  # here, as each command's own (termios)

    from .auth import hash_password

    if sys.stdin.isatty():
        password = getpass.getpass(f"password for {args.user}: ")
    else:
        password = sys.stdin.readline().rstrip("\r\n")
    if not password:
        raise UsageError("empty password")
    if not _users_file_name(args.user):
        raise UsageError(f"bad user name {args.user!r}")
    print(f"{args.user}:{hash_password(password)}")
    return EX_OK


def _users_file_name(user: str) -> bool:
    """Whether `user` reads back from a users-file line as itself.

    load_users splits at the first ':', strips the line and skips one that starts with
    '#', so an empty name, a ':', a '#' first or blanks at either end would print a
    line that the daemon refuses, ignores or reads as another name.
    """
    return (
        bool(user)
        and ":" not in user
        and user.isprintable()
        and user == user.strip()
        and not user.startswith("#")
    )


def cmd_flush(args: argparse.Namespace) -> int:
    from .flush import flush  # here, not at the top: the queue tools start faster

    config = _config(args)
    delivery = config.delivery
    if args.smarthost:
        delivery = dataclasses.replace(delivery, smarthost=args.smarthost)
    if args.tls:
        delivery = dataclasses.replace(delivery, tls=args.tls)
    if args.ca_file:
        delivery = dataclasses.replace(delivery, ca_file=args.ca_file)
    alone = args.no_daemon or bool(args.smarthost or args.tls or args.ca_file)
    config = dataclasses.replace(config, delivery=delivery)
    return flush(config.queue, config.spool, config.process, use_daemon=not alone)


def _spool(args: argparse.Namespace) -> Spool:
    config = _config(args)
    try:
        check_spool(config.spool, spool_owner(config.spool, config.process), create=False)
        return Spool(config.spool, create=False)
    except FileNotFoundError:
        raise CantCreateError(f"no leafmail spool at {config.spool}") from None


def _selection(args: argparse.Namespace, default_states: tuple[QueueState, ...]) -> Selection:
    return Selection.build(
        states=args.states,
        default_states=default_states,
        senders=args.senders or (),
        recipients=args.recipients or (),
        older_than=args.older_than,
        younger_than=args.younger_than,
    )


def cmd_queue(args: argparse.Namespace) -> int:
    """Stream the listing; text goes through `printable`, JSON is exact."""
    selection = _selection(args, tuple(QueueState))
    workers = args.jobs or fanout.default_workers()
    out = sys.stdout if args.json else listing.Printable(sys.stdout)
    fanout.write_listing(_spool(args), selection, out, as_json=args.json, workers=workers)
    return EX_OK


def cmd_qshape(args: argparse.Namespace) -> int:
    from . import qshape  # here, as each tool's own: no process of `serve` runs it

    entries = listing.iter_queue(
        _spool(args), _selection(args, (QueueState.QUEUE, QueueState.DEFERRED))
    )
    result = qshape.shape(
        entries, minutes=args.bucket_minutes, count=args.buckets, by_sender=args.sender
    )
    if args.json:
        qshape.write_json(result, sys.stdout)
    else:
        qshape.write_text(result, listing.Printable(sys.stdout))
    return EX_OK


def cmd_show(args: argparse.Namespace) -> int:
    import json

    from . import tools  # here, as each tool's own: no process of `serve` runs it

    info, data = tools.show(_spool(args), args.id)
    head = json.dumps(info, indent=2) + "\n"  # ASCII: JSON escapes the rest
    if args.envelope:
        write_out(head)
    elif sys.stdout.isatty():
        text = data.decode("utf-8", errors="backslashreplace")
        write_out(head + "\n" + printable(text, lines=True))
    else:
        write_out(head.encode() + b"\n" + data)
    return EX_OK


PIECE = 1 << 16


def write_out(output: str | bytes) -> None:
    """Write to stdout in pieces of 64 KiB.

    When the reader goes away during one large write, the kernel returns a short count
    that CPython does not always report; only a write after it fails. In pieces, a
    closed pipe is always found (and ends the command with EX_PIPE), whatever the size.
    """
    data = output.encode() if isinstance(output, str) else output
    sys.stdout.flush()
    out = sys.stdout.buffer
    for start in range(0, len(data), PIECE):
        out.write(data[start : start + PIECE])
        out.flush()


def cmd_newaliases(args: argparse.Namespace) -> int:
    """Parse the aliases file as delivery would: 65 and FILE:LINE for a mistake in it."""
    config = _config(args)
    path = config.local.aliases
    if not path:
        raise ConfigError(f"{config.source}: local.aliases is not set: no aliases file to check")
    try:
        with open(path, "rb"):
            pass
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from None
    try:
        from .aliases import Aliases  # here: no process of `serve` runs this check

        table = Aliases(path, config.local_domains).table()
    except ConfigError as exc:  # readable, so the mistake is in its text
        raise AliasesError(str(exc)) from None
    count = len(table)
    print(printable(f"{path}: {count} alias{'es' if count != 1 else ''}"))
    return EX_OK


class AliasesError(NetserverError):
    """A mistake in the aliases file's text (EX_DATAERR), unlike one in the config."""

    exit_code = EX_DATAERR


def cmd_change(args: argparse.Namespace) -> int:
    """delete / hold / release / requeue what the ids and filters select (leafmail.bulk)."""
    from . import bulk  # here, as each tool's own: no process of `serve` runs it

    spool = _spool(args)
    status, changed = bulk.run(
        args.command,
        spool,
        args.ids,
        _selection(args, bulk.ACTIONS[args.command].default_states),
        stdin=sys.stdin,
        out=sys.stdout,
        err=sys.stderr,
        prog=PROG,
        junk=getattr(args, "junk", False),
    )
    if changed and args.command in ("release", "requeue"):
        control.wake(spool.control_path)  # a running daemon takes them at once
    return status


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "serve": cmd_serve,
    "flush": cmd_flush,
    "queue": cmd_queue,
    "show": cmd_show,
    "delete": cmd_change,
    "hold": cmd_change,
    "release": cmd_change,
    "requeue": cmd_change,
    "qshape": cmd_qshape,
    "passwd": cmd_passwd,
    "newaliases": cmd_newaliases,
}

# Run by these names (symlinks to leafmail), the program is that command, as with Postfix.
OTHER_NAMES: dict[str, Callable[[], argparse.ArgumentParser]] = {
    "mailq": _mailq_parser,
    "newaliases": _newaliases_parser,
}


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; a reader that went away ends it quietly (see `closed_pipe`)."""
    try:
        return _dispatch(argv)
    except BrokenPipeError:
        return closed_pipe()


def _dispatch(argv: Sequence[str] | None) -> int:
    name = os.path.basename(sys.argv[0]) if argv is None else PROG
    words = list(sys.argv[1:] if argv is None else argv)
    if name == "sendmail":
        return _sendmail(words, prog="sendmail")  # installed as sendmail
    if name in OTHER_NAMES:
        args = OTHER_NAMES[name]().parse_args(words)
        return exit_status(name, lambda: COMMANDS[args.command](args))
    if words[:1] == ["sendmail"]:  # argparse cannot parse -fADDR, -oi, -bs and friends
        return _sendmail(words[1:], prog="leafmail sendmail")
    args = build_parser().parse_args(words)
    return exit_status(PROG, lambda: COMMANDS[args.command](args))


def _sendmail(words: list[str], prog: str) -> int:
    from . import sendmail  # here, not at the top: the queue tools start faster

    return sendmail.main(words, prog=prog)


def closed_pipe() -> int:
    """EX_PIPE after pointing stdout at /dev/null, where Python's final flush of what is
    still buffered goes instead of raising BrokenPipeError again at exit.

    Python ignores SIGPIPE, so a write to a closed pipe raises instead of ending the
    process as it ends a C program; this gives the same end (nothing on stderr, the
    status a shell shows for SIGPIPE), and `set -o pipefail` scripts see it as they would
    for cat(1). Nothing is lost by it: the listing tools change nothing, and a command
    that changes the spool has made each change durable before it prints about it.
    """
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    return EX_PIPE


if __name__ == "__main__":
    sys.exit(main())
