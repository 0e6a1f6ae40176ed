"""One queue tool (delete, hold, release, requeue) applied to many messages, and its report.

What it acts on, as Postfix's ``postsuper`` and exim's ``exiqgrep`` allow:

* queue ids named on the command line (an error for one does not stop the others);
* ``ALL``: every message in the command's default states (or ``--state``);
* ``-``: queue ids read from standard input, one per line (``postsuper -d -``);
* filters alone (``--from``, ``--to``, ``--older-than``, ``--younger-than``): every
  message that matches; with ids, they narrow those ids.

Each message gets one line on stdout (``ID: deleted``), and a last line sums up what
was done (``-- 3 messages deleted, 1 failed``), as postsuper reports "Deleted: 3
messages". The exit status is that of the first failure (sysexits), else 0. With a
selection (``ALL`` or filters) a message that is delivered meanwhile is not an error;
a named id that is gone is (67), as before.
"""

from __future__ import annotations

import itertools
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace
from typing import TextIO

from netserver.errors import EX_CANTCREAT, EX_OK, NetserverError, UsageError

from . import listing, tools
from .printable import printable
from .selection import Selection
from .spool import Junk, Spool, valid_id
from .states import QueueState

ALL = "ALL"
STDIN = "-"


@dataclass(frozen=True)
class QueueTool:
    """A queue tool: what it does to one message, and the words of its report."""

    name: str
    done: str  # the word for a message it changed
    unchanged: str  # the word for a message that was already so
    run: Callable[[Spool, str], bool | None]
    default_states: tuple[QueueState, ...]
    target: QueueState | None  # the state it moves messages to (scanned first)


_Q = QueueState
_READABLE = (_Q.QUEUE, _Q.DEFERRED, _Q.HOLD)  # every state but corrupt/
ACTIONS = {
    a.name: a
    for a in (
        QueueTool("delete", "deleted", "", tools.delete, _READABLE, None),
        QueueTool("hold", "held", "already held", tools.hold, (_Q.QUEUE, _Q.DEFERRED), _Q.HOLD),
        QueueTool("release", "released", "not held", tools.release, (_Q.HOLD,), _Q.QUEUE),
        QueueTool("requeue", "requeued", "", tools.requeue, _READABLE, _Q.QUEUE),
    )
}


# The summary's count of junk entries removed: they are not messages (leafmail.listing).
JUNK_DELETED = "junk entries deleted"


@dataclass
class ToolReport:
    """Counts per outcome and the first failure's exit status."""

    out: TextIO
    err: TextIO
    counts: Counter[str]
    status: int = EX_OK

    def done(self, name: str, word: str, counted: str = "") -> None:
        """One line for `name`; counted under `word`, or `counted` (junk is no message)."""
        self.counts[counted or word] += 1
        self.out.write(f"{printable(name)}: {word}\n")

    def failed(self, prog: str, message: str, code: int) -> None:
        self.counts["failed"] += 1
        self.err.write(f"{prog}: {message}\n")
        self.status = self.status or code

    def summary(self, action: QueueTool) -> str:
        changed = self.counts.pop(action.done, 0)
        if not changed and not self.counts:
            return "-- no messages selected\n"
        parts = [f"{changed} message{'s' if changed != 1 else ''} {action.done}"]
        parts += [_counted(n, word) for word, n in self.counts.items()]
        return "-- " + ", ".join(parts) + "\n"


def _counted(n: int, word: str) -> str:
    if word == JUNK_DELETED and n == 1:
        return "1 junk entry deleted"
    return f"{n} {word}"


def run(
    action_name: str,
    spool: Spool,
    words: list[str],
    selection: Selection,
    *,
    stdin: TextIO,
    out: TextIO,
    err: TextIO,
    prog: str = "leafmail",
    junk: bool = False,
) -> tuple[int, int]:
    """Apply the action to what `words` and `selection` name; (exit status, changed).

    `junk` (delete only) also removes every junk entry of every state directory.
    """
    action = ACTIONS[action_name]
    report = ToolReport(out, err, Counter())
    wanted = words or selection.filtered or not junk
    chosen = targets(spool, action, words, selection, stdin) if wanted else iter(())
    for target in itertools.chain(chosen, _junk(spool) if junk else ()):
        if isinstance(target, Junk):
            _remove_junk(spool, action, target, report, prog)
        else:
            qid, named = target
            _apply(spool, action, qid, named, report, prog)
    changed = report.counts[action.done]
    out.write(report.summary(action))
    return report.status, changed


