"""The local submission socket's wire format, and its client (`leafmail sendmail`).

On a shared machine the spool is private to the daemon's user, so an ordinary user's
`leafmail sendmail` hands its message to the daemon through a Unix socket instead, as
OpenSMTPD's enqueuer does through smtpd.sock; the daemon learns who is submitting from
the kernel (SO_PEERCRED), never from the request (see leafmail.pickup). No setuid
program is involved.

The socket is ``SPOOL/public/submit`` (mode 0666 in a 0755 directory, in a spool that
others may traverse but not read: 0711), so whoever knows the spool finds it. One
request per connection::

    -> {"envelope": {...}, "full_name": null, "protocol": null, "size": N}\\n   (JSON)
    -> N octets: the message, CRLF line ends, as sendmail read it
    <- {"queued": "QID"}\\n                        the message is durable in the spool
    <- {"error": "...", "status": 65}\\n           refused (sysexits status), nothing queued

The envelope is `Envelope.to_json`; the daemon takes from it only what a sendmail user
may choose anyway (sender, recipients, DSN parameters, body type, HELO of -bs) and sets
the rest itself. JSON runs no code when loaded.
"""

from __future__ import annotations

import json
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from netserver.errors import EX_TEMPFAIL

from .control import socket_name
from .envelope import Envelope, EnvelopeError, load_json

SOCKET_NAME = "submit"
HEADER_LIMIT = 1 << 20  # the request line: recipients are bounded by this
REPLY_LIMIT = 64 * 1024
CONNECT_TIMEOUT = 5.0
REPLY_TIMEOUT = 120.0  # the daemon answers once the message is fsync'd: seconds at worst
_HEADER_KEYS = {"envelope", "full_name", "protocol", "size"}


def socket_path(spool: str | Path) -> Path:
    """Where the daemon of this spool listens for local submissions."""
    return Path(spool) / "public" / SOCKET_NAME


class NoDaemon(OSError):
    """Nobody answers on the submission socket (or it cannot be reached): nothing queued."""


class Refused(Exception):
    """The daemon refused the message; `status` is the sysexits code to exit with."""

    def __init__(self, text: str, status: int) -> None:
        super().__init__(text)
        self.status = status


@dataclass(frozen=True)
class SubmitRequest:
    """A parsed request header: what the submitter asks for."""

    envelope: Envelope
    full_name: str | None
    protocol: str | None
    size: int


def encode_request(
    envelope: Envelope, data: bytes, *, full_name: str | None, protocol: str | None
) -> bytes:
    header = {
        "envelope": envelope.to_json(),
        "full_name": full_name,
        "protocol": protocol,
        "size": len(data),
    }
    return json.dumps(header, separators=(",", ":"), ensure_ascii=True).encode() + b"\n" + data


def parse_request(line: bytes) -> SubmitRequest:
    """The request line; EnvelopeError (a ValueError) says what is wrong with it."""
    obj = load_json(line, "request")
    if not isinstance(obj, dict) or set(obj) != _HEADER_KEYS:
        raise EnvelopeError("the request has the wrong fields")
    size = obj["size"]
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise EnvelopeError("size must be a non-negative integer")
    for key in ("full_name", "protocol"):
        if obj[key] is not None and not isinstance(obj[key], str):
            raise EnvelopeError(f"{key} must be a string or null")
    return SubmitRequest(
        Envelope.from_json(obj["envelope"]), obj["full_name"], obj["protocol"], size
    )


def encode_reply(reply: dict[str, Any]) -> bytes:
    return json.dumps(reply, separators=(",", ":"), ensure_ascii=True).encode() + b"\n"


def probe(path: Path) -> None:
    """Connect and hang up: NoDaemon if nobody listens (sendmail -bs asks before its 220)."""
    with _Connection(path):
        pass


def submit(
    path: Path,
    envelope: Envelope,
    data: bytes,
    *,
    full_name: str | None,
    protocol: str | None,
) -> str:
    """Hand one message to the daemon; its queue id once it is durable.

    NoDaemon when nobody answers, or when the daemon went away before it answered (then
    the message may be queued or not: the caller must not claim either). Refused when
    the daemon says no.
    """
    request = encode_request(envelope, data, full_name=full_name, protocol=protocol)
    with _Connection(path) as sock:
        try:
            sock.settimeout(REPLY_TIMEOUT)
            _send_all(sock, request)
            line = _read_line(sock)
        except OSError as exc:
            raise NoDaemon(exc.errno, f"the daemon did not answer: {exc.strerror or exc}") from None
    return _queue_id(line)


class _Connection:
    """A connected socket as a context manager; NoDaemon when the connect fails."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)

    def __enter__(self) -> socket.socket:
        self.sock.settimeout(CONNECT_TIMEOUT)
        try:
            with socket_name(self.path) as name:
                self.sock.connect(name)
        except OSError as exc:
            self.sock.close()
            raise NoDaemon(exc.errno, exc.strerror or str(exc)) from None
        return self.sock

    def __exit__(self, *exc: object) -> None:
        self.sock.close()


def _send_all(sock: socket.socket, request: bytes) -> None:
    """Send the request; a daemon that refuses early (a size over its limit) stops
    reading and answers at once, so a broken pipe here still leaves a reply to read."""
    try:
        sock.sendall(request)
        sock.shutdown(socket.SHUT_WR)
    except (BrokenPipeError, ConnectionResetError):
        pass


def _read_line(sock: socket.socket) -> bytes:
    buf = bytearray()
    while b"\n" not in buf:
        chunk = sock.recv(4096)
        if not chunk:
            raise OSError(0, "the connection closed before the answer")
        buf += chunk
        if len(buf) > REPLY_LIMIT:
            raise OSError(0, "the answer is too long")
    return bytes(buf.split(b"\n", 1)[0])


def _queue_id(line: bytes) -> str:
    try:
        reply = json.loads(line)
    except ValueError:
        raise NoDaemon(0, "the daemon's answer is not JSON") from None
    if isinstance(reply, dict) and isinstance(reply.get("queued"), str):
        return str(reply["queued"])
    if isinstance(reply, dict) and isinstance(reply.get("error"), str):
        status = reply.get("status")
        raise Refused(reply["error"], status if isinstance(status, int) else EX_TEMPFAIL)
    raise NoDaemon(0, "the daemon's answer makes no sense")
