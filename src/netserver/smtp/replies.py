"""SMTP replies as values, never as ad-hoc strings.

A `Reply` is a basic code (RFC 5321 4.2), an optional enhanced status code (RFC 3463)
and one or more lines of text.  `Reply.to_bytes` renders it on the wire: every line but
the last uses ``code-``, the last ``code SP`` (RFC 5321 4.2.1), and the enhanced code,
when present, prefixes *every* line (RFC 2034 section 4).

Which replies carry an enhanced code is decided here, once, by the constants below:
RFC 2034 puts one on every 2xx/4xx/5xx reply except the greeting and any reply to
HELO/EHLO, and never on 3xx (354 and the 334 SASL challenges, whose text is base64).
The protocol strips the code from whatever it answers to HELO/EHLO (`Reply.plain`).

A reply never contains CR or LF inside its text: that would let text that came from
the client, or from a policy, inject extra reply lines.  The constructor refuses it.

`RemoteProtocolError` is how parsers report that the *client* got something wrong: it
carries the reply to send.  Errors of the program driving the protocol are
`netserver.smtp.core.LocalProtocolError`.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field, replace

__all__ = [
    "ALREADY_AUTHENTICATED",
    "AUTH_BAD_BASE64",
    "AUTH_CANCELLED",
    "AUTH_ENCRYPTION_REQUIRED",
    "AUTH_FAILED",
    "AUTH_LINE_TOO_LONG",
    "AUTH_OK",
    "AUTH_TEMPORARY_FAILURE",
    "AUTH_UNKNOWN_MECHANISM",
    "BAD_UTF8",
    "BARE_NEWLINE_IN_COMMAND",
    "BARE_NEWLINE_IN_DATA",
    "CONTROL_CHARACTER",
    "DATA_LINE_TOO_LONG",
    "DUPLICATE_PARAMETER",
    "EXPN_DISABLED",
    "LINE_TOO_LONG",
    "MAIL_OK",
    "MESSAGE_ACCEPTED",
    "MESSAGE_TOO_BIG",
    "NON_ASCII_ADDRESS",
    "OK",
    "RCPT_OK",
    "READY_FOR_TLS",
    "RESET_OK",
    "START_DATA",
    "TOO_MANY_RECIPIENTS",
    "UNKNOWN_COMMAND",
    "VRFY_CANNOT",
    "RemoteProtocolError",
    "Reply",
    "bad_sequence",
    "challenge",
    "chunk_received",
    "closing",
    "ehlo",
    "greeting",
    "helo",
    "help_commands",
    "not_implemented",
    "queued",
    "shutting_down",
    "syntax_error",
    "timed_out",
    "too_many_errors",
    "unsupported_parameter",
]

_ENHANCED = re.compile(r"[245]\.[0-9]{1,3}\.[0-9]{1,3}")
# Reply text is "textstring" (RFC 5321 4.2): HT, SP and printable characters.  Any
# other control character, and above all CR and LF, is refused.
_FORBIDDEN_TEXT = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")


@dataclass(frozen=True, slots=True)
class Reply:
    """One SMTP reply: a three-digit code, an optional enhanced code, and its text.

    ``text`` is a single line or a tuple of lines (a multi-line reply).  The codes are
    checked against each other so a typo such as ``Reply(250, "5.0.0", ...)`` fails at
    import time rather than confusing a client.
    """

    code: int
    enhanced: str | None
    text: str | tuple[str, ...]
    # A reply read from a server (the client role) keeps its text exactly as sent, control
    # characters included, so what the next hop said is recorded as it said it; such a
    # reply is for reading, and `to_bytes` refuses to put its control characters on a wire.
    received: bool = field(default=False, kw_only=True, repr=False, compare=False)
    # The rendered reply, made at the first `to_bytes`: most replies are constants sent
    # to every client, so they are rendered once.
    _wire: bytes | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not 200 <= self.code <= 599 or self.code % 100 > 59:
            raise ValueError(f"not an SMTP reply code: {self.code}")
        if self.enhanced is not None:
            if self.code // 100 == 3:
                raise ValueError("3xx replies carry no enhanced status code (RFC 2034)")
            if not _ENHANCED.fullmatch(self.enhanced) or self.enhanced[0] != str(self.code)[0]:
                raise ValueError(f"enhanced code {self.enhanced!r} does not fit {self.code}")
        if not self.lines:
            raise ValueError("a reply needs at least one line of text")
        if not self.received:
            self._check_text()

    def _check_text(self) -> None:
        """Refuse a control character, above all CR and LF, in the text (RFC 5321 4.2)."""
        for line in self.lines:
            if _FORBIDDEN_TEXT.search(line):
                raise ValueError(f"control character in reply text: {line!r}")

    @property
    def lines(self) -> tuple[str, ...]:
        """The text as a tuple of lines, whichever form it was given in."""
        return (self.text,) if isinstance(self.text, str) else self.text

    @property
    def closes(self) -> bool:
        """421 means the server is closing the channel (RFC 5321 3.8)."""
        return self.code == 421

    def plain(self) -> Reply:
        """The same reply without an enhanced code (for greetings and HELO/EHLO replies)."""
        return self if self.enhanced is None else replace(self, enhanced=None)

    def to_bytes(self) -> bytes:
        """Render the reply, one ``code[-| ][enhanced ]text CRLF`` per line."""
        wire = self._wire
        if wire is None:
            if self.received:
                self._check_text()
            prefix = f"{self.enhanced} " if self.enhanced else ""
            lines = self.lines
            last = len(lines) - 1
            out = [
                f"{self.code}{' ' if i == last else '-'}{prefix}{line}\r\n"
                for i, line in enumerate(lines)
            ]
            wire = "".join(out).encode("utf-8")
            object.__setattr__(self, "_wire", wire)  # frozen: set once, as a cache
        return wire

    def __str__(self) -> str:
        return self.to_bytes().decode("utf-8").rstrip("\r\n")


class RemoteProtocolError(Exception):
    """The client sent something invalid; `reply` is what to answer it with."""

    def __init__(self, reply: Reply) -> None:
        super().__init__(str(reply))
        self.reply = reply


# --- replies that depend on the session --------------------------------------------


@functools.lru_cache(maxsize=16)  # one a server name: made and rendered once
def greeting(hostname: str) -> Reply:
    """The 220 opening reply (no enhanced code: RFC 2034 exempts the greeting)."""
    return Reply(220, None, f"{hostname} ESMTP ready")


def _greets(hostname: str, client: str) -> str:
    # The client's name is echoed only while it is no longer than a domain can be, and
    # while "250-", our own name (253 octets at most), " greets " and CRLF leave room
    # for it: the reply line stays within 512 octets (RFC 5321 4.5.3.1.5).
    room = min(255, 512 - len("250- greets \r\n") - len(hostname.encode()))
    return f"{hostname} greets {client if len(client.encode()) <= room else 'you'}"


# Clients mostly greet with the same few names, so the reply (checked and rendered once)
# is kept for the last 256 of them; the names are the client's, so the table is bounded.
@functools.lru_cache(maxsize=256)
def helo(hostname: str, client: str) -> Reply:
    """The 250 answer to HELO."""
    return Reply(250, None, _greets(hostname, client))


@functools.lru_cache(maxsize=256)  # as `helo`
def ehlo(hostname: str, client: str, keywords: tuple[str, ...]) -> Reply:
    """The multi-line 250 answer to EHLO: the greeting line, then one extension a line."""
    return Reply(250, None, (_greets(hostname, client), *keywords))


@functools.lru_cache(maxsize=4)  # one for each of the four answers
def help_commands(starttls: bool, auth: bool) -> Reply:
    """The 214 answer to HELP: the commands this session would accept, STARTTLS and
    AUTH only when EHLO offers them now (listing a command that will be refused misleads
    clients and scanners; RFC 5321 4.1.1.8 leaves the text to the server)."""
    commands = "HELO EHLO MAIL RCPT DATA BDAT RSET NOOP QUIT VRFY HELP"
    if starttls:
        commands += " STARTTLS"
    if auth:
        commands += " AUTH"
    return Reply(214, "2.0.0", ("Commands: " + commands, "See RFC 5321 for their use"))


@functools.lru_cache(maxsize=16)
def closing(hostname: str) -> Reply:
    """The 221 answer to QUIT."""
    return Reply(221, "2.0.0", f"{hostname} closing connection")


def too_many_errors(hostname: str) -> Reply:
    """421 sent instead of the error reply that crosses the error limit."""
    return Reply(421, "4.7.0", f"{hostname} too many errors, closing connection")


def timed_out(hostname: str) -> Reply:
    """421 for a client that stayed silent past the timeout (RFC 5321 4.5.3.2)."""
    return Reply(421, "4.4.2", f"{hostname} timeout exceeded, closing connection")


def shutting_down(hostname: str) -> Reply:
    """421 for a server that is going away (RFC 5321 3.8)."""
    return Reply(421, "4.3.2", f"{hostname} service shutting down, closing connection")


def queued(queue_id: str) -> Reply:
    """The 250 that acknowledges a message once it is durably spooled."""
    return Reply(250, "2.0.0", f"OK queued as {queue_id}")


def chunk_received(octets: int) -> Reply:
    """250 for a BDAT chunk that is not the last (RFC 3030 2)."""
    return Reply(250, "2.0.0", f"{octets} octets received")


def challenge(base64_text: str) -> Reply:
    """334 carrying a SASL challenge; base64 text, so no enhanced code (RFC 4954 4)."""
    return Reply(334, None, base64_text)


def bad_sequence(text: str) -> Reply:
    """503: the command is valid but not now (RFC 5321 4.2.4)."""
    return Reply(503, "5.5.1", text)


def syntax_error(text: str) -> Reply:
    """501: the command is known but its arguments are not valid."""
    return Reply(501, "5.5.4", text)


def not_implemented(text: str) -> Reply:
    """502: a command this server does not offer."""
    return Reply(502, "5.5.1", text)


def unsupported_parameter(keyword: str) -> Reply:
    """555: a MAIL/RCPT parameter that is not recognized (RFC 5321 4.1.1.11, RFC 1869).

    The keyword is the client's, as long as its command line allows (2,048 octets):
    echoed whole, it made a reply line longer than the 512 octets of RFC 5321 4.5.3.1.5.
    """
    shown = keyword if len(keyword) <= 40 else keyword[:40] + "..."
    return Reply(555, "5.5.4", f"Unsupported parameter {shown}")


# --- fixed replies -----------------------------------------------------------------

OK = Reply(250, "2.0.0", "OK")
RESET_OK = Reply(250, "2.0.0", "Reset OK")
MAIL_OK = Reply(250, "2.1.0", "Sender OK")
RCPT_OK = Reply(250, "2.1.5", "Recipient OK")
MESSAGE_ACCEPTED = Reply(250, "2.0.0", "OK message accepted")
START_DATA = Reply(354, None, "End data with <CR><LF>.<CR><LF>")
READY_FOR_TLS = Reply(220, "2.0.0", "Ready to start TLS")
VRFY_CANNOT = Reply(252, "2.5.0", "Cannot VRFY user, but will accept message and attempt delivery")
EXPN_DISABLED = not_implemented("EXPN not available")

UNKNOWN_COMMAND = Reply(500, "5.5.2", "Command not recognized")
LINE_TOO_LONG = Reply(500, "5.5.2", "Line too long")
BARE_NEWLINE_IN_COMMAND = Reply(500, "5.5.2", "Bare CR or LF in command line")
BAD_UTF8 = Reply(500, "5.5.2", "Command line is not valid UTF-8")
CONTROL_CHARACTER = Reply(501, "5.5.2", "Control character in command line")
DUPLICATE_PARAMETER = syntax_error("Duplicate parameter")
NON_ASCII_ADDRESS = Reply(553, "5.6.7", "Non-ASCII address requires the SMTPUTF8 parameter")

TOO_MANY_RECIPIENTS = Reply(452, "4.5.3", "Too many recipients")
MESSAGE_TOO_BIG = Reply(552, "5.3.4", "Message size exceeds fixed maximum message size")
BARE_NEWLINE_IN_DATA = Reply(554, "5.6.0", "Message contains bare CR or LF")
# 554 as for the other content errors found while reading (RFC 5321 4.3.2 lists 554
# for DATA's end; 550 is about mailboxes); 5.6.0, "other media error" (RFC 3463).
NUL_IN_DATA = Reply(554, "5.6.0", "Message contains a NUL octet")
DATA_LINE_TOO_LONG = Reply(554, "5.6.0", "Message contains a line longer than 1000 octets")

AUTH_OK = Reply(235, "2.7.0", "Authentication successful")
AUTH_FAILED = Reply(535, "5.7.8", "Authentication credentials invalid")
AUTH_TEMPORARY_FAILURE = Reply(454, "4.7.0", "Temporary authentication failure")
AUTH_CANCELLED = Reply(501, "5.0.0", "Authentication cancelled")
AUTH_BAD_BASE64 = Reply(501, "5.5.2", "Cannot decode response")
AUTH_UNKNOWN_MECHANISM = Reply(504, "5.5.4", "Unrecognized authentication mechanism")
AUTH_ENCRYPTION_REQUIRED = Reply(
    538, "5.7.11", "Encryption required for requested authentication mechanism"
)
AUTH_LINE_TOO_LONG = Reply(500, "5.5.6", "Authentication exchange line is too long")
ALREADY_AUTHENTICATED = bad_sequence("Already authenticated")
