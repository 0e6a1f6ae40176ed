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
import os
import subprocess
from collections.abc import Callable, Generator, Iterator
from types import ModuleType

import pytest

# The tests' own ways of starting a program, by name (the helper modules that define them
# import conftest, so this plugin cannot import them). A test module that holds one of
# them, or anything of the subprocess, multiprocessing or pty modules, is an integration
# module: all its tests are slow.
LAUNCHERS = frozenset(
    {
        "launch_with_ready_fd",
        "start_server",
        "start_leafmail",
        "spawn_leafmail",
        "leafmail_servers",
        "LeafmailFactory",
        "run_flush",
        "start_run",
        "run_fails",
    }
)
PROCESS_MODULES = frozenset({"subprocess", "multiprocessing", "pty"})
PROCESS_FIXTURES = frozenset({"netserver_proc"})
INTEGRATION_DIRS = frozenset({"reliability"})  # the reliability suite: daemons by design


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "fast: in this process; no subprocess, fork or daemon")
    config.addinivalue_line("markers", "slow: starts processes (a daemon, a command, a fork)")


def starts_processes(module: ModuleType) -> bool:
    """True if a test module can start programs: it imports a process module or a launcher."""
    for value in vars(module).values():
        home = value.__name__ if isinstance(value, ModuleType) else getattr(value, "__module__", "")
        if str(home).partition(".")[0] in PROCESS_MODULES:
            return True
        if not isinstance(value, ModuleType) and getattr(value, "__name__", None) in LAUNCHERS:
            return True
    return False


def is_slow(item: pytest.Item) -> bool:
    """The layer rule: by the test's directory, its module's imports and its fixtures."""
    if item.get_closest_marker("slow") is not None:
        return True  # said by hand, for a test the rule cannot see
    if INTEGRATION_DIRS & set(item.path.parts):
        return True
    module = getattr(item, "module", None)
    if module is not None and starts_processes(module):
        return True
    return bool(PROCESS_FIXTURES & set(getattr(item, "fixturenames", ())))


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        item.add_marker(pytest.mark.slow if is_slow(item) else pytest.mark.fast)


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
