"""The connection object handed to handlers in the fork, prefork and thread modes."""

from __future__ import annotations

import contextlib
import socket
from typing import TextIO, cast

from .endpoint import Endpoint
from .stdio import DEFAULT_MAX_LINE, BinaryReader, BinaryWriter, TextReader, TextWriter


class Connection:
    """One accepted client: binary and text streams, and both addresses.

    `rfile`/`wfile` are bytes; `stdin`/`stdout` are text over the same buffers, so a
    handler may mix them. Reads are bounded by `max_line` per line and by the idle
    timeout; writes are buffered and flushed before each blocking read and at the end.
    """

    def __init__(
        self,
        sock: socket.socket,
        peer: Endpoint,
        local: Endpoint,
        *,
        timeout: float | None = None,
        max_line: int = DEFAULT_MAX_LINE,
    ) -> None:
        sock.setblocking(True)
        sock.settimeout(timeout)
        self.sock = sock
        self.peer = peer
        self.local = local
        self.wfile = BinaryWriter(sock)
        self.rfile = BinaryReader(sock, max_line, before_wait=self.wfile.flush)
        self.stdin = cast(TextIO, TextReader(self.rfile))
        self.stdout = cast(TextIO, TextWriter(self.wfile))

    @property
    def bytes_in(self) -> int:
        """Bytes received so far."""
        return self.rfile.bytes_in

    @property
    def bytes_out(self) -> int:
        """Bytes sent so far (flushed to the kernel)."""
        return self.wfile.bytes_out

    def write(self, data: bytes) -> None:
        """Queue bytes for the client."""
        self.wfile.write(data)

    def flush(self) -> None:
        """Send what is buffered."""
        self.wfile.flush()

    def finish(self) -> None:
        """Flush, then half-close so the client sees EOF even if a child holds the fd."""
        try:
            self.wfile.flush()
        finally:
            with contextlib.suppress(OSError):
                self.sock.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        """Flush what can be flushed and close the socket; never raises."""
        with contextlib.suppress(OSError):
            self.finish()
        self.sock.close()
