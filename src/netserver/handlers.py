"""The five handler forms, and how a name on the command line becomes one.

(a) `StdioHandler`: ``def main(): ...`` reading ``sys.stdin``, writing ``sys.stdout``;
(b) `ConnectionHandler`: ``def main(conn: Connection): ...``;
(c) `AsyncHandler`: ``async def main(conn: AsyncConnection): ...`` (event-loop mode);
(d) `CallbackHandler`: a `Callbacks` subclass, one object per connection whose
    ``data_received`` the loop calls (event-loop mode; see `netserver.callbacks`);
(e) `Command`: an argv run once per connection, the socket on its stdin and stdout.

`as_handler` picks the form of a plain callable from its signature once, at start-up
(a `Callbacks` subclass by its type); wrap a callable in the class explicitly to skip
that guess.
"""

from __future__ import annotations

import importlib
import inspect
import os
import sys
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from .aio import AsyncConnection
from .callbacks import CallbackConnection, Callbacks
from .connection import Connection
from .errors import ConfigError


@dataclass(frozen=True)
class StdioHandler:
    """A function of no arguments that talks through sys.stdin and sys.stdout."""

    func: Callable[[], object]
    modes = frozenset({"fork", "prefork", "thread"})


@dataclass(frozen=True)
class ConnectionHandler:
    """A function that takes a `Connection`."""

    func: Callable[[Connection], object]
    modes = frozenset({"fork", "prefork", "thread"})


@dataclass(frozen=True)
class AsyncHandler:
    """A coroutine function that takes an `AsyncConnection`."""

    func: Callable[[AsyncConnection], Awaitable[object]]
    modes = frozenset({"async"})


@dataclass(frozen=True)
class CallbackHandler:
    """A `Callbacks` class (or any callable making one from a `CallbackConnection`)."""

    factory: Callable[[CallbackConnection], Callbacks]
    modes = frozenset({"async"})


@dataclass(frozen=True)
class Command:
    """A program to run per connection (no shell is involved)."""

    argv: tuple[str, ...]
    modes = frozenset({"fork", "prefork", "thread", "async"})

    def __post_init__(self) -> None:
        if not self.argv:
            raise ConfigError("empty command")


Handler = StdioHandler | ConnectionHandler | AsyncHandler | CallbackHandler | Command
LoopHandler = AsyncHandler | CallbackHandler
"""The forms event-loop mode runs."""
HandlerLike = Handler | Sequence[str] | Callable[..., object]


def as_handler(obj: HandlerLike) -> Handler:
    """Return `obj` as one of the five forms; ConfigError if it fits none."""
    if isinstance(obj, Handler):
        return obj
    if isinstance(obj, str):
        raise ConfigError(f"handler {obj!r} is a string: use load_handler() or Command([...])")
    if isinstance(obj, Sequence):
        return Command(tuple(str(arg) for arg in obj))
    if not callable(obj):
        raise ConfigError(f"handler {obj!r} is not callable")
    if isinstance(obj, type) and issubclass(obj, Callbacks):
        return CallbackHandler(obj)
    if inspect.iscoroutinefunction(obj):
        return AsyncHandler(obj)
    return ConnectionHandler(obj) if _required_params(obj) >= 1 else StdioHandler(obj)


def _required_params(func: Callable[..., object]) -> int:
    try:
        params = inspect.signature(func).parameters.values()
    except (TypeError, ValueError):
        return 0
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return sum(1 for p in params if p.kind in kinds and p.default is inspect.Parameter.empty)


def cwd_searched_last() -> None:
    """Put the current directory at the end of ``sys.path`` (and only there).

    A handler module may live in the current directory, but a file there must never
    shadow an installed module: a ``uvloop.py`` or ``ssl.py`` planted in the directory a
    root server was started from would otherwise run as root. ``python -m`` puts the
    directory first (as "" or its path); it is moved to the end, after site-packages.
    """
    cwd = os.getcwd()
    sys.path[:] = [entry for entry in sys.path if entry not in ("", cwd)]
    sys.path.append(cwd)


def load_handler(spec: str) -> Handler:
    """Import ``module:callable``; the current directory is searched after everything else."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ConfigError(f"handler {spec!r}: expected MODULE:CALLABLE")
    cwd_searched_last()
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:
        raise ConfigError(f"handler {spec!r}: cannot import {module_name}: {exc}") from None
    target: object = module
    for part in attr.split("."):
        if not hasattr(target, part):
            raise ConfigError(f"handler {spec!r}: {module_name} has no {attr}")
        target = getattr(target, part)
    if not callable(target):
        raise ConfigError(f"handler {spec!r} is not callable")
    return as_handler(target)


def check_mode(handler: Handler, mode: str) -> None:
    """Refuse a handler form that the mode cannot run, naming the modes that can."""
    if mode not in handler.modes:
        kind = type(handler).__name__
        allowed = ", ".join(sorted(handler.modes))
        raise ConfigError(f"a {kind} cannot run in {mode} mode (use: {allowed})")
