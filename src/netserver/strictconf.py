"""Strict reading of TOML config tables: one set of rules for every config file.

Both `netserver run` (the [[service]] tables) and leafmail (leafmail.toml) read their
files through this module, so a duration, a size, a count or an unknown key means the
same thing, and is refused with the same words, in both. A config file is strict
because a typo must never fall back silently to a default (an inetd service without
its ``per_source`` limit, a mail server that relays for everyone).

A *kind* reads one TOML value into a Python value or raises `Unfit` with the reason
("must be an integer"); `Table` reads the keys of one table with kinds, remembers which
it read, and refuses the others. Errors are `Invalid`: the dotted key and the reason,
to which each reader adds its place (file, line, service).

Durations are seconds, as a number (``300``, ``0.5``) or a string with one unit:
``"90s"``, ``"5m"``, ``"4h"``, ``"5d"``. Sizes are bytes, as an integer or a string
with a binary unit: ``"64K"`` (65536), ``"25M"``, ``"1G"``.
"""

from __future__ import annotations

import difflib
import math
import os
import re
import tomllib
from collections.abc import Callable, Collection, Mapping
from pathlib import Path
from typing import Any, TypeVar

from .errors import ConfigError

T = TypeVar("T")

DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
SIZE_UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}
_DURATION = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*")
_SIZE = re.compile(r"\s*(\d+)\s*([kmgKMG]?)\s*")
NOT_A_DURATION = 'must be a duration such as 300, "5m" or "4h"'
NOT_A_SIZE = 'must be a size such as 1048576, "64K" or "25M"'


class Unfit(ValueError):
    """A value that does not fit its kind; the text completes "KEY ...": "must be ..."."""


class Invalid(ConfigError):
    """One key of a config file is wrong: its dotted `key` and the `reason`.

    `str()` is "KEY REASON"; a reader that says where (file, line, service) builds its
    own line from `key` and `reason`.
    """

    def __init__(self, key: str, reason: str) -> None:
        super().__init__(f"{key} {reason}")
        self.key = key
        self.reason = reason


class UnknownKey(Invalid):
    """A key no setting has: a typo, or an option this program does not have."""

    def __init__(self, key: str, near: str | None = None) -> None:
        hint = f" (did you mean {near!r}?)" if near else ""
        super().__init__(key, f"unknown key{hint}")
        self.args = (f"unknown key {key!r}{hint}",)


Kind = Callable[[object], T]
"""Reads one TOML value, or raises `Unfit`."""


# -- kinds ----------------------------------------------------------------------------
def string(value: object) -> str:
    if not isinstance(value, str):
        raise Unfit("must be a string")
    return value


def integer(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise Unfit("must be an integer")
    return value


def boolean(value: object) -> bool:
    if not isinstance(value, bool):
        raise Unfit("must be true or false")
    return value


def strings(value: object) -> tuple[str, ...]:
    """A list of strings; one string is a list of one."""
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(v, str) for v in items):
        raise Unfit("must be a list of strings")
    return tuple(items)


def duration(value: object) -> float:
    """Seconds from a number or a string with a unit: "30s", "5m", "1h", "5d"."""
    if isinstance(value, bool):
        raise Unfit(NOT_A_DURATION)
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str) and (match := _DURATION.fullmatch(value)):
        seconds = float(match.group(1)) * DURATION_UNITS[match.group(2) or "s"]
    else:
        raise Unfit(NOT_A_DURATION)
    if not math.isfinite(seconds):
        raise Unfit("must be a finite duration")
    if seconds < 0:
        raise Unfit("must not be negative")
    return seconds


def size(value: object) -> int:
    """Bytes from an integer or a string with a binary unit: "64K", "25M", "1G"."""
    if isinstance(value, bool):
        raise Unfit(NOT_A_SIZE)
    if isinstance(value, int):
        count = value
    elif isinstance(value, str) and (match := _SIZE.fullmatch(value)):
        count = int(match.group(1)) * SIZE_UNITS[match.group(2).lower()]
    else:
        raise Unfit(NOT_A_SIZE)
    if count < 0:
        raise Unfit("must not be negative")
    return count


