"""Turning samples into the Markdown tables and ratio lines that `python -m bench` prints.

Medians, not means: on a small shared VM one round can be hit by another process and
a mean would carry that into the headline. Each round is also shown, so the spread is
visible. Ratios are given three ways, because they answer different questions:

* of the median rates: the headline, what a user would see;
* per round, paired: the servers of one round ran seconds apart, so pairing
  cancels slow drift of the machine;
* of server CPU per operation: what each server costs for the same work, which holds
  even when the load generator, not the server, limits the rate.
"""

from __future__ import annotations

import statistics
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from types import FrameType

from .clients import Sample

# A round in which other processes took more than this many cores is marked in the table.
CONTAMINATED = 0.25
MARK = "†"


def median_known(values: Sequence[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return statistics.median(known) if known else None


def fmt_or_na(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def table(unit: str, samples: dict[str, list[Sample]]) -> list[str]:
    """A Markdown table: one row per server, the median first, then every round."""
    rounds = max(len(s) for s in samples.values())
    head = ["server", f"median {unit}", *(f"round {i + 1}" for i in range(rounds))]
    head += [f"server CPU µs/{unit.split('/')[0]}", "server cores", "client cores"]
    head += ["other procs cores", "steal cores", "errors"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, rows in samples.items():

        def med(get: Callable[[Sample], float | None], rows: list[Sample] = rows) -> float | None:
            return median_known([get(s) for s in rows])

        cells = [name, fmt_or_na(med(lambda s: s.rate), ",.0f")]
        cells += [
            fmt_or_na(s.rate, ",.0f") + (MARK if s.other_util > CONTAMINATED else "") for s in rows
        ]
        cells += [""] * (rounds - len(rows))
        cells += [
            fmt_or_na(med(lambda s: s.server_us), ".2f"),
            fmt_or_na(med(lambda s: s.server_util), ".2f"),
            fmt_or_na(med(lambda s: s.client_util), ".2f"),
            fmt_or_na(med(lambda s: s.other_util), ".2f"),
            fmt_or_na(med(lambda s: s.steal_util), ".2f"),
            str(sum(s.errors for s in rows)),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    if any(s.other_util > CONTAMINATED for rows in samples.values() for s in rows):
        lines += [
            "",
            f"{MARK} other processes on the machine used more than {CONTAMINATED} cores during "
            "that round.",
        ]
    return lines


def ratio(samples: dict[str, list[Sample]], num: str, den: str, target: float) -> list[str]:
    """How `num` compares with `den`: median rates, paired rounds, CPU per operation."""
    a, b = samples[num], samples[den]
    rate_a = median_known([s.rate for s in a])
    rate_b = median_known([s.rate for s in b])
    headline = None if rate_a is None or not rate_b else rate_a / rate_b
    paired = [x.rate / y.rate for x, y in zip(a, b, strict=False) if y.rate]
    us_a = median_known([s.server_us for s in a])
    us_b = median_known([s.server_us for s in b])
    by_cpu = None if us_a is None or us_b is None or not us_a else us_b / us_a
    cpu_paired = [
        y.server_us / x.server_us
        for x, y in zip(a, b, strict=False)
        if x.server_us and y.server_us is not None
    ]
    verdict = "n/a" if headline is None else ("meets" if headline >= target else "below")
    return [
        f"- **{num} / {den}: {fmt_or_na(headline, '.2f')}x** (target ≥ {target:.2f}x: {verdict}); "
        f"per round {', '.join(f'{r:.2f}' for r in paired)}; "
        f"by server CPU per operation {fmt_or_na(by_cpu, '.2f')}x"
        f" (per round {', '.join(f'{r:.2f}' for r in cpu_paired)})"
    ]


def write_section(path: Path, section: str, lines: Sequence[str]) -> None:
    """Replace one benchmark's `section` of `path` (or append it), leaving the rest alone."""
    old = path.read_text().splitlines() if path.exists() else []
    start = next((i for i, line in enumerate(old) if line.strip() == section), None)
    if start is None:
        new = [*old, *([""] if old and old[-1] else []), *lines]
    else:
        end = next((i for i in range(start + 1, len(old)) if old[i].startswith("## ")), len(old))
        new = [*old[:start], *lines, *old[end:]]
    path.write_text("\n".join(new).rstrip("\n") + "\n")


def progress(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def unwind_on_sigterm(signum: int, frame: FrameType | None) -> None:
    """SIGTERM unwinds like Ctrl-C, so every `finally` stops what it started."""
    raise KeyboardInterrupt
