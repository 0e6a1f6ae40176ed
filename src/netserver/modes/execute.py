"""Run a command per connection, as tcpserver and inetd do.

The command is started with posix_spawn (vfork + exec: no copy of the server's memory),
with the socket as its stdin and stdout, the server's stderr (the log) as its stderr,
every signal at its default disposition (SIGPIPE included), and no other descriptor:
everything the server opens is close-on-exec. Its environment is the server's plus the
ucspi-tcp variables, so programs written for tcpserver run unchanged.

A command is spawned directly by the supervisor in every mode: forking a Python worker
only to exec would cost a process copy and buy nothing.
"""

from __future__ import annotations

import os
import shutil
import socket
import struct
from collections.abc import Mapping

from ..accepted import Accepted
from ..connlog import ConnRecord
from ..errors import ConfigError
from ..handlers import Command
from .base import RESET_SIGNALS, ModeContext
from .process import ProcessMode

# Every ucspi variable is dropped from the inherited environment first, so a command
# never sees a stale value from the server's own environment or the other family.
_UCSPI = frozenset(
    [
        "PROTO",
        "TCPLOCALIP",
        "TCPLOCALPORT",
        "TCPLOCALHOST",
        "TCPREMOTEIP",
        "TCPREMOTEPORT",
        "TCPREMOTEHOST",
        "TCPREMOTEINFO",
        "UNIXLOCALPATH",
        "UNIXREMOTEPID",
        "UNIXREMOTEUID",
        "UNIXREMOTEGID",
    ]
)
_PEERCRED = struct.Struct("3i")


def tcp_environ(base: Mapping[str, str], sock: socket.socket, record: ConnRecord) -> dict[str, str]:
    """The environment of a per-connection command (ucspi-tcp names).

    TCPREMOTEHOST and TCPLOCALHOST are set only when the name is known (see tcpd.envnames).
    """
    env = {k: v for k, v in base.items() if k not in _UCSPI}
    peer, local = record.peer, record.local
    env["PROTO"] = peer.proto
    if peer.ip is not None and local.ip is not None:
        env["TCPLOCALIP"] = str(local.ip)
        env["TCPLOCALPORT"] = str(local.port)
        env["TCPREMOTEIP"] = str(peer.ip)
        env["TCPREMOTEPORT"] = str(peer.port)
        if record.remote_host is not None:
            env["TCPREMOTEHOST"] = record.remote_host
        if record.local_host is not None:
            env["TCPLOCALHOST"] = record.local_host
    else:
        env["UNIXLOCALPATH"] = local.path or ""
        pid, uid, gid = _peer_credentials(sock)
        if pid > 0:
            env.update(UNIXREMOTEPID=str(pid), UNIXREMOTEUID=str(uid), UNIXREMOTEGID=str(gid))
    return env


def _peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
    except OSError:
        return (0, -1, -1)
    pid, uid, gid = _PEERCRED.unpack(raw)
    return (pid, uid, gid)


def resolve_program(argv: tuple[str, ...]) -> str:
    """The path of argv[0] (searched in $PATH once, at start-up), or ConfigError."""
    path = shutil.which(argv[0])
    if path is None:
        raise ConfigError(f"command {argv[0]!r} not found or not executable")
    return path


def spawn(path: str, argv: tuple[str, ...], fd: int, env: Mapping[str, str]) -> int:
    """Start the command on socket `fd`; return its pid."""
    return os.posix_spawn(
        path,
        argv,
        env,
        file_actions=[(os.POSIX_SPAWN_DUP2, fd, 0), (os.POSIX_SPAWN_DUP2, fd, 1)],
        setsigdef=RESET_SIGNALS,
        setsigmask=(),
    )


class ExecMode(ProcessMode):
    """Serves each connection with a fresh process running the command."""

    def __init__(self, ctx: ModeContext, command: Command, path: str) -> None:
        super().__init__(ctx)
        self.argv = command.argv
        self.path = path
        # Filtered once: copying the whole environment per connection was measurable.
        self.base_env = {k: v for k, v in os.environ.items() if k not in _UCSPI}

    def start_child(self, conn: Accepted) -> int:
        env = tcp_environ(self.base_env, conn.sock, conn.record)
        return spawn(self.path, self.argv, conn.sock.fileno(), env)
