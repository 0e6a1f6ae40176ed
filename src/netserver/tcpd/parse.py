"""Reading hosts.allow / hosts.deny files (hosts_access(5), hosts_options(5)) into rules.

The reading follows tcpd's own, byte for byte where it decides anything:

* a backslash directly before the newline joins the next physical line, with nothing in
  between (``a \\<NL>b`` is ``a b``; ``a\\<NL>b`` is ``ab``), and that happens before
  comments are recognised, so a comment ending in a backslash swallows the next line;
* only a ``#`` in the first column starts a comment; elsewhere ``#`` is an ordinary
  pattern that matches nothing;
* a rule is ``daemon_list : client_list [: option : option ...]``, split at the first
  and second colon *outside square brackets* (so ``[::1]`` survives) -- Debian's tcpd
  counts ``[`` and ``]`` and splits only at depth zero;
* list elements are separated by blanks, tabs, CR, LF and commas;
* a rule is reported at its last physical line, as tcpd's "matched: FILE line N" does.

Where tcpd would only log a warning and carry on with a rule it ignores or one that
can never work (a line without ``:``, no newline at the end of the file, a logical line
over its 2047-character buffer, an unknown or misplaced option), this module raises
`HostsSyntaxError` naming the file and line instead: a server that silently drops a
deny rule is worse than one that refuses to start.  Lines tcpd skips harmlessly (an
indented comment) are skipped here too.  Everything accepted means what it means to tcpd.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

from ..errors import ConfigError

__all__ = [
    "HostsRule",
    "HostsSyntaxError",
    "HostsTable",
    "Option",
    "fold",
    "parse_table",
    "read_table",
    "split_at",
    "tokens",
]

# tcpd reads a logical line into a 2048-byte buffer: 2047 characters and the NUL.
MAX_LINE = 2047
LIST_SEPARATORS = ", \t\r\n"
_SEPARATOR_RE = re.compile(r"[, \t\r\n]+")
_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")
_C_SPACE = " \t\n\v\f\r"  # isspace() in the C locale

# Option keywords tcpd knows (Debian build), what each takes, and whether it must end a rule.
NEED_ARG, NO_ARG, OPT_ARG = "need", "none", "optional"
OPTION_ARGS = {
    "allow": NO_ARG,
    "deny": NO_ARG,
    "spawn": NEED_ARG,
    "twist": NEED_ARG,
    "setenv": NEED_ARG,
    "banners": NEED_ARG,
    "severity": NEED_ARG,
    "keepalive": NO_ARG,
    "linger": NEED_ARG,
    "rfc931": OPT_ARG,
    "nice": OPT_ARG,
    "umask": NEED_ARG,
    "user": NEED_ARG,
    "group": NEED_ARG,
    "aclexec": NEED_ARG,
}
MUST_BE_LAST = frozenset({"allow", "deny", "twist"})
# Known to tcpd but changing the service's process, which netserver does not do: a rule
# silently run with more privilege than asked for would be a security bug, so refuse it.
UNSUPPORTED = frozenset({"user", "group", "umask", "nice", "aclexec"})

SYSLOG_FACILITIES = frozenset(
    ["kern", "user", "mail", "daemon", "auth", "lpr", "news", "uucp", "cron"]
    + [f"local{n}" for n in range(8)]
)
SYSLOG_LEVELS = ("emerg", "alert", "crit", "err", "warning", "notice", "info", "debug")


class HostsSyntaxError(ConfigError):
    """A hosts.allow/hosts.deny file cannot be used; the message starts with FILE:LINE."""


def fold(text: str) -> str:
    """ASCII-only lowercase, as strcasecmp compares: tcpd patterns ignore ASCII case only."""
    return text.translate(_ASCII_LOWER)


@dataclass(frozen=True)
class Option:
    """One ``keyword [value]`` field of a rule; *value* is as written, before % expansion."""

    name: str
    value: str | None

    def __str__(self) -> str:
        return self.name if self.value is None else f"{self.name} {self.value}"


@dataclass(frozen=True)
class HostsRule:
    """One rule of a table; *line* is the last physical line it occupies (tcpd's count)."""

    path: str
    line: int
    daemons: tuple[str, ...]
    clients: tuple[str, ...]
    options: tuple[Option, ...] = ()

    @property
    def where(self) -> str:
        return f"{self.path}:{self.line}"


@dataclass(frozen=True)
class HostsTable:
    """The rules of one file in order, and warnings worth logging at load time.

    *patterns* holds the contents of ``/file`` patterns read at load time, so matching
    never touches the disk (tcpd re-reads them per connection; here SIGHUP does).
    """

    path: str
    rules: tuple[HostsRule, ...] = ()
    warnings: tuple[str, ...] = ()
    patterns: dict[str, tuple[str, ...]] = field(default_factory=dict)


# --------------------------------------------------------------------------- splitting


def split_at(text: str, delimiter: str) -> tuple[str, str] | None:
    """Split at the first *delimiter* outside ``[...]``, as Debian's split_at does.

    Brackets are counted, not matched: a stray ``]`` makes the depth negative and no
    later delimiter splits, which is what tcpd does with such a line.
    """
    depth = 0
    for index, char in enumerate(text):
        if char == "[":
            depth += 1
        elif char == "]":
            depth -= 1
        elif depth == 0 and char == delimiter:
            return text[:index], text[index + 1 :]
    return None


def tokens(text: str) -> tuple[str, ...]:
    """The elements of a daemon or client list (strtok on blanks and commas)."""
    return tuple(part for part in _SEPARATOR_RE.split(text) if part)


def c_strip(text: str) -> str:
    """Strip C-locale whitespace from both ends (tcpd's chop_string)."""
    return text.strip(_C_SPACE)


# --------------------------------------------------------------------------- lines


def logical_lines(path: str, text: str) -> list[tuple[int, str]]:
    """(last physical line number, logical line with its newline) pairs, tcpd's way."""
    result: list[tuple[int, str]] = []
    pending = ""
    lineno = 0
    for piece in _physical_lines(text):
        lineno += 1
        if len(pending) + len(piece) > MAX_LINE:
            raise HostsSyntaxError(
                f"{path}:{lineno}: rule longer than {MAX_LINE} characters "
                "(tcpd ignores it and every later rule of the file)"
            )
        if not piece.endswith("\n"):
            raise HostsSyntaxError(
                f"{path}:{lineno}: no newline at the end of the file "
                "(tcpd ignores such a last rule)"
            )
        if piece.endswith("\\\n"):
            pending += piece[:-2]
            continue
        result.append((lineno, pending + piece))
        pending = ""
    if pending:
        raise HostsSyntaxError(f"{path}:{lineno}: continuation at the end of the file")
    return result


def _physical_lines(text: str) -> list[str]:
    """Lines ending in LF (only LF: CR, VT and FF are ordinary characters to fgets)."""
    pieces = text.split("\n")
    lines = [piece + "\n" for piece in pieces[:-1]]
    return [*lines, pieces[-1]] if pieces[-1] else lines


def _decode(path: str, data: bytes) -> str:
    """Text of a file; NUL bytes make tcpd drop the rest of the file, so they are errors."""
    if b"\0" in data:
        lineno = data[: data.index(b"\0")].count(b"\n") + 1
        raise HostsSyntaxError(f"{path}:{lineno}: NUL character in the file")
    return data.decode("utf-8", "surrogateescape")


# --------------------------------------------------------------------------- options


def option_fields(text: str) -> list[str]:
    """Split the options part at ``:``; ``\\:`` is a literal colon (tcpd's get_field).

    A field starts wherever the previous one ended, until the text is used up: a rule
    ending in ``:`` has no empty last field, but one ending in ``:`` and the newline
    tcpd keeps has a blank one, which is then a "missing option name".
    """
    fields: list[str] = []
    index = 0
    while index < len(text):
        current: list[str] = []
        while index < len(text) and text[index] != ":":
            if text[index] == "\\" and text[index + 1 : index + 2] == ":":
                index += 1
            current.append(text[index])
            index += 1
        index += 1  # past the ':' (or the end)
        fields.append("".join(current))
    return fields


def parse_option(text: str) -> Option:
    """``keyword``, ``keyword value`` or ``keyword = value`` (one '=' is allowed)."""
    body = c_strip(text)
    cut = len(body)
    for index, char in enumerate(body):
        if char in "= \t\r\n":
            cut = index
            break
    key, rest = body[:cut], body[cut:]
    if rest and rest[0] != "=":
        rest = rest[1:].lstrip(" \t\r\n")
    if rest.startswith("="):
        rest = rest[1:].lstrip(" \t\r\n")
    if not key:
        raise ValueError("missing option name")
    return Option(fold(key), rest or None)


def check_option(option: Option, last: bool) -> str | None:
    """Raise ValueError for what tcpd would reject when the rule matches; maybe warn."""
    kind = OPTION_ARGS.get(option.name)
    if kind is None:
        raise ValueError(f'bad option name: "{option.name}"')
    if option.value is None and kind == NEED_ARG:
        raise ValueError(f'option "{option.name}" requires value')
    if option.value is not None and kind == NO_ARG:
        raise ValueError(f'option "{option.name}" requires no value')
    if option.name in MUST_BE_LAST and not last:
        raise ValueError(f'option "{option.name}" must be at end')
    if option.name in UNSUPPORTED:
        raise ValueError(f'option "{option.name}" is not supported by netserver')
    return _check_value(option)


def _check_value(option: Option) -> str | None:
    value = option.value
    if option.name == "severity" and value is not None:
        facility, dot, level = value.partition(".")
        if not dot:
            facility, level = "", facility
        if fold(level) not in SYSLOG_LEVELS or (dot and fold(facility) not in SYSLOG_FACILITIES):
            raise ValueError(f'bad syslog facility or severity: "{value}"')
    elif option.name == "linger" and value is not None:
        if not re.fullmatch(r"[ \t]*[+-]?\d+", value) or int(value) < 0:
            raise ValueError(f'bad linger value: "{value}"')
    elif option.name == "rfc931":
        if value is not None and (not re.fullmatch(r"[ \t]*[+-]?\d+", value) or int(value) <= 0):
            raise ValueError(f'bad rfc931 timeout: "{value}"')
        return "rfc931: netserver does no ident lookups; the client user stays unknown"
    return None


def parse_options(text: str) -> tuple[tuple[Option, ...], list[str]]:
    """All options of a rule, validated as tcpd would at match time; and warnings."""
    fields = option_fields(text)
    options: list[Option] = []
    warnings: list[str] = []
    for index, raw in enumerate(fields):
        option = parse_option(raw)
        warning = check_option(option, last=index == len(fields) - 1)
        if warning:
            warnings.append(warning)
        options.append(option)
    return tuple(options), warnings


# --------------------------------------------------------------------------- rules


def parse_rule(path: str, lineno: int, line: str) -> tuple[HostsRule | None, list[str]]:
    """One logical line to a rule (None for comments and blank lines) and its warnings."""
    if line.startswith("#") or not line.strip(" \t\r\n"):
        return None, []
    first = split_at(line, ":")
    if first is None:
        if line.lstrip(" \t\r\n").startswith("#"):
            return None, []  # an indented comment: tcpd skips it for want of a ':'
        raise HostsSyntaxError(f'{path}:{lineno}: missing ":" separator')
    daemon_text, rest = first
    second = split_at(rest, ":")
    client_text, option_text = second if second is not None else (rest, None)
    options: tuple[Option, ...] = ()
    warnings: list[str] = []
    if option_text is not None:
        try:
            options, warnings = parse_options(option_text)
        except ValueError as exc:
            raise HostsSyntaxError(f"{path}:{lineno}: {exc}") from None
    rule = HostsRule(path, lineno, tokens(daemon_text), tokens(client_text), options)
    warnings.extend(_pattern_warnings(rule))
    return rule, [f"{path}:{lineno}: {warning}" for warning in warnings]


def _pattern_warnings(rule: HostsRule) -> list[str]:
    found: list[str] = []
    if not rule.daemons:
        found.append("empty daemon list: the rule never matches")
    if not rule.clients:
        found.append("empty client list: the rule never matches")
    for token in rule.clients:
        if token.startswith("@"):
            found.append(f"{token}: NIS netgroups are not supported; the pattern matches nothing")
    return found


def parse_table(path: str, text: str) -> HostsTable:
    """Parse the text of one file; raise HostsSyntaxError naming FILE:LINE."""
    rules: list[HostsRule] = []
    warnings: list[str] = []
    for lineno, line in logical_lines(path, text):
        rule, notes = parse_rule(path, lineno, line)
        warnings.extend(notes)
        if rule is not None:
            rules.append(rule)
    patterns = pattern_files(rules, warnings)
    return HostsTable(path, tuple(rules), tuple(warnings), patterns)


def read_table(path: str | os.PathLike[str]) -> HostsTable:
    """Read one file; a missing file is an empty table, as for tcpd."""
    name = os.fspath(path)
    try:
        with open(name, "rb") as stream:
            data = stream.read()
    except FileNotFoundError:
        return HostsTable(name, warnings=(f"{name}: no such file (no rules)",))
    except OSError as exc:
        raise HostsSyntaxError(f"{name}: cannot read: {exc.strerror or exc}") from exc
    return parse_table(name, _decode(name, data))


# --------------------------------------------------------------------------- /file patterns

MAX_PATTERN_FILE_DEPTH = 8


def pattern_files(rules: list[HostsRule], warnings: list[str]) -> dict[str, tuple[str, ...]]:
    """Read every ``/path`` client pattern (and those nested in them) once, now."""
    found: dict[str, tuple[str, ...]] = {}
    todo = [(token, 0) for rule in rules for token in _host_parts(rule)]
    while todo:
        token, depth = todo.pop()
        if not token.startswith("/") or token in found or depth > MAX_PATTERN_FILE_DEPTH:
            continue
        found[token] = _read_patterns(token, warnings)
        todo.extend((inner, depth + 1) for inner in found[token])
    return found


def _host_parts(rule: HostsRule) -> list[str]:
    """The host patterns of a rule: client tokens and the host half of ``x@host``."""
    parts: list[str] = []
    for token in rule.clients:
        split = split_at(token[1:], "@")
        parts.append(split[1] if split is not None else token)
    for token in rule.daemons:
        split = split_at(token[1:], "@")
        if split is not None:
            parts.append(split[1])
    return parts


def _read_patterns(path: str, warnings: list[str]) -> tuple[str, ...]:
    """Whitespace-separated patterns (fscanf %s: '#' is no comment there); missing: none."""
    try:
        with open(path, "rb") as stream:
            text = stream.read().decode("utf-8", "surrogateescape")
    except FileNotFoundError:
        return ()
    except OSError as exc:
        warnings.append(f"{path}: cannot read pattern file: {exc.strerror or exc}")
        return ()
    return tuple(part for part in re.split(r"[ \t\n\v\f\r]+", text) if part)
