"""Next hops that misbehave on purpose, for the smarthost-fault tests.

`FaultServer` is a raw-socket SMTP server on 127.0.0.1 (port 0, read back, so no race)
that fails in one chosen way, each the kind of failure a provider's server shows in
real life: it never greets, stalls mid-transaction, reads the message one byte per tick,
says 421 and hangs up, or breaks the TLS handshake. Set `fault` to `Fault.RELAY` and it
passes every new connection through to a healthy upstream server (the aiosmtpd
`Smarthost`): the same address that failed now works, as when a provider recovers.

Each connection runs in a thread of its own with blocking sockets; `stop()` closes the
listener and every connection, so nothing outlives the test.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from enum import StrEnum


class Fault(StrEnum):
    SILENT = "silent"  # accepts the connection, never greets
    STALL = "stall"  # greets and answers EHLO, never answers MAIL
    SLOW_READER = "slow-reader"  # 354 to DATA, then reads one byte per tick
    DROP_AT_MAIL = "421-at-mail"  # 421 to MAIL, then closes
    DROP_AT_RCPT = "421-at-rcpt"  # 250 to the first RCPT, 421 to what follows, closes
    TLS_BROKEN = "tls-broken"  # offers STARTTLS, says 220, then sends no TLS at all
    RELAY = "relay"  # healthy: the connection is passed through to the upstream


class FaultServer:
    """A misbehaving SMTP server on 127.0.0.1:<ephemeral>."""

    def __init__(
        self,
        fault: Fault,
        upstream: tuple[str, int] | None = None,
        *,
        tick: float = 0.01,
    ) -> None:
        self.fault = fault
        self.upstream = upstream
        self.tick = tick
        self.accepts = 0
        self.data_bytes = 0  # message bytes a slow reader took in
        self._stop = threading.Event()
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        # A small receive buffer, inherited by accepted sockets, keeps a slow reader slow.
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port: int = self.sock.getsockname()[1]
        self._thread = threading.Thread(target=self._accept_loop, daemon=True)
        self._thread.start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        self._stop.set()
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        self._thread.join(5)
        with self._lock:
            for conn in self._conns:
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RDWR)
                conn.close()

    def _keep(self, conn: socket.socket) -> None:
        with self._lock:
            self._conns.append(conn)

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepts += 1
            self._keep(conn)
            fault = self.fault
            target = self._relay if fault is Fault.RELAY else self._session
            threading.Thread(target=target, args=(conn, fault), daemon=True).start()

    # -- the scripted dialogue ------------------------------------------------------------
    def _session(self, conn: socket.socket, fault: Fault) -> None:
        """Speak SMTP until the fault; then hang up (a silent or stalled peer first waits
        for `stop`)."""
        with contextlib.suppress(OSError):
            self._dialogue(conn, fault)
        with contextlib.suppress(OSError):
            conn.shutdown(socket.SHUT_RDWR)

    def _dialogue(self, conn: socket.socket, fault: Fault) -> None:
        if fault is Fault.SILENT:
            self._stop.wait()
            return
        lines = _Lines(conn)
        conn.sendall(b"220 fault.test ESMTP\r\n")
        rcpts = 0
        while (line := lines.next()) is not None:
            verb = line[:4].upper()
            if verb in (b"EHLO", b"HELO"):
                tls = b"250-STARTTLS\r\n" if fault is Fault.TLS_BROKEN else b""
                conn.sendall(b"250-fault.test\r\n" + tls + b"250 8BITMIME\r\n")
            elif verb == b"STAR" and fault is Fault.TLS_BROKEN:
                conn.sendall(b"220 2.0.0 go ahead\r\nthis is not a TLS record\r\n")
                return
            elif verb == b"MAIL" and fault is Fault.STALL:
                self._stop.wait()
                return
            elif verb == b"MAIL" and fault is Fault.DROP_AT_MAIL:
                conn.sendall(b"421 4.3.2 fault.test shutting down\r\n")
                return
            elif verb in (b"RCPT", b"DATA") and fault is Fault.DROP_AT_RCPT and rcpts:
                conn.sendall(b"421 4.4.5 fault.test too busy, closing\r\n")
                return
            elif verb == b"RCPT":
                rcpts += 1
                conn.sendall(b"250 2.1.5 ok\r\n")
            elif verb == b"DATA" and fault is Fault.SLOW_READER:
                conn.sendall(b"354 go ahead\r\n")
                self._read_slowly(conn)
                return
            elif verb == b"QUIT":
                conn.sendall(b"221 bye\r\n")
                return
            else:
                conn.sendall(b"250 ok\r\n")

    def _read_slowly(self, conn: socket.socket) -> None:
        """One byte per tick, never a reply: the peer's deadline must end it."""
        while not self._stop.wait(self.tick):
            if not conn.recv(1):
                return
            self.data_bytes += 1

    def _relay(self, conn: socket.socket, fault: Fault) -> None:
        assert self.upstream is not None, "Fault.RELAY needs an upstream"
        with contextlib.suppress(OSError):
            upstream = socket.create_connection(self.upstream, timeout=10)
            self._keep(upstream)
            upstream.settimeout(None)
            back = threading.Thread(target=_pump, args=(upstream, conn), daemon=True)
            back.start()
            _pump(conn, upstream)
            back.join(10)


class _Lines:
    """CRLF-terminated command lines from a blocking socket (None at EOF)."""

    def __init__(self, conn: socket.socket) -> None:
        self.conn = conn
        self.buf = b""

    def next(self) -> bytes | None:
        while b"\r\n" not in self.buf:
            chunk = self.conn.recv(4096)
            if not chunk:
                return None
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\r\n")
        return line


def _pump(src: socket.socket, dst: socket.socket) -> None:
    """Copy src to dst until EOF, then pass the EOF on."""
    with contextlib.suppress(OSError):
        while chunk := src.recv(65536):
            dst.sendall(chunk)
    with contextlib.suppress(OSError):
        dst.shutdown(socket.SHUT_WR)
