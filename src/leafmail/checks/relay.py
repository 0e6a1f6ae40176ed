"""Relay control: leafmail is never an open relay.

A recipient in `local_domains` is accepted; any other recipient only from a client in
`relay_networks` or from an authenticated session. The domain judged is the one the
address parser found: ``%``, ``!`` and a quoted ``@`` stay inside the local part, and
source routes were dropped, so ``<"a@victim"@local>`` or ``<a%victim@local>`` is mail
for the local domain, never a relay through it -- here.

A next hop may read those local parts as routes, though (sendmail's percent hack, UUCP
bang paths), and every relay scanner (nmap's smtp-open-relay) reports a server that
takes them. So, as Postfix does with ``allow_untrusted_routing = no`` (its resolver flags
such addresses as routed and ``reject_unauth_destination`` refuses them), a local
recipient whose local part holds ``%``, ``!`` or ``@`` -- quoted or not -- is refused to
untrusted clients with the same 550 5.7.1 as any relay attempt.
"""

from __future__ import annotations

from collections.abc import Iterable

from netserver.admit.access import AccessPolicy
from netserver.smtp.addresses import Mailbox
from netserver.smtp.replies import Reply

from . import ACCEPT, Check, CheckContext, Reject, Verdict

# 550, not the 554 some MTAs send: RFC 5321 4.3.2 lists no 554 for RCPT, and 3.6
# names 550 for a recipient refused by policy.
RELAY_DENIED = Reply(550, "5.7.1", "Relay access denied")
ROUTING_DENIED = Reply(
    550, "5.7.1", "Relay access denied: sender-specified routing (%, ! or @ in the local part)"
)
_ROUTING = frozenset("%!@")


def is_routed(mailbox: Mailbox) -> bool:
    """True when the local part looks like a route to another host (``%``, ``!``, ``@``)."""
    return not _ROUTING.isdisjoint(mailbox.local_unquoted)


def relay_check(local_domains: Iterable[str], relay_networks: AccessPolicy) -> Check:
    """The RCPT-stage check for these domains and networks."""
    local = frozenset(d.lower().rstrip(".") for d in local_domains)

    def trusted(session: CheckContext) -> bool:
        if session.user is not None:
            return True
        ip = session.client_ip
        return ip is not None and relay_networks.decide(ip).allowed

    def check(session: CheckContext) -> Verdict:
        rcpt = session.recipient
        if rcpt is None or not rcpt.domain:
            return ACCEPT  # <Postmaster> without a domain is ours (RFC 5321 4.1.1.3)
        if rcpt.domain.lower().rstrip(".") in local:
            if is_routed(rcpt) and not trusted(session):
                return Reject(ROUTING_DENIED)
            return ACCEPT
        return ACCEPT if trusted(session) else Reject(RELAY_DENIED)

    return check
