"""A first end-to-end check: the echo example in fork mode over a real socket."""

from __future__ import annotations

import socket

from conftest import ServerFactory


def test_echo_fork(netserver_proc: ServerFactory) -> None:
    server = netserver_proc(["--listen", "127.0.0.1:0", "--handler", "examples.echo:binary"])
    with socket.create_connection(server.host_port, timeout=10) as sock:
        sock.sendall(b"hello\r\n")
        assert sock.recv(100) == b"hello\r\n"