def choice(*allowed: str) -> Kind[str]:
    """A string that must be one of `allowed`."""

    def read(value: object) -> str:
        text = string(value)
        if text not in allowed:
            raise Unfit(f"must be one of {', '.join(allowed)}")
        return text

    return read


def at_least(kind: Kind[T], low: float, *, above: bool = False) -> Kind[T]:
    """`kind`, refused when below `low` (or not above it, with `above`)."""

    def read(value: object) -> T:
        number = kind(value)
        if not isinstance(number, int | float):
            raise TypeError("at_least needs a numeric kind")
        if number < low or (above and number == low):
            raise Unfit(f"must be {'>' if above else '>='} {low:g}")
        return number

    return read


def positive(kind: Kind[T]) -> Kind[T]:
    """`kind`, refused unless > 0."""
    return at_least(kind, 0, above=True)


def value_of(kind: Kind[T], value: object, key: str) -> T:
    """`value` read by `kind`, or Invalid naming `key`."""
    try:
        return kind(value)
    except Unfit as exc:
        raise Invalid(key, str(exc)) from None


def parse_duration(value: object, what: str) -> float:
    """A duration for a caller that names it itself: ConfigError "WHAT must be ..."."""
    return value_of(duration, value, what)


# -- files ----------------------------------------------------------------------------
def read_file(path: str | os.PathLike[str]) -> tuple[str, dict[str, Any]]:
    """The text of a TOML file and its tables; ConfigError naming the file on any problem."""
    name = os.fspath(path)
    try:
        text = Path(name).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{name}: no such config file") from None
    except OSError as exc:
        raise ConfigError(f"{name}: cannot read: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{name}: not UTF-8 text") from None
    try:
        return text, tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{name}: {exc}") from None


# -- tables ---------------------------------------------------------------------------
class Table:
    """One TOML table, read strictly: typed reads that remember which keys were read.

    `finish` then refuses every key nobody read. `name` is the table's dotted name
    ("" for the top level), which prefixes every key in an error.
    """

    def __init__(self, data: object, name: str = "") -> None:
        if not isinstance(data, dict):
            raise Invalid(name or "top level", "must be a table")
        self.data: dict[str, Any] = data
        self.name = name
        self.used: set[str] = set()

    def dotted(self, key: str) -> str:
        return f"{self.name}.{key}" if self.name else key

    def __contains__(self, key: str) -> bool:
        return key in self.data

    def get(self, key: str, kind: Kind[T], default: T) -> T:
        """The value of `key` read by `kind`, or `default` when the key is absent."""
        if key not in self.data:
            return default
        return self.read(key, kind)

    def read(self, key: str, kind: Kind[T]) -> T:
        """The value of `key` (which must be there) read by `kind`."""
        self.used.add(key)
        return value_of(kind, self.data[key], self.dotted(key))

    def table(self, key: str) -> Table:
        """The sub-table `key` (empty when absent)."""
        self.used.add(key)
        return Table(self.data.get(key, {}), self.dotted(key))

    def finish(self, known: Collection[str] = ()) -> None:
        """Refuse keys nobody read (nor listed in `known`): typos or options we lack."""
        unknown = sorted(set(self.data) - self.used - set(known))
        if unknown:
            near = difflib.get_close_matches(unknown[0], [*self.used, *known], 1)
            raise UnknownKey(self.dotted(unknown[0]), near[0] if near else None)


def refuse_unknown(data: Mapping[str, object], known: Collection[str], name: str = "") -> None:
    """Refuse a key of `data` not in `known`, in file order (UnknownKey)."""
    for key in data:
        if key not in known:
            near = difflib.get_close_matches(key, list(known), 1)
            raise UnknownKey(f"{name}.{key}" if name else key, near[0] if near else None)
