"""Relay control: leafmail is never an open relay.

A recipient in `local_domains` is always accepted. Any other recipient is accepted only
from a client in `relay_networks` or from an authenticated session. The domain judged is
the one the address parser found: ``%``, ``!`` and a quoted ``@`` stay inside the local
part, and source routes were dropped, so ``<"a@victim"@local>`` or ``<a%victim@local>``
is mail for the local domain, never a relay through it.
"""

from __future__ import annotations

from collections.abc import Iterable

from netserver.access import AccessPolicy
from netserver.smtp.replies import Reply

from . import ACCEPT, Check, Reject, Session, Verdict

# 550, not the 554 some MTAs send: RFC 5321 4.3.2 lists no 554 for RCPT, and 3.6
# names 550 for a recipient refused by policy.
RELAY_DENIED = Reply(550, "5.7.1", "Relay access denied")


def relay_check(local_domains: Iterable[str], relay_networks: AccessPolicy) -> Check:
    """The RCPT-stage check for these domains and networks."""
    local = frozenset(d.lower().rstrip(".") for d in local_domains)

    def check(session: Session) -> Verdict:
        rcpt = session.recipient
        if rcpt is None or not rcpt.domain or rcpt.domain.lower().rstrip(".") in local:
            return ACCEPT  # <Postmaster> without a domain is ours too (RFC 5321 4.1.1.3)
        if session.user is not None:
            return ACCEPT
        if session.client_ip is not None and relay_networks.decide(session.client_ip).allowed:
            return ACCEPT
        return Reject(RELAY_DENIED)

    return check
