"""Fuzz the checks leafmail runs on a received message (`leafmail.checks`).

The header limits and the loop count run in the smtpd process; the RFC 5322, Received
chain and Authentication-Results parsing run in the check pool under a CPU budget.
Checked: nothing raises, and the cost per input stays linear: every input slower than
`SLOW_PER_OCTET` a byte (past a fixed allowance) is written to ``slow-<sha256>`` in the
working directory for `fuzz/scaling.py` to grow and time.
"""

from __future__ import annotations

import time

import atheris
from common import keep_if_slow, run

with atheris.instrument_imports():
    from leafmail.checks.auth import forged_results
    from leafmail.checks.limits import header_limit_problem
    from leafmail.checks.received import chain_problems
    from leafmail.checks.rfc5322 import problems
    from leafmail.trace import count_received
    from netserver.smtp.parameters import Body, MailParameters

ALLOWANCE = 0.05  # seconds any input may take, instrumented
SLOW_PER_OCTET = 20e-6  # seconds per octet past the allowance, instrumented


def run_checks(data: bytes, flags: int) -> None:
    """Every message check once, the way leafmail calls them."""
    params = MailParameters(body=Body.EIGHTBITMIME if flags & 1 else None, smtputf8=bool(flags & 2))
    header_limit_problem(data, 1 << 16, 1000)
    count_received(data)
    problems(data, params)
    chain_problems(data, "mx.example")
    forged_results(data, "mx.example")


def one_input(data: bytes) -> None:
    if not data:
        return
    started = time.process_time()
    run_checks(data[1:], data[0])
    spent = time.process_time() - started
    keep_if_slow(data, spent, ALLOWANCE + SLOW_PER_OCTET * len(data))


if __name__ == "__main__":
    run(one_input)
