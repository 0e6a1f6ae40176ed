"""PROXY protocol v1/v2: the parser against the spec's examples, then real servers.

The servers are real `netserver serve` processes; the "load balancer" is the test's
own loopback socket writing the header. A command prints what it was told about the
client ($TCPREMOTEIP ...) and then echoes the payload, so the tests see both that the
header was believed and that the bytes after it arrive exactly as sent.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import socket
import struct
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import RunningServer, ServerFactory
from lifecycle_handlers import HANDLER_ENV, connect, read_to_end, wait_until

from netserver.endpoint import Endpoint
from netserver.listen.proxy import (
    V2_SIGNATURE,
    ProxyError,
    ProxyInfo,
    header_length,
    parse,
    read_header,
)

SHOW_AND_ECHO = [
    "--",
    "sh",
    "-c",
    'echo "$TCPREMOTEIP $TCPREMOTEPORT $TCPLOCALIP $TCPLOCALPORT"; exec cat',
]
PAYLOAD = b"PROXY TCP4 6.6.6.6 6.6.6.6 1 1\r\n\x00\xff\r\n\rbinary\n" * 50


def v2(command: int, family: int, body: bytes) -> bytes:
    """A v2 header: signature, version 2 and `command`, `family`, length, `body`."""
    return V2_SIGNATURE + bytes([0x20 | command, family]) + struct.pack("!H", len(body)) + body


def v2_tcp4(src: str, dst: str, sport: int, dport: int, tlvs: bytes = b"") -> bytes:
    addrs = ipaddress.IPv4Address(src).packed + ipaddress.IPv4Address(dst).packed
    return v2(1, 0x11, addrs + struct.pack("!HH", sport, dport) + tlvs)


def v2_tcp6(src: str, dst: str, sport: int, dport: int) -> bytes:
    addrs = ipaddress.IPv6Address(src).packed + ipaddress.IPv6Address(dst).packed
    return v2(1, 0x21, addrs + struct.pack("!HH", sport, dport))


# -- the parser ---------------------------------------------------------------------------

SPEC_V1 = [
    (b"PROXY TCP4 255.255.255.255 255.255.255.255 65535 65535\r\n", "255.255.255.255", 65535),
    (b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n", "192.168.0.1", 56324),
    (
        b"PROXY TCP6 ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"
        b" ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff 65535 65535\r\n",
        "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff",
        65535,
    ),
]


@pytest.mark.parametrize(("header", "ip", "port"), SPEC_V1)
def test_v1_spec_examples(header: bytes, ip: str, port: int) -> None:
    data = header + b"GET / HTTP/1.1\r\nHost: 192.168.0.11\r\n\r\n"
    assert header_length(data) == len(header)
    info = parse(header)
    assert info.source == Endpoint(ipaddress.ip_address(ip), port)
    assert info.version == 1


@pytest.mark.parametrize(
    "header",
    [
        b"PROXY UNKNOWN\r\n",
        b"PROXY UNKNOWN ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"
        b" ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff 65535 65535\r\n",  # 107 bytes: the maximum
        # "The receiver must ignore anything presented before the CRLF is found": even
        # octets that are not ASCII (refused before as "v1 header is not ASCII").
        b"PROXY UNKNOWN \xff\xfe\x00 junk\r\n",
    ],
)
def test_v1_unknown_means_the_real_peer(header: bytes) -> None:
    assert header_length(header) == len(header) <= 107
    assert parse(header) == ProxyInfo(1, len(header))


def test_v2_addresses_and_tlvs() -> None:
    tlvs = b"\x04\x00\x03abc" + b"\x20\x00\x05\x01\x00\x00\x00\x00"  # NOOP, SSL: skipped
    header = v2_tcp4("192.0.2.7", "198.51.100.1", 5555, 80, tlvs)
    assert header_length(header + b"payload") == len(header)
    info = parse(header)
    assert info.source == Endpoint(ipaddress.ip_address("192.0.2.7"), 5555)
    assert info.dest == Endpoint(ipaddress.ip_address("198.51.100.1"), 80)
    six = parse(v2_tcp6("2001:db8::7", "2001:db8::1", 1, 2))
    assert six.source == Endpoint(ipaddress.ip_address("2001:db8::7"), 1)


@pytest.mark.parametrize(
    "header",
    [v2(0, 0x00, b""), v2(0, 0x11, bytes(12)), v2(1, 0x00, b""), v2(1, 0x31, bytes(216))],
)
def test_v2_local_unspec_and_unix_use_the_real_peer(header: bytes) -> None:
    assert parse(header).source is None


@pytest.mark.parametrize("partial", [b"", b"PRO", b"PROXY TCP4 1.2.3.4", V2_SIGNATURE[:5]])
def test_incomplete_headers_ask_for_more(partial: bytes) -> None:
    assert header_length(partial) == 0


@pytest.mark.parametrize(
    "data",
    [
        b"GET / HTTP/1.0\r\n",
        b"PROXY TCP4 " + b"1" * 120,  # no CRLF within 107 bytes
        V2_SIGNATURE + b"\x21\x11\xff\xff",  # 64 KiB of TLVs: over the bound
        b"\r\n\r\n\x00\r\nQUIX\n",
    ],
)
def test_garbage_and_oversized_headers_fail_at_once(data: bytes) -> None:
    with pytest.raises(ProxyError):
        header_length(data)


@pytest.mark.parametrize(
    "header",
    [
        b"PROXY TCP4 192.0.2.7 198.51.100.1 5555\r\n",
        b"PROXY TCP4 ::1 ::1 1 2\r\n",
        b"PROXY TCP6 1.2.3.4 1.2.3.4 1 2\r\n",
        b"PROXY TCP4 192.0.2.7 198.51.100.1 65536 80\r\n",
        b"PROXY TCP4 192.0.2.7 198.51.100.1 080 80\r\n",
        b"PROXY TCP4  192.0.2.7 198.51.100.1 1 80\r\n",
        b"PROXY UDP4 192.0.2.7 198.51.100.1 1 80\r\n",
        v2(1, 0x11, bytes(8)),  # shorter than two IPv4 addresses and ports
        V2_SIGNATURE + b"\x11\x11\x00\x00",  # version 1 in a v2 header
        v2(2, 0x11, bytes(12)),  # unknown command
        # Address family (high nibble) and protocol (low) out of the spec's lists: it
        # says these "must be rejected as invalid by receivers" (they were taken as
        # UNSPEC, the real peer's address used).
        v2(1, 0x41, bytes(12)),
        v2(1, 0x13, bytes(12)),
        v2(1, 0xFF, bytes(12)),
        b"PROXY TCP6 fe80::1%eth0 ::1 1 80\r\n",  # an IPv6 zone (inet_pton refuses it)
        b"PROXY TCP6 ::1 fe80::2%1 1 80\r\n",
    ],
)
def test_malformed_headers_are_rejected(header: bytes) -> None:
    with pytest.raises(ProxyError):
        parse(header)


# -- reading a header off a socket --------------------------------------------------------

BOUND = 15.0  # seconds: the upper bound of every wait below (each ends when it holds)


def _pending(sock: socket.socket) -> bool:
    """Whether bytes wait in `sock`'s receive buffer (peeked, not taken)."""
    try:
        return bool(sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT))
    except BlockingIOError:
        return False


