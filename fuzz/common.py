"""What every harness here shares: running under atheris, and keeping slow inputs."""

from __future__ import annotations

import hashlib
import sys
from collections.abc import Callable

import atheris


def keep_if_slow(data: bytes, spent: float, limit: float) -> None:
    """Write `data` to ``slow-<sha256>`` in the working directory when `spent` > `limit`.

    `spent` is CPU time (a shared machine makes wall time noise). One slow run is only
    a hint; fuzz/scaling.py grows such an input and times each size, which says whether
    its cost is superlinear.
    """
    if spent > limit:
        name = "slow-" + hashlib.sha256(data).hexdigest()
        with open(name, "wb") as out:
            out.write(data)
        print(f"slow input {name}: {spent:.3f} s for {len(data)} octets", file=sys.stderr)


def run(one_input: Callable[[bytes], None]) -> None:
    """Fuzz `one_input` with the libFuzzer options on the command line."""
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()
