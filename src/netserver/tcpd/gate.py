"""Carrying out hosts_access decisions for real connections.

`HostsGate` is what the server holds: the loaded tables (reloaded on SIGHUP, keeping
the old ones on an error), the daemon name, and the name resolver.  On the accept path
the server asks `HostsGate.quick` for a verdict that needs no lookup, no disk and no
side effect; anything else -- a name to look up, a banner to read, a command to spawn --
is done by `HostsGate.judge` and `HostsGate.prepare` in a task, off the accept path,
with every lookup bounded by a deadline (a lookup that does not finish counts as
failed: the name is "unknown", as for tcpd).

``spawn`` runs ``/bin/sh -c COMMAND`` with stdin, stdout and stderr on /dev/null, and
the service starts once it has finished (tcpd waits too; end the command with ``&``
not to wait), but never waits longer than `SPAWN_WAIT`.  ``twist`` hands the client to
``/bin/sh -c COMMAND`` with the socket on all three descriptors (`TwistMode`).
``setenv`` reaches spawned and twisted commands and, through `HostsExecMode`, the
command a server runs per connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import os
import socket
import struct
from collections.abc import Mapping

from ..children import ProcessMode, watch_child
from ..connlog import ServerLog
from ..endpoint import Endpoint
from ..errors import NetserverError
from ..handlers import Command
from ..modes.base import RESET_SIGNALS, Accepted, ModeContext
from ..modes.execute import ExecMode, spawn, tcp_environ
from .access import (
    HostsAccess,
    HostsLoader,
    NameNeeded,
    Plan,
    Request,
    make_request,
    read_banner_file,
)
from .match import UNKNOWN
from .names import HostNames
from .options import Banner, Keepalive, Linger, OptionStep, Spawn

__all__ = ["HostsExecMode", "HostsGate", "TwistMode", "spawn_shell"]

LOOKUP_TIMEOUT = 5.0
SPAWN_WAIT = 30.0
BANNER_TIMEOUT = 10.0
SHELL = "/bin/sh"
MAX_PASSES = 4


class HostsGate:
    """hosts.allow/hosts.deny for one service: decide, then carry the decision out."""

    def __init__(
        self,
        load: HostsLoader,
        daemon: str,
        names: HostNames,
        log: ServerLog,
        lookup_timeout: float = LOOKUP_TIMEOUT,
    ) -> None:
        self.load = load
        self.access: HostsAccess = load()
        self.daemon = daemon
        self.names = names
        self.log = log
        self.lookup_timeout = lookup_timeout

    def announce(self) -> None:
        """Log what was loaded, and every warning (netgroups, missing files, ...)."""
        self.log.info("hosts access", daemon=self.daemon, tables=self.access.describe())
        for warning in self.access.warnings:
            self.log.info("hosts access warning", warning=warning)

    def reload(self) -> None:
        """Re-read both files; on an error keep the old rules and say where it is."""
        try:
            self.access = self.load()
        except NetserverError as exc:
            self.log.error("hosts reload failed, keeping the previous rules", error=str(exc))
            return
        self.log.info("hosts access reloaded", tables=self.access.describe())
        for warning in self.access.warnings:
            self.log.info("hosts access warning", warning=warning)

    # -- deciding ------------------------------------------------------------------------
    def request(self, peer: Endpoint, local: Endpoint) -> Request:
        return make_request(self.daemon, peer, local)

    def quick(self, request: Request) -> Plan | None:
        """A verdict without lookups or side effects, or None: then use `judge`."""
        return self.access.quick(request)

    async def judge(self, request: Request, access: HostsAccess) -> Plan:
        """Decide with lookups as needed (each bounded); banners are read here too."""
        loop = asyncio.get_running_loop()
        for _ in range(MAX_PASSES):
            try:
                return await loop.run_in_executor(None, access.decide, request, read_banner_file)
            except NameNeeded as need:
                host = request.client if need.role == "client" else request.server
                host.resolved = await self._lookup(host.addr)
        return Plan("denied", error="host name lookups did not settle")

    async def _lookup(self, address: str) -> str:
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return UNKNOWN
        loop = asyncio.get_running_loop()
        try:
            return await asyncio.wait_for(
                loop.run_in_executor(None, self.names.hostname, ip), self.lookup_timeout
            )
        except TimeoutError:
            return UNKNOWN

    # -- reporting -----------------------------------------------------------------------
    def record(self, peer: Endpoint, plan: Plan) -> None:
        """One log line per decision made by a rule (tcpd logs each connection too)."""
        if plan.rule is None:
            return
        fields: dict[str, object] = {
            "peer": str(peer),
            "daemon": self.daemon,
            "verdict": plan.verdict,
            "rule": plan.rule.where,
        }
        if plan.severity is not None:
            fields["severity"] = plan.severity
        if plan.error is not None:
            fields["error"] = plan.error
        self.log.info("hosts access", **fields)

    @staticmethod
    def reason(plan: Plan) -> str:
        """Why a client was refused, for the "refused" log line."""
        where = plan.rule.where if plan.rule is not None else "hosts access"
        if plan.error is not None:
            return f"{where}: {plan.error}"
        return f"denied by {where}"

    # -- carrying out --------------------------------------------------------------------
    async def prepare(self, plan: Plan, sock: socket.socket, ctx: ModeContext) -> None:
        """Banners, socket options and spawned commands, in the rule's order."""
        for step in plan.steps:
            await self._step(step, sock, ctx)

    async def _step(self, step: OptionStep, sock: socket.socket, ctx: ModeContext) -> None:
        if isinstance(step, Banner):
            await asyncio.get_running_loop().run_in_executor(None, send_banner, sock, step.data)
        elif isinstance(step, Keepalive):
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        elif isinstance(step, Linger):
            value = struct.pack("ii", 1 if step.seconds else 0, step.seconds)
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, value)
        elif isinstance(step, Spawn):
            await self._spawn(step, ctx)

    async def _spawn(self, step: Spawn, ctx: ModeContext) -> None:
        """Run the command and wait (bounded) for it; the watcher reaps it either way."""
        try:
            pid = spawn_shell(step.command, {**os.environ, **dict(step.env)})
        except OSError as exc:
            self.log.error("hosts access: cannot spawn", command=step.command, error=str(exc))
            return
        done: asyncio.Future[int] = ctx.loop.create_future()

        def exited(code: int) -> None:
            ctx.fds.discard(pidfd)
            if not done.done():
                done.set_result(code)

        pidfd = watch_child(ctx.loop, pid, exited)
        ctx.fds.add(pidfd)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(done), SPAWN_WAIT)


def send_banner(sock: socket.socket, data: bytes) -> None:
    """Write a banner within BANNER_TIMEOUT, then put the socket back to blocking."""
    try:
        sock.settimeout(BANNER_TIMEOUT)
        sock.sendall(data)
    except OSError:
        pass
    finally:
        with contextlib.suppress(OSError):
            sock.setblocking(True)


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
        setsigdef=RESET_SIGNALS,
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


class HostsExecMode(ExecMode):
    """`ExecMode` that adds a connection's ``setenv`` variables to its command."""

    def __init__(self, ctx: ModeContext, command: Command, path: str) -> None:
        super().__init__(ctx, command, path)
        self.extra_env: dict[int, dict[str, str]] = {}

    def set_env(self, conn: Accepted, env: Mapping[str, str]) -> None:
        """Variables for the next start of *conn*'s command (setenv applies last)."""
        self.extra_env[conn.fd] = dict(env)

    def start_child(self, conn: Accepted) -> int:
        extra = self.extra_env.pop(conn.fd, None)
        if not extra:
            return super().start_child(conn)
        env = tcp_environ(self.base_env, conn.sock, conn.record)
        env.update(extra)
        return spawn(self.path, self.argv, conn.sock.fileno(), env)
