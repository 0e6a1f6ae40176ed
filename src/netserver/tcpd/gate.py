"""The tcpd gate: hosts_access decisions carried out for real connections.

`HostsGate` holds the loaded tables (reloaded on SIGHUP, keeping the old ones on an
error), the daemon name, and the host-name resolver. Its `quick` gives a ruling when the
tables need no lookup, no disk and no side effect; anything else -- a name to look up,
a banner to read, a command to spawn -- is done by `judge`, in the server's task off the
accept path, with every lookup bounded by a deadline (a lookup that does not finish
counts as failed: the name is "unknown", as for tcpd).

``spawn`` runs ``/bin/sh -c COMMAND`` with stdin, stdout and stderr on /dev/null, and
the service starts once it has finished (tcpd waits too; end the command with ``&``
not to wait), but never waits longer than `SPAWN_WAIT`. ``twist`` diverts the client to
``/bin/sh -c COMMAND`` (`netserver.modes.divert.TwistMode`). ``setenv`` reaches spawned
and twisted commands and, through `ExecMode.dispatch`, the command a server runs per
connection. A name a rule looked up becomes TCPREMOTEHOST/TCPLOCALHOST.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import os
import socket
import struct
from collections.abc import Sequence

from ..accepted import Accepted
from ..admit.gate import LOOKUP_TIMEOUT, PASS, Divert, Pass, Refusal, Ruling
from ..children import watch_child
from ..connlog import ConnRecord, ServerLog
from ..endpoint import Endpoint
from ..errors import NetserverError
from ..modes.base import Mode, ModeContext
from ..modes.divert import TwistMode, spawn_shell
from ..modes.execute import ExecMode
from .access import (
    HostsAccess,
    HostsLoader,
    NameNeeded,
    Plan,
    Request,
    make_request,
    read_banner_file,
)
from .match import UNKNOWN, HostInfo, hostname_known
from .names import HostNames, ResolverNames
from .options import Banner, Keepalive, Linger, OptionStep, Spawn

__all__ = ["HostsGate", "send_banner"]

SPAWN_WAIT = 30.0
BANNER_TIMEOUT = 10.0
MAX_PASSES = 4


class HostsGate:
    """hosts.allow/hosts.deny for one service: decide, then carry the decision out."""

    def __init__(
        self,
        load: HostsLoader,
        daemon: str,
        names: HostNames | None = None,
        lookup_timeout: float = LOOKUP_TIMEOUT,
    ) -> None:
        self.load = load
        self.access: HostsAccess = load()
        self.daemon = daemon
        self.names = names or ResolverNames()
        self.lookup_timeout = lookup_timeout
        self.log = ServerLog()
        self._ctx: ModeContext | None = None
        self._twist: TwistMode | None = None
        self._setenv: ExecMode | None = None

    # -- the Gate contract (netserver.admit.gate) ---------------------------------------
    def start(self, ctx: ModeContext, mode: Mode) -> Sequence[Mode]:
        """Log what was loaded; make the modes for twisted and ``setenv`` connections."""
        self.log, self._ctx = ctx.log, ctx
        self.announce()
        self._twist = TwistMode(ctx)
        if not isinstance(mode, ExecMode):
            return [self._twist]
        self._setenv = mode  # its dispatch takes the setenv variables
        return [self._twist]

    def reload(self, log: ServerLog) -> None:
        """Re-read both files; on an error keep the old rules and say where it is."""
        try:
            self.access = self.load()
        except NetserverError as exc:
            log.error("hosts reload failed, keeping the previous rules", error=str(exc))
            return
        log.info("hosts access reloaded", tables=self.access.describe())
        for warning in self.access.warnings:
            log.info("hosts access warning", warning=warning)

    def quick(self, peer: Endpoint, local: Endpoint) -> Pass | Refusal | None:
        """A ruling without lookups or side effects, or None: then `judge` decides."""
        if peer.ip is None:
            return PASS
        plan = self.access.quick(make_request(self.daemon, peer, local))
        if plan is None:
            return None
        self.record(peer, plan)
        return PASS if plan.granted else Refusal(self.reason(plan))

    async def judge(self, conn: Accepted) -> Ruling:
        """Decide with lookups, carry out the rule's options, then pass, refuse or divert."""
        record = conn.record
        if record.peer.ip is None:
            return PASS
        request = make_request(self.daemon, record.peer, record.local)
        plan = await self.decide(request, self.access)
        self.record(record.peer, plan)
        assert self._ctx is not None, "start() comes before any connection"
        await self.prepare(plan, conn.sock, self._ctx)
        _take_names(record, request)
        return self._ruling(conn, plan)

    def _ruling(self, conn: Accepted, plan: Plan) -> Ruling:
        if plan.twist is not None and self._twist is not None:
            twist, command, env = self._twist, plan.twist, dict(plan.env)
            return Divert(lambda c: twist.twist(c, command, env))
        if not plan.granted:
            return Refusal(self.reason(plan))
        if plan.env and self._setenv is not None:
            setenv, extra = self._setenv, dict(plan.env)
            return Divert(lambda c: setenv.dispatch(c, extra))
        if plan.env:
            self.log.info("setenv applies only to commands", peer=str(conn.record.peer))
        return PASS

    def announce(self) -> None:
        """Log what was loaded, and every warning (netgroups, missing files, ...)."""
        self.log.info("hosts access", daemon=self.daemon, tables=self.access.describe())
        for warning in self.access.warnings:
            self.log.info("hosts access warning", warning=warning)

    # -- deciding ------------------------------------------------------------------------
    async def decide(self, request: Request, access: HostsAccess) -> Plan:
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
        try:
            return await asyncio.wait_for(self.names.hostname(ip), self.lookup_timeout)
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


def _known(host: HostInfo) -> str | None:
    """The name a rule looked up for one end, if it is a confirmed name."""
    if host.resolved is not None and hostname_known(host.resolved):
        return host.resolved
    return None


def _take_names(record: ConnRecord, request: Request) -> None:
    """Names the rules looked up while deciding serve as TCPREMOTEHOST/TCPLOCALHOST."""
    record.remote_host = record.remote_host or _known(request.client)
    record.local_host = record.local_host or _known(request.server)
