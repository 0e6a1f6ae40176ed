"""netserver: write a TCP server as a function that reads stdin and writes stdout.

import netserver

def main() -> None:
    for line in sys.stdin:
        print(line.upper(), end="")

netserver.serve(main, "127.0.0.1:7000", mode="fork")
"""

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
