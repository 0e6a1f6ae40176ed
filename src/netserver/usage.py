"""What every command of netserver's and leafmail's shares: usage errors, flags, exit codes.

Kept apart from `netserver.cli` so a command that only needs these (``leafmail``, and so
every process of ``leafmail serve``, which forks from it) does not import the
``netserver`` command's own machinery: the inetd supervisor, hosts.allow/hosts.deny and
their gates. Modules a forked process never runs still cost memory in all of them.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import NoReturn

from . import errors


class UsageParser(argparse.ArgumentParser):
    """argparse, but usage errors exit 64 (EX_USAGE) instead of 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(errors.EX_USAGE, f"{self.prog}: error: {message} (see --help)\n")


def count(text: str) -> int:
    """An argparse type: a whole number, 0 or more."""
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number")
    return int(text)


def add_runtime_flags(group: argparse._ActionsContainer) -> None:
    """--log-format, --loop and --ready-fd, which every serving command shares."""
    group.add_argument(
        "--log-format",
        choices=("text", "json"),
        default="text",
        help="one line per connection on stderr, as text or JSON",
    )
    group.add_argument(
        "--loop",
        choices=("auto", "asyncio", "uvloop"),
        default="auto",
        help="event loop (default: uvloop if installed)",
    )
    group.add_argument(
        "--ready-fd",
        type=count,
        metavar="FD",
        help="when listening, write 'READY ADDR ...' to this descriptor and close it",
    )


def add_quiet_flag(group: argparse._ActionsContainer, also: str = "") -> None:
    """--quiet, for netserver's serve and run (leafmail's sessions log what they do)."""
    group.add_argument(
        "--quiet",
        action="store_true",
        help="no line per connection that was served (refusals, errors and start/stop "
        f"are still logged), like tcpserver without -v{also}",
    )


def exit_status(prog: str, run: Callable[[], int]) -> int:
    """Run a command's body: a NetserverError becomes one line on stderr and its sysexits
    code, Ctrl-C becomes 130; never a traceback for something the user can fix."""
    try:
        return run()
    except errors.NetserverError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
