"""Why a connection was refused, and the line each kind of refusal sends the client.

A server refuses for three kinds of reason, and a client (or its operator) acts on each
differently, so an SMTP server answers each with its own reply, as Postfix does:

- LIMIT: too many connections at once or per second from that source, or for the
  service: try again later (Postfix: ``421 4.7.0 ... too many connections``).
- ACCESS: an allow/deny or hosts_access rule turns the client away: do not retry
  (Postfix: ``554 5.7.1 ... Access denied``).
- ERROR: the server could not decide or could not serve (an access check failed, a
  rule it cannot carry out, no process to run the command): try again later.

The cause is known where the refusal is made; the line is chosen only then, so the
accept path of an admitted client pays nothing for it.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass

__all__ = [
    "MAX_LINE_OCTETS",
    "RefusalCause",
    "RefusalLines",
    "per_cause",
    "refusal_lines",
    "refusal_problem",
]

# The longest refusal text, in UTF-8 octets (CRLF not counted). A proxied client's
# refusal travels to the worker that holds it as one message of at most 4 KB
# (modes.worker.MAX_MSG), JSON-encoded, where a character takes up to three times its
# UTF-8 octets: a longer line was cut there and its client never heard it. An SMTP
# reply line is at most 512 octets with its CRLF (RFC 5321 4.5.3.1.5).
MAX_LINE_OCTETS = 1000


class RefusalCause(enum.Enum):
    LIMIT = "limit"
    ACCESS = "access"
    ERROR = "error"


@dataclass(frozen=True, slots=True)
class RefusalLines:
    """The line (CRLF added) sent for each cause before the close; None sends none."""

    limit: str | None = None
    access: str | None = None
    error: str | None = None

    def __post_init__(self) -> None:
        for text in (self.limit, self.access, self.error):
            problem = None if text is None else refusal_problem(text)
            if text is not None and problem is not None:
                shown = text if len(text) <= 40 else text[:40] + "..."
                raise ValueError(f"refusal line {shown!r}: {problem}")

    def line(self, cause: RefusalCause) -> str | None:
        if cause is RefusalCause.LIMIT:
            return self.limit
        if cause is RefusalCause.ACCESS:
            return self.access
        return self.error


def refusal_lines(spec: str | RefusalLines | None) -> RefusalLines:
    """One line for every cause (`--refuse-message`, an inetd banner), or lines per cause."""
    if spec is None or isinstance(spec, RefusalLines):
        return spec or RefusalLines()
    return RefusalLines(spec, spec, spec)


def per_cause(
    line: str | None,
    *,
    limit: str | None = None,
    access: str | None = None,
    error: str | None = None,
) -> RefusalLines:
    """`line` for every cause, except those given a line of their own: how the command
    line (``--refuse-message`` and ``--refuse-limit/-access/-error``) and a ``netserver
    run`` service (``banner`` and ``banner_limit/_access/_error``) say it."""
    return RefusalLines(
        line if limit is None else limit,
        line if access is None else access,
        line if error is None else error,
    )


def refusal_problem(text: str) -> str | None:
    """Why `text` cannot be a refusal line, or None: longer than `MAX_LINE_OCTETS` in
    UTF-8, not UTF-8 (undecodable bytes of a command line: sending it would raise), or
    holding a control character other than CR, LF (a multi-line banner) and TAB."""
    try:
        size = len(text.encode())
    except UnicodeEncodeError:
        return "not UTF-8 text"
    if size > MAX_LINE_OCTETS:
        return f"{size} octets, more than {MAX_LINE_OCTETS}"
    if _CONTROL.search(text):
        return "holds a control character (only CR, LF and TAB may be used)"
    return None


_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
