"""Grow a kept slow input and time each size: is its cost superlinear?

    python fuzz/scaling.py message_checks slow-<sha256> [slow-...]

The harness's ``one_input`` gets the input's first octet (the harnesses' selector or
flags) followed by the rest repeated 1, 2, 4, 8 and 16 times. A cost per octet that
keeps rising with the size is a superlinear cost. Instrumented code runs slower, but
alike at every size, so the ratios hold.
"""

from __future__ import annotations

import importlib
import sys
import time

REPEATS = (1, 2, 4, 8, 16)


def per_octet(one_input: object, data: bytes) -> list[float]:
    """CPU seconds per octet of input at each size of `REPEATS`."""
    assert callable(one_input)
    figures = []
    for repeat in REPEATS:
        grown = data[:1] + data[1:] * repeat
        started = time.process_time()
        one_input(grown)
        figures.append((time.process_time() - started) / len(grown))
    return figures


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print(__doc__, file=sys.stderr)
        return 64
    harness = importlib.import_module(argv[0])
    for path in argv[1:]:
        with open(path, "rb") as stream:
            data = stream.read()
        figures = per_octet(harness.one_input, data)
        growth = figures[-1] / figures[0] if figures[0] else 0.0
        cells = " ".join(f"x{r}:{f * 1e6:.2f}" for r, f in zip(REPEATS, figures, strict=True))
        print(f"{path}: µs/octet {cells}; x{REPEATS[-1]}/x1 = {growth:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
