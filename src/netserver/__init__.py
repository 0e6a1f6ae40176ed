"""netserver: write a TCP server as a function that reads stdin and writes stdout.

import netserver

def main() -> None:
    for line in sys.stdin:
        print(line.upper(), end="")

netserver.serve(main, "127.0.0.1:7000", mode="fork")

The public names are imported on first use (PEP 562), not when the package is: a
program that needs one part, such as `leafmail sendmail` with `netserver.errors`, does
not load the whole server (every mode, asyncio, ssl) at each start. Type checkers read
the imports under TYPE_CHECKING, which are the same names.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .lazy import exports

if TYPE_CHECKING:
    from .admit.access import AccessPolicy, Decision
    from .aio import AsyncConnection
    from .callbacks import CallbackConnection, Callbacks
    from .connection import Connection
    from .endpoint import Endpoint
    from .errors import AccessSpecError, ConfigError, NetserverError, UsageError
    from .handlers import (
        AsyncHandler,
        CallbackHandler,
        Command,
        ConnectionHandler,
        StdioHandler,
        load_handler,
    )
    from .limits import Limits
    from .modes.prefork import PoolSize
    from .resolver import SystemResolver
    from .server import MODES, Server, serve
    from .stdio import LineTooLong

__all__ = [
    "MODES",
    "AccessPolicy",
    "AccessSpecError",
    "AsyncConnection",
    "AsyncHandler",
    "CallbackConnection",
    "CallbackHandler",
    "Callbacks",
    "Command",
    "ConfigError",
    "Connection",
    "ConnectionHandler",
    "Decision",
    "Endpoint",
    "Limits",
    "LineTooLong",
    "NetserverError",
    "PoolSize",
    "Server",
    "StdioHandler",
    "SystemResolver",
    "UsageError",
    "load_handler",
    "serve",
]


# Each public name's home module, for `__getattr__` (the same as the imports above).
_HOMES: dict[str, str] = {
    "AccessPolicy": ".admit.access",
    "Decision": ".admit.access",
    "AsyncConnection": ".aio",
    "CallbackConnection": ".callbacks",
    "Callbacks": ".callbacks",
    "Connection": ".connection",
    "Endpoint": ".endpoint",
    "AccessSpecError": ".errors",
    "ConfigError": ".errors",
    "NetserverError": ".errors",
    "UsageError": ".errors",
    "AsyncHandler": ".handlers",
    "CallbackHandler": ".handlers",
    "Command": ".handlers",
    "ConnectionHandler": ".handlers",
    "StdioHandler": ".handlers",
    "load_handler": ".handlers",
    "Limits": ".limits",
    "PoolSize": ".modes.prefork",
    "SystemResolver": ".resolver",
    "MODES": ".server",
    "Server": ".server",
    "serve": ".server",
    "LineTooLong": ".stdio",
}


__getattr__ = exports(__name__, _HOMES, globals())
