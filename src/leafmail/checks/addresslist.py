"""An address field cut into parts that the email package parses in linear time.

CPython's header parser (`email._header_value_parser`) copies the rest of the value
for each token it takes, and splits the rest again for each RFC 2047 encoded word, so
one field costs time that grows with the square of its length. Measured on the bench
VM, a 100 KB To: costs 0.7 s of CPU when made of encoded words and 11 s when made of
``a.a.a.``, while any part of 2,048 characters or less costs at most ~10 µs a
character. A field longer than `PART_SIZE` is therefore cut at its list commas into
parts of at most `PART_SIZE` characters, each parsed on its own: the work is then
linear in the header's size.

A comma is cut at only when the parser is sure to see it as the end of an address
(RFC 5322 3.4 address-list): outside quoted strings, comments, domain literals, angle
brackets (obs-route has commas), encoded words and groups (a group's members belong
to it). CPython reads an encoded word as one token even with specials inside, but
only where it decodes (its `get_encoded_word` rules, followed here exactly) and where
a token begins; elsewhere the same characters are text whose quotes and commas count.
Where the scan is unsure (such a word after a "." or right after another word, or
inside quotes, or too long to decode) it cuts nowhere after it, which is always safe:
fewer cuts only make a part longer. (A word taken as one where CPython reads text, or
the reverse, made a cut inside a quoted string: a valid field refused, or an invalid
one passed, each part being valid.) An address (or a whole group) longer than
`PART_SIZE` is not parsed at all; the caller reports it. Postfix bounds the same cost
with ``header_address_token_limit`` and drops the tokens past it; leafmail never
changes a message, so it reports instead.
"""

from __future__ import annotations

import bisect
import re

# The parser's own decoding (no stub), so a word is taken exactly where CPython takes one.
from email import _encoded_words as _ew  # type: ignore[attr-defined]

# The longest part handed to the parser, in characters of the unfolded value. No
# mailbox needs this much: a path is at most 256 octets (RFC 5321 4.5.3.1.3) and a
# display name a few encoded words of at most 75 (RFC 2047 2).
PART_SIZE = 2048

_SPECIAL = re.compile(r'[\\"()<>\[\],:;]|=\?')
_LIST_SPECIAL = re.compile(r'[\\"()<>\[\],:;]')  # what changes the scan
_QUOTE_SPECIAL = re.compile(r'["\\]')  # what ends a quoted string's scan
_OPEN, _CLOSE, _MARK = re.compile(r"=\?"), re.compile(r"\?="), re.compile(r"\?")
_HEX = frozenset("0123456789abcdefABCDEF")
# Where a token begins for CPython (after these an encoded word is tried), and the
# rest of its specials ("." and the closing ones: what comes next depends on context).
_TOKEN_STARTS = frozenset(' \t"),<:;@')
_CPYTHON_SPECIALS = frozenset('()<>@,:;.\\"[]')


def address_parts(value: str, size: int = PART_SIZE) -> list[str] | None:
    """`value` as address lists to parse one by one, each at most `size` characters:
    ``[value]`` itself when it is that short; None when one address is longer."""
    if len(value) <= size:
        return [value]
    parts: list[str] = []
    start = 0
    for cut in (*_list_commas(value), len(value)):
        if cut - start > size:
            return None
        if parts and len(parts[-1]) + 1 + (cut - start) <= size:
            parts[-1] += "," + value[start:cut]
        else:
            parts.append(value[start:cut])
        start = cut + 1
    return parts


def _list_commas(value: str) -> list[int]:
    """Where the commas between the addresses of `value` are (see the module doc). It
    stops at the first place where it cannot tell how CPython reads on (an encoded
    word whose reading depends on what the parser is in): the rest is then one part."""
    commas: list[int] = []
    words = _EncodedWords(value)
    quote = literal = angle = group = False
    depth = 0  # of nested comments
    word_end = -1  # where the last encoded word skipped ended
    at = 0
    while (found := _SPECIAL.search(value, at)) is not None:
        char, start, at = found.group(), found.start(), found.end()
        if char == "\\":
            at += 1 if quote or depth or literal else 0  # a quoted pair
        elif quote:
            if char == "=?" and words.hides(start, _QUOTE_SPECIAL):
                return commas  # a word CPython may read inside the quotes hides their end
            quote = char != '"'
        elif depth:
            depth += {"(": 1, ")": -1}.get(char, 0)
        elif literal:
            literal = char != "]"
        elif char == "=?":
            end = words.end(start)
            if end is None:
                continue  # not a word: CPython reads it as text, as this scan does
            if words.hides(start, _LIST_SPECIAL):  # else read as a word or not: the same
                taken = _taken_at(value, start, word_end)
                if taken is None or (taken and end is _LONG):
                    return commas  # how CPython reads on depends on what it is in
                if not taken:
                    continue
            at = word_end = end
        elif char in '"([':
            quote, depth, literal = char == '"', int(char == "("), char == "["
        elif char in "<>":
            angle = char == "<"
        elif angle:
            continue  # obs-route: "<@a,@b:user@c>"
        elif char == ":":
            group = True
        elif char == ";":
            group = False
        elif char == "," and not group and start != word_end:
            # (Not right after a word: CPython finds a word followed by anything but
            # white space invalid, and a part ending there would hide that.)
            commas.append(start)
    return commas


