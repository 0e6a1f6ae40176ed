"""What a ``netserver run`` reload changes, and the listening sockets it hands on.

On SIGHUP the supervisor re-reads CONFIG.toml, as xinetd does. Services are matched by
name: one whose table is the same (line numbers aside) keeps its process and its
connections, and only gets the HUP (rules and certificates reload); a new one starts; a
changed one starts anew and its old process is retired; a removed one is retired.

A retired process is sent TERM, which is how a service stops: it closes its copy of the
listeners and lets its open connections finish within its ``grace`` (xinetd instead
kills the servers of a removed service at once; finishing what was begun is what a stop
already does here, and loses no client's work). A new or changed service that listens
where a retired one did takes over the very same socket (`ListenerPool`), so no client
is refused during the hand-over; a changed service with a port 0 address keeps its own
socket, so the port the kernel chose stays the same. A retired socket nobody takes over
is shut down in the supervisor -- that stops listening in every process that shares it,
so clients are refused at once -- and then closed.

Handlers are Python modules the supervisor imported at start: a reload does not import
a changed module's new code (restart for that); commands are run afresh per connection.
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace

from ..endpoint import Endpoint
from ..listen.listeners import Listener, ListenSpec, open_listeners
from ..server import Server
from .config import ServiceConfig

__all__ = ["Changes", "Claim", "ListenerPool", "compare", "same_service"]


def same_service(a: ServiceConfig, b: ServiceConfig) -> bool:
    """Equal tables; where a key sits in the file does not count."""
    return replace(a, lines={}) == replace(b, lines={})


@dataclass(frozen=True)
class Changes:
    """Service names: kept as they run, started (new or changed), retired (changed or gone)."""

    kept: tuple[str, ...]
    started: tuple[str, ...]
    retired: tuple[str, ...]

    def describe(self) -> dict[str, str]:
        """Log fields: each list of names, "-" when empty."""
        fields = {"kept": self.kept, "started": self.started, "retired": self.retired}
        return {key: ",".join(names) or "-" for key, names in fields.items()}


def compare(
    running: Sequence[ServiceConfig], new: Sequence[ServiceConfig], failed: Iterable[str] = ()
) -> Changes:
    """Match by name. A service that failed to start counts as changed: it is tried again."""
    old = {c.name: c for c in running}
    down = set(failed)
    kept = tuple(
        c.name for c in new if c.name in old and c.name not in down and same_service(old[c.name], c)
    )
    started = tuple(c.name for c in new if c.name not in kept)
    retired = tuple(c.name for c in running if c.name not in kept)
    return Changes(kept, started, retired)


# A socket is found by its address; one on port 0 only by its own service's name.
_Key = tuple[str, ListenSpec]


def _key(spec: ListenSpec, service: str) -> _Key:
    return (service if spec.kind == "tcp" and spec.port == 0 else "", spec)


class ListenerPool:
    """Retired services' listening sockets, taken over by a service on the same address.

    First every starting service claims the sockets it shares with a retired one; then
    the rest are shut down and closed; only then are new sockets opened, so a service
    may bind an address a retired socket held in another spelling.
    """

    def __init__(self, retired: Iterable[tuple[str, Sequence[Listener]]]) -> None:
        self._free: dict[_Key, list[Listener]] = {}
        for service, listeners in retired:
            for listener in listeners:
                self._free.setdefault(_key(listener.spec, service), []).append(listener)

    def claim(self, service: str, server: Server) -> Claim:
        """Take the sockets for the addresses `server` shares with a retired service."""
        keys = [_key(spec, service) for spec in server.specs]
        return Claim(server, keys, {key: self._free.pop(key) for key in keys if key in self._free})

    def close(self) -> None:
        """Shut down and close every socket nobody claimed."""
        _shut(one for group in self._free.values() for one in group)
        self._free.clear()


@dataclass
class Claim:
    """A starting service's sockets: those taken over, and the addresses still to bind."""

    server: Server
    keys: list[_Key]
    reused: dict[_Key, list[Listener]]

    def bind(self) -> list[Endpoint]:
        """Open the rest and give the server all its listeners, in its order.

        On an error (the address is taken) every socket of the claim is closed -- the
        taken-over ones stop listening too, as no service has them now -- and it is raised.
        """
        opened: dict[_Key, list[Listener]] = {}
        try:
            for key in self.keys:
                if key not in self.reused:
                    opened[key] = open_listeners([key[1]])
        except BaseException:
            for listener in (one for group in opened.values() for one in group):
                listener.close()
            _shut(one for group in self.reused.values() for one in group)
            raise
        chosen = {**self.reused, **opened}
        self.server.listeners = [one for key in self.keys for one in chosen[key]]
        return self.server.addresses


def _shut(listeners: Iterable[Listener]) -> None:
    """Stop listening in every process that shares each socket, then close our copy."""
    for listener in listeners:
        with contextlib.suppress(OSError):
            listener.sock.shutdown(socket.SHUT_RDWR)
        listener.close()
