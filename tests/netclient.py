"""A small blocking test client: connect to a READY address, read lines, prompts, EOF.

Every read goes through the socket timeout, so a test that waits for something the
server never sends fails within `TIMEOUT` seconds instead of hanging.
"""

from __future__ import annotations

import socket
from types import TracebackType

TIMEOUT = 5.0


def split_address(address: str) -> tuple[str, int]:
    """``127.0.0.1:7000`` or ``[::1]:7000`` (as in the READY line) -> (host, port)."""
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


def open_socket(address: str, *, host: str | None = None) -> socket.socket:
    """Connect to a READY address (``unix:PATH`` too); `host` replaces the address's host."""
    if address.startswith("unix:"):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(TIMEOUT)
        sock.connect(address[5:])
        return sock
    listen_host, port = split_address(address)
    return socket.create_connection((host or listen_host, port), timeout=TIMEOUT)


class Client:
    """A connected socket with a read buffer, so prompts and lines can be taken apart."""

    def __init__(self, address: str, *, host: str | None = None) -> None:
        self.sock = open_socket(address, host=host)
        self._buf = bytearray()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        self.sock.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def shut_write(self) -> None:
        """Half-close: the server reads EOF, and may still answer."""
        self.sock.shutdown(socket.SHUT_WR)

    def read_until(self, marker: bytes) -> bytes:
        """Everything up to and including `marker`; AssertionError if EOF comes first."""
        while (idx := self._buf.find(marker)) < 0:
            data = self.sock.recv(65536)
            if not data:
                raise AssertionError(f"EOF before {marker!r}; got {bytes(self._buf)!r}")
            self._buf += data
        end = idx + len(marker)
        out = bytes(self._buf[:end])
        del self._buf[:end]
        return out

    def read_line(self) -> bytes:
        """One line with its LF."""
        return self.read_until(b"\n")

    def read_all(self) -> bytes:
        """Everything until the server closes."""
        while data := self.sock.recv(65536):
            self._buf += data
        out = bytes(self._buf)
        self._buf.clear()
        return out


def exchange(address: str, data: bytes = b"", *, host: str | None = None) -> bytes:
    """Send `data`, half-close, and return all the server sends until it closes."""
    with Client(address, host=host) as client:
        if data:
            client.send(data)
        client.shut_write()
        return client.read_all()