async def _until(condition: Callable[[], bool]) -> None:
    """Yield to the loop until `condition` holds (at most BOUND seconds)."""
    deadline = time.monotonic() + BOUND
    while not condition():
        assert time.monotonic() < deadline, "condition never held"
        await asyncio.sleep(0.005)


async def _read_in_two_parts(header: bytes, first: int) -> tuple[ProxyInfo, bytes]:
    """`read_header` on a real loopback TCP connection whose balancer sends `header[:first]`,
    waits until the reader has taken those bytes (or given up), then sends the rest and a
    payload; what it read, and the payload the socket still holds."""
    with (
        socket.create_server(("127.0.0.1", 0)) as listener,
        socket.create_connection(listener.getsockname()) as balancer,
    ):
        server, _ = listener.accept()
        with server:
            server.setblocking(False)
            balancer.sendall(header[:first])
            await _until(lambda: _pending(server))
            reading = asyncio.create_task(read_header(server, timeout=BOUND))
            await _until(lambda: reading.done() or not _pending(server))
            balancer.sendall(header[first:] + b"payload")
            info = await reading
            server.settimeout(BOUND)
            return info, server.recv(100)


@pytest.mark.parametrize("first", [10, 16, 20, 27])
def test_a_v2_header_that_arrives_in_two_parts_is_waited_for(first: int) -> None:
    """A v2 header whose first segment holds its length field but not all it announces
    (16 fixed octets and part of the addresses: a balancer's write cut by the network)
    is complete once the rest arrives. Before, the reader asked the kernel for the whole
    header, got only what had come and then EAGAIN: the connection was refused with
    "[Errno 11] Resource temporarily unavailable" (found with a hand-made probe against
    `netserver serve --proxy-from`)."""
    header = v2_tcp4("192.0.2.9", "198.51.100.1", 4444, 80)
    info, payload = asyncio.run(_read_in_two_parts(header, first))
    assert info.source == Endpoint(ipaddress.ip_address("192.0.2.9"), 4444)
    assert payload == b"payload"


