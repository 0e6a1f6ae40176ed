"""`leafmail sendmail`: the sendmail(8) command line, spooling straight to the spool.

Programs that send mail (cron, mail(1), git send-email, PHP's mail()) run ``sendmail``
with the message on stdin; this accepts the options they use, the way Postfix and dma
do, and commits the message with `Spool.commit`'s steps (write, fsync, rename, fsync
the directory) before it exits 0. No daemon is needed: a running one is only woken
through the control socket so that it delivers at once.

Modes: ``-bm`` (the default: read a message), ``-bs`` (an SMTP dialogue on stdin and
stdout, through the same `ServerProtocol` as the network service), ``-bp`` (list the
queue) and ``-q`` (flush it). Sendmail's options leave no room for ``--config``, so the
config comes from ``$LEAFMAIL_CONFIG`` (else the default location) and the spool from
``$LEAFMAIL_SPOOL`` (else the config). Errors print one line and exit with a sysexits
code: 64 usage, 65 bad data, 73 the spool cannot be created, 75 try again later.
"""

from __future__ import annotations

import contextlib
import email.header
import email.utils
import errno
import os
import pwd
import re
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import BinaryIO

from netserver.errors import (
    EX_DATAERR,
    EX_OK,
    EX_TEMPFAIL,
    CantCreateError,
    NetserverError,
    UsageError,
)
from netserver.smtp import (
    AuthRequest,
    BareNewline,
    DataStart,
    Decision,
    Helo,
    MailFrom,
    MessageReady,
    RcptTo,
    RemoteProtocolError,
    Reply,
    ServerConfig,
    ServerProtocol,
    received_protocol,
    replies,
)
from netserver.smtp.addresses import parse_forward_path, parse_reverse_path

from . import config as configuration
from . import control, tools
from .envelope import ClientInfo, Envelope, Recipient
from .flush import flush
from .receive import SPOOL_FAILED
from .spool import Spool, new_id

USAGE = """\
usage: sendmail [OPTION ...] [--] [RECIPIENT ...]

  -t        also take recipients from To, Cc and Bcc (or Resent-To/Cc/Bcc)
            (Bcc and Resent-Bcc are always removed from the message)
  -i, -oi   a line with only "." does not end the message
  -f, -r    envelope sender ("<>" for none); default LOGIN@HOSTNAME
  -F        full name for a From header leafmail adds (default $NAME, else the GECOS)
  -N        DSN notify: never, or success,failure,delay
  -R        DSN return: full or hdrs;   -V  DSN envelope id
  -bm       read a message from stdin (the default);  -bs  SMTP on stdin/stdout
  -bp       list the queue;  -q  deliver everything queued now
  -oX, -v, -m, -n, -U, -G, -B TYPE, -h N, -L LABEL, -O OPT, -X FILE: accepted, ignored

Config: $LEAFMAIL_CONFIG, else the default location; spool: $LEAFMAIL_SPOOL, else the
config. Exit codes: 0 ok, 64 usage, 65 bad data, 73 spool not writable, 75 try later,
78 configuration.
"""

MAX_LINE = 998  # octets without CRLF (RFC 5322 2.1.1); longer body lines are broken
READ_CHUNK = 65536
_VALUE_OPTIONS = frozenset("fFrbNRVoBhLOXq")  # options that take a value
_IGNORED_FLAGS = frozenset("vmnUG")  # verbose, metoo, no aliases, initial submission, gw
_IGNORED_VALUES = frozenset("BhLOX")  # body type, hop count, log label, option, log file
_MODES = {"m": "deliver", "s": "smtp", "p": "queue"}
_NOTIFY = frozenset({"SUCCESS", "FAILURE", "DELAY"})
_HEADER = re.compile(rb"[\x21-\x39\x3b-\x7e]+:")
_NAME_UNSAFE = re.compile(r"[\x00-\x1f\x7f]")
_TOKEN = re.compile(r'[^\s()<>\[\]:;@,"]+')
# errno values that mean "this spool cannot be written at all" rather than "not now".
_CANTCREAT_ERRNOS = frozenset(
    {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR, errno.ENOENT, errno.ELOOP, errno.EEXIST}
)


class BadInput(NetserverError):
    """The message or an address is malformed (EX_DATAERR)."""

    exit_code = EX_DATAERR


class TryLater(NetserverError):
    """The spool could not take the message now (EX_TEMPFAIL); nothing was queued."""

    exit_code = EX_TEMPFAIL


