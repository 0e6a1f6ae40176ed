"""The aliases file: local names mapped to users, commands, files, includes and addresses.

The syntax is sendmail's aliases(5)::

    # a comment
    postmaster: root
    staff:      alice, bob,
                carol                          (a line starting with blank continues)
    archive:    /var/mail/archive              (append to a file, as mbox)
    tickets:    "|/usr/local/bin/ticket --queue=mail"
    list:       :include:/etc/mail/list.txt    (more targets, one or more a line)
    alice:      \\alice, alice@elsewhere.example (her mailbox, and a forwarded copy)

Names are matched case-insensitively. A target is a local name (another alias or a
user), ``\\user`` (that user's mailbox, never looked up as an alias), ``|command args``
(split with shlex and run without a shell), ``:include:/path``, ``/path/file``, or an
address: one in a local domain is a local name again, any other is forwarded. A target
with commas or blanks in it is written in double quotes.

Expansion is recursive, loop-safe and bounded: MAX_DEPTH levels, MAX_FANOUT targets in
all (Postfix's duplicate_filter_limit), each include file read once per rights (as
Postfix's been_here) and MAX_INCLUDE_SIZE bytes at most. A name met again inside its
own expansion is delivered to that user's mailbox when it is one (the ``alice: alice,
bob`` idiom), else it is a loop.

Rights, as Postfix's local(8) has them. Every target remembers whose rights it carries:
the owner of the aliases file, or of the include file it came from. A command or file
runs with those rights (root's become `default_user`, see `leafmail.delivery.local`). An
include named with root's rights (in a root-owned aliases file) is read as root, and what
it names gets its owner's rights when that owner is not root; an include named with a
user's rights is read as that user (the `IncludeReader` switches, in a child process)
and keeps that user's rights, so including a victim's file gains nothing, and a file the
user cannot read is an error that never shows its content. Include files must be regular
files, not world-writable, and are opened with O_NOFOLLOW|O_NONBLOCK (a FIFO is refused
without waiting on it).

The file is parsed when it changes (its inode, size or mtime); an error is a ConfigError
naming the file and line, because a typo in an aliases file must never quietly drop mail.
"""

from __future__ import annotations

import errno
import os
import re
import shlex
import stat
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TypeVar, cast

from netserver.errors import ConfigError
from netserver.smtp.addresses import parse_forward_path
from netserver.smtp.replies import RemoteProtocolError

MAX_DEPTH = 10  # sendmail's MaxAliasRecursion
MAX_FANOUT = 1000  # targets and includes per expansion (Postfix's duplicate_filter_limit)
MAX_INCLUDE_SIZE = 1 << 20  # bytes of one :include: file
_OPEN = os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
INCLUDE = ":include:"
_NAME = re.compile(r"\A[^\s:\"\\@,#]+\Z")
_T = TypeVar("_T")


@dataclass(frozen=True)
class Origin:
    """Where a target was written: file, line and the file owner's uid and gid."""

    path: str
    line: int
    uid: int
    gid: int

    def error(self, message: str) -> ConfigError:
        return ConfigError(f"{self.path}:{self.line}: {message}")


@dataclass(frozen=True)
class LocalName:
    """An alias or a user: looked up in the aliases again."""

    name: str


@dataclass(frozen=True)
class UserTarget:
    """A user's mailbox (never looked up as an alias)."""

    name: str


@dataclass(frozen=True)
class CommandTarget:
    """A command: argv, run as the owner (uid, gid) of the file that named it."""

    argv: tuple[str, ...]
    uid: int
    gid: int
    origin: Origin | None = field(default=None, compare=False)


@dataclass(frozen=True)
class FileTarget:
    """A file to append the message to, as mbox, as the owner of the naming file."""

    path: str
    uid: int
    gid: int
    origin: Origin | None = field(default=None, compare=False)


@dataclass(frozen=True)
class RemoteTarget:
    """An address elsewhere: the message is forwarded (spooled again) to it."""

    address: str


@dataclass(frozen=True)
class Include:
    """``:include:/path``: more targets from that file, read with the rights (uid, gid)
    of the file that named it."""

    path: str
    uid: int = 0
    gid: int = 0


