"""`leafmail flush`: deliver everything queued now, with progress.

If a daemon runs on the spool, flush asks it through the control socket (so the
daemon's one connection pool and link state are used, and nothing is tried twice at
once); otherwise it runs one forced pass itself. Either way it reports each message as
it goes: a progress bar on a terminal, one line per message otherwise (for logs and
network-up hooks). Exit 0 when nothing is left deferred, 75 when something is.

What it prints came partly from the next hop (its replies), so it goes through
`printable` (and, for the bar, is escaped for rich's markup). A reader that goes away
(``leafmail flush | head -1``) only silences the report: delivery goes on to the end, as
stopping it half-way would help nobody.
"""

from __future__ import annotations

import asyncio
import sys
from collections import Counter
from typing import Any, TextIO

from netserver.errors import EX_OK, EX_TEMPFAIL, ConfigError, UnavailableError
from netserver.server import loop_factory

from . import control
from .config import ProcessConfig, QueueConfig
from .message import Attempt, AttemptOutcome
from .printable import printable
from .queue import QueueRunner, build_runner
from .spool import Spool
from .spoolcheck import check_spool, spool_owner


class Reporter:
    """Shows flush progress: rich's bar on a terminal, plain lines otherwise."""

    def __init__(self, out: TextIO, *, tty: bool) -> None:
        self.out = out
        self.counts: Counter[str] = Counter()
        self.closed = False  # the reader of `out` went away
        self._progress: Any = None
        self._task: Any = None
        if tty:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

            self._progress = Progress(
                TextColumn("flushing"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.description}"),
            )
            self._progress.start()
            self._task = self._progress.add_task("", total=None)

    def total(self, count: int) -> None:
        if self._progress is not None:
            self._progress.update(self._task, total=count)

    def message(self, qid: str, verdict: str, error: str) -> None:
        if verdict == AttemptOutcome.SKIPPED.value:
            return
        self.counts[verdict] += 1
        if self._progress is not None:
            from rich.markup import escape

            summary = ", ".join(f"{n} {v}" for v, n in sorted(self.counts.items()))
            self._progress.update(self._task, advance=1, description=escape(printable(summary)))
        else:
            tail = f": {error}" if error and verdict != AttemptOutcome.DELIVERED.value else ""
            self._print(printable(f"{qid} {verdict}{tail}"))

    def _print(self, line: str) -> None:
        """One line to `out`; once the reader has gone, nothing more (delivery goes on)."""
        if self.closed:
            return
        try:
            print(line, file=self.out, flush=True)
        except BrokenPipeError:
            self.closed = True

    def attempt(self, done: Attempt) -> None:
        self.message(done.qid, done.verdict.value, done.error)

    def line(self, obj: dict[str, Any]) -> None:
        """A reply line from the daemon's control socket."""
        if "total" in obj and isinstance(obj["total"], int):
            self.total(obj["total"])
        elif isinstance(obj.get("qid"), str):
            self.message(obj["qid"], str(obj.get("verdict", "")), str(obj.get("error", "")))

    def finish(self, link_error: str) -> None:
        if self._progress is not None:
            self._progress.stop()
        parts = [f"{n} {v}" for v, n in sorted(self.counts.items())] or ["nothing to deliver"]
        print(printable("flush: " + ", ".join(parts)), file=sys.stderr)
        if link_error:
            print(printable(f"flush: next hop unreachable: {link_error}"), file=sys.stderr)


def flush(
    queue: QueueConfig,
    spool_path: str,
    process: ProcessConfig,
    *,
    use_daemon: bool = True,
    out: TextIO = sys.stdout,
) -> int:
    """Deliver everything in `spool_path` now; EX_OK if nothing stays deferred, else
    EX_TEMPFAIL. `process` names the spool's owner (the daemon's user)."""
    try:
        check_spool(spool_path, spool_owner(spool_path, process), create=False)
        spool = Spool(spool_path, create=False)
    except FileNotFoundError:
        print(f"flush: no spool at {spool_path}: nothing to deliver", file=sys.stderr)
        return EX_OK
    runner = runner_for(queue, spool)  # a ConfigError comes before any output
    reporter = Reporter(out, tty=out.isatty())
    final = control.request(spool.control_path, "flush", reporter.line) if use_daemon else None
    if final is not None:
        reporter.finish(str(final.get("link_error", "")))
        if "error" in final:
            raise UnavailableError(printable(f"the running daemon says: {final['error']}"))
        return EX_TEMPFAIL if final.get("deferred") else EX_OK
    spool.settle_duplicates()  # no daemon did it at its start (a crash may have left some)
    try:
        with asyncio.Runner(loop_factory=loop_factory("auto")) as loop:  # uvloop if there
            summary = loop.run(
                runner.run_once(force=True, progress=reporter.attempt, on_total=reporter.total)
            )
    finally:
        reporter.finish("")
    if summary.link_error:
        print(printable(f"flush: next hop unreachable: {summary.link_error}"), file=sys.stderr)
    return EX_TEMPFAIL if summary.deferred else EX_OK


def runner_for(queue: QueueConfig, spool: Spool, **kwargs: Any) -> QueueRunner:
    """The queue runner for these sections; ConfigError if there is nowhere to deliver."""
    runner = build_runner(queue, spool, **kwargs)
    if runner is None:
        raise ConfigError("no smarthost configured: set delivery.smarthost or pass --smarthost")
    return runner
