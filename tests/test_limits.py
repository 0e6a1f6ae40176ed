"""Limits: per-source caps and rates, the global cap, idle timeouts and line lengths.

`Admission` is tested with a fake clock (no sleeping); everything else runs
``netserver serve`` as a process and checks what a real client receives.
"""

from __future__ import annotations

import ipaddress
import socket
import time
from typing import Any

import pytest
from conftest import RunningServer, ServerFactory
from lifecycle_handlers import (
    HANDLER_ENV,
    closed_by_peer,
    connect,
    log_count,
    nothing_arrives,
    read_to_end,
    recv_line,
    round_trip,
    serve_args,
    served,
    status_field,
    wait_until,
)

from netserver.admit.limits import Admission
from netserver.endpoint import Endpoint
from netserver.limits import Limits

SYNC_MODES = ["fork", "prefork", "thread"]
ALL_MODES = [*SYNC_MODES, "async"]

# --------------------------------------------------------------------------- Admission


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def peer(host: str = "192.0.2.1", port: int = 40000) -> Endpoint:
    return Endpoint(ip=ipaddress.ip_address(host), port=port)


def admission(clock: FakeClock | None = None, **limits: Any) -> Admission:
    return Admission(Limits(**limits), clock or FakeClock())


def test_rate_bucket_starts_full_then_refuses() -> None:
    adm = admission(rate_per_source=2)
    assert adm.admit(peer()) is None
    assert adm.admit(peer()) is None
    why = adm.admit(peer())
    assert why == "more than 2 connections/s from 192.0.2.1"
    assert adm.total == 2  # the refused one is not counted in


def test_tokens_refill_at_the_rate() -> None:
    clock = FakeClock()
    adm = admission(clock, rate_per_source=2)
    assert [adm.admit(peer()) for _ in range(2)] == [None, None]
    assert adm.admit(peer()) is not None
    clock.advance(0.25)  # half a token
    assert adm.admit(peer()) is not None
    clock.advance(0.25)  # the refused attempt did not spend the half token
    assert adm.admit(peer()) is None
    assert adm.admit(peer()) is not None


def test_refill_is_capped_at_the_burst() -> None:
    clock = FakeClock()
    adm = admission(clock, rate_per_source=2)
    clock.advance(3600)
    assert [adm.admit(peer()) is None for _ in range(3)] == [True, True, False]


def test_explicit_burst() -> None:
    clock = FakeClock()
    adm = admission(clock, rate_per_source=1, rate_burst=5)
    assert [adm.admit(peer()) is None for _ in range(6)] == [True] * 5 + [False]
    clock.advance(1.0)
    assert adm.admit(peer()) is None


def test_fractional_rate_has_a_burst_of_one() -> None:
    clock = FakeClock()
    adm = admission(clock, rate_per_source=0.5)
    assert adm.admit(peer()) is None
    clock.advance(1.0)
    assert adm.admit(peer()) == "more than 0.5 connections/s from 192.0.2.1"
    clock.advance(1.0)
    assert adm.admit(peer()) is None


def test_each_source_has_its_own_bucket() -> None:
    adm = admission(rate_per_source=1)
    assert adm.admit(peer("192.0.2.1")) is None
    assert adm.admit(peer("192.0.2.1")) is not None
    assert adm.admit(peer("192.0.2.2")) is None
    assert adm.admit(peer("2001:db8::1")) is None


def test_max_per_source_counts_open_connections() -> None:
    adm = admission(max_per_source=2)
    first, second, third = peer(port=1), peer(port=2), peer(port=3)
    assert adm.admit(first) is None
    assert adm.admit(second) is None
    assert adm.admit(third) == "more than 2 connections from 192.0.2.1"
    assert adm.admit(peer("192.0.2.9")) is None
    adm.release(first)
    assert adm.admit(third) is None


def test_a_v4_mapped_peer_is_the_same_source() -> None:
    """On a dual-stack listener an IPv4 client must not get a second allowance."""
    adm = admission(max_per_source=1)
    mapped = Endpoint.from_sockaddr(socket.AF_INET6, ("::ffff:192.0.2.1", 5, 0, 0))
    assert adm.admit(peer("192.0.2.1")) is None
    assert adm.admit(mapped) is not None


def test_exempt_sources_skip_the_per_source_caps_but_not_the_global_one() -> None:
    trusted = peer("192.0.2.7")
    adm = admission(
        max_per_source=1, rate_per_source=1, max_conns=3, exempt=lambda p: p.ip == trusted.ip
    )
    assert [adm.admit(peer("192.0.2.7", port=n)) for n in range(3)] == [None, None, None]
    assert adm.full  # exempt connections still count towards max_conns
    assert adm.admit(peer("192.0.2.1")) is None  # the global cap pauses accept, no refusal
    assert adm.admit(peer("192.0.2.1", port=2)) == "more than 1 connections from 192.0.2.1"