# --- options ---------------------------------------------------------------------------


@dataclass
class Options:
    """What the command line asked for."""

    mode: str = "deliver"
    extract: bool = False  # -t
    dots_end: bool = True  # not -i / -oi
    sender: str | None = None  # -f / -r, as given
    full_name: str | None = None  # -F
    notify: tuple[str, ...] = ()  # -N
    ret: str | None = None  # -R
    envid: str | None = None  # -V
    recipients: list[str] = field(default_factory=list)
    help: bool = False


def parse_options(argv: Sequence[str]) -> Options:
    """Parse sendmail's getopt-style options; options and recipients may be mixed.

    argparse cannot do this: values attach to their letter (``-fuser``, ``-oi``,
    ``-bs``) and flags cluster (``-ti``), as in every sendmail since 1983.
    """
    opts = Options()
    words = list(argv)
    while words:
        word = words.pop(0)
        if word == "--":
            opts.recipients += words
            break
        if word == "--help":
            opts.help = True
        elif word.startswith("-") and len(word) > 1:
            _cluster(opts, word, words)
        else:
            opts.recipients.append(word)
    return opts


def _cluster(opts: Options, word: str, rest: list[str]) -> None:
    """One ``-xyz`` word: flags, then possibly a letter whose value is the remainder."""
    for i, letter in enumerate(word[1:], start=1):
        if letter in _VALUE_OPTIONS:
            value = word[i + 1 :]
            if not value and letter != "q":
                if not rest:
                    raise UsageError(f"option -{letter} needs a value")
                value = rest.pop(0)
            _value_option(opts, letter, value)
            return
        _flag(opts, letter)


def _flag(opts: Options, letter: str) -> None:
    if letter == "t":
        opts.extract = True
    elif letter == "i":
        opts.dots_end = False
    elif letter not in _IGNORED_FLAGS:
        raise UsageError(f"unknown option -{letter}")


def _value_option(opts: Options, letter: str, value: str) -> None:
    match letter:
        case "f" | "r":
            opts.sender = value
        case "F":
            opts.full_name = value
        case "b":
            opts.mode = _mode(value)
        case "q":
            if value:
                raise UsageError(f"-q{value} is not supported: run `leafmail serve` instead")
            opts.mode = "flush"
        case "o":
            if value == "i":  # -oi; every other -oX (-oem, -odb, ...) is ignored
                opts.dots_end = False
        case "N":
            opts.notify = _notify(value)
        case "R":
            opts.ret = _ret(value)
        case "V":
            opts.envid = _envid(value)
        case _:
            assert letter in _IGNORED_VALUES


def _mode(value: str) -> str:
    if value not in _MODES:
        raise UsageError(f"-b{value} is not supported (use -bm, -bs or -bp)")
    return _MODES[value]


def _notify(value: str) -> tuple[str, ...]:
    """-N never | success,failure,delay: DSN NOTIFY (RFC 3461 4.1)."""
    words = {w.strip().upper() for w in value.split(",") if w.strip()}
    if words == {"NEVER"}:
        return ("NEVER",)
    if not words or not words <= _NOTIFY:
        raise UsageError(f"-N {value!r}: use never, or some of success,failure,delay")
    return tuple(sorted(words))


def _ret(value: str) -> str:
    if value.upper() not in ("FULL", "HDRS"):
        raise UsageError(f"-R {value!r}: use full or hdrs")
    return value.upper()


def _envid(value: str) -> str:
    if not value or len(value) > 100 or not all(" " < c < "\x7f" for c in value):
        raise UsageError("-V needs an envelope id of 1 to 100 printable ASCII characters")
    return value


# --- who is sending ----------------------------------------------------------------


@dataclass(frozen=True)
class Identity:
    """The local user that runs this command, as the Received and From headers name it."""

    login: str
    uid: int
    gecos: str

    @classmethod
    def current(cls) -> Identity:
        """From the password database by real uid, which the user cannot forge as they
        could $USER; $LOGNAME only for a uid with no entry (as in some containers)."""
        uid = os.getuid()
        try:
            entry = pwd.getpwuid(uid)
        except KeyError:  # a container uid with no passwd entry
            return cls(os.environ.get("LOGNAME") or f"uid{uid}", uid, "")
        return cls(entry.pw_name, uid, entry.pw_gecos)

    def full_name(self, given: str | None) -> str:
        """-F, else $NAME, else the first GECOS field with BSD's "&" for the login."""
        if given is not None:
            return given
        if os.environ.get("NAME"):
            return os.environ["NAME"]
        return self.gecos.split(",", 1)[0].replace("&", self.login.capitalize())


