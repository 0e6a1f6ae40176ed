"""Access control against address games: v4-mapped IPv6, ::1 vs 127.0.0.1, PROXY spoofing.

On a dual-stack listener (``--listen :0``) an IPv4 client arrives as ``::ffff:a.b.c.d``;
a client can also open an AF_INET6 socket itself and connect to ``::ffff:127.0.0.1``.
Either way it must be judged exactly as the IPv4 address it is, or an IPv4 deny rule
(``--deny``, hosts.deny, leafmail's ``relay_networks``) could be dodged by choosing the
socket family. ``::1`` is another host than ``127.0.0.1`` for every rule. hosts.deny
verdicts are compared with tcpd's own (``tcpdmatch``) for the IPv4 address. A PROXY
header from a peer outside ``--proxy-from`` is data, never an address to judge.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import soak
from conftest import RunningServer, ServerFactory, start_server
from leafmail_fixtures import (
    Leafmail,
    LeafmailFactory,
    RawSMTP,
    leafmail_servers,
    queued_id,
)
from lifecycle_handlers import (
    HANDLER_ENV,
    IO_TIMEOUT,
    connect,
    log_count,
    read_to_end,
    recv_line,
    serve_args,
    wait_until,
)
from test_access_net import ipv6_loopback_works

REFUSAL = b"554 go away\r\n"
MAPPED_1 = "::ffff:127.0.0.1"
MAPPED_2 = "::ffff:127.0.0.2"
NO_CHECKS = '[checks]\nrfc5322 = "off"\nreceived = "off"\nspf = "off"\ndkim = "off"\n'


pytestmark = [
    pytest.mark.timeout(soak.scaled(60, 300)),
    pytest.mark.skipif(not ipv6_loopback_works(), reason="no IPv6"),
]


def dual_stack(netserver_proc: ServerFactory, *flags: str) -> RunningServer:
    """The echo handler on ``:0`` (one AF_INET6 socket for both families)."""
    server = netserver_proc(
        serve_args("thread", "--refuse-message", REFUSAL.decode().strip(), *flags, listen=":0"),
        env=HANDLER_ENV,
    )
    assert server.addresses[0].startswith("[::]:"), server.addresses
    return server


def target_for(source: str) -> str:
    """Where a client from `source` connects: the same family, the same kind of address."""
    if source.startswith("::ffff:"):
        return MAPPED_1
    return "::1" if ":" in source else "127.0.0.1"


def verdict(server: RunningServer, source: str) -> bool:
    """True if a client from `source` is served (echo), False if refused and closed."""
    address = (target_for(source), server.host_port[1])
    with connect(address, source) as sock:
        try:
            sock.sendall(b"ping\n")
            data = recv_line(sock)
        except (ConnectionResetError, BrokenPipeError):
            return False
    assert data in (b"ping\n", REFUSAL, b""), data
    return data == b"ping\n"


# --- --allow / --deny ------------------------------------------------------------------

ADDRESS_CASES: list[tuple[list[str], dict[str, bool]]] = [
    (["--deny", "127.0.0.1"], {MAPPED_1: False, MAPPED_2: True, "127.0.0.1": False, "::1": True}),
    (["--deny", "127.0.0.0/8"], {MAPPED_1: False, MAPPED_2: False, "::1": True}),
    (["--deny", "::ffff:127.0.0.1"], {MAPPED_1: False, "127.0.0.1": False, MAPPED_2: True}),
    (["--deny", "::ffff:0:0/96"], {MAPPED_2: False, "127.0.0.2": False, "::1": True}),
    (["--deny", "::1"], {"::1": False, MAPPED_1: True, "127.0.0.1": True}),
    (["--allow", "127.0.0.2"], {MAPPED_2: True, MAPPED_1: False, "::1": False}),
    (["--allow", "::ffff:127.0.0.2"], {"127.0.0.2": True, MAPPED_2: True, "127.0.0.1": False}),
    (["--allow", "::1"], {"::1": True, MAPPED_1: False, "127.0.0.1": False}),
    (["--allow", "ALL", "--deny", "[::ffff:127.0.0.0]/120"], {MAPPED_2: False, "::1": True}),
]


@pytest.mark.parametrize(("flags", "expected"), ADDRESS_CASES, ids=lambda v: str(v))
def test_mapped_clients_meet_ipv4_rules(
    netserver_proc: ServerFactory, flags: list[str], expected: dict[str, bool]
) -> None:
    server = dual_stack(netserver_proc, *flags)
    got = {source: verdict(server, source) for source in expected}
    soak.record("attack", f"access {' '.join(flags)}", expected=expected, got=got)
    assert got == expected
    assert "peer=[::ffff:" not in server.log()  # logged (and judged) as IPv4


# --- hosts.allow / hosts.deny, against tcpdmatch ----------------------------------------

HOSTS_DENY_PATTERNS = [
    "127.0.0.1",
    "127.0.0.",
    "127.0.0.0/255.255.255.0",
    "127.0.0.0/24",
    "[::ffff:127.0.0.1]",
    "[::ffff:127.0.0.0]/104",
    "[::ffff:0:0]/96",
    "ALL EXCEPT 127.0.0.2",
    "[::1]",
]


def tcpdmatch(directory: Path, client: str) -> bool:
    """tcpd's verdict for `client` with the hosts files in `directory` (granted?)."""
    out = subprocess.run(
        ["tcpdmatch", "-d", "echo", client],
        cwd=directory,
        capture_output=True,
        text=True,
        timeout=10,
        check=True,
    ).stdout
    return "access:   granted" in out