def test_ipv6_sources_can_be_counted_per_network() -> None:
    adm = admission(max_per_source=1, ipv6_source_prefix=64)
    assert adm.admit(peer("2001:db8:1:2::1")) is None
    refused = adm.admit(peer("2001:db8:1:2:ffff::9"))  # same /64, another address
    assert refused == "more than 1 connections from 2001:db8:1:2::/64"
    assert adm.admit(peer("2001:db8:1:3::1")) is None  # the next /64 is someone else
    assert adm.admit(peer("192.0.2.1")) is None  # IPv4 is per address
    adm.release(peer("2001:db8:1:2::1"))
    assert adm.admit(peer("2001:db8:1:2:ffff::9")) is None
    per_address = admission(max_per_source=1)  # the default: every address its own
    assert per_address.admit(peer("2001:db8::1")) is None
    assert per_address.admit(peer("2001:db8::2")) is None


def test_global_cap_is_full_and_frees_up() -> None:
    adm = admission(max_conns=2)
    assert not adm.full
    adm.admit(peer("192.0.2.1"))
    adm.admit(peer("192.0.2.2"))
    assert adm.full
    adm.release(peer("192.0.2.1"))
    assert not adm.full
    unlimited = admission(max_conns=0)
    for n in range(50):
        unlimited.admit(peer(port=n))
    assert not unlimited.full


def test_many_sources_do_not_grow_the_buckets_forever() -> None:
    """Once buckets have refilled they are forgotten, bounding memory under a flood."""
    clock = FakeClock()
    adm = admission(clock, rate_per_source=1, max_conns=0)
    base = int(ipaddress.IPv6Address("2001:db8::"))
    for n in range(65537):
        adm.admit(Endpoint(ip=ipaddress.IPv6Address(base + n), port=1))
    clock.advance(2.0)
    assert adm.admit(peer()) is None
    assert len(adm._buckets) <= 2


# --------------------------------------------------------------------------- per source


def refused_with(address: tuple[str, int], message: bytes, source: str | None = None) -> bool:
    """Connect, and report whether we got exactly *message* and then the end."""
    with connect(address, source) as sock:
        return read_to_end(sock) == message


@pytest.mark.parametrize("mode", ALL_MODES)
def test_max_per_source(netserver_proc: ServerFactory, mode: str) -> None:
    server = netserver_proc(
        serve_args(mode, "--max-per-source", "1", "--refuse-message", "421 too many from you"),
        env=HANDLER_ENV,
    )
    with connect(server.host_port) as first:
        assert round_trip(first, b"one\n") == b"one\n"
        assert refused_with(server.host_port, b"421 too many from you\r\n")
        assert round_trip(first, b"two\n") == b"two\n"
        # Another source address is not affected.
        assert served(server.host_port, source="127.0.0.2")
    assert wait_until(lambda: log_count(server.log, "netserver: conn ") == 2)
    assert served(server.host_port)
    assert log_count(server.log, 'reason="more than 1 connections from 127.0.0.1"') == 1


@pytest.mark.parametrize("mode", ALL_MODES)
def test_max_conns_waits_in_the_backlog(netserver_proc: ServerFactory, mode: str) -> None:
    server = netserver_proc(serve_args(mode, "--max-conns", "1"), env=HANDLER_ENV)
    first = connect(server.host_port)
    assert round_trip(first, b"first\n") == b"first\n"
    with connect(server.host_port) as second:  # the kernel completes the handshake
        second.sendall(b"second\n")
        assert nothing_arrives(second, 0.3), "served while the first client is still on"
        assert round_trip(first, b"still first\n") == b"still first\n"
        first.close()
        assert recv_line(second) == b"second\n"
        assert round_trip(second, b"again\n") == b"again\n"
    assert "refused" not in server.log()


def test_rate_per_source(netserver_proc: ServerFactory) -> None:
    server = netserver_proc(
        serve_args("thread", "--rate-per-source", "2", "--refuse-message", "slow down"),
        env=HANDLER_ENV,
    )
    assert served(server.host_port)
    assert served(server.host_port)
    assert refused_with(server.host_port, b"slow down\r\n")
    assert served(server.host_port, source="127.0.0.2")
    assert log_count(server.log, "connections/s from 127.0.0.1") == 1


