"""The two test layers, marked by rule and enforced.

Every test is marked `fast` or `slow` by `is_slow`, not by hand. A fast test stays in
this process: it starts no subprocess, forks nothing and spawns nothing; `make check`
runs only those (``-m fast``), `make test` runs both. The rule is enforced, not trusted:
while a fast test runs (setup, call and teardown), every way to start a process raises
`StartedProcess` and fails the test, even if the code under test swallows the exception.
A test the rule cannot see can be marked ``@pytest.mark.slow`` by hand.
"""

from __future__ import annotations

import _posixsubprocess
import contextlib
import inspect
import os
import subprocess
import sys
from collections.abc import Callable, Generator, Iterator
from pathlib import Path
from types import CodeType, ModuleType

import pytest

PROCESS_MODULES = frozenset({"subprocess", "multiprocessing", "pty"})
PROCESS_FIXTURES = frozenset({"netserver_proc"})
# What a function must call on a process module to start something (not just wait for
# or type a process: RunningServer.stop only signals one).
STARTERS = frozenset({"Popen", "run", "call", "check_call", "check_output", "getoutput"})
STARTERS |= {"getstatusoutput", "Process", "Pool", "get_context", "fork", "spawn"}
INTEGRATION_DIRS = frozenset({"reliability"})  # the reliability suite: daemons by design


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "fast: in this process; no subprocess, fork or daemon")
    config.addinivalue_line("markers", "slow: starts processes (a daemon, a command, a fork)")


def _names(code: CodeType) -> Iterator[str]:
    """The global and attribute names a function's code (and its nested code) uses."""
    yield from code.co_names
    for const in code.co_consts:
        if isinstance(const, CodeType):
            yield from _names(const)


class ProcessReach:
    """Whether a test module can start a process: it holds a process module (or something
    of one), or a helper of the test tree whose code reaches one, through any number of
    other helpers of the test tree (functions, and classes by their methods).

    This reads the helpers' code, so a new launcher needs no list kept up to date. It may
    call a module slow that is not (a name shared by an attribute and a global); the
    guard catches the other direction.
    """

    def __init__(self, root: Path) -> None:
        self.root = root  # only code under it is read: library code is the guard's part
        self.known: dict[int, bool] = {}

    def module(self, module: ModuleType) -> bool:
        return any(self.reaches(value) for value in list(vars(module).values()))

    def reaches(self, value: object) -> bool:
        if isinstance(value, ModuleType):
            return value.__name__.partition(".")[0] in PROCESS_MODULES
        home = getattr(value, "__module__", None)
        if not isinstance(home, str):
            return False
        if home.partition(".")[0] in PROCESS_MODULES:
            return True
        if id(value) in self.known or not self._ours(home):
            return self.known.get(id(value), False)
        self.known[id(value)] = False  # a cycle of helpers reaches nothing by itself
        self.known[id(value)] = found = any(self.reaches(v) for v in self._uses(value))
        return found

    def _ours(self, home: str) -> bool:
        """Code of the test tree: under the root, and not an installed package (a venv
        inside the checkout holds those)."""
        path = getattr(sys.modules.get(home), "__file__", None)
        if path is None:
            return False
        where = Path(path).resolve()
        return where.is_relative_to(self.root) and "site-packages" not in where.parts

    def _uses(self, value: object) -> Iterator[object]:
        if isinstance(value, type):
            yield from (v for v in vars(value).values() if callable(v) or isinstance(v, property))
            return
        if isinstance(value, property):
            yield from (f for f in (value.fget, value.fset) if f is not None)
            return
        func = inspect.unwrap(value) if callable(value) else None
        code = getattr(func, "__code__", None)
        scope = getattr(func, "__globals__", None)
        if isinstance(code, CodeType) and isinstance(scope, dict):
            names = set(_names(code))
            starts = bool(STARTERS & names)
            for name in names & scope.keys():
                if starts or not isinstance(scope[name], ModuleType):
                    yield scope[name]


def is_slow(item: pytest.Item, reach: ProcessReach) -> bool:
    """The layer rule: by the test's directory, its module's reach and its fixtures."""
    if item.get_closest_marker("slow") is not None:
        return True  # said by hand, for a test the rule cannot see
    if INTEGRATION_DIRS & set(item.path.parts):
        return True
    module = getattr(item, "module", None)
    if module is not None and reach.module(module):
        return True
    return bool(PROCESS_FIXTURES & set(getattr(item, "fixturenames", ())))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    reach = ProcessReach(config.rootpath.resolve())
    for item in items:
        item.add_marker(pytest.mark.slow if is_slow(item, reach) else pytest.mark.fast)


class StartedProcess(AssertionError):
    """A fast test started a process: it belongs in the slow layer (say why in a marker)."""


# Every way this Python can start a process: subprocess (and asyncio's subprocesses)
# through its own reference to _posixsubprocess.fork_exec or os.posix_spawn;
# multiprocessing and pty through os.fork; os.system.
_PROCESS_STARTERS: tuple[tuple[ModuleType, str], ...] = (
    (os, "fork"),
    (os, "forkpty"),
    (os, "posix_spawn"),
    (os, "posix_spawnp"),
    (os, "system"),
    (_posixsubprocess, "fork_exec"),
    (subprocess, "_fork_exec"),
)


@contextlib.contextmanager
def _forbid_processes() -> Iterator[list[StartedProcess]]:
    """While inside, starting a process raises StartedProcess (and is recorded, so a
    test that swallows the exception still fails)."""
    caught: list[StartedProcess] = []
    saved = [(module, name, getattr(module, name)) for module, name in _PROCESS_STARTERS]

    def guard(name: str) -> Callable[..., object]:
        def refuse(*_args: object, **_kwargs: object) -> object:
            exc = StartedProcess(f"a fast test called {name}: mark it slow or keep it in-process")
            caught.append(exc)
            raise exc

        return refuse

    for module, name, _ in saved:
        setattr(module, name, guard(f"{module.__name__}.{name}"))
    try:
        yield caught
    finally:
        for module, name, original in saved:
            setattr(module, name, original)


def _guarded_phase(item: pytest.Item) -> Generator[None, None, None]:
    if item.get_closest_marker("fast") is None:
        yield
        return
    with _forbid_processes() as caught:
        yield
    if caught:
        raise caught[0]


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item: pytest.Item) -> Generator[None, None, None]:
    yield from _guarded_phase(item)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Generator[None, None, None]:
    yield from _guarded_phase(item)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item: pytest.Item) -> Generator[None, None, None]:
    yield from _guarded_phase(item)
