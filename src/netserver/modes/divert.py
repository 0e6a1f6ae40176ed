"""The mode a gate diverts connections to: tcpd's ``twist``.

``twist`` hands the client to ``/bin/sh -c COMMAND`` with the socket on all three
descriptors (`TwistMode`). (``setenv`` variables reach the command a server runs per
connection through `ExecMode.dispatch` itself.) The tcpd gate (`netserver.tcpd.gate`)
decides which connection goes where; this only starts the processes, tracked like any
other.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from ..accepted import Accepted
from .base import DEFAULT_SIGNALS, ModeContext
from .execute import tcp_environ
from .process import ProcessMode

__all__ = ["SHELL", "TwistMode", "spawn_shell"]

SHELL = "/bin/sh"


def spawn_shell(command: str, env: Mapping[str, str], fd: int | None = None) -> int:
    """``/bin/sh -c COMMAND``: stdio on *fd* (twist) or /dev/null (spawn); its pid."""
    actions: list[tuple[int | str, ...]]
    if fd is None:
        actions = [(os.POSIX_SPAWN_OPEN, n, os.devnull, os.O_RDWR, 0) for n in (0, 1, 2)]
    else:
        actions = [(os.POSIX_SPAWN_DUP2, fd, n) for n in (0, 1, 2)]
    return os.posix_spawn(
        SHELL,
        ["sh", "-c", command],
        env,
        file_actions=actions,
        setsigdef=DEFAULT_SIGNALS,
        setsigmask=(),
    )


class TwistMode(ProcessMode):
    """Connections whose service a ``twist`` option replaced by a shell command."""

    def __init__(self, ctx: ModeContext) -> None:
        super().__init__(ctx)
        self._next: tuple[str, dict[str, str]] | None = None

    def twist(self, conn: Accepted, command: str, extra_env: Mapping[str, str]) -> None:
        """Run *command* on the connection; it is tracked, logged and reaped like any."""
        env = tcp_environ(os.environ, conn.sock, conn.record)
        env.update(extra_env)
        self._next = (command, env)
        try:
            self.dispatch(conn)
        finally:
            self._next = None

    def start_child(self, conn: Accepted) -> int:
        assert self._next is not None
        command, env = self._next
        return spawn_shell(command, env, conn.sock.fileno())
