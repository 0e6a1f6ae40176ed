"""One end of a connection: an IP address and port, or a unix-socket path.

Everything that reports or judges a peer goes through `Endpoint`, so an IPv4-mapped
IPv6 address (``::ffff:192.0.2.1`` on a dual-stack listener) is seen everywhere as the
IPv4 address it is: access rules, limits, logs and the ucspi-tcp environment agree.
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass
from typing import Any

from .memo import BoundedMemo

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def unmap(ip: IPAddress) -> IPAddress:
    """Return the IPv4 address inside an IPv4-mapped IPv6 address, else `ip` itself."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


# Addresses already parsed and printed, shared: a server sees the same few clients and
# its own addresses over and over, and parsing or printing one costs microseconds.
KNOWN_ADDRESSES = 4096
_parsed = BoundedMemo[str, IPAddress](
    lambda host: unmap(ipaddress.ip_address(host)), KNOWN_ADDRESSES
)
_ip_text = BoundedMemo[IPAddress, str](str, KNOWN_ADDRESSES)


def parse_ip(host: str) -> IPAddress:
    """`host` (an address as text, no scope) as an address, IPv4-mapped ones unmapped;
    ValueError if it is none."""
    return _parsed(host)


@dataclass(frozen=True, slots=True)
class Endpoint:
    """An address as the server reports it: `ip`/`port` for TCP, `path` for unix sockets."""

    ip: IPAddress | None = None
    port: int | None = None
    path: str | None = None

    @classmethod
    def from_sockaddr(cls, family: int, sockaddr: Any) -> Endpoint:
        """Build from what accept()/getsockname() return for `family`."""
        if family in (socket.AF_INET, socket.AF_INET6):
            host = str(sockaddr[0]).split("%", 1)[0]
            return cls(ip=parse_ip(host), port=int(sockaddr[1]))
        if isinstance(sockaddr, bytes):
            sockaddr = sockaddr.decode("utf-8", "surrogateescape")
        return cls(path=str(sockaddr or ""))

    @property
    def is_ip(self) -> bool:
        """True for a TCP endpoint."""
        return self.ip is not None

    @property
    def proto(self) -> str:
        """The ucspi-tcp PROTO value: TCP, TCP6 or UNIX."""
        if self.ip is None:
            return "UNIX"
        return "TCP6" if self.ip.version == 6 else "TCP"

    @property
    def host(self) -> str:
        """The address alone, as text (the path for a unix socket)."""
        return _ip_text(self.ip) if self.ip is not None else (self.path or "")

    def __str__(self) -> str:
        if self.ip is None:
            return f"unix:{self.path or ''}"
        if self.ip.version == 6:
            return f"[{_ip_text(self.ip)}]:{self.port}"
        return f"{_ip_text(self.ip)}:{self.port}"
