"""Shared plumbing of the fuzz tests: one budget rule and an execution counter.

Every fuzz target runs under `budget`: a few hundred examples with a fixed seed in
``make test`` (so the suite is deterministic and a failure replays the same way), and
tens of thousands of fresh random examples in ``make soak``. `Tally` counts how often a
target's body ran and how often it failed, because @given runs the body many times and
the report (bench/RELIABILITY.md) wants executions and crashes per target.
"""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import Callable, Iterator
from typing import ParamSpec, TypeVar

import soak
from hypothesis import HealthCheck, settings
from hypothesis.errors import StopTest, UnsatisfiedAssumption

_P = ParamSpec("_P")
_R = TypeVar("_R")


def budget(short: int, full: int) -> settings:
    """Hypothesis settings for one target: `short` examples in make test, `full` in soak.

    No deadline (a loaded 2-core machine makes timings meaningless) and no example
    database: the short form is derandomized, so it is reproducible without one, and the
    soak form prints its falsifying example, which becomes an explicit @example.
    """
    return settings(
        max_examples=soak.scaled(short, full),
        deadline=None,
        derandomize=not soak.SOAK,
        database=None,
        suppress_health_check=list(HealthCheck),
        print_blob=True,
    )


class Tally:
    """Executions and crashes of one fuzz target, recorded as a "fuzz" figure."""

    def __init__(self, target: str) -> None:
        self.target = target
        self.executions = 0
        self.crashes = 0

    def count(self, body: Callable[_P, _R]) -> Callable[_P, _R]:
        """Wrap a @given body so that every run, and every failing run, is counted."""

        @functools.wraps(body)
        def counted(*args: _P.args, **kwargs: _P.kwargs) -> _R:
            self.executions += 1
            try:
                return body(*args, **kwargs)
            except (UnsatisfiedAssumption, StopTest):
                raise  # hypothesis's own control flow (assume(), end of data): no crash
            except BaseException:
                self.crashes += 1
                raise

        return counted

    @contextlib.contextmanager
    def recorded(self) -> Iterator[None]:
        """Run the target and record its figures, also when it fails."""
        self.executions = self.crashes = 0
        started = time.monotonic()
        try:
            yield
        finally:
            soak.record(
                "fuzz",
                self.target,
                executions=self.executions,
                crashes=self.crashes,
                seconds=round(time.monotonic() - started, 2),
            )