def test_a_v1_header_that_arrives_in_two_parts_is_waited_for() -> None:
    header = b"PROXY TCP4 192.0.2.7 198.51.100.1 5555 80\r\n"
    info, payload = asyncio.run(_read_in_two_parts(header, 20))
    assert info.source == Endpoint(ipaddress.ip_address("192.0.2.7"), 5555)
    assert payload == b"payload"


# -- real servers -------------------------------------------------------------------------


def proxied(server: RunningServer, header: bytes, payload: bytes = PAYLOAD) -> bytes:
    """Send `header` + `payload` from 127.0.0.1, half-close, return all the server sent.

    A server that drops a bad header may reset the connection before the half-close
    (ENOTCONN) or even before all is sent (EPIPE): then whatever arrived is the answer.
    """
    with connect(server.host_port) as sock:
        try:
            sock.sendall(header + payload)
            sock.shutdown(socket.SHUT_WR)
        except OSError as exc:
            if exc.errno not in (errno.ENOTCONN, errno.ECONNRESET, errno.EPIPE):
                raise
        return read_to_end(sock)


def serve_proxied(netserver_proc: ServerFactory, *extra: str) -> RunningServer:
    return netserver_proc(
        ["--listen", "127.0.0.1:0", "--proxy-from", "127.0.0.0/8", *extra, *SHOW_AND_ECHO]
    )


@pytest.mark.parametrize(
    ("header", "shown"),
    [
        (b"PROXY TCP4 192.0.2.7 198.51.100.1 5555 80\r\n", "192.0.2.7 5555 198.51.100.1 80"),
        (b"PROXY TCP6 2001:db8::7 2001:db8::1 6666 443\r\n", "2001:db8::7 6666 2001:db8::1 443"),
        (
            v2_tcp4("192.0.2.8", "198.51.100.2", 7777, 25, b"\x04\x00\x02hi"),
            "192.0.2.8 7777 198.51.100.2 25",
        ),
        (v2_tcp6("2001:db8::8", "2001:db8::2", 8888, 587), "2001:db8::8 8888 2001:db8::2 587"),
    ],
)
def test_command_sees_the_proxied_client_and_the_exact_payload(
    netserver_proc: ServerFactory, header: bytes, shown: str
) -> None:
    server = serve_proxied(netserver_proc)
    out = proxied(server, header)
    first, _, rest = out.partition(b"\n")
    assert first.decode() == shown
    assert rest == PAYLOAD
    ip = shown.split()[0]
    assert wait_until(lambda: f"peer={'[' + ip + ']' if ':' in ip else ip}:" in server.log())


@pytest.mark.parametrize("header", [b"PROXY UNKNOWN\r\n", v2(0, 0x00, b""), v2(0, 0x11, bytes(12))])
def test_unknown_and_local_keep_the_real_peer(netserver_proc: ServerFactory, header: bytes) -> None:
    server = serve_proxied(netserver_proc)
    first, _, rest = proxied(server, header).partition(b"\n")
    assert first.split()[0] == b"127.0.0.1"
    assert rest == PAYLOAD


def test_deny_rule_matches_the_proxied_address(netserver_proc: ServerFactory) -> None:
    server = serve_proxied(netserver_proc, "--deny", "192.0.2.0/24")
    assert proxied(server, b"PROXY TCP4 192.0.2.7 198.51.100.1 5555 80\r\n") == b""
    assert wait_until(lambda: "refused peer=192.0.2.7:5555" in server.log())
    first, _, _ = proxied(server, b"PROXY TCP4 203.0.113.9 198.51.100.1 5555 80\r\n").partition(
        b"\n"
    )
    assert first.split()[0] == b"203.0.113.9"


def test_hosts_deny_matches_the_proxied_address(
    netserver_proc: ServerFactory, tmp_path: Path
) -> None:
    allow, deny = tmp_path / "hosts.allow", tmp_path / "hosts.deny"
    allow.write_text("")
    deny.write_text("ALL: 192.0.2.\n")
    server = serve_proxied(netserver_proc, "--hosts-allow", str(allow), "--hosts-deny", str(deny))
    assert proxied(server, b"PROXY TCP4 192.0.2.7 198.51.100.1 5555 80\r\n") == b""
    first, _, _ = proxied(server, b"PROXY TCP4 203.0.113.9 198.51.100.1 1 80\r\n").partition(b"\n")
    assert first.split()[0] == b"203.0.113.9"


