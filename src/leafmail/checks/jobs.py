"""What a check asks of the check pool: a runner of named jobs, and the reply it gives
when a job broke its budget.

The checks that hand their work to the pool (RFC 5322, the Received chain, DKIM, SPF)
are also what the pool's worker process runs, so they cannot import the pool: the pool
imports the worker, which imports them. They hold this contract instead, which
`leafmail.checks.pool.CheckPool` fulfils, and the import graph stays a tree.
"""

from __future__ import annotations

from typing import Any, Protocol

from netserver.smtp.replies import Reply

from . import Defer, Tag, Verdict, header_field

# What a check answers under "reject" when its job broke the budget: try again later.
OVER_BUDGET = Reply(451, "4.7.0", "Message checks exceeded their time budget, try again later")


def over_budget(mode: str, tag_field: str) -> Verdict:
    """The verdict of a content check whose job broke its budget: under "reject" a 451
    (the sender retries, nothing is lost), else the message goes on, tagged temperror
    in the check's own field so that a filter downstream can tell."""
    if mode == "reject":
        return Defer(OVER_BUDGET)
    return Tag((header_field(tag_field, "temperror (over budget)"),))


class JobRunner(Protocol):
    """Runs one named job of the worker (`leafmail.checks.worker.JOBS`) on the message."""

    async def run(self, job: str, args: dict[str, Any], data: bytes) -> dict[str, Any] | None:
        """The job's answer, or None when it broke its budget or its worker died."""
        ...
