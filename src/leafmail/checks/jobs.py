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

# What a check answers under "reject" when its job broke the budget: try again later.
OVER_BUDGET = Reply(451, "4.7.0", "Message checks exceeded their time budget, try again later")


class JobRunner(Protocol):
    """Runs one named job of the worker (`leafmail.checks.worker.JOBS`) on the message."""

    async def run(self, job: str, args: dict[str, Any], data: bytes) -> dict[str, Any] | None:
        """The job's answer, or None when it broke its budget or its worker died."""
        ...
