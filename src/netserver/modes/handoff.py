"""The header that goes with a descriptor handed from the supervisor to a worker.

The supervisor writes one per connection (prefork and the async worker pool) and the
worker reads it, so both ends are on the per-connection path: a fixed binary layout
costs about a microsecond each way where JSON cost five. The worker cannot ask the
socket for the endpoints: behind a PROXY header the client is not the socket's peer,
and behind TLS termination the socket is a socketpair.

Layout: connection id (u64), service name length (u16), the name (UTF-8), then each
endpoint as a tag and its fields: ``4`` or ``6`` then the packed address and the port
(i32, -1 for none); ``u`` then the path's length (u16) and the path (UTF-8 with
surrogate escapes, as `Endpoint.from_sockaddr` decodes it); ``-`` for no address at all.
"""

from __future__ import annotations

import ipaddress
import struct

from ..endpoint import KNOWN_ADDRESSES, Endpoint, IPAddress, unmap
from ..memo import BoundedMemo

__all__ = ["HandoffError", "decode_conn", "decode_endpoints", "encode_conn", "encode_endpoints"]

_HEAD = struct.Struct("=QH")  # connection id, length of the service name
_PORT = struct.Struct("=i")
_LENGTH = struct.Struct("=H")
_TAG_V4, _TAG_V6, _TAG_PATH, _TAG_NONE = b"4", b"6", b"u", b"-"
_ADDRESS_SIZE = {_TAG_V4[0]: 4, _TAG_V6[0]: 16}

# Packed addresses already turned into objects (a worker sees the same few clients).
_unpacked = BoundedMemo[bytes, IPAddress](
    lambda packed: unmap(ipaddress.ip_address(packed)), KNOWN_ADDRESSES
)


class HandoffError(ValueError):
    """A header that does not follow the layout (a bug on the other end, never input)."""


def encode_conn(cid: int, service: str, peer: Endpoint, local: Endpoint) -> bytes:
    """The header for connection `cid` of `service` between `peer` and `local`."""
    name = service.encode()
    return _HEAD.pack(cid, len(name)) + name + _endpoint(peer) + _endpoint(local)


def decode_conn(data: bytes) -> tuple[int, str, Endpoint, Endpoint]:
    """The inverse of `encode_conn`."""
    if len(data) < _HEAD.size:
        raise HandoffError("hand-off header too short")
    cid, size = _HEAD.unpack_from(data)
    start = _HEAD.size + size
    if start > len(data):
        raise HandoffError("hand-off service name too short")
    service = data[_HEAD.size : start].decode()
    peer, local = decode_endpoints(data[start:])
    return cid, service, peer, local


def encode_endpoints(peer: Endpoint, local: Endpoint) -> bytes:
    """Both endpoints (prefork's message carries only these)."""
    return _endpoint(peer) + _endpoint(local)


def decode_endpoints(data: bytes) -> tuple[Endpoint, Endpoint]:
    """The inverse of `encode_endpoints`; nothing may follow them."""
    peer, at = _read_endpoint(data, 0)
    local, at = _read_endpoint(data, at)
    if at != len(data):
        raise HandoffError("trailing bytes after the endpoints")
    return peer, local


def _endpoint(end: Endpoint) -> bytes:
    ip = end.ip
    if ip is not None:
        tag = _TAG_V4 if ip.version == 4 else _TAG_V6
        return tag + ip.packed + _PORT.pack(-1 if end.port is None else end.port)
    if end.path is None:
        return _TAG_NONE
    path = end.path.encode("utf-8", "surrogateescape")
    return _TAG_PATH + _LENGTH.pack(len(path)) + path


def _read_endpoint(data: bytes, at: int) -> tuple[Endpoint, int]:
    if at >= len(data):
        raise HandoffError("hand-off header too short")
    tag = data[at]
    at += 1
    size = _ADDRESS_SIZE.get(tag)
    if size is not None:
        end = at + size + _PORT.size
        if end > len(data):
            raise HandoffError("hand-off address too short")
        (port,) = _PORT.unpack_from(data, at + size)
        ip = _unpacked(data[at : at + size])
        return Endpoint(ip=ip, port=None if port < 0 else port), end
    if tag == _TAG_PATH[0]:
        if at + _LENGTH.size > len(data):
            raise HandoffError("hand-off path too short")
        (length,) = _LENGTH.unpack_from(data, at)
        at += _LENGTH.size
        if at + length > len(data):
            raise HandoffError("hand-off path too short")
        path = data[at : at + length].decode("utf-8", "surrogateescape")
        return Endpoint(path=path), at + length
    if tag == _TAG_NONE[0]:
        return Endpoint(), at
    raise HandoffError(f"unknown endpoint tag {tag!r}")
