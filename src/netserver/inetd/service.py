"""One ``netserver run`` service: its `Server`, and the life of the process that runs it.

The supervisor builds every service's `Server` and binds its sockets itself (as root if
ports below 1024 need it), so every configuration error shows before anything forks.
Each service then runs in a forked child that closes what belongs to the others, drops
to the service's user, sets the service's environment and calls `Server.run()`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import ssl
import sys
import traceback
from collections.abc import Callable, Iterable
from dataclasses import replace

from .. import privileges
from ..admit.access import AccessPolicy
from ..connlog import ServerLog
from ..endpoint import Endpoint
from ..errors import EX_SOFTWARE, ConfigError, NetserverError
from ..gates import standard_gates
from ..handlers import Command, Handler, load_handler
from ..listen.tls import load_context
from ..server import RunOptions, Server
from ..tcpd.access import HostsLoader, load_hosts
from .config import ServiceConfig

FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD)


def build_server(service: ServiceConfig, log: ServerLog, loop: str) -> Server:
    """The service's Server, unbound; ConfigError naming the service and key if it cannot be."""
    try:
        handler = _handler(service)
        policy = AccessPolicy(service.allow, service.deny)
        gates = standard_gates(
            handler,
            lambda: policy,
            proxy_from=service.proxy_from,
            hosts=_hosts(service),
            daemon_name=service.daemon_name,
        )
        return Server(
            handler,
            list(service.listen),
            mode=service.mode,
            gates=gates,
            tls=_tls_loader(service),
            limits=service.limits,
            log=log.without_connections() if service.quiet else log,
            options=RunOptions(loop=loop, refuse_message=service.banner),
        )
    except NetserverError as exc:
        raise service.error(_key_of(service, str(exc)), str(exc)) from None


def _key_of(service: ServiceConfig, message: str) -> str:
    """Which key a Server error is about, for the one-line message."""
    if "TLS" in message:
        return "tls_cert"
    if "mode" in message:
        return "mode"
    return "command" if service.command else "handler"


def _handler(service: ServiceConfig) -> Handler:
    if service.command:
        return Command(service.command)
    return load_handler(service.handler)


def _hosts(service: ServiceConfig) -> HostsLoader | None:
    allow, deny = service.hosts_allow, service.hosts_deny
    if allow is None and deny is None:
        return None
    load_hosts(allow, deny)  # a syntax error is a start-up error, not a surprise later
    return lambda: load_hosts(allow, deny)


def _tls_loader(service: ServiceConfig) -> Callable[[], ssl.SSLContext] | None:
    """Loads the pair now (as root, in the supervisor) and again on every SIGHUP."""
    if service.tls_key and not service.tls_cert:
        raise service.error("tls_key", "needs tls_cert as well")
    if not service.tls_cert:
        return None
    cert, key = service.tls_cert, service.tls_key or service.tls_cert
    return lambda: load_context(cert, key)


def run_child(
    service: ServiceConfig,
    server: Server,
    close_fds: Iterable[int],
    on_ready: Callable[[list[Endpoint]], None] | None,
    on_stopping: Callable[[], None],
) -> None:
    """The body of a service's process: never returns, exits with a sysexits code."""
    code = EX_SOFTWARE
    try:
        _become_service(service, server, close_fds)
        server.options = dataclasses.replace(server.options, on_ready=on_ready)
        server.on_stopping = on_stopping
        server.run()
        code = 0
    except NetserverError as exc:
        print(f"netserver: service {service.name!r}: {exc}", file=sys.stderr, flush=True)
        code = exc.exit_code
    except BaseException:
        traceback.print_exc()
    finally:
        os._exit(code)


def _become_service(service: ServiceConfig, server: Server, close_fds: Iterable[int]) -> None:
    """Signals back to normal, others' descriptors closed, environment, then the user."""
    signal.set_wakeup_fd(-1)
    for sig in FORWARDED:
        signal.signal(sig, signal.SIG_DFL)
    # A reload asked for before Server installs its handler must not end the service.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_SETMASK, set())
    for fd in close_fds:
        with contextlib.suppress(OSError):
            os.close(fd)
    # The supervisor owns unix socket files: a service that exits must not unlink the
    # path its restarted successor will listen on through the same socket.
    for listener in server.listeners:
        if listener.spec.kind == "unix":
            listener.spec = replace(listener.spec, kind="fd")
    os.environ.pop("NOTIFY_SOCKET", None)  # only the supervisor speaks to systemd
    if service.identity is not None and os.geteuid() == 0:
        privileges.drop(service.identity)
    elif service.identity is not None and not privileges.is_current(service.identity):
        raise ConfigError(f"cannot run as {service.identity.user!r}: not root")
    os.environ.update(service.env)