def _apply(
    spool: Spool, action: QueueTool, qid: str, named: bool, report: ToolReport, prog: str
) -> None:
    try:
        changed = action.run(spool, qid)
    except tools.NoSuchMessage as exc:
        if named:
            report.failed(prog, str(exc), exc.exit_code)
        return  # selected by ALL or a filter, delivered meanwhile: nothing to do
    except NetserverError as exc:
        report.failed(prog, str(exc), exc.exit_code)
        return
    except OSError as exc:
        report.failed(prog, f"{qid}: cannot {action.name}: {exc.strerror}", EX_CANTCREAT)
        return
    report.done(qid, action.unchanged if changed is False else action.done)


def _remove_junk(
    spool: Spool, action: QueueTool, junk: Junk, report: ToolReport, prog: str
) -> None:
    if action.name != "delete":
        error = tools.not_a_message(junk)
        report.failed(prog, str(error), error.exit_code)
        return
    try:
        spool.remove_junk(junk)
    except OSError as exc:
        why = f"{printable(junk.ref)}: cannot delete: {exc.strerror}"
        report.failed(prog, why, EX_CANTCREAT)
        return
    report.done(junk.ref, "deleted", JUNK_DELETED)


ToolTarget = tuple[str, bool] | Junk


def targets(
    spool: Spool, action: QueueTool, words: list[str], selection: Selection, stdin: TextIO
) -> Iterator[ToolTarget]:
    """What to act on: (queue id, named on the command line?) or a junk entry."""
    if ALL in words:
        if len(words) > 1:
            raise UsageError(f"{ALL} selects every message; give it alone (with filters)")
        yield from _scan(spool, action, selection)
    elif words:
        now = time.time()
        for word in _words(words, stdin):
            yield from _named(spool, word, selection, now)
    elif selection.filtered:
        yield from _scan(spool, action, selection)
    else:
        raise UsageError(
            f"say which messages to {action.name}: queue ids, {ALL}, - (ids on stdin), "
            "or a filter such as --from, --to or --older-than"
        )


def _words(words: list[str], stdin: TextIO) -> Iterator[str]:
    for word in words:
        if word == STDIN:
            yield from (line.strip() for line in stdin if line.strip())
        else:
            yield word


def _named(spool: Spool, word: str, selection: Selection, now: float) -> Iterator[ToolTarget]:
    """A word of the command line: STATE/NAME of junk as `leafmail queue` lists it, a
    queue id whose file is junk (a symlink), or a queue id for the action to check."""
    if "/" in word or (valid_id(word) and spool.find(word) is None):
        junk = tools.find_junk(spool, word)
        if junk is not None:
            yield junk
            return
    if not selection.filtered or _matches(spool, word, selection, now):
        yield word, True


def _matches(spool: Spool, qid: str, selection: Selection, now: float) -> bool:
    """Whether a named message passes the filters (a bad id passes, to be reported)."""
    state = spool.find(qid)
    if state is None:
        return True  # the action says what is wrong with it
    if state == QueueState.CORRUPT:
        return QueueState.CORRUPT in selection.states and not selection.by_envelope
    if state not in selection.states or not selection.id_matches(qid, now):
        return False
    return not selection.by_envelope or _envelope_matches(spool, qid, state, selection)


def _envelope_matches(spool: Spool, qid: str, state: QueueState, selection: Selection) -> bool:
    """As the listing would show it (gone, corrupt or unreadable: no match)."""
    entry = listing.entry_for(spool, state, qid, selection)
    return entry is not None and entry.state not in (listing.JUNK, listing.CORRUPT)


def _scan(spool: Spool, action: QueueTool, selection: Selection) -> Iterator[ToolTarget]:
    """Every selected message, streamed; the action's target state is read first, so a
    message it moves there is never met twice."""
    states = sorted(selection.states, key=lambda s: s != action.target)
    for qid in _selected(spool, replace(selection, states=tuple(states))):
        yield qid, False


def _junk(spool: Spool) -> Iterator[Junk]:
    """Every junk entry of every state directory (what `leafmail queue` lists as junk)."""
    for state in QueueState:
        for item in spool.scan(state):
            if isinstance(item, Junk):
                yield item


def _selected(spool: Spool, selection: Selection) -> Iterable[str]:
    """The ids `iter_queue` would list (junk is never selected by ALL or a filter)."""
    now = time.time()
    for state in selection.states:
        for item in spool.scan(state):
            if isinstance(item, Junk) or not selection.id_matches(item, now):
                continue
            if not selection.by_envelope or _envelope_matches(spool, item, state, selection):
                yield item
