"""Mail loop detection: too many Received headers (RFC 5321 6.3)."""

from __future__ import annotations

import re

from netserver.smtp.replies import Reply

from ..trace import header_section
from . import ACCEPT, CheckContext, Reject, Verdict

MAX_HOPS = 100
LOOP_DETECTED = Reply(554, "5.4.6", "Too many hops: mail loop detected")
_RECEIVED = re.compile(rb"^received[ \t]*:", re.IGNORECASE | re.MULTILINE)


def count_received(data: bytes) -> int:
    """How many Received header fields the message carries."""
    return len(_RECEIVED.findall(header_section(data)))


def loop_check(session: CheckContext) -> Verdict:
    """End-of-data: refuse a message that has already made more than MAX_HOPS hops."""
    if count_received(session.data) > MAX_HOPS:
        return Reject(LOOP_DETECTED)
    return ACCEPT
