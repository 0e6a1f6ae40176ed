"""Who receives mail here: local accounts, the configured users, aliases and postmaster.

Both sides of the spool ask it: the RCPT check refuses unknown local recipients while
the client is still connected (`leafmail.checks.recipients`), and local delivery
expands each recipient through it (`leafmail.delivery.local`). Neither imports the
other; both import this.
"""

from __future__ import annotations

import pwd
import re

from .aliases import Aliases, Expansion, IncludeReader, Problem, UserTarget
from .config import LocalConfig

POSTMASTER = "postmaster"
_USER = re.compile(r"\A[a-z0-9_][a-z0-9_.-]{0,63}\Z")


def valid_user(name: str) -> bool:
    """A name safe to use in a path: no '/', no leading '.' or '-', no NUL, short."""
    return bool(_USER.match(name))


def account(name: str) -> pwd.struct_passwd | None:
    """The passwd entry of a (valid) user name, or None."""
    if not valid_user(name):
        return None
    try:
        return pwd.getpwnam(name)
    except KeyError:
        return None


class Directory:
    """Who receives mail here: the configured users (else passwd), aliases, postmaster."""

    def __init__(
        self,
        local: LocalConfig,
        local_domains: tuple[str, ...],
        reader: IncludeReader | None = None,
    ) -> None:
        self.users = frozenset(user.lower() for user in local.users)
        self.aliases: Aliases | None = None
        if local.aliases:
            self.aliases = Aliases(local.aliases, local_domains)
            if reader is not None:
                self.aliases.reader = reader
            self.aliases.table()  # a broken file is a ConfigError at start-up, not later

    def is_user(self, name: str) -> bool:
        """A mailbox exists for `name` (postmaster always has one: RFC 5321 4.5.1)."""
        if name == POSTMASTER:
            return True
        if not valid_user(name):
            return False
        return name in self.users if self.users else account(name) is not None

    def knows(self, name: str) -> bool:
        """Mail for this lookup name can be taken (a user, an alias or postmaster)."""
        return self.is_user(name) or (self.aliases is not None and name in self.aliases.table())

    def expand(self, name: str) -> Expansion:
        """Where mail for this lookup name goes; ConfigError if the aliases file is wrong."""
        if self.aliases is not None:
            return self.aliases.expand(name, self.is_user)
        if self.is_user(name):
            return Expansion((UserTarget(name),), ())
        return Expansion((), (Problem("5.1.1", f"no such user: {name}"),))
