"""Reading the message: stdin for -bm, the DATA of an SMTP transaction for -bs."""

from __future__ import annotations

from typing import BinaryIO

from .errors import BadInput

READ_CHUNK = 65536


def read_message(stream: BinaryIO, *, dots_end: bool, limit: int) -> list[bytes]:
    """The lines of stdin, without their ends; stop at a "." line unless -i.

    LF and CRLF both end a line (CRs before the LF go). A CR anywhere else becomes a
    space: it would be a bare CR on the wire, which SMTP forbids, and turning it into
    a line break could make an empty line that ends the header section early. NUL
    octets are dropped (see `without_nul`).
    """
    lines: list[bytes] = []
    size = 0  # octets so far with CRLF line ends: what the limit is about
    pending = bytearray()
    while chunk := stream.readline(READ_CHUNK):
        pending += chunk
        if size + len(pending) > limit + 1:  # +1: the LF may stand for a CRLF
            raise BadInput(f"message larger than the limit of {limit} octets")
        if not chunk.endswith(b"\n"):
            continue  # a long line, or the last one: keep reading
        line = bytes(pending).rstrip(b"\n").rstrip(b"\r")
        pending.clear()
        if dots_end and line == b".":
            return lines
        size += len(line) + 2
        if size > limit:
            raise BadInput(f"message larger than the limit of {limit} octets")
        lines.append(without_nul(line.replace(b"\r", b" ")))
    last = bytes(pending).rstrip(b"\r")
    if pending and not (dots_end and last == b"."):
        if size + len(last) + 2 > limit:
            raise BadInput(f"message larger than the limit of {limit} octets")
        lines.append(without_nul(last.replace(b"\r", b" ")))
    return lines


def without_nul(data: bytes) -> bytes:
    """`data` without NUL octets.

    RFC 5321 and 5322 allow NUL nowhere in a message, and a next hop that drops them
    would read CRLF NUL "." CRLF as the end of DATA (SMTP smuggling). The SMTP server
    refuses such a message; a local submitter (a cron job's output, say) cannot be
    asked again, so its NULs are removed before the message is stored.
    """
    return data.replace(b"\0", b"")


def crlf_lines(data: bytes) -> list[bytes]:
    """The lines of a message that arrived by SMTP or the submission socket (CRLF line
    ends, final one included), without NUL octets."""
    lines = without_nul(data).split(b"\r\n")
    if lines and lines[-1] == b"":
        lines.pop()
    return lines