@dataclass(frozen=True)
class IncludeFile:
    """An include file's text, and its owner (whose rights what it names may get)."""

    text: str
    uid: int
    gid: int


IncludeReader = Callable[[str, int, int], IncludeFile]
"""Reads an include file (path) with the rights of (uid, gid); OSError when it cannot."""


Target = UserTarget | CommandTarget | FileTarget | RemoteTarget
Parsed = LocalName | Include | Target


@dataclass(frozen=True)
class Problem:
    """A branch of an expansion that cannot be delivered: enhanced status and why."""

    status: str
    text: str


@dataclass(frozen=True)
class Expansion:
    """Where mail for a name goes: the targets (no duplicates) and the failed branches."""

    targets: tuple[Target, ...]
    problems: tuple[Problem, ...]


def lookup_name(local_part: str) -> str:
    """The name a local part is looked up by: lower-case, ``+extension`` dropped."""
    name = local_part.lower()
    user, plus, _extension = name.partition("+")
    return user if plus and user else name


# --- parsing ------------------------------------------------------------------------


def split_targets(text: str, origin: Origin) -> list[str]:
    """Split a target list at commas outside double quotes; empty items are dropped."""
    items: list[str] = []
    current: list[str] = []
    quoted = escaped = False
    for char in text:
        if escaped:
            escaped = False
        elif char == "\\":
            escaped = True
        elif char == '"':
            quoted = not quoted
        elif char == "," and not quoted:
            items.append("".join(current))
            current = []
            continue
        current.append(char)
    if quoted:
        raise origin.error("unterminated quoted target")
    items.append("".join(current))
    return [item.strip() for item in items if item.strip()]


def _unquote(text: str, origin: Origin) -> str:
    """The inside of a ``"..."`` target, with backslash escapes undone."""
    if len(text) < 2 or not text.endswith('"'):
        raise origin.error(f"bad quoting in target {text}")
    return re.sub(r"\\(.)", r"\1", text[1:-1])


def parse_target(text: str, origin: Origin, local_domains: frozenset[str]) -> Parsed:
    """One target as written (already split from its list)."""
    if text.startswith('"'):
        text = _unquote(text, origin).strip()
    if text.startswith("|"):
        return _command(text[1:], origin)
    if text.startswith(INCLUDE):
        path = text[len(INCLUDE) :].strip()
        if not os.path.isabs(path):
            raise origin.error(f"{INCLUDE} needs an absolute path, not {path!r}")
        return Include(os.path.normpath(path), origin.uid, origin.gid)
    if text.startswith("/"):
        return FileTarget(os.path.normpath(text), origin.uid, origin.gid, origin)
    if any(char.isspace() for char in text) or not text:
        raise origin.error(f"bad target {text!r} (quote targets that contain blanks)")
    if text.startswith("\\"):
        return UserTarget(lookup_name(_plain_name(text[1:], origin)))
    if "@" in text:
        return _address(text, origin, local_domains)
    return LocalName(lookup_name(_plain_name(text, origin)))


def _plain_name(text: str, origin: Origin) -> str:
    if not _NAME.match(text):
        raise origin.error(f"bad local name {text!r}")
    return text


def _command(text: str, origin: Origin) -> CommandTarget:
    try:
        argv = shlex.split(text)
    except ValueError as exc:
        raise origin.error(f"bad command |{text}: {exc}") from None
    if not argv:
        raise origin.error("empty command after |")
    return CommandTarget(tuple(argv), origin.uid, origin.gid, origin)


def _address(text: str, origin: Origin, local_domains: frozenset[str]) -> Parsed:
    try:
        mailbox = parse_forward_path(f"<{text}>", utf8=True)
    except RemoteProtocolError:
        raise origin.error(f"bad address {text!r}") from None
    if mailbox.domain.lower().rstrip(".") in local_domains:
        return LocalName(lookup_name(mailbox.local_unquoted))
    return RemoteTarget(text)


def _logical_lines(text: str, path: str) -> list[tuple[int, str]]:
    """(first line number, text) of each entry, continuation lines joined on."""
    entries: list[tuple[int, str]] = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if line[0] in " \t":
            if not entries:
                raise ConfigError(f"{path}:{number}: continuation line with no entry before it")
            first, joined = entries[-1]
            entries[-1] = (first, f"{joined} {line.strip()}")
        else:
            entries.append((number, line))
    return entries


