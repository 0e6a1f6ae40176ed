"""`Listener.local`: the local end of accepted connections, known once per listener
when the kernel need not be asked per connection (netserver.listen.listeners)."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from netserver.listen.listeners import Listener, open_listeners, parse_listen


def opened(spec: str) -> Listener:
    (listener,) = open_listeners([parse_listen(spec)])
    return listener


def accepted_local(listener: Listener) -> tuple[str, int] | str:
    """What getsockname says for a connection the listener accepts."""
    with socket.socket(listener.family, socket.SOCK_STREAM) as client:
        address = listener.sock.getsockname()
        client.connect(address)
        listener.sock.setblocking(True)
        sock, _addr = listener.sock.accept()
        with sock:
            local = sock.getsockname()
    return local if isinstance(local, str) else (local[0], local[1])


def test_one_address_gives_every_connections_local_end() -> None:
    listener = opened("127.0.0.1:0")
    try:
        assert listener.local == listener.endpoint
        assert listener.family == socket.AF_INET
        local = accepted_local(listener)
        assert listener.local is not None and (listener.local.host, listener.local.port) == local
    finally:
        listener.close()


def test_a_unix_path_gives_every_connections_local_end(tmp_path: Path) -> None:
    listener = opened(f"unix:{tmp_path / 'l.sock'}")
    try:
        assert listener.local == listener.endpoint
        assert listener.local is not None and listener.local.path == accepted_local(listener)
    finally:
        listener.close()


@pytest.mark.parametrize("spec", ["0.0.0.0:0", ":0"])
def test_a_wildcard_asks_per_connection(spec: str) -> None:
    listener = opened(spec)
    try:
        assert listener.local is None
    finally:
        listener.close()


def test_a_socket_handed_over_asks_per_connection() -> None:
    """It may be transparent (IP_TRANSPARENT): reached at any address whatever it is
    bound to, so only getsockname tells."""
    with socket.socket() as bound:
        bound.bind(("127.0.0.1", 0))
        bound.listen()
        listener = opened(f"fd:{bound.fileno()}")
        try:
            assert listener.endpoint.host == "127.0.0.1"
            assert listener.local is None
        finally:
            listener.sock.detach()