def test_per_source_limit_counts_the_real_clients(netserver_proc: ServerFactory) -> None:
    server = serve_proxied(netserver_proc, "--max-per-source", "1")
    one = connect(server.host_port)
    two = connect(server.host_port)
    try:
        one.sendall(b"PROXY TCP4 192.0.2.1 198.51.100.1 1 80\r\n")
        two.sendall(b"PROXY TCP4 192.0.2.2 198.51.100.1 1 80\r\n")
        assert one.recv(100).startswith(b"192.0.2.1 ")
        assert two.recv(100).startswith(b"192.0.2.2 ")  # same balancer, other client
        assert proxied(server, b"PROXY TCP4 192.0.2.1 198.51.100.1 2 80\r\n") == b""
        assert wait_until(lambda: "more than 1 connections from 192.0.2.1" in server.log())
    finally:
        one.close()
        two.close()


def test_untrusted_source_cannot_spoof(netserver_proc: ServerFactory) -> None:
    server = netserver_proc(
        ["--listen", "127.0.0.1:0", "--proxy-from", "127.0.0.2", *SHOW_AND_ECHO]
    )
    header = b"PROXY TCP4 192.0.2.7 198.51.100.1 5555 80\r\n"
    first, _, rest = proxied(server, header).partition(b"\n")
    assert first.split()[0] == b"127.0.0.1"
    assert rest == header + PAYLOAD  # the header is only data


@pytest.mark.parametrize(
    "data",
    [
        b"GET / HTTP/1.0\r\n\r\n",
        b"PROXY TCP4 " + b"9" * 200 + b"\r\n",
        V2_SIGNATURE + b"\x21\x11\xff\xff" + bytes(1000),
        b"PROXY TCP4 192.0.2.7 198.51.100.1 99999 80\r\n",
        b'PROXY TCP6 fe80::1%a"b=c\x1b ::1 1 80\r\n',  # a zone: not inet_ntop's form
    ],
)
def test_trusted_source_without_a_valid_header_is_dropped(
    netserver_proc: ServerFactory, data: bytes
) -> None:
    server = serve_proxied(netserver_proc)
    assert proxied(server, data, b"payload") == b""
    assert wait_until(lambda: "refused peer=127.0.0.1" in server.log())
    assert "PROXY protocol" in server.log()
    assert "netserver: conn " not in server.log()


def test_slow_header_times_out(netserver_proc: ServerFactory) -> None:
    server = serve_proxied(netserver_proc, "--timeout", "0.5")
    with connect(server.host_port) as sock:
        sock.sendall(b"PROXY TCP4 192.0.2.7 ")
        assert sock.recv(100) == b""  # closed by the server, within the socket timeout
    assert wait_until(lambda: "no complete PROXY header" in server.log())


def test_header_split_across_segments(netserver_proc: ServerFactory) -> None:
    server = serve_proxied(netserver_proc)
    header = v2_tcp4("192.0.2.9", "198.51.100.1", 4444, 80)
    with connect(server.host_port) as sock:
        for i in range(0, len(header), 5):
            sock.sendall(header[i : i + 5])
        sock.sendall(b"hello")
        sock.shutdown(socket.SHUT_WR)
        assert read_to_end(sock) == b"192.0.2.9 4444 198.51.100.1 80\nhello"


@pytest.mark.parametrize("mode", ["fork", "prefork", "thread", "async"])
def test_handler_peer_is_the_proxied_client(netserver_proc: ServerFactory, mode: str) -> None:
    handler = "proxy_tls_handlers:async_peer" if mode == "async" else "handlers_for_tests:peer"
    server = netserver_proc(
        [
            "--listen",
            "127.0.0.1:0",
            "--mode",
            mode,
            "--proxy-from",
            "127.0.0.1",
            "--handler",
            handler,
        ],
        env=HANDLER_ENV,
    )
    out = proxied(server, v2_tcp6("2001:db8::7", "2001:db8::1", 1234, 443), b"")
    assert out == b"[2001:db8::7]:1234 [2001:db8::1]:443\n"


def test_a_trusted_source_without_a_valid_header_is_dropped_without_the_line(
    netserver_proc: ServerFactory,
) -> None:
    """Even with --refuse-message, a peer dropped for its PROXY header reads nothing: it
    is the balancer, and the line speaks to a client (leafmail's names a limit)."""
    server = serve_proxied(netserver_proc, "--refuse-message", "421 refused")
    assert proxied(server, b"GET / HTTP/1.0\r\n\r\n", b"payload") == b""
    assert wait_until(lambda: 'reason="PROXY protocol: ' in server.log())
