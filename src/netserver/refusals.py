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
from dataclasses import dataclass

__all__ = ["RefusalCause", "RefusalLines", "per_cause", "refusal_lines"]


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
