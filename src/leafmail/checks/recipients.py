"""RCPT stage: local recipients nobody here would take are refused while the client waits.

Refusing at RCPT (as Postfix's local_recipient_maps does) leaves the bounce to the
sending server, instead of accepting the mail and then sending a bounce that may go to
a forged sender. It asks `leafmail.directory`, as local delivery does.
"""

from __future__ import annotations

from collections.abc import Callable

from netserver.errors import ConfigError
from netserver.smtp.replies import Reply

from ..aliases import lookup_name
from ..config import LocalConfig
from ..directory import Directory
from ..states import Route
from . import ACCEPT, Check, CheckContext, Defer, Reject, Verdict

UNKNOWN_USER = Reply(550, "5.1.1", "Recipient address rejected: no such user here")
ALIASES_BROKEN = Reply(451, "4.3.5", "Recipient lookup failed: the aliases file is broken")


def local_recipient_check(
    local: LocalConfig, local_domains: tuple[str, ...], route_for: Callable[[str], Route]
) -> Check:
    """RCPT stage: refuse (550 5.1.1) local recipients nobody here would take.

    Recipients routed elsewhere (`route_for` of their domain is not local) pass
    untouched; users, aliases and postmaster pass. A broken aliases file defers
    (451 4.3.5) instead of refusing good mail.
    """
    directory = Directory(local, local_domains) if local.enabled else None

    def check(session: CheckContext) -> Verdict:
        rcpt = session.recipient
        if directory is None or rcpt is None:
            return ACCEPT
        if rcpt.domain and route_for(rcpt.domain) != Route.LOCAL:
            return ACCEPT
        try:
            known = directory.knows(lookup_name(rcpt.local_unquoted))
        except ConfigError:
            return Defer(ALIASES_BROKEN)
        return ACCEPT if known else Reject(UNKNOWN_USER)

    return check
