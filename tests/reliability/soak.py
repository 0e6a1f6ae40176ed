"""Sizes and figures for the reliability suite (tests/reliability/).

The suite runs twice over: a short, bounded form inside ``make test`` and the full size
in ``make soak``. ``SOAK=1`` in the environment selects the full size; `scaled` picks the
number that applies, so every test states both of its sizes in one place.

`record` appends one JSON line of figures (messages sent, acknowledged, spooled, lost,
kills, fuzz executions, attack outcomes, peak RSS ...) to the file named by
``RELIABILITY_RECORD``; ``make soak`` sets it and ``python -m bench.reliability_report``
turns the lines into bench/RELIABILITY.md. Without the variable nothing is written, so
``make test`` leaves no files behind.
"""

from __future__ import annotations

import fcntl
import json
import os
from typing import TypeVar

SOAK = os.environ.get("SOAK", "") not in ("", "0")
_N = TypeVar("_N", int, float)


def scaled(short: _N, full: _N) -> _N:
    """`full` under ``make soak`` (SOAK=1), `short` in ``make test``."""
    return full if SOAK else short


def record(section: str, name: str, **figures: object) -> None:
    """Append ``{"section", "name", "soak", **figures}`` to $RELIABILITY_RECORD, if set.

    `section` is the issue's heading (crash, disk, smarthost, attack, fuzz, load); `name`
    says what was tried; `figures` must be JSON values. Appends are whole lines under an
    flock, so tests running in parallel processes cannot interleave them.
    """
    path = os.environ.get("RELIABILITY_RECORD")
    if not path:
        return
    line = json.dumps({"section": section, "name": name, "soak": SOAK, **figures})
    with open(path, "a", encoding="utf-8") as out:
        fcntl.flock(out, fcntl.LOCK_EX)
        out.write(line + "\n")
