"""Text for a person's terminal: control characters made visible, never obeyed.

Much of what the queue tools and `flush` print came from elsewhere: a smarthost's reply,
an envelope address, a message's headers. A terminal obeys the control characters in
it: ``ESC [2J`` clears the screen, other sequences set the window title, move the
cursor over earlier lines or, on some terminals, answer back with keystrokes. So every
human-readable output goes through `printable` (the way less(1) and ls(1) show such bytes
escaped), while ``--json`` output stays exact, because JSON escapes them itself.

A character is shown as it is when Python calls it printable (letters, marks, symbols and
the plain space, in any script); anything else (C0 and C1 controls, DEL, the bidi
overrides that reorder a line, line and paragraph separators, other format characters)
is written as a Python-style escape: ``\\x1b``, ``\\u202e``. A backslash that is already
in the text stays as it is: the output is for eyes, not for parsing back.
"""

from __future__ import annotations

import re

# A tab and a CRLF or LF line end are layout in multi-line text; a lone CR is not (it
# would move the cursor back over what the line said).
_LAYOUT = re.compile(r"\t|\r?\n")


def printable(text: str, *, lines: bool = False) -> str:
    """`text` with every non-printable character escaped; with `lines`, tabs and line
    ends (LF or CRLF, written as LF) are kept as layout."""
    if text.isprintable():
        return text
    if not lines:
        return "".join(_escape(c) for c in text)
    pieces = []
    for part, layout in _split_layout(text):
        pieces.append("".join(_escape(c) for c in part))
        pieces.append("\n" if layout.endswith("\n") else layout)
    return "".join(pieces)


def _split_layout(text: str) -> list[tuple[str, str]]:
    """(text, layout that follows it) pairs; the last layout is ""."""
    pairs = []
    start = 0
    for match in _LAYOUT.finditer(text):
        pairs.append((text[start : match.start()], match.group()))
        start = match.end()
    pairs.append((text[start:], ""))
    return pairs


def _escape(char: str) -> str:
    if char.isprintable():
        return char
    code = ord(char)
    return (
        f"\\x{code:02x}"
        if code < 0x100
        else f"\\u{code:04x}"
        if code < 0x10000
        else f"\\U{code:08x}"
    )
