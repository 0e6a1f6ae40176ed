"""The PROXY protocol, versions 1 and 2 (haproxy's proxy-protocol.txt), receiving side.

A load balancer in front of the server opens the connection itself, so the peer the
kernel reports is the balancer; the balancer says who the real client is in a header
sent before any payload. The header is trusted only from configured sources (the
PROXY trust gate, `netserver.admit.proxy`): from anyone else it would let a client pick
the address that access rules, limits and logs see.

The parser is pure (`header_length`, `parse`); `read_header` does the I/O on the
supervisor's loop. It never reads past the header -- it peeks, then receives exactly the
header's bytes -- so the payload stays in the kernel for whoever serves the connection,
byte for byte, whether that is a handler, a forked child or a spawned command.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from dataclasses import dataclass

from ..endpoint import Endpoint, IPAddress, unmap

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V1_PREFIX = b"PROXY "
V1_MAX = 107  # the longest v1 line the spec allows, CRLF included
V2_MAX = 16 + 4096  # the spec allows 64 KiB of TLVs; a balancer sends a few hundred bytes
PROXY_TIMEOUT = 5.0  # for the whole header, or the idle timeout if shorter (`header_timeout`)

_V2_ADDRESS_SIZE = {0x11: 4, 0x21: 16}  # (family << 4 | STREAM): bytes per address


class ProxyError(ValueError):
    """The header is missing, malformed, too long, or did not arrive in time."""


@dataclass(frozen=True, slots=True)
class ProxyInfo:
    """What a header says: the client and the address it connected to.

    `source`/`dest` are None when the header says to use the real connection's
    endpoints (v1 UNKNOWN, v2 LOCAL, or an address family other than TCP over IP).
    """

    version: int
    length: int
    source: Endpoint | None = None
    dest: Endpoint | None = None


def header_length(data: bytes) -> int:
    """The length of the header `data` starts with, or 0 if more bytes are needed.

    Raises ProxyError as soon as `data` cannot be the start of a valid header, so a
    client that sends something else is dropped without waiting for the timeout.
    """
    if V2_SIGNATURE.startswith(data[:12]):
        if len(data) < 16:
            return 0
        total = 16 + int.from_bytes(data[14:16], "big")
        if total > V2_MAX:
            raise ProxyError(f"v2 header of {total} bytes is longer than {V2_MAX}")
        return total
    if V1_PREFIX.startswith(data[:6]):
        end = data.find(b"\r\n", 0, V1_MAX)
        if end >= 0:
            return end + 2
        if len(data) >= V1_MAX:
            raise ProxyError(f"v1 header longer than {V1_MAX} bytes")
        return 0
    raise ProxyError("no PROXY header")


def parse(header: bytes) -> ProxyInfo:
    """Parse one complete header (exactly `header_length` bytes)."""
    if header.startswith(V2_SIGNATURE):
        return _parse_v2(header)
    return _parse_v1(header)


def _parse_v1(header: bytes) -> ProxyInfo:
    if not header.endswith(b"\r\n") or len(header) > V1_MAX:
        raise ProxyError("v1 header does not end with CRLF within 107 bytes")
    if header[:-2].split(b" ", 2)[:2] == [b"PROXY", b"UNKNOWN"]:
        # The spec: the receiver "must ignore anything presented before the CRLF", so
        # the rest is not even decoded (a non-ASCII octet there refused the connection).
        return ProxyInfo(1, len(header))
    try:
        line = header[:-2].decode("ascii")
    except UnicodeDecodeError:
        raise ProxyError("v1 header is not ASCII") from None
    fields = line.split(" ")
    if len(fields) != 6 or fields[0] != "PROXY" or fields[1] not in ("TCP4", "TCP6"):
        raise ProxyError(f"malformed v1 header {line[:60]!r}")
    version = 4 if fields[1] == "TCP4" else 6
    src = _endpoint(_v1_address(fields[2], version), _v1_port(fields[4]))
    dst = _endpoint(_v1_address(fields[3], version), _v1_port(fields[5]))
    return ProxyInfo(1, len(header), src, dst)


def _v1_address(text: str, version: int) -> IPAddress:
    """The address as inet_ntop writes it, which the spec asks for (HAProxy reads it with
    inet_pton). `ipaddress` also takes an IPv6 zone ("fe80::1%eth0") of any ASCII text,
    quotes, "=" and control characters included, which would reach the log lines, the
    per-source limits and a command's TCPREMOTEIP as the balancer wrote it: refused."""
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        ip = None
    if ip is None or "%" in text:
        raise ProxyError(f"bad address {text[:45]!r} in v1 header")
    if ip.version != version:
        raise ProxyError(f"address {text!r} is not of the family the v1 header names")
    return ip