# --- addresses --------------------------------------------------------------------------


def address_list(text: str) -> list[str]:
    """The addr-specs of an RFC 5322 address list, as written (quotes kept).

    Display names, comments and group names are dropped; ``Name <a@b>``, ``a@b (Name)``,
    ``list: a@b, c@d;`` and ``undisclosed-recipients:;`` all work. Anything that is not
    clearly an address list raises BadInput: a recipient is never guessed.
    """
    items: list[list[str]] = [[]]
    angle = False
    for part in _tokens(text):
        if part == "<":
            angle = True
        elif part == ">":
            angle = False
        if not angle and part in (",", ";"):
            items.append([])
        elif not angle and part == ":":
            items[-1] = []  # a group name: what follows are its members
        else:
            items[-1].append(part)
    if angle:
        raise BadInput(f"bad address {text!r}: missing '>'")
    return [_addr_spec(item, text) for item in items if any(t != " " for t in item)]


def _tokens(text: str) -> list[str]:
    """Words, quoted strings, domain literals and specials; a space is the token " "."""
    tokens: list[str] = []
    i = 0
    while i < len(text):
        char = text[i]
        if char.isspace() or char == "(":
            i = _skip_comment(text, i) if char == "(" else i + 1
            if tokens and tokens[-1] != " ":
                tokens.append(" ")
            continue
        end = _token_end(text, i)
        tokens.append(text[i:end])
        i = end
    return tokens


def _token_end(text: str, i: int) -> int:
    char = text[i]
    if char == '"':
        j = i + 1
        while j < len(text) and text[j] != '"':
            j += 2 if text[j] == "\\" else 1
        if j >= len(text):
            raise BadInput(f"bad address {text!r}: unclosed quote")
        return j + 1
    if char == "[":
        j = text.find("]", i)
        if j < 0:
            raise BadInput(f"bad address {text!r}: unclosed '['")
        return j + 1
    match = _TOKEN.match(text, i)
    return match.end() if match else i + 1


def _skip_comment(text: str, i: int) -> int:
    """Index after the (possibly nested) comment opening at `i`."""
    depth = 0
    while i < len(text):
        char = text[i]
        if char == "\\":
            i += 1
        elif char == "(":
            depth += 1
        elif char == ")":
            depth -= 1
            if depth == 0:
                return i + 1
        i += 1
    raise BadInput(f"bad address {text!r}: unclosed comment")


def _addr_spec(item: list[str], text: str) -> str:
    """The address of one list item: what is inside <>, else the whole item."""
    if "<" in item:
        start = item.index("<")
        end = item.index(">", start) if ">" in item[start:] else len(item)
        if any(t != " " for t in item[end + 1 :]):
            raise BadInput(f"bad address {text!r}: text after '>'")
        item = item[start + 1 : end]
    for i in range(len(item) - 2):
        if item[i + 1] == " " and _is_word(item[i]) and _is_word(item[i + 2]):
            raise BadInput(f"bad address {text!r}: a space inside an address")
    spec = "".join(t for t in item if t != " ")
    if spec.startswith("@") and ":" in spec:  # obsolete source route: <@a,@b:user@c>
        spec = spec.split(":", 1)[1]
    return spec


def _is_word(token: str) -> bool:
    return token not in (" ", "@", "<", ">", ":", ";", ",") and token[:1] != "."


def mailbox(address: str, hostname: str, *, role: str = "recipient") -> str:
    """`address` checked as an SMTP path, with ``@hostname`` added to a bare local name."""
    if not _has_domain(address):
        address = f"{address}@{hostname}"
    path, utf8 = f"<{address}>", not address.isascii()
    try:
        if role == "recipient":
            return str(parse_forward_path(path, utf8=utf8))
        return str(parse_reverse_path(path, utf8=utf8))
    except RemoteProtocolError as exc:
        raise BadInput(f"bad {role} address {address!r}: {exc.reply.lines[0]}") from None


def _has_domain(address: str) -> bool:
    """True if an unquoted "@" follows the local part."""
    if address.startswith('"'):
        end = _token_end(address, 0) if address.count('"') > 1 else len(address)
        return "@" in address[end:]
    return "@" in address


