"""Shared plumbing of the protocol attack tests (tests/reliability/test_attack_*.py).

The attacks talk to a real `leafmail serve` with `RawSMTP` (hostile bytes no real client
would send), then look at three places an attack could land: the replies (one per
command, in order), the spool (how many messages, with which envelope), and the next
hop, by running a real `leafmail flush` to the aiosmtpd `Smarthost` or to `RawCapture`,
a bare socket server that keeps every byte leafmail sends so the exact wire form of
what is relayed can be checked (a lenient next hop reads more than aiosmtpd does).
"""

from __future__ import annotations

import contextlib
import random
import re
import socket
import subprocess
import threading
from collections.abc import Sequence
from pathlib import Path

import soak
from leafmail_fixtures import (
    Leafmail,
    RawSMTP,
    Reply,
    run_flush,
    toml_string,
    write_config,
)

SENDER = "alice@example.test"
RCPT = "bob@dst.test"  # relayed (the client is on loopback): flush sends it onward
VICTIM = "victim@dst.test"
EVIL = "evil@elsewhere.test"
FLUSH_TIMEOUT = 30.0
# Message checks ask the DNS and tag; attacks are about the protocol, not the checks.
NO_CHECKS = '[checks]\nrfc5322 = "off"\nreceived = "off"\nspf = "off"\ndkim = "off"\n'
# Any ending a lenient server might take for the end of DATA (CR, LF or CRLF, ".", ...).
_LOOSE_END = re.compile(rb"(?:\r\n|\r|\n)\.(?:\r\n|\r|\n)")
_BARE = re.compile(rb"\r(?!\n)|(?<!\r)\n")


def config(bare_lf: str = "reject", extra: str = "") -> str:
    """A leafmail config with the bare-LF policy and no message checks."""
    return f'[smtp]\nbare_lf = "{bare_lf}"\n{extra}\n' + NO_CHECKS


def record(name: str, outcome: str, **figures: object) -> None:
    """One attack and what came of it, for bench/RELIABILITY.md."""
    soak.record("attack", name, outcome=outcome, **figures)


# --- sessions --------------------------------------------------------------------------


def session(server: Leafmail, name: str = "client.test") -> RawSMTP:
    """A raw session that was greeted and said EHLO."""
    client = RawSMTP(server.address())
    client.greeting()
    client.ehlo(name)
    return client


def open_transaction(client: RawSMTP, rcpts: Sequence[str] = (RCPT,), data: bool = True) -> None:
    """MAIL FROM, RCPT TO for each of `rcpts`, and (if `data`) DATA, each acknowledged."""
    assert client.command(f"MAIL FROM:<{SENDER}>").code == 250
    for rcpt in rcpts:
        reply = client.command(f"RCPT TO:<{rcpt}>")
        assert reply.code == 250, reply
    if data:
        assert client.command("DATA").code == 354


def replies_until_close(client: RawSMTP) -> list[Reply]:
    """Every reply up to the server's close (send QUIT before calling this)."""
    got: list[Reply] = []
    while True:
        try:
            got.append(client.reply())
        except ConnectionError:
            return got


def codes(replies: Sequence[Reply]) -> list[int]:
    return [r.code for r in replies]


def send_split(client: RawSMTP, data: bytes, rng: random.Random | None) -> int:
    """Send `data` in one write, or cut at random points when `rng` is given.

    Returns the number of writes. TCP_NODELAY makes each write its own segment (as far
    as loopback allows), so the server really sees the cuts.
    """
    if rng is None:
        client.send(data)
        return 1
    client.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    cuts = sorted(rng.sample(range(1, len(data)), min(rng.randint(1, 12), len(data) - 1)))
    pieces = [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]
    for piece in pieces:
        client.send(piece)
    return len(pieces)


# --- what the spool and the next hop hold ----------------------------------------------


def has_bare_newline(data: bytes) -> bool:
    return _BARE.search(data) is not None


def repair(data: bytes) -> bytes:
    """`data` with every bare CR or LF made CRLF (what ``bare_lf = "replace"`` promises)."""
    return _BARE.sub(b"\r\n", data)


def loose_ends(data: bytes) -> list[bytes]:
    """Every sequence in `data` that some server could read as the end of DATA."""
    return _LOOSE_END.findall(data)


def flush(tmp_path: Path, server: Leafmail, smarthost: str) -> subprocess.CompletedProcess[str]:
    """Run `leafmail flush` on `server`'s spool to `smarthost` (plain SMTP), in its own process."""
    spool = toml_string(server.spool_path)
    path = write_config(
        tmp_path,
        f'hostname = "mx.test"\nspool = {spool}\n\n'
        '[delivery]\nmode = "offline"\ntls = "none"\nretry_initial = 300\n',
    )
    return run_flush(tmp_path, path, "--smarthost", smarthost, "--tls", "none")


def peak_rss_kib(pid: int) -> int:
    """The process's peak resident set (VmHWM) in KiB."""
    status = Path(f"/proc/{pid}/status").read_text()
    match = re.search(r"^VmHWM:\s+(\d+) kB", status, re.M)
    assert match is not None, status
    return int(match[1])


class RawCapture:
    """A minimal SMTP server that keeps every byte a client sends, for leafmail's onward wire.

    Each connection gets its own thread (the queue runner opens several at once). It
    offers what aiosmtpd offers (PIPELINING, 8BITMIME, SMTPUTF8, DSN, SIZE), accepts
    everything, and ends DATA only at CRLF.CRLF, as RFC 5321 says; `messages` holds the
    raw DATA bytes of each transaction (dot-stuffed, terminator included) and
    `commands` every command line.
    """

    EHLO = (
        b"250-capture.test\r\n250-PIPELINING\r\n250-8BITMIME\r\n250-SMTPUTF8\r\n"
        b"250-DSN\r\n250 SIZE 33554432\r\n"
    )

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.port: int = self.sock.getsockname()[1]
        self.commands: list[bytes] = []
        self.messages: list[bytes] = []
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        self._thread.join(10)

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._connection, args=(conn,), daemon=True).start()

    def _connection(self, conn: socket.socket) -> None:
        with conn, contextlib.suppress(OSError):
            conn.settimeout(FLUSH_TIMEOUT)
            self._session(conn)

    def _session(self, conn: socket.socket) -> None:
        buf = bytearray()
        conn.sendall(b"220 capture.test ESMTP\r\n")
        while True:
            line = self._until(conn, buf, b"\r\n")
            if line is None:
                return
            self.commands.append(line[:-2])
            verb = line[:4].upper()
            if verb == b"EHLO":
                conn.sendall(self.EHLO)
            elif verb == b"DATA":
                conn.sendall(b"354 go on\r\n")
                body = self._until(conn, buf, b"\r\n.\r\n", start=b"\r\n")
                if body is None:
                    return
                self.messages.append(body)
                conn.sendall(b"250 2.0.0 captured\r\n")
            elif verb == b"QUIT":
                conn.sendall(b"221 bye\r\n")
                return
            else:
                conn.sendall(b"250 2.0.0 OK\r\n")

    def _until(
        self, conn: socket.socket, buf: bytearray, end: bytes, start: bytes = b""
    ) -> bytes | None:
        """Bytes up to and including `end` (`start` counts as already seen before them)."""
        while True:
            found = (start + bytes(buf)).find(end)
            if found >= 0:
                taken = found + len(end) - len(start)
                out = bytes(buf[:taken])
                del buf[:taken]
                return out
            chunk = conn.recv(65536)
            if not chunk:
                return None
            buf += chunk