def _v1_port(text: str) -> int:
    if not text.isdigit() or not text.isascii() or (text.startswith("0") and text != "0"):
        raise ProxyError(f"bad port {text[:8]!r} in v1 header")
    port = int(text)
    if port > 65535:
        raise ProxyError(f"port {port} out of range in v1 header")
    return port


def _parse_v2(header: bytes) -> ProxyInfo:
    if len(header) < 16 or len(header) != 16 + int.from_bytes(header[14:16], "big"):
        raise ProxyError("truncated v2 header")
    version, command = header[12] >> 4, header[12] & 0x0F
    if version != 2:
        raise ProxyError(f"unsupported PROXY protocol version {version}")
    if command == 0:  # LOCAL: the balancer's own connection (a health check)
        return ProxyInfo(2, len(header))
    if command != 1:
        raise ProxyError(f"unknown v2 command {command}")
    family, transport = header[13] >> 4, header[13] & 0x0F
    if family > 3 or transport > 2:  # the spec: other values "must be rejected as invalid"
        raise ProxyError(f"unknown v2 address family and protocol 0x{header[13]:02x}")
    size = _V2_ADDRESS_SIZE.get(header[13])
    if size is None:  # UNSPEC, UNIX, DGRAM: no TCP/IP client to report; TLVs skipped
        return ProxyInfo(2, len(header))
    body = header[16:]
    if len(body) < 2 * size + 4:
        raise ProxyError("v2 address block shorter than its family needs")
    src = ipaddress.ip_address(body[:size])
    dst = ipaddress.ip_address(body[size : 2 * size])
    sport = int.from_bytes(body[2 * size : 2 * size + 2], "big")
    dport = int.from_bytes(body[2 * size + 2 : 2 * size + 4], "big")
    return ProxyInfo(2, len(header), _endpoint(src, sport), _endpoint(dst, dport))


def _endpoint(ip: IPAddress, port: int) -> Endpoint:
    return Endpoint(ip=unmap(ip), port=port)


def apply(info: ProxyInfo, peer: Endpoint, local: Endpoint) -> tuple[Endpoint, Endpoint]:
    """The (peer, local) the server should see after `info`."""
    if info.source is None or info.dest is None:
        return peer, local
    return info.source, info.dest


# -- reading it off a socket --------------------------------------------------------------


def header_timeout(idle: float | None) -> float:
    """How long a balancer has for its whole header: PROXY_TIMEOUT, or the server's idle
    timeout `idle` if that is shorter (None or 0: no idle timeout)."""
    return min(PROXY_TIMEOUT, idle or PROXY_TIMEOUT)


async def read_header(sock: socket.socket, timeout: float = PROXY_TIMEOUT) -> ProxyInfo:
    """Consume exactly the header from non-blocking `sock`; ProxyError if none in time."""
    try:
        async with asyncio.timeout(timeout):
            return await _read_header(sock)
    except TimeoutError:
        raise ProxyError(f"no complete PROXY header within {timeout:g}s") from None


async def _read_header(sock: socket.socket) -> ProxyInfo:
    buf = b""
    while True:
        await _readable(sock)
        try:
            peek = sock.recv(V2_MAX - len(buf), socket.MSG_PEEK)
        except (BlockingIOError, InterruptedError):
            continue
        if not peek:
            raise ProxyError("connection closed inside the PROXY header")
        total = header_length(buf + peek)
        if total and total <= len(buf) + len(peek):
            buf += _recv_exactly(sock, total - len(buf))
            return parse(buf)
        # Without the whole header yet (no CRLF of a v1 line, or fewer bytes than a v2
        # header's length field says), every byte peeked is header: take it all, so the
        # next wait is for new bytes (peeking alone would spin on a readable socket).
        buf += _recv_exactly(sock, len(peek))


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    """Receive `n` bytes that a peek showed are already in the kernel's buffer."""
    out = b""
    while len(out) < n:
        data = sock.recv(n - len(out))
        if not data:
            raise ProxyError("connection closed inside the PROXY header")
        out += data
    return out


async def _readable(sock: socket.socket) -> None:
    loop = asyncio.get_running_loop()
    ready: asyncio.Future[None] = loop.create_future()

    def wake() -> None:
        if not ready.done():
            ready.set_result(None)

    fd = sock.fileno()
    loop.add_reader(fd, wake)
    try:
        await ready
    finally:
        loop.remove_reader(fd)
