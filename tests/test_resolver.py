"""The one resolver protocol of the tree (netserver.resolver), against a loopback DNS server.

`DnsResolver` tells "there is none" ([] / an empty Forward) apart from "DNS could not
tell" (None), and `confirmed_names` carries that through, so the access rules (no names),
tcpd (unknown / paranoid) and leafmail's reverse-DNS check (never refuse for our own DNS
trouble) all build on the same two lookups. No other module defines the basics again.
"""

from __future__ import annotations

import ast
import asyncio
from ipaddress import ip_address
from pathlib import Path

from dnsserver import LoopbackDNS, reverse_name

from netserver.dnsresolver import DnsResolver
from netserver.resolver import Forward, confirmed_names
from netserver.tcpd.names import ResolverNames

SRC = Path(__file__).resolve().parent.parent / "src"

RECORDS = {
    (reverse_name("192.0.2.10"), "PTR"): ["good.example.test"],
    ("good.example.test", "A"): ["192.0.2.10"],
    (reverse_name("192.0.2.20"), "PTR"): ["broken.example.test"],
    (reverse_name("192.0.2.30"), "PTR"): ["liar.example.test"],
    ("liar.example.test", "A"): ["192.0.2.99"],
}
SERVFAIL = [reverse_name("192.0.2.40"), "broken.example.test"]


def test_none_is_told_apart_from_could_not_tell() -> None:
    with LoopbackDNS(RECORDS, servfail=SERVFAIL) as server:
        dns = DnsResolver(["127.0.0.1"], server.port, timeout=2.0)

        async def ask() -> list[object]:
            return [
                await dns.reverse(ip_address("192.0.2.10")),
                await dns.reverse(ip_address("192.0.2.50")),  # NXDOMAIN
                await dns.reverse(ip_address("192.0.2.40")),  # SERVFAIL
                await dns.forward("good.example.test", 4),
                await dns.forward("nowhere.example.test", 4),
                await dns.forward("broken.example.test", 4),
            ]

        got = asyncio.run(ask())
    assert got == [
        ["good.example.test"],
        [],
        None,
        Forward("good.example.test", (ip_address("192.0.2.10"),)),
        Forward(),
        None,
    ]


def test_confirmed_names_and_tcpd_names_share_the_lookups() -> None:
    with LoopbackDNS(RECORDS, servfail=SERVFAIL) as server:
        dns = DnsResolver(["127.0.0.1"], server.port, timeout=2.0)
        tcpd = ResolverNames(dns)

        async def ask(address: str) -> tuple[frozenset[str] | None, str]:
            ip = ip_address(address)
            return await confirmed_names(dns, ip), await tcpd.hostname(ip)

        results = {a: asyncio.run(ask(a)) for a in ("192.0.2.10", "192.0.2.20", "192.0.2.30")}
        results["192.0.2.40"] = asyncio.run(ask("192.0.2.40"))
    assert results == {
        "192.0.2.10": (frozenset({"good.example.test"}), "good.example.test"),
        "192.0.2.20": (None, "paranoid"),  # the forward lookup failed: cannot tell
        "192.0.2.30": (frozenset(), "paranoid"),  # the PTR lies
        "192.0.2.40": (None, "unknown"),  # the reverse lookup failed
    }


def _defines_lookup_basics(tree: ast.Module) -> list[str]:
    """Classes or functions that do what netserver.resolver does: a PTR lookup protocol,
    or confirming a PTR name by a forward lookup."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef):
            methods = {
                n.name for n in node.body if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)
            }
            if methods & {"reverse", "confirmed_names", "hostname"} and "Protocol" in ast.unparse(
                node
            ):
                found.append(node.name)
        if isinstance(node, ast.Attribute) and node.attr == "from_address":
            found.append("dns.reversename.from_address")
    return found


def test_no_other_module_redefines_the_basics() -> None:
    """One protocol: PTR lookups and their protocols live in netserver's resolver
    modules (and tcpd's verdict view of them); leafmail builds on them."""
    allowed = {
        SRC / "netserver" / "resolver.py": ["Resolver"],
        SRC / "netserver" / "dnsresolver.py": ["dns.reversename.from_address"],
        SRC / "netserver" / "tcpd" / "names.py": ["HostNames"],
        # DNSBL zones are keyed by the reversed address: a record lookup, not a PTR one.
        SRC / "leafmail" / "checks" / "lookup.py": ["dns.reversename.from_address"],
    }
    for path in sorted(SRC.rglob("*.py")):
        found = _defines_lookup_basics(ast.parse(path.read_text(encoding="utf-8")))
        assert found == allowed.get(path, []), path
