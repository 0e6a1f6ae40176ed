"""Readers: how the bytes in the receive buffer are cut up, chosen by protocol state.

Three readers share one receive buffer (a ``bytearray`` the protocol appends to):

* `CommandReader` cuts command lines (and SASL response lines).  A line ends at CRLF
  and nowhere else.  A bare CR or LF inside a line is an error, or is replaced by a
  space when `BareNewline.REPLACE` is configured; it is never a line end, so that a
  client and this server can never disagree about where a command stops.  A line is at
  most 512 octets with its CRLF (RFC 5321 4.5.3.1.4), or more for commands whose
  extensions raise the limit; an over-long line is discarded as it arrives, so memory
  stays bounded, and reported once its CRLF shows up.
* `DataReader` reads a DATA body.  It removes dot-stuffing (RFC 5321 4.5.2) and ends
  only at CRLF "." CRLF, where the first CRLF may be the one that ended the DATA
  command.  ``LF.LF``, ``CR.CR`` or ``LF.CRLF`` end nothing.  Bare CR/LF, lines over
  1000 octets (4.5.3.1.6), NUL octets and an over-size message are *recorded* and
  answered after the terminator, as 4.2.5 requires; from the first such error on the
  body is dropped, so memory never grows past the maximum message size. Of several,
  the reply names the same one however the input was cut into reads (`_RANK`).
* `ChunkReader` reads exactly the octets a BDAT command announced (RFC 3030); they are
  raw, with no line structure and no stuffing.

NUL is refused in DATA and BDAT alike (by `MessageSink`, which both feed): RFC 5321
4.5.2 and RFC 5322 2.3 allow it in no text, and a next hop that silently drops NUL
octets would read ``CRLF NUL "." CRLF`` as the end of DATA and run what follows as
commands (the SMTP-smuggling scanners send exactly that), so no NUL is ever stored or
relayed.  Stripping it instead would change a message we cannot know the meaning of.

The DATA reader works on runs of bytes between line starts that begin with a dot,
using ``bytes.find``/``count``, rather than on single lines, because a multi-megabyte
body should cost a handful of C-level scans, not a Python loop per line.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum
from typing import Final

__all__ = [
    "COMMAND_LINE_LIMIT",
    "EXTENDED_LINE_LIMITS",
    "SASL_LINE_LIMIT",
    "TEXT_LINE_LIMIT",
    "BareNewline",
    "ChunkEnd",
    "ChunkReader",
    "CommandLine",
    "CommandReader",
    "DataError",
    "DataReader",
    "LineError",
    "MessageEnd",
    "MessageSink",
    "apply_newline_policy",
    "has_bare_newline",
    "has_long_line",
]

COMMAND_LINE_LIMIT = 512  # octets with CRLF, RFC 5321 4.5.3.1.4
TEXT_LINE_LIMIT = 1000  # octets with CRLF, RFC 5321 4.5.3.1.6
SASL_LINE_LIMIT = 12288  # AUTH command and responses, RFC 4954 4
# Extensions raise the command line limit for the commands that carry their
# parameters: SIZE (+26, RFC 1870), ENVID/RET (RFC 3461), AUTH= (+500, RFC 4954 5),
# ORCPT (+500) and NOTIFY.  2048 covers all of them with room to spare.
EXTENDED_LINE_LIMITS: dict[bytes, int] = {
    b"MAIL ": 2048,
    b"RCPT ": 2048,
    b"AUTH ": SASL_LINE_LIMIT,
}

_TERMINATOR = b".\r\n"
_NO_EXTENSIONS: dict[bytes, int] = {}
# A line that starts with a dot. re finds it 2.5 to 3 times faster than bytearray.find
# in a 10 KiB body without one (9 against 24 µs, timeit): its search skips to each CR.
_DOT_LINE = re.compile(rb"\r\n\.")


class BareNewline(Enum):
    """What to do with a CR or LF that is not part of a CRLF pair."""

    REJECT = "reject"
    REPLACE = "replace"


# A CR that no LF follows. re looks for the literal CR first and jumps from one to the
# next, so the search costs about what a one-octet count does.
_BARE_CR = re.compile(rb"\r(?!\n)")


def has_bare_newline(data: bytes) -> bool:
    """True if ``data`` holds a CR or LF outside a CRLF pair.

    Without a bare CR every CR begins a CRLF, so there are as many LFs as CRs exactly
    when no LF is bare either. Two one-octet counts and that search take about 11 µs
    for smtp-source's 10 KiB body, against 16 µs for three counts (the two-octet count
    of CRLF alone took 8.5 µs: its search does not skip ahead as memchr does).
    """
    return data.count(b"\r") != data.count(b"\n") or _BARE_CR.search(data) is not None


def has_long_line(data: bytes) -> bool:
    """True if a line of a whole body (CRLF line ends) is over RFC 5321's 1000 octets.

    A BDAT message is checked whole, on the event loop, so the cost must stay linear:
    the regex this replaced (999 octets that are not CR or LF) restarted at every octet
    of a line and scanned to its end, about 500 steps an octet for lines near the
    limit (5.6 s for 1 MiB of 998-octet lines, 2.1 ms for smtp-source's 10 KiB body);
    `_long_line_between` takes one ``rfind`` per kilobyte.
    """
    return _long_line_between(data, 0, len(data))


def apply_newline_policy(data: bytes, policy: BareNewline) -> bytes | None:
    """Enforce the bare-newline policy on a whole body: None means reject it.

    With `BareNewline.REPLACE` each bare CR or LF becomes CRLF, the line end the
    sender most likely meant.
    """
    if not has_bare_newline(data):
        return data
    if policy is BareNewline.REJECT:
        return None
    return _crlf_line_ends(data)


def _crlf_line_ends(data: bytes) -> bytes:
    """``data`` with each bare CR or LF made a CRLF (pairs stay as they are).

    Three C-level replaces: pairs to LF, the CRs left (all bare) to LF, then every LF to
    CRLF. The regex with a look-behind it replaces tried a match at every octet: 26.7 ms
    a MiB of LF-ended lines against 3.2 ms, run on the event loop for every such message
    under `BareNewline.REPLACE`.
    """
    return data.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\r\n")


# --- command lines -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CommandLine:
    """One complete line, without its CRLF."""

    line: bytes


class LineErrorKind(Enum):
    TOO_LONG = "too long"
    BARE_NEWLINE = "bare newline"


@dataclass(frozen=True, slots=True)
class LineError:
    """A line that was read to its CRLF but cannot be used."""

    kind: LineErrorKind


class CommandReader:
    """Cuts CRLF-terminated lines out of the buffer, within a length limit.

    ``limit`` is the default maximum (CRLF included); ``extended`` maps upper-case line
    prefixes to larger limits.  `skip` makes the reader drop a number of octets first:
    that is how the octets of a refused BDAT chunk are consumed without being taken
    for commands (RFC 3030 2).
    """

    __slots__ = ("_discarding", "_extended", "_limit", "_policy", "_skip")

    def __init__(
        self,
        policy: BareNewline,
        limit: int = COMMAND_LINE_LIMIT,
        extended: dict[bytes, int] | None = None,
    ) -> None:
        extended = extended or _NO_EXTENSIONS
        if min(extended.values(), default=limit) < limit:
            raise ValueError("an extended line limit must not be below the default one")
        self._policy = policy
        self._limit = limit
        self._extended = extended
        self._discarding = False
        self._skip = 0

    def skip(self, octets: int) -> None:
        """Drop the next ``octets`` octets before looking for lines."""
        self._skip += octets

    @property
    def discarding(self) -> bool:
        """Whether it is inside an over-long line, which it drops as it comes."""
        return self._discarding

    @property
    def skipping(self) -> int:
        """Octets still to drop before the next line (a refused BDAT chunk's)."""
        return self._skip

    def reset(self) -> None:
        """Forget a half-read line and pending skips (after STARTTLS)."""
        self._discarding = False
        self._skip = 0

    def read(self, buf: bytearray) -> CommandLine | LineError | None:
        """Take one line from ``buf``; None means more input is needed."""
        if self._skip:
            taken = min(self._skip, len(buf))
            del buf[:taken]
            self._skip -= taken
            if self._skip:
                return None
        end = buf.find(b"\r\n")
        if self._discarding:
            return self._discard(buf, end)
        # An extended limit only raises the default one, so a line (or the start of
        # one) within the default needs no look at its prefix: most lines, every time.
        if end < 0:
            if len(buf) < self._limit or len(buf) < self._limit_for(buf):
                return None
            self._discarding = True
            return self._discard(buf, end)
        line = bytes(buf[:end])
        del buf[: end + 2]
        if end + 2 > self._limit and end + 2 > self._limit_for(line):
            return LineError(LineErrorKind.TOO_LONG)
        if b"\r" in line or b"\n" in line:
            if self._policy is BareNewline.REJECT:
                return LineError(LineErrorKind.BARE_NEWLINE)
            line = line.replace(b"\r", b" ").replace(b"\n", b" ")
        return CommandLine(line)

    def _limit_for(self, buf: bytes | bytearray) -> int:
        prefix = bytes(buf[:5]).upper()
        return self._extended.get(prefix, self._limit)

    def _discard(self, buf: bytearray, end: int) -> LineError | None:
        """Drop an over-long line as it arrives; report it once its CRLF is seen."""
        if end >= 0:
            del buf[: end + 2]
            self._discarding = False
            return LineError(LineErrorKind.TOO_LONG)
        # Keep a trailing CR: it may be the first half of the CRLF.
        keep = 1 if buf.endswith(b"\r") else 0
        del buf[: len(buf) - keep]
        return None


# --- message bodies ----------------------------------------------------------------


class DataError(Enum):
    """Why a received message cannot be accepted, found while reading it."""

    TOO_BIG = "too big"
    LINE_TOO_LONG = "line too long"
    BARE_NEWLINE = "bare newline"
    NUL = "NUL octet"


# A message with several faults is answered for the one that ranks first here, wherever
# each is: answering the first one read would make the reply depend on how the network
# cut the input into reads (a NUL in one read and a bare LF in the next were answered
# "NUL", both in one read "bare CR or LF"). The octets that SMTP smuggling is made of
# (bare CR/LF, NUL) come first, then the size, then a long line. Once a fault is found,
# only those that outrank it are still looked for, so a refused message costs no more
# than an accepted one.
_RANK: Final = {
    DataError.BARE_NEWLINE: 0,
    DataError.NUL: 1,
    DataError.TOO_BIG: 2,
    DataError.LINE_TOO_LONG: 3,
}


class MessageSink:
    """Collects a message body up to ``max_size`` octets, refusing NUL octets.

    The first error drops what was collected and everything after it; the size keeps
    being counted, but memory is never spent on a message that will be refused. `error`
    is the highest-ranked fault found (`_RANK`), whatever the order of the writes.
    """

    __slots__ = ("_body", "error", "max_size", "size")

    def __init__(self, max_size: int) -> None:
        self.max_size = max_size
        self.size = 0
        self.error: DataError | None = None
        self._body = bytearray()

    def write(self, data: bytes) -> None:
        self.size += len(data)
        error = self.error
        if error is None or _RANK[error] > _RANK[DataError.NUL]:  # a NUL still outranks it
            if b"\0" in data:
                self.fail(DataError.NUL)
            elif self.size > self.max_size:
                self.fail(DataError.TOO_BIG)
            elif error is None:
                self._body += data

    def fail(self, error: DataError) -> None:
        """Record `error` if it outranks what was found so far, and let go of the body."""
        current = self.error
        if current is None or _RANK[error] < _RANK[current]:
            self.error = error
            self._body = bytearray()

    @property
    def buffered(self) -> int:
        """Octets held in memory (never more than ``max_size``)."""
        return len(self._body)

    def getvalue(self) -> bytes:
        return bytes(self._body)


def _long_line_between(data: bytes, start: int, end: int) -> bool:
    """True if a line of ``data[start:end]`` (lines split at CRLF) is over the limit.

    It jumps from the last CRLF of each window of TEXT_LINE_LIMIT octets to the next
    window, so a body of ordinary lines costs one ``rfind`` per kilobyte. Splitting
    the body into lines cost a bytes object per line: about 100 µs for a 10 KiB
    message, and more the shorter its lines (a client chooses them).
    """
    while end - start > TEXT_LINE_LIMIT - 2:
        crlf = data.rfind(b"\r\n", start, start + TEXT_LINE_LIMIT)
        if crlf < 0:
            return True  # TEXT_LINE_LIMIT - 1 octets or more before the next CRLF
        start = crlf + 2
    return False


@dataclass(frozen=True, slots=True)
class MessageEnd:
    """The DATA terminator was read: the body, or the error to answer with."""

    data: bytes
    size: int
    error: DataError | None


class DataReader:
    """Reads one DATA body from the buffer until CRLF.CRLF, unstuffing dots."""

    __slots__ = ("_line_len", "_line_start", "_policy", "_sink")

    def __init__(self, policy: BareNewline, max_size: int) -> None:
        self._policy = policy
        self._sink = MessageSink(max_size)
        self._line_start = True  # the DATA command's own CRLF opens the first line
        self._line_len = 0  # octets of the current, unfinished line

    def read(self, buf: bytearray) -> MessageEnd | None:
        """Consume ``buf``; a `MessageEnd` once the terminator is read, else None."""
        while buf:
            if self._line_start:
                if len(buf) < 3 and _TERMINATOR.startswith(buf):
                    return None  # "." or ".\r": could still be the terminator
                if buf.startswith(_TERMINATOR):
                    del buf[:3]
                    return self._finish()
                if buf[0] == 0x2E:
                    del buf[:1]  # a stuffed dot; it does not count toward the limit
                self._line_start = False
            # Everything up to the next line that starts with a dot needs no
            # per-line handling; without such a line, take all but a trailing CR.
            dot_line = _DOT_LINE.search(buf)
            if dot_line is not None:
                end = dot_line.start() + 2
            else:
                end = len(buf) - 1 if buf.endswith(b"\r") else len(buf)
            if end == 0:
                return None
            segment = bytes(buf[:end])
            del buf[:end]
            self._line_start = segment.endswith(b"\r\n")
            self._take(segment)
        return None

    def _take(self, segment: bytes) -> None:
        sink = self._sink
        error = sink.error
        if error is None:
            if has_bare_newline(segment):
                if self._policy is BareNewline.REJECT:
                    sink.fail(DataError.BARE_NEWLINE)
                else:
                    segment = _crlf_line_ends(segment)
            if self._too_long(segment):
                sink.fail(DataError.LINE_TOO_LONG)
        elif error is not DataError.BARE_NEWLINE and has_bare_newline(segment):
            # A refused message: only a fault that outranks `error` still matters (a
            # long line never does), and the size, counted as if it were accepted.
            if self._policy is BareNewline.REJECT:
                sink.fail(DataError.BARE_NEWLINE)
            else:
                segment = _crlf_line_ends(segment)
        sink.write(segment)

    def _too_long(self, segment: bytes) -> bool:
        """Track line lengths across segments; True if any line passed 1000 octets."""
        first = segment.find(b"\r\n")
        if first < 0:
            self._line_len += len(segment)
            return self._line_len + 2 > TEXT_LINE_LIMIT
        too_long = self._line_len + first + 2 > TEXT_LINE_LIMIT
        last = segment.rfind(b"\r\n")
        too_long = too_long or _long_line_between(segment, first + 2, last)
        self._line_len = len(segment) - last - 2
        return too_long or self._line_len + 2 > TEXT_LINE_LIMIT

    def _finish(self) -> MessageEnd:
        sink = self._sink
        return MessageEnd(sink.getvalue(), sink.size, sink.error)


@dataclass(frozen=True, slots=True)
class ChunkEnd:
    """All octets of a BDAT chunk were read."""

    size: int
    last: bool


class ChunkReader:
    """Reads the octets of one BDAT chunk into a `MessageSink` shared by all chunks."""

    __slots__ = ("_last", "_remaining", "_sink", "_size")

    def __init__(self, sink: MessageSink, size: int, last: bool) -> None:
        self._sink = sink
        self._size = size
        self._remaining = size
        self._last = last

    @property
    def remaining(self) -> int:
        """Octets of the chunk not read yet."""
        return self._remaining

    def read(self, buf: bytearray) -> ChunkEnd | None:
        """Consume up to the rest of the chunk; a `ChunkEnd` when it is complete."""
        taken = min(self._remaining, len(buf))
        if taken:
            self._sink.write(bytes(buf[:taken]))
            del buf[:taken]
            self._remaining -= taken
        if self._remaining:
            return None
        return ChunkEnd(self._size, self._last)
