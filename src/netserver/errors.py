"""Errors that carry the sysexits(3) code a command-line front end should exit with.

The library raises these for bad configuration or usage; the CLI turns them into one
line on stderr and the matching exit status, never a traceback.
"""

from __future__ import annotations

import errno

EX_OK = 0
EX_USAGE = 64
EX_DATAERR = 65
EX_NOINPUT = 66
EX_NOUSER = 67
EX_UNAVAILABLE = 69
EX_SOFTWARE = 70
EX_OSERR = 71
EX_CANTCREAT = 73
EX_IOERR = 74
EX_TEMPFAIL = 75
EX_NOPERM = 77
EX_CONFIG = 78

# errno values that mean "the system is out of descriptors, processes or memory": the
# server backs off and retries rather than failing one client or spinning.
RESOURCE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM, errno.EAGAIN})


class NetserverError(Exception):
    """Base of the errors this package raises on purpose; `exit_code` is a sysexits value."""

    exit_code = EX_SOFTWARE


class UsageError(NetserverError):
    """A flag or argument is malformed (EX_USAGE)."""

    exit_code = EX_USAGE


class ConfigError(NetserverError):
    """A configuration value is wrong: an address, a rule, a handler (EX_CONFIG)."""

    exit_code = EX_CONFIG


class UnavailableError(NetserverError):
    """A resource the server needs is not available, e.g. the port is taken (EX_UNAVAILABLE)."""

    exit_code = EX_UNAVAILABLE


class CantCreateError(NetserverError):
    """A file or directory the program must write cannot be created (EX_CANTCREAT)."""

    exit_code = EX_CANTCREAT


class AccessSpecError(ConfigError):
    """An allow/deny specification cannot be parsed."""