@pytest.fixture
def hosts_server(netserver_proc: ServerFactory, tmp_path: Path) -> Iterator[RunningServer]:
    (tmp_path / "hosts.allow").write_text("")
    (tmp_path / "hosts.deny").write_text("")
    flags = ["--hosts-allow", str(tmp_path / "hosts.allow")]
    flags += ["--hosts-deny", str(tmp_path / "hosts.deny"), "--daemon-name", "echo"]
    yield dual_stack(netserver_proc, *flags)


def reload_rules(server: RunningServer, deny: Path, text: str) -> None:
    """Write hosts.deny and SIGHUP; return once the server logged the reload."""
    before = log_count(server.log, "access rules reloaded")
    deny.write_text(text)
    server.signal(signal.SIGHUP)
    assert wait_until(lambda: log_count(server.log, "access rules reloaded") > before)


@pytest.mark.skipif(shutil.which("tcpdmatch") is None, reason="tcpd is not installed")
def test_hosts_deny_treats_mapped_clients_as_tcpd_treats_ipv4(
    hosts_server: RunningServer, tmp_path: Path
) -> None:
    """For each pattern: the mapped client's fate is tcpd's verdict on the IPv4 address."""
    deny = tmp_path / "hosts.deny"
    outcomes: dict[str, dict[str, bool]] = {}
    for pattern in HOSTS_DENY_PATTERNS:
        reload_rules(hosts_server, deny, f"ALL: {pattern}\n")
        got: dict[str, bool] = {}
        for source in (MAPPED_1, MAPPED_2, "127.0.0.1", "::1"):
            plain = source.removeprefix("::ffff:")
            want = tcpdmatch(tmp_path, plain)
            got[source] = verdict(hosts_server, source)
            assert got[source] == want, (pattern, source, want)
        outcomes[pattern] = got
    # The rule that matters most: an IPv4 deny never lets the mapped form in.
    assert outcomes["127.0.0.1"][MAPPED_1] is False
    soak.record("attack", "hosts.deny vs v4-mapped clients", outcomes=outcomes)


def test_hosts_allow_grants_the_mapped_form_of_an_allowed_address(
    hosts_server: RunningServer, tmp_path: Path
) -> None:
    (tmp_path / "hosts.allow").write_text("echo: 127.0.0.2\n")
    reload_rules(hosts_server, tmp_path / "hosts.deny", "ALL: ALL\n")
    assert verdict(hosts_server, MAPPED_2)
    assert not verdict(hosts_server, MAPPED_1)
    assert not verdict(hosts_server, "::1")