def _taken_at(value: str, start: int, word_end: int) -> bool | None:
    """Whether CPython tries an encoded word at `start` (outside quotes): where a token
    begins, after white space, one of the specials that end one, or the start; not
    inside an atom, which `get_atext` reads whole. None where it depends on what the
    parser is in: after "." (a dot-atom reads on, a phrase does not), another
    special, or right after an encoded word."""
    if start == word_end:
        return None
    previous = value[start - 1] if start else " "
    if previous in _TOKEN_STARTS:
        return True
    return None if previous in _CPYTHON_SPECIALS else False


class _Long(int):
    """The end of an encoded word too long to decode here (over `PART_SIZE`)."""


_LONG = _Long(-1)


class _EncodedWords:
    """What CPython's `get_encoded_word` would take as an encoded word at a "=?" of one
    field, in time that does not grow with the field: every "?=", "?" and special is
    found once, and the text decoded (at most `PART_SIZE` characters) only where the
    word has the form "=?" charset "?" encoding "?" text "?=". Each "?=" closes the
    candidates of the stretch before it, which hold one such form at most, so the
    decoding is linear in the field too."""

    def __init__(self, value: str) -> None:
        self.value = value
        self.opens = [m.start() for m in _OPEN.finditer(value)]
        self.closes = [m.start() for m in _CLOSE.finditer(value)]
        self.marks = [m.start() for m in _MARK.finditer(value)]
        self.found: dict[re.Pattern[str], list[int]] = {}
        self.ends: dict[int, int | None] = {}

    def end(self, start: int) -> int | None:
        """Where the word CPython would take at `start` ends (if it tries one there);
        None if it would not take one (no "?=", not the form, or the text does not
        decode); `_LONG` if it is too long to tell."""
        if start not in self.ends:
            self.ends[start] = self._end(start)
        return self.ends[start]

    def _end(self, start: int) -> int | None:
        value = self.value
        close = _next(self.closes, start + 2)
        if close is None:
            return None
        text_end, end = close, close + 2
        escape = len(value) >= end + 2 and set(value[end : end + 2]) <= _HEX
        if escape and self._marks(start + 2, close) < 2:  # "=?cs?q?=41?=": read on
            following = _next(self.closes, end)
            text_end = end = len(value) if following is None else following
            end += 0 if following is None else 2
        if self._marks(start + 2, text_end) != 2:
            return None
        if end - start > PART_SIZE:
            return _LONG
        try:
            _ew.decode("=?" + value[start + 2 : text_end] + "?=")
        except (ValueError, KeyError):
            return None  # as get_encoded_word: then CPython reads it as text
        except Exception:
            return _LONG  # CPython's parser raises too: no cut can be trusted
        return end

    def hides(self, start: int, chars: re.Pattern[str]) -> bool:
        """Whether reading the word at `start` as a word or as text could scan
        differently: it holds one of `chars` or another "=?", or is too long to tell."""
        end = self.end(start)
        if end is None:
            return False
        if end is _LONG:
            return True
        inner = _next(self._positions(chars), start + 2)
        opens = _next(self.opens, start + 1)
        return (inner is not None and inner < end) or (opens is not None and opens < end)

    def _marks(self, begin: int, end: int) -> int:
        return bisect.bisect_left(self.marks, end) - bisect.bisect_left(self.marks, begin)

    def _positions(self, chars: re.Pattern[str]) -> list[int]:
        if chars not in self.found:
            self.found[chars] = [m.start() for m in chars.finditer(self.value)]
        return self.found[chars]


def _next(positions: list[int], at: int) -> int | None:
    """The first of the sorted `positions` at or after `at`."""
    index = bisect.bisect_left(positions, at)
    return positions[index] if index < len(positions) else None
