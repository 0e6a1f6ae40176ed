"""Start one program again and again: posix_spawn(3) with what never changes prepared once.

`os.posix_spawn` converts its whole argument list on every call: each variable of the
environment becomes a new ``NAME=value`` bytes object and a C string (about a thousand
instructions a variable, a third of an exec spawner's user-space work per connection
with a 44-variable environment; bench/RESULTS.md), the signal set is rebuilt from the
Python set, and so is the attribute object. The exec spawner starts the same program
with the same environment for every connection, only a few ucspi-tcp variables and the
socket differ: so `Launcher` builds the attributes (signals to default, an empty mask),
argv and the fixed part of the environment once, as C arrays, and per call writes the
connection's variables into the slots after the fixed part and calls glibc's
posix_spawn through ctypes, as leafmail.spool calls syncfs. The two dup2 file actions
are built again only when the socket's descriptor number is not the last call's.

The call itself is kept cheap, as it runs once per connection: the variables come as
ready ``NAME=value`` items (`spawn_items`; the exec spawner keeps those of each address
it has seen), written into the slots by one slice assignment; the arguments are one
tuple built once; and the function is called without releasing the GIL (`ctypes.PyDLL`):
the spawner has one thread, so there is nobody to hand it to during the vfork wait,
and releasing and taking it back was a tenth of the call's instructions.

The child is started exactly as `os.posix_spawn` starts it (same glibc call, same
attributes, same file actions); what the prepared call cannot express the same way is
left to `os.posix_spawn` (`posix_spawn_on`): a variable whose name is also in the fixed
part (the later one must win, as in a dict) or more variables than there are slots. So
is everything where the C library has no posix_spawn (`Launcher.make` gives None).
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Callable, Iterable, Mapping, Sequence

__all__ = ["Launcher", "posix_spawn_on"]

_SETSIGDEF, _SETSIGMASK = 0x04, 0x08  # glibc's POSIX_SPAWN_SETSIGDEF, _SETSIGMASK
# Opaque glibc types, given more room than they take (80, 336 and 128 bytes on x86-64).
_ACTIONS_SIZE, _ATTR_SIZE, _SIGSET_SIZE = 512, 1024, 256
SLOTS = 16  # variables a call may add after the fixed environment


def posix_spawn_on(
    path: str, argv: tuple[str, ...], env: Mapping[bytes, bytes], fd: int, defaults: Iterable[int]
) -> int:
    """`path` started by `os.posix_spawn` with `fd` as its stdin and stdout, the signals
    in `defaults` at their default and none blocked; its pid, or OSError."""
    return os.posix_spawn(
        path,
        argv,
        env,
        file_actions=[(os.POSIX_SPAWN_DUP2, fd, 0), (os.POSIX_SPAWN_DUP2, fd, 1)],
        setsigdef=defaults,
        setsigmask=(),
    )


class Launcher:
    """posix_spawn of one program, argv and base environment, on a socket as fd 0 and 1."""

    def __init__(
        self,
        libc: ctypes.CDLL,
        posix_spawn: Callable[..., int],
        path: str,
        argv: Sequence[str],
        env: Mapping[bytes, bytes],
        default_signals: Iterable[int],
    ) -> None:
        self._libc = libc
        self._program = path, tuple(argv), env, frozenset(default_signals)  # the fallback's
        self._path = os.fsencode(path)
        self._argv = (ctypes.c_char_p * (len(argv) + 1))(*map(os.fsencode, argv))
        fixed = [name + b"=" + value for name, value in env.items()]
        self._names = frozenset(env)
        self._fixed = len(fixed)
        self._envp = (ctypes.c_char_p * (len(fixed) + SLOTS + 1))(*fixed)
        self._actions = ctypes.create_string_buffer(_ACTIONS_SIZE)
        self._actions_fd = -1  # the socket descriptor `_actions` dup2s (-1: none built)
        self._attr = ctypes.create_string_buffer(_ATTR_SIZE)
        self._pid = ctypes.c_int()
        self._call = posix_spawn
        pid = ctypes.byref(self._pid)
        self._args = pid, self._path, self._actions, self._attr, self._argv, self._envp
        defaults = ctypes.create_string_buffer(_SIGSET_SIZE)
        mask = ctypes.create_string_buffer(_SIGSET_SIZE)
        libc.sigemptyset(defaults)
        libc.sigemptyset(mask)
        for sig in self._program[3]:
            libc.sigaddset(defaults, int(sig))
        _check(libc.posix_spawnattr_init(self._attr))
        _check(libc.posix_spawnattr_setsigdefault(self._attr, defaults))
        _check(libc.posix_spawnattr_setsigmask(self._attr, mask))
        _check(libc.posix_spawnattr_setflags(self._attr, ctypes.c_short(_SETSIGDEF | _SETSIGMASK)))

    @classmethod
    def make(
        cls,
        path: str,
        argv: Sequence[str],
        env: Mapping[bytes, bytes],
        default_signals: Iterable[int],
    ) -> Launcher | None:
        """A launcher, or None where the C library has no posix_spawn to call."""
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            # As `ctypes.PyDLL` calls it: the GIL held (see the module's docstring); the
            # arguments are converted by their own types (no `argtypes` to check).
            posix_spawn = ctypes.PyDLL(None).posix_spawn
            return cls(libc, posix_spawn, path, argv, env, default_signals)
        except (AttributeError, OSError):
            return None

    def spawn(self, fd: int, variables: Mapping[bytes, bytes]) -> int:
        """Start the program with `fd` as its stdin and stdout and `variables` added to
        the environment; its pid, or OSError if it cannot start."""
        if len(variables) > SLOTS or not self._names.isdisjoint(variables):
            path, argv, env, defaults = self._program
            return posix_spawn_on(path, argv, {**env, **variables}, fd, defaults)
        return self.spawn_items(fd, [name + b"=" + value for name, value in variables.items()])

    def spawn_items(self, fd: int, items: Sequence[bytes]) -> int:
        """`spawn` with the variables as ``NAME=value`` items, at most `SLOTS` of them,
        none named as a variable of the fixed environment (the caller's promise: the
        exec spawner's fixed environment has no ucspi-tcp name)."""
        if len(items) > SLOTS:
            return self.spawn(fd, dict(item.split(b"=", 1) for item in items))
        at = self._fixed
        end = at + len(items)
        self._envp[at:end] = items  # type: ignore[call-overload]  # (any sequence: typeshed says list)
        self._envp[end] = None
        if fd != self._actions_fd:
            self._dup2_actions(fd)
        error = self._call(*self._args)
        if error:
            raise OSError(error, os.strerror(error), os.fsdecode(self._path))
        return self._pid.value

    def _dup2_actions(self, fd: int) -> None:
        """File actions that make `fd` the child's stdin and stdout, kept for the next
        call: the spawner closes each socket once its command has started, so the next
        client's is most often given the same number, and glibc checks each descriptor
        of a dup2 action against RLIMIT_NOFILE (two getrlimit calls an action)."""
        libc, actions = self._libc, self._actions
        if self._actions_fd >= 0:
            libc.posix_spawn_file_actions_destroy(actions)
            self._actions_fd = -1
        _check(libc.posix_spawn_file_actions_init(actions))
        try:
            _check(libc.posix_spawn_file_actions_adddup2(actions, fd, 0))
            _check(libc.posix_spawn_file_actions_adddup2(actions, fd, 1))
        except OSError:
            libc.posix_spawn_file_actions_destroy(actions)
            raise
        self._actions_fd = fd


def _check(error: int) -> None:
    """posix_spawn's functions return an error number (0: done), not -1 and errno."""
    if error:
        raise OSError(error, os.strerror(error))
