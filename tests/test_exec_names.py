"""TCPREMOTEHOST and TCPLOCALHOST for commands, as tcpserver sets them.

Names come only from `LoopbackDNS` (``--dns-server``), never the machine's resolver.
The server listens on 127.0.0.2 and clients connect from other loopback addresses, so
the client's name and the local name are told apart.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import ServerFactory
from dnsserver import LoopbackDNS, reverse_name
from netclient import TIMEOUT, split_address
from test_cli import netserver

ENV_COMMAND = ["--", "env"]
LISTEN = ["--listen", "127.0.0.2:0"]
CLIENT, LIAR, NAMELESS = "127.0.0.3", "127.0.0.4", "127.0.0.5"
RECORDS = {
    (reverse_name(CLIENT), "PTR"): ["Client.Example.TEST"],
    ("client.example.test", "A"): [CLIENT],
    (reverse_name("127.0.0.2"), "PTR"): ["server.example.test"],
    ("server.example.test", "A"): ["127.0.0.2"],
    # A reverse zone that claims a name whose A record does not list the address.
    (reverse_name(LIAR), "PTR"): ["trusted.example.test"],
    ("trusted.example.test", "A"): ["192.0.2.9"],
}


@pytest.fixture
def dns() -> Iterator[LoopbackDNS]:
    with LoopbackDNS(RECORDS) as server:  # started by entering
        yield server


def dns_flag(dns: LoopbackDNS) -> list[str]:
    return ["--dns-server", f"127.0.0.1:{dns.port}"]


def env_from(address: str, source: str) -> dict[str, str]:
    """The command's environment, as seen by a client connecting from `source`."""
    with socket.create_connection(
        split_address(address), timeout=TIMEOUT, source_address=(source, 0)
    ) as sock:
        sock.shutdown(socket.SHUT_WR)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    pairs = (line.partition("=") for line in data.decode().splitlines())
    return {key: value for key, _, value in pairs}


def names(env: dict[str, str]) -> tuple[str | None, str | None]:
    return env.get("TCPREMOTEHOST"), env.get("TCPLOCALHOST")


def test_lookup_names_sets_confirmed_names(netserver_proc: ServerFactory, dns: LoopbackDNS) -> None:
    server = netserver_proc([*LISTEN, *dns_flag(dns), "--lookup-names", *ENV_COMMAND])
    env = env_from(server.addresses[0], CLIENT)
    assert env["TCPREMOTEIP"] == CLIENT
    assert names(env) == ("client.example.test", "server.example.test")


@pytest.mark.parametrize("source", [LIAR, NAMELESS], ids=["unconfirmed", "no PTR"])
def test_no_remote_host_without_a_confirmed_name(
    netserver_proc: ServerFactory, dns: LoopbackDNS, source: str
) -> None:
    """As tcpserver -p: a PTR name that does not map back to the client is dropped."""
    server = netserver_proc([*LISTEN, *dns_flag(dns), "--lookup-names", *ENV_COMMAND])
    env = env_from(server.addresses[0], source)
    assert env["TCPREMOTEIP"] == source
    assert names(env) == (None, "server.example.test")


def test_no_lookup_by_default_and_local_name_is_given(
    netserver_proc: ServerFactory, dns: LoopbackDNS
) -> None:
    server = netserver_proc([*LISTEN, *dns_flag(dns), "--local-name", "0", *ENV_COMMAND])
    env = env_from(server.addresses[0], CLIENT)
    assert names(env) == (None, "0")
    assert dns.queries == []


def test_local_name_given_is_not_looked_up(netserver_proc: ServerFactory, dns: LoopbackDNS) -> None:
    args = [*LISTEN, *dns_flag(dns), "--lookup-names", "--local-name", "mx.example", *ENV_COMMAND]
    server = netserver_proc(args)
    env = env_from(server.addresses[0], CLIENT)
    assert names(env) == ("client.example.test", "mx.example")
    assert (reverse_name("127.0.0.2").rstrip("."), "PTR") not in dns.queries


def test_name_an_allow_rule_confirmed_is_passed_on(
    netserver_proc: ServerFactory, dns: LoopbackDNS
) -> None:
    """No --lookup-names: the lookup the rule needed gives the name, without a second one."""
    args = [*LISTEN, *dns_flag(dns), "--allow", ".example.test", *ENV_COMMAND]
    server = netserver_proc(args)
    env = env_from(server.addresses[0], CLIENT)
    assert names(env) == ("client.example.test", None)
    ptr = [q for q in dns.queries if q[1] == "PTR"]
    assert ptr == [(reverse_name(CLIENT).rstrip("."), "PTR")]


def test_name_a_hosts_rule_looked_up_is_passed_on(
    netserver_proc: ServerFactory, dns: LoopbackDNS, tmp_path: Path
) -> None:
    allow, deny = tmp_path / "hosts.allow", tmp_path / "hosts.deny"
    allow.write_text("env: .example.test\n")
    deny.write_text("ALL: ALL\n")
    hosts = ["--hosts-allow", str(allow), "--hosts-deny", str(deny)]
    server = netserver_proc([*LISTEN, *dns_flag(dns), *hosts, *ENV_COMMAND])
    env = env_from(server.addresses[0], CLIENT)
    assert names(env) == ("client.example.test", None)


def test_a_twisted_command_gets_the_local_name_and_no_lookup(
    netserver_proc: ServerFactory, dns: LoopbackDNS, tmp_path: Path
) -> None:
    """As before the gates: --local-name reaches a command a hosts rule twisted to, and
    --lookup-names does not (the twist replaces the service before the names are filled)."""
    allow, deny = tmp_path / "hosts.allow", tmp_path / "hosts.deny"
    allow.write_text("ALL: ALL: twist /usr/bin/env\n")
    deny.write_text("")
    hosts = ["--hosts-allow", str(allow), "--hosts-deny", str(deny)]
    args = [*LISTEN, *dns_flag(dns), *hosts, "--lookup-names", "--local-name", "mx.example"]
    server = netserver_proc([*args, *ENV_COMMAND])
    env = env_from(server.addresses[0], CLIENT)
    assert env["TCPREMOTEIP"] == CLIENT
    assert names(env) == (None, "mx.example")
    assert [q for q in dns.queries if q[1] == "PTR"] == []


def test_lookup_names_is_refused_for_python_handlers() -> None:
    result = netserver("serve", "--lookup-names", "--handler", "examples.echo:main")
    assert result.returncode == 78, result.stderr
    assert "for commands" in result.stderr
