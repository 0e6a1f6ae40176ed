"""Header limits, applied before anything parses the header (Postfix's header_size_limit).

The header is the part that every later check parses (Received chains, RFC 5322
fields, DKIM's h=), and parsing costs grow with it, so its size and its number of
fields are bounded first, by C-level scans of the octets: where the blank line is,
and how many lines do not start with white space. A message over either limit is
refused with 552 5.3.4 (RFC 3463: message too big for the system), for every client
alike, since it is a resource limit and not a judgement of the sender. Postfix
truncates an over-long header instead; refusing says clearly what happened and
never changes a message.
"""

from __future__ import annotations

from netserver.smtp.replies import Reply

from . import ACCEPT, Check, CheckContext, Reject, Verdict

HEADER_TOO_BIG = Reply(552, "5.3.4", "Message header exceeds the maximum header size")
TOO_MANY_FIELDS = Reply(552, "5.3.4", "Message header has too many fields")


def header_limit_problem(data: bytes, max_size: int, max_fields: int) -> Reply | None:
    """The refusal for a header over `max_size` octets or `max_fields` fields, or None."""
    end = data.find(b"\r\n\r\n", 0, max_size + 4)
    if end < 0:
        if len(data) > max_size:
            return HEADER_TOO_BIG
        end = len(data)
    header = data[: end + 2]
    lines = header.count(b"\r\n")
    folded = header.count(b"\r\n ") + header.count(b"\r\n\t")
    if lines - folded > max_fields:
        return TOO_MANY_FIELDS
    return None


def header_limit_check(max_size: int, max_fields: int) -> Check:
    """The first end-of-data check: refuse headers over the limits."""

    def check(session: CheckContext) -> Verdict:
        reply = header_limit_problem(session.data, max_size, max_fields)
        return ACCEPT if reply is None else Reject(reply)

    return check