def parse_aliases(
    text: str, origin: Origin, local_domains: frozenset[str]
) -> dict[str, tuple[Parsed, ...]]:
    """The entries of an aliases file: lower-case name -> targets."""
    table: dict[str, tuple[Parsed, ...]] = {}
    seen: dict[str, int] = {}
    for number, entry in _logical_lines(text, origin.path):
        here = Origin(origin.path, number, origin.uid, origin.gid)
        name, colon, rest = entry.partition(":")
        name = name.strip().lower()
        if not colon:
            raise here.error("expected 'name: target, target'")
        if not _NAME.match(name):
            raise here.error(f"bad alias name {name!r}")
        if name in seen:
            raise here.error(f"alias {name!r} is already defined on line {seen[name]}")
        targets = tuple(parse_target(t, here, local_domains) for t in split_targets(rest, here))
        if not targets:
            raise here.error(f"alias {name!r} has no targets")
        table[name] = targets
        seen[name] = number
    return table


def parse_include(text: str, origin: Origin, local_domains: frozenset[str]) -> tuple[Parsed, ...]:
    """The targets of an ``:include:`` file: comma-separated, any number a line."""
    found: list[Parsed] = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        here = Origin(origin.path, number, origin.uid, origin.gid)
        found.extend(parse_target(t, here, local_domains) for t in split_targets(line, here))
    return tuple(found)


# --- loading, with reload on change ---------------------------------------------------


class _FileCache:
    """Parsed files, parsed again only when the file changed (inode, size, mtime, ctime)."""

    def __init__(self) -> None:
        self._entries: dict[str, tuple[tuple[int, ...], object]] = {}

    def load(self, path: str, parse: Callable[[str, Origin], _T]) -> _T:
        cached = self._entries.get(path)
        try:
            key = _stat_key(os.stat(path))
            if cached is not None and cached[0] == key:
                return cast(_T, cached[1])  # stored by this same `parse`
            raw, info = read_regular(path, limit=None, follow=True)  # the admin's path
        except PermissionError as exc:
            # An smtpd worker read the file as root before it dropped privileges; it
            # keeps that table until a reload starts new workers (leafmail.smtpd).
            if cached is not None:
                return cast(_T, cached[1])
            raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from None
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from None
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ConfigError(f"{path}: not UTF-8 text ({exc.reason})") from None
        value = parse(text, Origin(path, 0, info.st_uid, info.st_gid))
        self._entries[path] = (_stat_key(info), value)
        return value


def read_regular(path: str, limit: int | None, *, follow: bool) -> tuple[bytes, os.stat_result]:
    """A regular file's bytes and status, opened so that a FIFO or a device is refused
    at once instead of waited on; a symbolic link (last component) too unless `follow`."""
    fd = os.open(path, _OPEN if follow else _OPEN | os.O_NOFOLLOW)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise OSError(errno.EINVAL, "not a regular file", path)
        if limit is not None and info.st_size > limit:
            raise OSError(errno.EFBIG, f"larger than {limit} bytes", path)
        chunks: list[bytes] = []
        size = 0
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
            size += len(chunk)
            if limit is not None and size > limit:
                raise OSError(errno.EFBIG, f"larger than {limit} bytes", path)
        return b"".join(chunks), info
    finally:
        os.close(fd)


def read_include(path: str) -> IncludeFile:
    """An include file as whoever we are now: regular, not world-writable, bounded."""
    raw, info = read_regular(path, MAX_INCLUDE_SIZE, follow=False)
    if info.st_mode & stat.S_IWOTH:
        raise OSError(errno.EPERM, "world-writable", path)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise OSError(errno.EILSEQ, f"not UTF-8 text ({exc.reason})", path) from None
    return IncludeFile(text, info.st_uid, info.st_gid)


def _in_process(path: str, uid: int, gid: int) -> IncludeFile:
    """The reader for callers that switch nothing (tests, checks): as we are."""
    return read_include(path)


def _stat_key(info: os.stat_result) -> tuple[int, ...]:
    return (info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns)


