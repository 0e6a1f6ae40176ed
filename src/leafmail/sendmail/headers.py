"""The header section: split into fields, read for -t, and completed before spooling
(Bcc removed; Date, Message-ID, From and a Received header added).
"""

from __future__ import annotations

import email.header
import email.utils
import re
from collections.abc import Iterable
from dataclasses import dataclass

from ..trace import MAX_LINE
from .addresses import mailbox, masquerade
from .context import Context
from .errors import BadInput

_HEADER = re.compile(rb"[\x21-\x39\x3b-\x7e]+:")
_NAME_UNSAFE = re.compile(r"[\x00-\x1f\x7f]")


@dataclass
class Field:
    """One header field: its lower-case name and its physical lines."""

    name: str
    lines: list[bytes]

    @property
    def value(self) -> str:
        """The unfolded value, decoded as UTF-8 (RFC 6532); BadInput if it is not."""
        raw = b"".join(self.lines).split(b":", 1)[1]
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise BadInput(f"the {self.name} header is not UTF-8") from None


@dataclass
class Draft:
    """A submitted message split into header fields and body lines (what sendmail reads,
    completes and spools; `leafmail.message.Message` is the spooled one)."""

    fields: list[Field]
    body: list[bytes]

    @classmethod
    def parse(cls, lines: list[bytes]) -> Draft:
        """Header fields up to the first empty line; a line that is neither a field nor
        a continuation starts the body there (an empty line is put before it)."""
        fields: list[Field] = []
        for i, line in enumerate(lines):
            if line == b"":
                return cls(fields, lines[i + 1 :])
            if line[:1] in (b" ", b"\t") and fields:
                fields[-1].lines.append(line)
            elif _HEADER.match(line):
                name = line.split(b":", 1)[0].decode("ascii").lower()
                fields.append(Field(name, [line]))
            else:
                return cls(fields, lines[i:])
        return cls(fields, [])

    def has(self, name: str) -> bool:
        return any(f.name == name for f in self.fields)

    def values(self, names: Iterable[str]) -> list[str]:
        wanted = set(names)
        return [f.value for f in self.fields if f.name in wanted]

    def remove(self, names: Iterable[str]) -> None:
        wanted = set(names)
        self.fields = [f for f in self.fields if f.name not in wanted]

    def add(self, header: str) -> None:
        name = header.split(":", 1)[0].lower()
        self.fields.append(Field(name, [header.encode("utf-8")]))

    def to_bytes(self) -> bytes:
        for f in self.fields:
            for line in f.lines:
                if len(line) > MAX_LINE:
                    raise BadInput(f"the {f.name} header has a line over {MAX_LINE} octets")
        body = [part for line in self.body for part in break_long_line(line)]
        lines = [line for f in self.fields for line in f.lines] + [b"", *body]
        return b"\r\n".join(lines) + b"\r\n"


def header_recipients(message: Draft) -> list[str]:
    """The address lists -t reads: Resent-To/Cc/Bcc if there are any, else To/Cc/Bcc."""
    resent = ("resent-to", "resent-cc", "resent-bcc")
    if any(message.has(name) for name in resent):
        return message.values(resent)
    return message.values(("to", "cc", "bcc"))


def from_header(full_name: str, address: str) -> str:
    """``From: "Full Name" <address>``; a non-ASCII name is an RFC 2047 encoded word."""
    name = _NAME_UNSAFE.sub("", full_name).strip()  # -F or GECOS must not add lines
    if not name:
        return f"From: {address}"
    if name.isascii():
        quoted = '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'
    else:
        quoted = email.header.Header(name, "utf-8").encode()
    return f"From: {quoted} <{address}>"


def complete(message: Draft, ctx: Context, *, qid: str, sender: str, name: str | None) -> None:
    """Remove Bcc; add Date, Message-ID and From when missing (as Postfix's cleanup)."""
    message.remove(("bcc", "resent-bcc"))
    if not message.has("date"):
        message.add(f"Date: {email.utils.formatdate(localtime=True)}")
    if not message.has("message-id"):
        message.add(f"Message-ID: <{qid}@{ctx.hostname}>")
    if not message.has("from"):
        own = mailbox(ctx.identity.login, ctx.origin, role="sender")
        address = sender or masquerade(own, ctx.masquerade_domains)
        message.add(from_header(ctx.identity.full_name(name), address))


def break_long_line(line: bytes) -> list[bytes]:
    """Split a body line of more than 998 octets, never inside a UTF-8 sequence."""
    parts = []
    while len(line) > MAX_LINE:
        cut = MAX_LINE
        while cut > MAX_LINE - 3 and 0x80 <= line[cut] < 0xC0:
            cut -= 1
        parts.append(line[:cut])
        line = line[cut:]
    parts.append(line)
    return parts
