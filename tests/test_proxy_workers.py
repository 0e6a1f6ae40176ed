"""PROXY protocol with worker processes: the worker reads the header, never the supervisor.

The supervisor of ``--mode async --workers N`` may be root, and no process with
privilege reads client bytes. A trusted balancer's connection is therefore handed to a
worker as it is; the worker reads the header and asks the supervisor to judge and count
the client it names, so per-source caps still hold across workers, for that client.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest
from conftest import RunningServer, ServerFactory
from dnsserver import LoopbackDNS, reverse_name
from lifecycle_handlers import (
    HANDLER_ENV,
    IO_TIMEOUT,
    children,
    recv_line,
    socket_fds,
    wait_until,
)

HEADER = "PROXY TCP4 {client} 127.0.0.1 5555 25\r\n"


def serve(netserver_proc: ServerFactory) -> RunningServer:
    return netserver_proc(
        [
            "--mode", "async", "--workers", "2", "--listen", "127.0.0.1:0",
            "--proxy-from", "127.0.0.1", "--max-per-source", "1",
            "--refuse-message", "421 too many", "--handler", "proxy_tls_handlers:async_peer_held",
        ],
        env=HANDLER_ENV,
    )  # fmt: skip


def test_a_worker_reads_the_header_and_the_cap_counts_the_named_client(
    netserver_proc: ServerFactory,
) -> None:
    server = serve(netserver_proc)
    parent = server.proc.pid
    assert wait_until(lambda: len(children(parent)) == 2)
    workers = list(children(parent))
    baseline = socket_fds(parent)
    in_workers = sum(socket_fds(pid) for pid in workers)
    first = socket.create_connection(server.host_port, timeout=IO_TIMEOUT)
    try:
        # Nothing sent yet: the connection is in a worker, the supervisor kept no copy.
        assert wait_until(lambda: sum(socket_fds(pid) for pid in workers) == in_workers + 1)
        assert wait_until(lambda: socket_fds(parent) == baseline)
        first.sendall(HEADER.format(client="10.9.8.7").encode())
        assert recv_line(first).startswith(b"10.9.8.7:5555 127.0.0.1:25")
        # The same client again, through the same balancer: over its cap of 1.
        with socket.create_connection(server.host_port, timeout=IO_TIMEOUT) as second:
            second.sendall(HEADER.format(client="10.9.8.7").encode())
            assert recv_line(second) == b"421 too many\r\n"
        # Another client behind the balancer is served.
        with socket.create_connection(server.host_port, timeout=IO_TIMEOUT) as third:
            third.sendall(HEADER.format(client="10.9.8.6").encode())
            assert recv_line(third).startswith(b"10.9.8.6:5555 ")
    finally:
        first.close()
    assert "more than 1 connections from 10.9.8.7" in server.log()


@pytest.fixture
def dns() -> Iterator[LoopbackDNS]:
    with LoopbackDNS() as server:
        yield server


def test_a_rule_that_needs_a_name_judges_the_client_the_header_names(
    netserver_proc: ServerFactory, dns: LoopbackDNS
) -> None:
    """A deny rule by host name needs a lookup of the named client: the supervisor makes
    it (off its loop, bounded) and judges by the answer, instead of refusing everyone."""
    for client, name in (("10.9.8.7", "bad.example.test"), ("10.9.8.6", "good.example.test")):
        dns.set_records(reverse_name(client), "PTR", [name])
        dns.set_records(name, "A", [client])
    server = netserver_proc(
        [
            "--mode", "async", "--workers", "2", "--listen", "127.0.0.1:0",
            "--proxy-from", "127.0.0.1", "--deny", "bad.example.test",
            "--dns-server", f"127.0.0.1:{dns.port}",
            "--refuse-message", "554 go away", "--handler", "proxy_tls_handlers:async_peer_held",
        ],
        env=HANDLER_ENV,
    )  # fmt: skip
    with socket.create_connection(server.host_port, timeout=IO_TIMEOUT) as good:
        good.sendall(HEADER.format(client="10.9.8.6").encode())
        assert recv_line(good).startswith(b"10.9.8.6:5555 127.0.0.1:25")
        with socket.create_connection(server.host_port, timeout=IO_TIMEOUT) as bad:
            bad.sendall(HEADER.format(client="10.9.8.7").encode())
            assert recv_line(bad) == b"554 go away\r\n"
            assert bad.recv(1) == b""
    assert ("7.8.9.10.in-addr.arpa", "PTR") in dns.queries  # the named clients, not
    assert ("6.8.9.10.in-addr.arpa", "PTR") in dns.queries  # the balancer, were looked up
    assert wait_until(lambda: 'reason="matched deny rule bad.example.test"' in server.log())
