"""Mail loop detection: too many Received headers (RFC 5321 6.3)."""

from __future__ import annotations

from netserver.smtp.replies import Reply

from ..trace import MAX_HOPS, count_received
from . import ACCEPT, CheckContext, Reject, Verdict

LOOP_DETECTED = Reply(554, "5.4.6", "Too many hops: mail loop detected")


def loop_check(session: CheckContext) -> Verdict:
    """End-of-data: refuse a message that has already made more than MAX_HOPS hops."""
    if count_received(session.data) > MAX_HOPS:
        return Reject(LOOP_DETECTED)
    return ACCEPT