def sender_address(given: str | None, identity: Identity, hostname: str) -> str:
    """The envelope sender: -f/-r ("" for ``<>``), else LOGIN@HOSTNAME."""
    if given is None:
        return mailbox(identity.login, hostname, role="sender")
    found = address_list(given.strip() or "<>")
    if len(found) > 1:
        raise BadInput(f"bad sender address {given!r}: one address, please")
    if not found or not found[0]:
        return ""
    return mailbox(found[0], hostname, role="sender")


def recipients_from(texts: Iterable[str], hostname: str) -> list[str]:
    """Every address in these address lists, checked, each once, in order."""
    found: list[str] = []
    for text in texts:
        for spec in address_list(text):
            if not spec:
                raise BadInput(f"bad recipient address {text!r}: empty")
            address = mailbox(spec, hostname)
            if address not in found:
                found.append(address)
    return found


# --- reading the message ------------------------------------------------------------


def read_message(stream: BinaryIO, *, dots_end: bool, limit: int) -> list[bytes]:
    """The lines of stdin, without their ends; stop at a "." line unless -i.

    LF and CRLF both end a line (CRs before the LF go). A CR anywhere else becomes a
    space: it would be a bare CR on the wire, which SMTP forbids, and turning it into
    a line break could make an empty line that ends the header section early.
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
        lines.append(line.replace(b"\r", b" "))
    last = bytes(pending).rstrip(b"\r")
    if pending and not (dots_end and last == b"."):
        if size + len(last) + 2 > limit:
            raise BadInput(f"message larger than the limit of {limit} octets")
        lines.append(last.replace(b"\r", b" "))
    return lines


def crlf_lines(data: bytes) -> list[bytes]:
    """The lines of a message that arrived by SMTP (CRLF line ends, final one included)."""
    lines = data.split(b"\r\n")
    if lines and lines[-1] == b"":
        lines.pop()
    return lines


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


# --- the header section --------------------------------------------------------------


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
class Message:
    """A message split into header fields and body lines."""

    fields: list[Field]
    body: list[bytes]

    @classmethod
    def parse(cls, lines: list[bytes]) -> Message:
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


def header_recipients(message: Message) -> list[str]:
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


def local_received(
    *, hostname: str, uid: int, qid: str, recipients: Sequence[str], protocol: str | None
) -> bytes:
    """The Received header of a local submission, as Postfix's pickup writes it.

    There is no client host: the trace is the user id, which the kernel vouches for
    (RFC 5321 4.4 lets the "from" clause go; the comment names the uid).
    """
    lines = [f"Received: by {hostname} (leafmail, from userid {uid})"]
    lines.append(f"\twith {protocol} id {qid}" if protocol else f"\tid {qid}")
    date = email.utils.format_datetime(datetime.now(UTC))
    if len(recipients) == 1:
        lines.append(f"\tfor <{recipients[0]}>; {date}")
    else:
        lines[-1] += ";"
        lines.append(f"\t{date}")
    return ("\r\n".join(lines) + "\r\n").encode("utf-8")


# --- the submission -------------------------------------------------------------------


@dataclass(frozen=True)
class Context:
    """What every mode needs: the config, and who is submitting."""

    config: configuration.Config
    identity: Identity

    @property
    def hostname(self) -> str:
        return self.config.hostname


def complete(message: Message, ctx: Context, *, qid: str, sender: str, name: str | None) -> None:
    """Remove Bcc; add Date, Message-ID and From when missing (as Postfix's cleanup)."""
    message.remove(("bcc", "resent-bcc"))
    if not message.has("date"):
        message.add(f"Date: {email.utils.formatdate(localtime=True)}")
    if not message.has("message-id"):
        message.add(f"Message-ID: <{qid}@{ctx.hostname}>")
    if not message.has("from"):
        address = sender or mailbox(ctx.identity.login, ctx.hostname, role="sender")
        message.add(from_header(ctx.identity.full_name(name), address))


@dataclass(frozen=True)
class Submission:
    """One message ready to spool."""

    qid: str
    envelope: Envelope
    data: bytes


def build(
    message: Message,
    ctx: Context,
    *,
    envelope: Envelope,
    full_name: str | None,
    protocol: str | None,
) -> Submission:
    """Complete the headers, prepend the Received header, set BODY and SMTPUTF8."""
    qid = new_id()
    complete(message, ctx, qid=qid, sender=envelope.sender, name=full_name)
    addresses = [r.address for r in envelope.recipients]
    trace = local_received(
        hostname=ctx.hostname,
        uid=ctx.identity.uid,
        qid=qid,
        recipients=addresses,
        protocol=protocol,
    )
    data = trace + message.to_bytes()
    utf8 = envelope.smtputf8 or not all(a.isascii() for a in [envelope.sender, *addresses])
    body = "8BITMIME" if envelope.body == "8BITMIME" or not data.isascii() else "7BIT"
    return Submission(qid, replace(envelope, body=body, smtputf8=utf8), data)


def open_spool(config: configuration.Config) -> Spool:
    """The spool, created if needed; CantCreateError / TryLater say why not."""
    try:
        return Spool(config.spool)
    except OSError as exc:
        raise _spool_error(exc, f"cannot use the spool {config.spool}") from None


def commit(spool: Spool, item: Submission) -> None:
    """Spool.commit with our queue id: durable (fsync'd file and directory) on return.

    The id is chosen before the commit because the Received and Message-ID headers
    carry it, as the SMTP service's do.
    """
    try:
        spool.commit(item.envelope, item.data, item.qid)
    except OSError as exc:
        raise _spool_error(exc, "cannot spool the message") from None


def _spool_error(exc: OSError, what: str) -> NetserverError:
    reason = exc.strerror or str(exc)
    if exc.errno in _CANTCREAT_ERRNOS:
        return CantCreateError(f"{what}: {reason}")
    return TryLater(f"{what}: {reason} (nothing was queued; try again later)")


def wake(spool: Spool) -> None:
    """Tell a running daemon that mail is waiting; no daemon, or a busy one, is fine."""
    # No daemon, or one that answers oddly: its next queue scan picks the mail up.
    with contextlib.suppress(OSError, ValueError):
        control.request(spool.control_path, "wake", lambda _line: None)


def submit(opts: Options, ctx: Context, stdin: BinaryIO) -> int:
    """-bm: read one message from stdin and spool it."""
    hostname = ctx.hostname
    sender = sender_address(opts.sender, ctx.identity, hostname)
    recipients = recipients_from(opts.recipients, hostname)
    if not recipients and not opts.extract:
        raise UsageError("no recipients given (name them, or use -t)")
    limit = ctx.config.smtp.max_message_size
    message = Message.parse(read_message(stdin, dots_end=opts.dots_end, limit=limit))
    if opts.extract:
        from_headers = recipients_from(header_recipients(message), hostname)
        recipients += [r for r in from_headers if r not in recipients]
    if not recipients:
        raise UsageError("no recipients: none given and none in To, Cc or Bcc")
    envelope = Envelope(
        sender=sender,
        recipients=tuple(Recipient(r, opts.notify) for r in recipients),
        client=ClientInfo(protocol="local"),
        received=_now(),
        ret=opts.ret,
        envid=opts.envid,
    )
    item = build(message, ctx, envelope=envelope, full_name=opts.full_name, protocol=None)
    spool = open_spool(ctx.config)
    commit(spool, item)
    wake(spool)
    return EX_OK


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


# --- -bs: SMTP on stdin and stdout ---------------------------------------------------


class SmtpSession:
    """Drives `ServerProtocol` on a pipe pair for a local, already trusted user.

    The user could run -bm with any sender and recipients, so every HELO, MAIL, RCPT
    and DATA is accepted; what the engine still enforces is the syntax, the size
    limit and the order of commands. Each message is durable before its 250.
    """

    def __init__(self, ctx: Context, stdin_fd: int, stdout_fd: int) -> None:
        self.ctx = ctx
        self.stdin_fd = stdin_fd
        self.stdout_fd = stdout_fd
        self.spool: Spool | None = None
        smtp = ctx.config.smtp
        self.proto_config = ServerConfig(
            hostname=ctx.hostname,
            max_message_size=smtp.max_message_size,
            max_recipients=smtp.max_recipients,
            max_errors=smtp.max_errors,
            bare_newline=BareNewline.REPLACE if smtp.bare_lf == "replace" else BareNewline.REJECT,
        )

    def run(self) -> int:
        """Serve until QUIT or end of input; the exit status is about the spool only."""
        status, greeting = EX_OK, None
        try:
            self.spool = open_spool(self.ctx.config)
        except NetserverError as exc:
            print(f"sendmail: {exc}", file=sys.stderr)
            status = exc.exit_code
            greeting = Reply(421, "4.3.0", f"{self.ctx.hostname} spool unavailable")
        proto = ServerProtocol(self.proto_config, greeting)
        try:
            self._send(proto)
            while not proto.closed:
                data = os.read(self.stdin_fd, READ_CHUNK)  # unbuffered: nothing read before
                if not data:
                    break
                self._process(proto, proto.receive_data(data))
        except BrokenPipeError:
            pass  # the client went away; what was answered 250 is spooled
        return status

    def _process(self, proto: ServerProtocol, events: Sequence[object]) -> None:
        """Answer decisions until the input is used up, replying after each batch."""
        while True:
            decision = next((e for e in events if isinstance(e, Decision)), None)
            if decision is not None:
                self._decide(proto, decision)
            self._send(proto)
            if decision is None:
                return
            events = proto.resume()

    def _decide(self, proto: ServerProtocol, event: Decision) -> None:
        match event:
            case Helo() | MailFrom() | RcptTo() | DataStart():
                proto.accept()
            case MessageReady():
                self._message(proto, event)
            case AuthRequest():
                proto.reject(replies.not_implemented("AUTH not available"))
            case _:
                raise TypeError(f"unexpected decision {event!r}")

    def _message(self, proto: ServerProtocol, event: MessageReady) -> None:
        assert self.spool is not None
        try:
            item = build(
                Message.parse(crlf_lines(event.data)),
                self.ctx,
                envelope=self._envelope(event),
                full_name="",  # the sender is the client's choice: no name of ours
                protocol=received_protocol(event.session, event.envelope),
            )
            commit(self.spool, item)
        except BadInput as exc:
            proto.reject(Reply(554, "5.6.0", f"Message refused: {exc}"))
            return
        except NetserverError as exc:
            print(f"sendmail: {exc}", file=sys.stderr)
            proto.reject(SPOOL_FAILED)
            return
        proto.accept(replies.queued(item.qid))
        wake(self.spool)

    def _envelope(self, event: MessageReady) -> Envelope:
        """The spool envelope; ``<Postmaster>`` becomes postmaster@HOSTNAME."""
        smtp = event.envelope
        params = smtp.params
        return Envelope(
            sender=str(smtp.sender) if smtp.sender else "",
            recipients=tuple(
                Recipient(
                    str(r.mailbox) if r.mailbox.domain else f"postmaster@{self.ctx.hostname}",
                    tuple(sorted(n.value for n in r.params.notify or ())),
                    f"{r.params.orcpt.addr_type};{r.params.orcpt.address}"
                    if r.params.orcpt
                    else None,
                )
                for r in smtp.recipients
            ),
            client=ClientInfo(protocol="local", helo=event.session.helo),
            received=_now(),
            body=params.body.value if params.body else "7BIT",
            smtputf8=params.smtputf8,
            ret=params.ret.value if params.ret else None,
            envid=params.envid,
        )

    def _send(self, proto: ServerProtocol) -> None:
        """Write the queued replies straight to the descriptor: no buffer to lose."""
        view = memoryview(proto.data_to_send())
        while view:
            view = view[os.write(self.stdout_fd, view) :]


# --- -bp and -q ---------------------------------------------------------------------


def list_queue(ctx: Context) -> int:
    """-bp: what `leafmail queue` prints; no spool yet is an empty queue."""
    try:
        spool = Spool(ctx.config.spool, create=False)
    except FileNotFoundError:
        sys.stdout.write(tools.format_queue([]))
        return EX_OK
    sys.stdout.write(tools.format_queue(tools.list_queue(spool)))
    return EX_OK


# --- entry point ---------------------------------------------------------------------


def run(opts: Options) -> int:
    """Dispatch on the mode, with the config from the environment."""
    ctx = Context(configuration.load(), Identity.current())
    match opts.mode:
        case "queue":
            return list_queue(ctx)
        case "flush":
            return flush(ctx.config)
        case "smtp":
            return SmtpSession(ctx, sys.stdin.fileno(), sys.stdout.fileno()).run()
        case _:
            return submit(opts, ctx, sys.stdin.buffer)


def main(argv: Sequence[str], prog: str = "sendmail") -> int:
    """Run as sendmail(8); errors are one line on stderr and a sysexits status."""
    try:
        opts = parse_options(argv)
        if opts.help:
            sys.stdout.write(USAGE.replace("sendmail", prog, 1))
            return EX_OK
        return run(opts)
    except NetserverError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