# --- leafmail relay_networks on a dual-stack listener -----------------------------------


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LeafmailFactory]:
    yield from leafmail_servers(tmp_path_factory.mktemp("access"))


def relay_attempt(server: Leafmail, source: str) -> tuple[int, str | None]:
    """RCPT to a foreign domain from `source`; (code, client ip in the spool) if taken."""
    address = (target_for(source), server.address("::")[1])
    with RawSMTP(address, source=source) as client:
        client.greeting()
        client.ehlo()
        assert client.command("MAIL FROM:<a@mx.test>").code == 250
        reply = client.command("RCPT TO:<u@other.test>")
        if reply.code != 250:
            return reply.code, None
        assert client.command("DATA").code == 354
        qid = queued_id(client.command(b"Subject: x\r\n\r\nx\r\n.").text)
    return 250, server.message(qid).envelope.client.ip


RELAY_CASES = [
    ('["127.0.0.2"]', {MAPPED_1: False, MAPPED_2: True, "127.0.0.2": True, "::1": False}),
    ('["::ffff:127.0.0.2"]', {"127.0.0.2": True, MAPPED_1: False}),
    ('["::1"]', {"::1": True, "127.0.0.1": False, MAPPED_1: False}),
    # ::/0 is an IPv6 network: IPv4 clients, mapped or not, are outside it.
    ('["::/0"]', {"::1": True, MAPPED_1: False, "127.0.0.1": False}),
]


@pytest.mark.parametrize(("networks", "expected"), RELAY_CASES, ids=lambda v: str(v))
def test_relay_networks_judge_mapped_clients_as_ipv4(
    shared: LeafmailFactory, networks: str, expected: dict[str, bool]
) -> None:
    server = shared(f"[relay]\nrelay_networks = {networks}\n" + NO_CHECKS, listen=(":0",))
    got: dict[str, bool] = {}
    for source, trusted in expected.items():
        code, ip = relay_attempt(server, source)
        got[source] = code == 250
        assert got[source] == trusted, (networks, source, code)
        if ip is not None:  # the spool names the client as the rules saw it
            assert ip == source.removeprefix("::ffff:"), ip
    soak.record("attack", f"relay_networks {networks} dual stack", expected=expected, got=got)


# --- PROXY protocol from a peer that is not the balancer ---------------------------------

SHOW = ["--", "/bin/sh", "-c", 'echo "$TCPREMOTEIP"; exec cat']


def proxied(server: RunningServer, source: str, data: bytes) -> bytes:
    address = (target_for(source), server.host_port[1])
    with connect(address, source) as sock:
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
        return read_to_end(sock)


def test_a_spoofed_proxy_header_is_only_data(tmp_path: Path) -> None:
    """Only --proxy-from peers (127.0.0.3, also as ::ffff:127.0.0.3) may name a client."""
    server = start_server(
        ["--listen", ":0", "--proxy-from", "127.0.0.3", "--deny", "127.0.0.1",
         "--deny", "127.0.0.5", "--timeout", str(IO_TIMEOUT), *SHOW],
        tmp_path,
    )  # fmt: skip
    try:
        spoof = b"PROXY TCP4 10.9.9.9 127.0.0.1 5555 25\r\n"
        # A denied peer stays denied whatever it claims to be.
        assert proxied(server, MAPPED_1, spoof + b"x") == b""
        # An allowed, untrusted peer is itself; the header is passed on as data.
        assert proxied(server, MAPPED_2, spoof + b"x") == b"127.0.0.2\n" + spoof + b"x"
        # The balancer, even in mapped form, is trusted: the named client is judged.
        trusted = "::ffff:127.0.0.3"
        assert proxied(server, trusted, spoof + b"x") == b"10.9.9.9\nx"
        mapped_denied = b"PROXY TCP6 ::ffff:127.0.0.5 ::1 5555 25\r\n"
        assert proxied(server, trusted, mapped_denied + b"x") == b""
    finally:
        server.stop()
    soak.record("attack", "PROXY header from an untrusted peer", spoof_ignored=True)
