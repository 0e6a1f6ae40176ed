"""The limits table that workers accepting on one listener share (modes.shared).

Real processes: a forked child counts its connections in its own seat, and the parent
sees them in the caps; a child that dies, even holding the lock, leaves nothing stuck.
"""

from __future__ import annotations

import fcntl
import ipaddress
import os
import signal
import threading

import pytest

from netserver.endpoint import Endpoint
from netserver.limits import Limits
from netserver.modes.shared import FULL, SharedLimits

PEER = Endpoint.from_sockaddr(2, ("192.0.2.1", 4000))
OTHER = Endpoint.from_sockaddr(2, ("192.0.2.2", 4000))
THIRD = Endpoint.from_sockaddr(2, ("192.0.2.3", 4000))

pytestmark = pytest.mark.slow  # each test forks a worker of its own


def in_child(table: SharedLimits, seat: int, peers: list[Endpoint]) -> list[int]:
    """Admit `peers` from seat `seat` in a forked process that then exits (never
    releasing, as a killed worker); the entries it got (-2 for a refusal)."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        table.take_seat(seat)
        got = [table.admit(p) for p in peers]
        os.write(write, ",".join(str(g if isinstance(g, int) else -2) for g in got).encode())
        os._exit(0)
    os.close(write)
    data = os.read(read, 1024)
    os.close(read)
    os.waitpid(pid, 0)
    return [int(x) for x in data.decode().split(",")]


def test_caps_count_every_seat_and_a_dead_seat_is_counted_out() -> None:
    table = SharedLimits(Limits(max_conns=3, max_per_source=2), seats=2)
    assert in_child(table, 1, [PEER]) == [0]
    table.take_seat(0)
    assert table.total == 1
    first = table.admit(PEER)
    assert first == 0
    refused = table.admit(PEER)  # one here and one in the other seat: the cap is 2
    assert refused == "more than 2 connections from 192.0.2.1"
    assert table.admit(OTHER) == 1
    assert table.admit(THIRD) == FULL  # 3 counted in, 2 of them here
    assert table.clear_seat(1) == 1  # its worker is gone: its connection counts out
    assert table.total == 2
    assert table.admit(PEER) == 2
    table.release(first)
    table.release(2)
    assert table.total == 1


def test_the_lock_of_a_killed_holder_is_free() -> None:
    table = SharedLimits(Limits(max_conns=10), seats=2)
    pid = os.fork()
    if pid == 0:
        fcntl.lockf(table.fd, fcntl.LOCK_EX)
        os.kill(os.getpid(), signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status)
    table.take_seat(0)
    assert table.admit(PEER) == 0  # would wait forever on a lock that stayed taken


def test_the_least_busy_accepting_seat_takes_the_next_client() -> None:
    table = SharedLimits(Limits(), seats=3)
    table.take_seat(0)
    table.accepting(True)
    table.admit(PEER)
    assert not table.busier()  # nobody else watches the listener
    table.take_seat(2)
    table.accepting(True)  # seat 2 watches and serves nobody: the next client is its
    table.take_seat(0)
    assert table.busier()
    table.take_seat(2)
    table.accepting(False)  # it stopped watching: no client is left to it
    table.take_seat(0)
    assert not table.busier()
    table.take_seat(2)
    table.accepting(True)
    table.clear_seat(2)  # it died: no longer a place to leave clients to
    table.take_seat(0)
    assert not table.busier()


def test_a_release_does_not_wait_for_the_lock() -> None:
    """Counting out needs no lock (one writer per seat): a worker that ends a
    connection while another holds the lock goes on at once."""
    table = SharedLimits(Limits(max_conns=10, max_per_source=5), seats=2)
    table.take_seat(0)
    entry = table.admit(PEER)
    assert entry == 0
    locked_r, locked_w = os.pipe()
    go_r, go_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        fcntl.lockf(table.fd, fcntl.LOCK_EX)
        os.write(locked_w, b"x")
        os.read(go_r, 1)
        os._exit(0)
    try:
        assert os.read(locked_r, 1) == b"x"
        releasing = threading.Thread(target=table.release, args=(entry,))
        releasing.start()
        releasing.join(10.0)
        done = not releasing.is_alive()
    finally:
        os.write(go_w, b"x")
        os.waitpid(pid, 0)
        releasing.join()
        for fd in (locked_r, locked_w, go_r, go_w):
            os.close(fd)
    assert done  # it did not wait for the other's lock
    assert table.total == 0
    assert table.admit(PEER) == 0  # the entry is free again, and the source counted out


def test_a_source_digest_follows_the_limits_it_was_made_with() -> None:
    """The digest of a client's source is remembered per address, for the limits it was
    made with: limits replaced (a reload) with another IPv6 prefix count anew."""
    table = SharedLimits(Limits(max_conns=10, max_per_source=1), seats=1)
    table.take_seat(0)
    one, two = (Endpoint(ipaddress.ip_address(f"2001:db8::{n}"), 1) for n in (1, 2))
    entries = [table.admit(one), table.admit(two)]  # /128: two sources
    assert all(isinstance(entry, int) and entry >= 0 for entry in entries)
    for entry in entries:
        table.release(int(entry))
    table.limits = Limits(max_conns=10, max_per_source=1, ipv6_source_prefix=64)
    assert isinstance(table.admit(one), int)
    assert table.admit(two) == "more than 1 connections from 2001:db8::/64"
