"""Access control over real sockets: what a client from a given address actually gets.

The whole of 127.0.0.0/8 is loopback on Linux, so binding the client socket to
127.0.0.1 or 127.0.0.2 gives the server two different sources. Names are only ever
resolved by `LoopbackDNS` (``--dns-server``), never by the machine's resolver.
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterator

import pytest
from conftest import RunningServer, ServerFactory
from dnsserver import LoopbackDNS, reverse_name
from lifecycle_handlers import (
    HANDLER_ENV,
    connect,
    log_count,
    read_to_end,
    round_trip,
    serve_args,
    served,
    wait_until,
)

REFUSAL = "554 go away"


def refused(server: RunningServer, source: str | None = None, port_of: str = "") -> bool:
    """Connect from *source*; True if the server sent the refusal line and closed."""
    host, port = server.host_port
    address = (port_of or host, port)
    with connect(address, source) as sock:
        return read_to_end(sock) == (REFUSAL + "\r\n").encode()


def start(netserver_proc: ServerFactory, listen: str, *flags: str) -> RunningServer:
    return netserver_proc(
        serve_args("thread", "--refuse-message", REFUSAL, *flags, listen=listen),
        env=HANDLER_ENV,
    )


def ipv6_loopback_works() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


needs_ipv6 = pytest.mark.skipif(not ipv6_loopback_works(), reason="no IPv6 loopback")


@pytest.mark.parametrize(
    ("listen", "flags", "source", "allowed", "reason"),
    [
        ("127.0.0.1:0", [], "127.0.0.1", True, None),
        ("127.0.0.1:0", ["--deny", "127.0.0.0/8"], "127.0.0.1", False, "deny rule 127.0.0.0/8"),
        ("127.0.0.1:0", ["--deny", "127.0.0.0/8"], "127.0.0.2", False, "deny rule 127.0.0.0/8"),
        ("127.0.0.1:0", ["--allow", "127.0.0.2"], "127.0.0.1", False, "no allow rule matched"),
        ("127.0.0.1:0", ["--allow", "127.0.0.2/32"], "127.0.0.2", True, None),
        ("127.0.0.1:0", ["--allow", "127.0.0.2/32"], "127.0.0.1", False, "no allow rule"),
        ("127.0.0.1:0", ["--allow", "ALL", "--deny", "127.0.0.2"], "127.0.0.1", True, None),
        (
            "127.0.0.1:0",
            ["--allow", "ALL", "--deny", "127.0.0.2"],
            "127.0.0.2",
            False,
            "deny rule 127.0.0.2",
        ),
        # Deny is checked first: a broad allow never lets a denied client in.
        (
            "127.0.0.1:0",
            ["--allow", "127.0.0.1", "--deny", "127.0.0.0/8"],
            "127.0.0.1",
            False,
            "deny rule 127.0.0.0/8",
        ),
        ("[::1]:0", ["--deny", "::1"], "::1", False, "deny rule ::1"),
        ("[::1]:0", ["--deny", "[::1]"], "::1", False, "deny rule [::1]"),
        ("[::1]:0", ["--deny", "::2"], "::1", True, None),
        ("[::1]:0", ["--allow", "::1/128"], "::1", True, None),
        ("[::1]:0", ["--deny", "127.0.0.0/8"], "::1", True, None),
        # An IPv4 rule never matches a real IPv6 client ...
        ("[::1]:0", ["--allow", "127.0.0.1"], "::1", False, "no allow rule matched"),
    ],
)
def test_address_rules(
    netserver_proc: ServerFactory,
    listen: str,
    flags: list[str],
    source: str,
    allowed: bool,
    reason: str | None,
) -> None:
    if ":" in source and not ipv6_loopback_works():
        pytest.skip("no IPv6 loopback")
    server = start(netserver_proc, listen, *flags)
    if allowed:
        assert served(server.host_port, source)
        assert "refused" not in server.log()
    else:
        assert refused(server, source)
        assert reason is not None
        line = f"netserver: refused peer={source if ':' not in source else f'[{source}]'}:"
        assert wait_until(lambda: log_count(server.log, line) == 1), server.log()
        assert reason in server.log()
        assert "netserver: conn " not in server.log(), "a refused client reached the handler"


@needs_ipv6
@pytest.mark.parametrize(
    ("flags", "source", "allowed"),
    [
        (["--deny", "127.0.0.1"], "127.0.0.1", False),
        (["--deny", "127.0.0.1"], "127.0.0.2", True),
        (["--deny", "::ffff:127.0.0.1"], "127.0.0.1", False),
        (["--deny", "[::ffff:127.0.0.0]/104"], "127.0.0.2", False),
        (["--allow", "127.0.0.2"], "127.0.0.2", True),
        (["--allow", "127.0.0.2"], "127.0.0.1", False),
        (["--deny", "::1"], "::1", False),
        (["--deny", "::1"], "127.0.0.1", True),
        # ::/0 is an IPv6 rule; an IPv4 client on a dual-stack socket is not inside it.
        (["--deny", "::/0"], "127.0.0.1", True),
    ],
)
def test_v4_mapped_on_a_dual_stack_listener(
    netserver_proc: ServerFactory, flags: list[str], source: str, allowed: bool
) -> None:
    """On ``:PORT`` an IPv4 client arrives as ::ffff:a.b.c.d; IPv4 rules must still apply."""
    server = start(netserver_proc, ":0", *flags)
    assert server.addresses[0].startswith("[::]:")
    target = "::1" if ":" in source else "127.0.0.1"
    if allowed:
        assert served((target, server.host_port[1]), source)
    else:
        assert refused(server, source, port_of=target)
        shown = f"[{source}]" if ":" in source else source
        assert wait_until(lambda: f"refused peer={shown}:" in server.log()), server.log()
        assert "peer=[::ffff:" not in server.log()


def test_the_server_keeps_serving_after_refusals(netserver_proc: ServerFactory) -> None:
    server = start(netserver_proc, "127.0.0.1:0", "--allow", "127.0.0.2")
    with connect(server.host_port, "127.0.0.2") as kept:
        for n in range(5):
            assert refused(server, "127.0.0.1")
            assert served(server.host_port, "127.0.0.2")
            assert round_trip(kept, b"%d\n" % n) == b"%d\n" % n
    assert wait_until(lambda: log_count(server.log, "netserver: refused ") == 5)
    assert log_count(server.log, 'reason="no allow rule matched"') == 5


def test_a_refused_client_that_sends_first_is_closed(netserver_proc: ServerFactory) -> None:
    """A client that talks before reading its refusal still sees the end, not a hang."""
    server = netserver_proc(
        serve_args("fork", "--deny", "127.0.0.1"),
        env=HANDLER_ENV,
    )
    with connect(server.host_port) as sock:
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(b"HELO me\r\n" * 100)
        assert read_to_end(sock) == b""
    assert served(server.host_port, "127.0.0.2")
    assert log_count(server.log, "netserver: refused ") == 1


# --------------------------------------------------------------------------- names


@pytest.fixture
def dns() -> Iterator[LoopbackDNS]:
    with LoopbackDNS() as server:
        yield server


def name_records(dns: LoopbackDNS, ptr_for: str, name: str, a: str) -> None:
    dns.set_records(reverse_name(ptr_for), "PTR", [name])
    dns.set_records(name, "A", [a])


@pytest.mark.parametrize("listen", ["127.0.0.1:0", pytest.param(":0", marks=needs_ipv6)])
@pytest.mark.parametrize(
    ("forward", "allowed"),
    [
        ("127.0.0.1", True),
        ("192.0.2.1", False),  # the reverse zone claims a name its owner does not confirm
    ],
)
def test_a_name_counts_only_when_forward_confirmed(
    netserver_proc: ServerFactory, dns: LoopbackDNS, forward: str, allowed: bool, listen: str
) -> None:
    name_records(dns, "127.0.0.1", "trusted.example.test", forward)
    server = start(
        netserver_proc,
        listen,
        "--allow",
        ".example.test",
        "--dns-server",
        f"127.0.0.1:{dns.port}",
    )
    address = ("127.0.0.1", server.host_port[1])
    if allowed:
        assert served(address)
    else:
        assert refused(server, port_of="127.0.0.1")
        assert wait_until(lambda: 'reason="no allow rule matched"' in server.log())
    assert ("1.0.0.127.in-addr.arpa", "PTR") in dns.queries
    assert ("trusted.example.test", "A") in dns.queries


@pytest.mark.parametrize("mode", ["fork", "prefork", "thread", "async"])
def test_a_denied_name_is_refused_and_others_are_served(
    netserver_proc: ServerFactory, dns: LoopbackDNS, mode: str
) -> None:
    """The name lookup runs off the accept path, then hands the client to the mode."""
    name_records(dns, "127.0.0.1", "bad.example.test", "127.0.0.1")
    name_records(dns, "127.0.0.2", "good.example.test", "127.0.0.2")
    server = netserver_proc(
        serve_args(
            mode,
            "--refuse-message",
            REFUSAL,
            "--deny",
            "bad.example.test",
            "--dns-server",
            f"127.0.0.1:{dns.port}",
        ),
        env=HANDLER_ENV,
    )
    with connect(server.host_port, "127.0.0.2") as kept:
        assert round_trip(kept) == b"ping\n"
        assert refused(server, "127.0.0.1")
        assert served(server.host_port, "127.0.0.2")
        assert round_trip(kept, b"again\n") == b"again\n"
    assert wait_until(lambda: 'reason="matched deny rule bad.example.test"' in server.log())


def test_address_rules_never_ask_dns(netserver_proc: ServerFactory, dns: LoopbackDNS) -> None:
    server = start(
        netserver_proc,
        "127.0.0.1:0",
        "--allow",
        "127.0.0.2",
        "--deny",
        ".example.test",
        "--deny",
        "127.0.0.3",
        "--dns-server",
        f"127.0.0.1:{dns.port}",
    )
    assert refused(server, "127.0.0.3")  # a deny rule already matches the address
    assert dns.queries == []
    assert not served(server.host_port, "127.0.0.1")