class Aliases:
    """An aliases file, read again whenever it changes, and its expansion."""

    def __init__(
        self, path: str, local_domains: Iterable[str], reader: IncludeReader = _in_process
    ) -> None:
        self.path = path
        self.local_domains = frozenset(d.lower().rstrip(".") for d in local_domains)
        self.reader = reader
        self._tables = _FileCache()

    def table(self) -> dict[str, tuple[Parsed, ...]]:
        """The current entries; ConfigError when the file is missing or wrong."""
        return self._tables.load(
            self.path, lambda text, origin: parse_aliases(text, origin, self.local_domains)
        )

    def include(self, include: Include) -> tuple[Parsed, ...]:
        """The targets of an include file, read and given rights as the module says.

        OSError when it cannot be read (the text never names its content); ConfigError
        naming file and line when what was read is wrong.
        """
        found = self.reader(include.path, include.uid, include.gid)
        uid, gid = include.uid, include.gid
        if uid == 0 and found.uid != 0:
            uid, gid = found.uid, found.gid  # a root-named include: its owner's rights
        return parse_include(found.text, Origin(include.path, 0, uid, gid), self.local_domains)

    def __contains__(self, name: str) -> bool:
        return lookup_name(name) in self.table()

    def expand(self, name: str, is_user: Callable[[str], bool]) -> Expansion:
        """Where mail for `name` goes; ConfigError when the aliases file itself is wrong."""
        expander = _Expander(self, self.table(), is_user)
        expander.name(lookup_name(name), (), 0)
        return Expansion(tuple(expander.targets), tuple(expander.problems))


class _Expander:
    """One expansion: a walk over the alias graph that remembers its path (`chain`)."""

    def __init__(
        self,
        aliases: Aliases,
        table: dict[str, tuple[Parsed, ...]],
        is_user: Callable[[str], bool],
    ) -> None:
        self.aliases = aliases
        self.table = table
        self.is_user = is_user
        self.targets: dict[Target, None] = {}  # an ordered set
        self.problems: list[Problem] = []
        self.included: set[tuple[int, str]] = set()  # (rights uid, path): read once
        self.work = 0  # targets and includes met, bounded by MAX_FANOUT

    def name(self, name: str, chain: tuple[str, ...], depth: int) -> None:
        if depth > MAX_DEPTH:
            self.problems.append(Problem("5.4.6", f"aliases nested more than {MAX_DEPTH} deep"))
            return
        entry = self.table.get(name)
        if entry is None or name in chain:
            self.user(name, looped=entry is not None)
            return
        for target in entry:
            self.target(target, (*chain, name), depth + 1)

    def user(self, name: str, *, looped: bool = False) -> None:
        if self.is_user(name):
            self.targets[UserTarget(name)] = None
        elif looped:
            self.problems.append(Problem("5.4.6", f"alias loop at {name}"))
        else:
            self.problems.append(Problem("5.1.1", f"no such user: {name}"))

    def target(self, target: Parsed, chain: tuple[str, ...], depth: int) -> None:
        self.work += 1
        if self.work > MAX_FANOUT:
            if self.work == MAX_FANOUT + 1:
                self.problems.append(Problem("5.3.5", f"expands to over {MAX_FANOUT} targets"))
            return
        if isinstance(target, LocalName):
            self.name(target.name, chain, depth)
        elif isinstance(target, UserTarget):
            self.user(target.name)
        elif isinstance(target, Include):
            self.include(target, chain, depth)
        else:
            self.targets[target] = None

    def include(self, include: Include, chain: tuple[str, ...], depth: int) -> None:
        key = INCLUDE + include.path
        if key in chain or depth > MAX_DEPTH:
            self.problems.append(Problem("5.4.6", f"{INCLUDE} loop or nesting too deep"))
            return
        if (include.uid, include.path) in self.included:
            return  # already expanded with these rights: a duplicate, not a loop
        self.included.add((include.uid, include.path))
        try:
            items = self.aliases.include(include)
        except OSError as exc:  # never the content: the reader may not have been allowed
            why = exc.strerror or type(exc).__name__
            self.problems.append(Problem("4.3.5", f"cannot read {key}: {why}"))
            return
        except ConfigError as exc:  # fixable by the admin: keep the mail meanwhile
            self.problems.append(Problem("4.3.5", str(exc)))
            return
        for item in items:
            self.target(item, (*chain, key), depth + 1)
