"""The sendmail(8) command line: its getopt-style options, parsed into `Options`."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from netserver.errors import UsageError

USAGE = """\
usage: sendmail [OPTION ...] [--] [RECIPIENT ...]

  -t        also take recipients from To, Cc and Bcc (or Resent-To/Cc/Bcc)
            (Bcc and Resent-Bcc are always removed from the message)
  -i, -oi   a line with only "." does not end the message
  -f, -r    envelope sender ("<>" for none); default LOGIN@HOSTNAME
  -F        full name for a From header leafmail adds (default $NAME, else the GECOS)
  -N        DSN notify: never, or success,failure,delay
  -R        DSN return: full or hdrs;   -V  DSN envelope id
  -bm       read a message from stdin (the default);  -bs  SMTP on stdin/stdout
  -bp       list the queue;  -q  deliver everything queued now
  -oX, -v, -m, -n, -U, -G, -Ac, -Am, -B TYPE, -h N, -L LABEL, -O OPT, -X FILE:
            accepted, ignored

Config: $LEAFMAIL_CONFIG, else ~/.config/leafmail/leafmail.toml, else
/etc/leafmail/leafmail.toml; spool: $LEAFMAIL_SPOOL, else the config. A spool of
this user's is written directly; anyone else's (a system daemon's) is reached through
the daemon's socket SPOOL/public/submit. Exit codes: 0 ok (the message is queued),
64 usage, 65 bad data, 73 spool cannot be created, 75 try later (e.g. no daemon
answers: nothing was queued), 78 configuration or an unsafe spool.
"""

_VALUE_OPTIONS = frozenset("fFrbNRVoABhLOXq")  # options that take a value
_IGNORED_FLAGS = frozenset("vmnUG")  # verbose, metoo, no aliases, initial submission, gw
# body type, hop count, log label, option, log file; -Ac/-Am (sendmail 8.12's choice of
# submit.cf or sendmail.cf, which PHP's and other callers' command lines still carry)
_IGNORED_VALUES = frozenset("ABhLOX")
_MODES = {"m": "deliver", "s": "smtp", "p": "queue"}
_NOTIFY = frozenset({"SUCCESS", "FAILURE", "DELAY"})


@dataclass
class Options:
    """What the command line asked for."""

    mode: str = "deliver"
    extract: bool = False  # -t
    dots_end: bool = True  # not -i / -oi
    sender: str | None = None  # -f / -r, as given
    full_name: str | None = None  # -F
    notify: tuple[str, ...] = ()  # -N
    ret: str | None = None  # -R
    envid: str | None = None  # -V
    recipients: list[str] = field(default_factory=list)
    help: bool = False


def parse_options(argv: Sequence[str]) -> Options:
    """Parse sendmail's getopt-style options; options and recipients may be mixed.

    argparse cannot do this: values attach to their letter (``-fuser``, ``-oi``,
    ``-bs``) and flags cluster (``-ti``), as in every sendmail since 1983.
    """
    opts = Options()
    words = list(argv)
    while words:
        word = words.pop(0)
        if word == "--":
            opts.recipients += words
            break
        if word == "--help":
            opts.help = True
        elif word.startswith("-") and len(word) > 1:
            _cluster(opts, word, words)
        else:
            opts.recipients.append(word)
    return opts


def _cluster(opts: Options, word: str, rest: list[str]) -> None:
    """One ``-xyz`` word: flags, then possibly a letter whose value is the remainder."""
    for i, letter in enumerate(word[1:], start=1):
        if letter in _VALUE_OPTIONS:
            value = word[i + 1 :]
            if not value and letter != "q":
                if not rest:
                    raise UsageError(f"option -{letter} needs a value")
                value = rest.pop(0)
            _value_option(opts, letter, value)
            return
        _flag(opts, letter)


def _flag(opts: Options, letter: str) -> None:
    if letter == "t":
        opts.extract = True
    elif letter == "i":
        opts.dots_end = False
    elif letter not in _IGNORED_FLAGS:
        raise UsageError(f"unknown option -{letter}")


def _value_option(opts: Options, letter: str, value: str) -> None:
    match letter:
        case "f" | "r":
            opts.sender = value
        case "F":
            opts.full_name = value
        case "b":
            opts.mode = _mode(value)
        case "q":
            if value:
                raise UsageError(f"-q{value} is not supported: run `leafmail serve` instead")
            opts.mode = "flush"
        case "o":
            if value == "i":  # -oi; every other -oX (-oem, -odb, ...) is ignored
                opts.dots_end = False
        case "N":
            opts.notify = _notify(value)
        case "R":
            opts.ret = _ret(value)
        case "V":
            opts.envid = _envid(value)
        case _:
            assert letter in _IGNORED_VALUES


def _mode(value: str) -> str:
    if value not in _MODES:
        raise UsageError(f"-b{value} is not supported (use -bm, -bs or -bp)")
    return _MODES[value]


def _notify(value: str) -> tuple[str, ...]:
    """-N never | success,failure,delay: DSN NOTIFY (RFC 3461 4.1)."""
    words = {w.strip().upper() for w in value.split(",") if w.strip()}
    if words == {"NEVER"}:
        return ("NEVER",)
    if not words or not words <= _NOTIFY:
        raise UsageError(f"-N {value!r}: use never, or some of success,failure,delay")
    return tuple(sorted(words))


def _ret(value: str) -> str:
    if value.upper() not in ("FULL", "HDRS"):
        raise UsageError(f"-R {value!r}: use full or hdrs")
    return value.upper()


def _envid(value: str) -> str:
    if not value or len(value) > 100 or not all(" " < c < "\x7f" for c in value):
        raise UsageError("-V needs an envelope id of 1 to 100 printable ASCII characters")
    return value