# --------------------------------------------------------------------------- idle timeout

IDLE = 0.5


def assert_idle_client_is_closed(server: RunningServer) -> None:
    with connect(server.host_port) as sock:
        assert round_trip(sock) == b"ping\n"
        started = time.monotonic()
        assert closed_by_peer(sock, 10 * IDLE), "idle client not closed"
        waited = time.monotonic() - started
    assert 0.8 * IDLE <= waited < 6 * IDLE
    assert wait_until(lambda: "status=idle-timeout" in server.log()), server.log()


@pytest.mark.parametrize("mode", ALL_MODES)
def test_idle_timeout(netserver_proc: ServerFactory, mode: str) -> None:
    server = netserver_proc(serve_args(mode, "--timeout", str(IDLE)), env=HANDLER_ENV)
    assert_idle_client_is_closed(server)
    assert served(server.host_port)


def test_idle_timeout_of_a_command(netserver_proc: ServerFactory) -> None:
    """/bin/cat never times out by itself: the supervisor reads TCP_INFO and ends it."""
    server = netserver_proc(["--listen", "127.0.0.1:0", "--timeout", str(IDLE), "--", "/bin/cat"])
    assert_idle_client_is_closed(server)


# The idle timeout of a command kept busy: a gap between two pings as long as this (the
# test process not scheduled) would make the command idle for real, so it is far longer
# than a loaded machine keeps a runnable process waiting; pings go every PACE.
BUSY_IDLE = 1.5
PACE = 0.05


def test_a_busy_command_is_not_idle(netserver_proc: ServerFactory) -> None:
    server = netserver_proc(
        ["--listen", "127.0.0.1:0", "--timeout", str(BUSY_IDLE), "--", "/bin/cat"]
    )
    with connect(server.host_port) as sock:
        deadline = time.monotonic() + 2 * BUSY_IDLE
        while time.monotonic() < deadline:
            assert round_trip(sock) == b"ping\n"
            assert nothing_arrives(sock, PACE)
    assert "idle-timeout" not in server.log()


# --------------------------------------------------------------------------- max line

ENDLESS = 64 * 1024 * 1024  # more than the kernel can buffer on both ends of loopback
RSS_BOUND_KB = 20 * 1024


def send_endless_line(sock: socket.socket) -> int:
    """Send up to ENDLESS bytes with no newline; return how many went before an error."""
    chunk = b"x" * (1 << 20)
    sent = 0
    try:
        while sent < ENDLESS:
            sock.sendall(chunk)
            sent += len(chunk)
    except (BrokenPipeError, ConnectionResetError, TimeoutError):
        pass
    return sent


@pytest.mark.parametrize("mode", ["fork", "thread", "async"])
def test_an_endless_line_is_cut_off(netserver_proc: ServerFactory, mode: str) -> None:
    server = netserver_proc(serve_args(mode, "--max-line", "100"), env=HANDLER_ENV)
    pid = server.proc.pid
    assert served(server.host_port)  # warm up: threads, buffers, first-use imports
    before = status_field(pid, "VmHWM")
    with connect(server.host_port) as sock:
        sent = send_endless_line(sock)
        assert sent < ENDLESS, "the server read a 64 MB line"
        assert closed_by_peer(sock)
    grown = status_field(pid, "VmHWM") - before
    assert grown < RSS_BOUND_KB, f"peak RSS grew by {grown} kB"
    assert wait_until(lambda: "status=line-too-long" in server.log()), server.log()
    assert served(server.host_port)


def test_a_line_longer_than_the_read_buffer_is_served_when_the_limit_allows(
    netserver_proc: ServerFactory,
) -> None:
    """Async mode pauses reading past READ_HIGH_WATER, but never while a read waits for
    the rest of a line: that would stall the connection for good."""
    server = netserver_proc(serve_args("async", "--max-line", str(4 << 20)), env=HANDLER_ENV)
    line = b"w" * (1 << 20) + b"\n"
    with connect(server.host_port) as sock:
        sock.sendall(line)
        sock.shutdown(socket.SHUT_WR)
        assert read_to_end(sock) == line


@pytest.mark.parametrize("mode", ["thread", "async"])
def test_a_line_at_the_limit_is_served(netserver_proc: ServerFactory, mode: str) -> None:
    server = netserver_proc(serve_args(mode, "--max-line", "100"), env=HANDLER_ENV)
    line = b"y" * 99 + b"\n"
    with connect(server.host_port) as sock:
        assert round_trip(sock, line) == line
        assert round_trip(sock, b"z" * 101 + b"\n") == b""
