"""The header section of a message as raw fields, for the checks that read headers.

The checks need the fields exactly as received: to count them, to parse them, and to
remove one (a forged Authentication-Results) without touching a byte of the others.
So this is a small splitter over bytes, not `email.message`, which would re-encode.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..trace import header_section

# RFC 5322 2.2: a field name is printable ASCII but the colon; obs-syntax allows
# white space before the colon (4.5).
_FIELD_START = re.compile(rb"([\x21-\x39\x3b-\x7e]+)[ \t]*:")


@dataclass(frozen=True)
class RawField:
    """One header field: its name and its raw text, continuation lines and CRLF included."""

    name: str
    raw: bytes

    @property
    def key(self) -> str:
        """The name in lower case, for comparisons (field names are case-insensitive)."""
        return self.name.lower()

    @property
    def value(self) -> str:
        """The unfolded value (RFC 5322 2.2.3), UTF-8 with U+FFFD for other bytes."""
        body = self.raw.split(b":", 1)[1]
        unfolded = body.replace(b"\r\n", b"")
        return unfolded.decode("utf-8", errors="replace").strip()


@dataclass(frozen=True)
class Header:
    """The header section: its fields in order, and the lines that are not fields."""

    fields: tuple[RawField, ...]
    malformed: tuple[bytes, ...]

    def named(self, name: str) -> list[RawField]:
        """The fields called `name` (any case), in order."""
        key = name.lower()
        return [f for f in self.fields if f.key == key]


_COMMENT = re.compile(r"\((?:[^()\\]|\\.)*\)")


def without_comments(text: str) -> str:
    """`text` with its RFC 5322 comments (parenthesized, nesting) replaced by a space."""
    for _ in range(8):  # innermost first; a few rounds take any sane nesting out
        text, count = _COMMENT.subn(" ", text)
        if not count:
            break
    return text


def parse_header(data: bytes) -> Header:
    """Split the header section of `data` into fields and malformed lines."""
    fields: list[tuple[str, list[bytes]]] = []
    malformed: list[bytes] = []
    for line in _lines(header_section(data)):
        if line[:1] in (b" ", b"\t") and fields:
            fields[-1][1].append(line)
            continue
        match = _FIELD_START.match(line)
        if match is None:
            malformed.append(line)
            continue
        fields.append((match.group(1).decode("ascii"), [line]))
    return Header(
        tuple(RawField(name, b"".join(lines)) for name, lines in fields), tuple(malformed)
    )


def _lines(head: bytes) -> list[bytes]:
    """The lines of `head`, each with its CRLF; only CRLF ends a line (RFC 5322 2.1)."""
    pieces = head.split(b"\r\n")
    lines = [piece + b"\r\n" for piece in pieces[:-1]]
    return [*lines, pieces[-1]] if pieces[-1] else lines


def drop_fields(data: bytes, drop: tuple[bytes, ...]) -> bytes:
    """`data` without the first occurrence in its header section of each raw field."""
    if not drop:
        return data
    head = header_section(data)
    rest = data[len(head) :]
    for raw in drop:
        at = _field_at(head, raw)
        if at >= 0:
            head = head[:at] + head[at + len(raw) :]
    return head + rest


def _field_at(head: bytes, raw: bytes) -> int:
    """Where field `raw` starts in `head` (at a line start), or -1."""
    at = head.find(raw)
    while at > 0 and head[at - 2 : at] != b"\r\n":
        at = head.find(raw, at + 1)
    return at
