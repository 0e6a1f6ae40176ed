"""Waiting, within a budget, for the machine to be quiet before each measurement.

The benchmarks run on a 2-core VM that other work shares. A measurement taken while
something else burns a core says more about that something than about the servers, so
before each one the runner samples /proc/stat and, while the machine is busy, waits a
little longer; the wait is bounded by a budget for the whole run, so a machine that
never quiets down still gets measured (and the report says how many were not quiet).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

from .cpu import machine_cpu

SAMPLE = 0.5
BUSY_THRESHOLD = 0.2


def machine_busy(seconds: float = SAMPLE) -> float:
    """Fraction of all CPUs busy over the next `seconds` (0.0 idle .. 1.0 saturated)."""
    start = time.perf_counter()
    busy0, _ = machine_cpu()
    time.sleep(seconds)
    busy1, _ = machine_cpu()
    elapsed = time.perf_counter() - start
    return (busy1 - busy0) / (elapsed * (os.cpu_count() or 1))


@dataclass
class QuietGate:
    """Before each measurement, wait for the machine to be under `threshold` busy.

    `budget` is seconds of waiting for the whole run, beyond the one sample every
    measurement takes. `noisy` counts measurements that started on a busy machine.
    """

    budget: float
    threshold: float = BUSY_THRESHOLD
    waited: float = 0.0
    checks: int = 0
    noisy: int = 0

    def wait(self) -> float:
        """Block until quiet or out of budget; return the last busy fraction seen."""
        self.checks += 1
        busy = machine_busy()
        while busy >= self.threshold and self.waited < self.budget:
            busy = machine_busy()
            self.waited += SAMPLE
        if busy >= self.threshold:
            self.noisy += 1
        return busy

    def summary(self) -> str:
        """One line for the report."""
        return (
            f"Quiet gate: waited {self.waited:.0f} s of a {self.budget:.0f} s budget for "
            f"the machine to be under {self.threshold:.0%} busy; {self.noisy} of "
            f"{self.checks} measurements started on a busier machine."
        )
