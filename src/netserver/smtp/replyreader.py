"""Server replies read incrementally, for the client role (RFC 5321 4.2, RFC 2034).

`ReplyReader.feed` takes whatever bytes arrived, in pieces of any size, and returns
the replies they complete, as `Reply` values: the basic code, the enhanced status code
when the server put one on the first line (RFC 2034 4), and the lines of text without
either. Several replies may arrive in one read (a pipelined group, RFC 2920), and one
reply may arrive over several reads; neither changes the result.

Everything the server controls is bounded, so a broken or hostile server costs little:
a line longer than `MAX_LINE` octets, a reply of more than `MAX_REPLY_LINES` lines or
`MAX_REPLY` octets, a code that is not three digits with a second digit 0-5 (RFC 5321
4.2), and a continuation line whose code differs from the first (RFC 5321 4.2.1) are a
`BadReply`, after which the reader refuses everything. Lines may end in CRLF or, as
Postfix's client tolerates, a bare LF. Text is decoded as UTF-8 (invalid octets
replaced) and otherwise kept exactly as the server sent it (a `Reply` marked
``received``, which `Reply.to_bytes` will not send on): what a reply says is
recorded as it was (a queue's `--json` shows it exact), and each human-readable output
escapes control characters where it prints them (the bounce's `clean`, the queue
tools' `printable`), so no terminal or mail header receives them raw.
"""

from __future__ import annotations

import re
from typing import Final

from ..memo import BoundedMemo
from .replies import Reply

__all__ = ["MAX_LINE", "MAX_REPLY", "MAX_REPLY_LINES", "BadReply", "ReplyReader", "parse_reply"]

MAX_LINE: Final = 8192  # octets in one reply line, its line end included
MAX_REPLY: Final = 32768  # octets in one (multi-line) reply
MAX_REPLY_LINES: Final = 200  # lines in one reply; an EHLO reply has about twenty

_ENHANCED: Final = re.compile(r"([245])\.[0-9]{1,3}\.[0-9]{1,3}(?= |\Z)")
_MEMO_LIMIT: Final = 256  # distinct one-line replies remembered (a server has a few)
_MEMO_LINE: Final = 512  # longer lines are parsed each time: the memo stays small


class BadReply(Exception):
    """The server broke the reply syntax or a bound; the connection cannot go on."""


def _text(raw: bytes) -> str:
    return raw.decode("utf-8", "replace").rstrip(" \t\r")


def _head(line: bytes) -> tuple[int, bool]:
    """(code, more lines follow) of one line without its line end; BadReply if malformed."""
    digits, separator = line[:3], line[3:4]
    if len(digits) != 3 or not digits.isdigit() or separator not in (b"", b" ", b"-"):
        raise BadReply(f"malformed reply line: {line[:80]!r}")
    code = int(digits)
    if not 200 <= code <= 559 or code % 100 > 59:
        raise BadReply(f"not an SMTP reply code: {digits.decode()}")
    return code, separator == b"-"


def parse_reply(code: int, lines: list[bytes]) -> Reply:
    """The `Reply` of `code` whose lines (each without code and separator) are `lines`.

    The enhanced code is taken from the first line when it has the reply's class
    (RFC 3463: 2, 4 or 5, as the basic code) and the reply is not 3xx, whose text is
    base64 or free (RFC 2034); it is then removed from every line that starts with it.
    """
    texts = [_text(raw) for raw in lines]
    enhanced = None
    if code // 100 != 3 and (match := _ENHANCED.match(texts[0])) and match[1] == str(code)[0]:
        enhanced = match[0]
        texts = [_without(t, enhanced) for t in texts]
    return Reply(code, enhanced, texts[0] if len(texts) == 1 else tuple(texts), received=True)


def _without(text: str, enhanced: str) -> str:
    """`text` without a leading `enhanced` code (only a whole one, followed by SP or end)."""
    rest = text[len(enhanced) :]
    return rest.lstrip(" ") if text.startswith(enhanced) and rest[:1] in ("", " ") else text


def _one_line(line: bytes) -> Reply:
    """A whole one-line reply (memoized: servers repeat the same few)."""
    code, _more = _head(line)
    return parse_reply(code, [line[4:]])


class ReplyReader:
    """Bytes in, complete replies out; keeps the part of a reply still arriving."""

    __slots__ = ("_broken", "_buffer", "_code", "_lines", "_memo", "_size")

    def __init__(self) -> None:
        self._buffer = b""
        self._code = 0  # of the multi-line reply being read, 0 between replies
        self._lines: list[bytes] = []
        self._size = 0
        self._broken: BadReply | None = None
        self._memo: BoundedMemo[bytes, Reply] = BoundedMemo(_one_line, _MEMO_LIMIT)

    @property
    def pending(self) -> bool:
        """True while bytes of a reply not yet complete are held."""
        return bool(self._buffer) or bool(self._lines)

    def feed(self, data: bytes) -> list[Reply]:
        """The replies `data` completes, in order; BadReply (then always) on bad input."""
        if self._broken is not None:
            raise self._broken
        buffer = self._buffer + data if self._buffer else data
        replies: list[Reply] = []
        start = 0
        try:
            while (end := buffer.find(b"\n", start)) >= 0:
                if end + 1 - start > MAX_LINE:
                    raise BadReply("reply line too long")
                line = buffer[start:end]
                start = end + 1
                if line.endswith(b"\r"):
                    line = line[:-1]
                reply = self._line(line)
                if reply is not None:
                    replies.append(reply)
            self._buffer = buffer[start:]
            if len(self._buffer) > MAX_LINE:
                raise BadReply("reply line too long")
        except BadReply as exc:
            self._broken = exc
            self._buffer = b""
            raise
        return replies

    def _line(self, line: bytes) -> Reply | None:
        if not self._lines and line[3:4] != b"-":
            # The usual case: a one-line reply, most often one seen before.
            return self._memo(line) if len(line) <= _MEMO_LINE else _one_line(line)
        code, more = _head(line)
        if self._lines and code != self._code:
            raise BadReply(f"reply line with code {code} inside a {self._code} reply")
        self._code = code
        self._lines.append(line[4:])
        self._size += len(line) + 2
        if len(self._lines) > MAX_REPLY_LINES or self._size > MAX_REPLY:
            raise BadReply("reply too long")
        if more:
            return None
        lines, self._lines, self._size, self._code = self._lines, [], 0, 0
        return parse_reply(code, lines)
