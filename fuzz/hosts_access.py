"""Fuzz hosts.allow/hosts.deny parsing and matching (`netserver.tcpd`).

The input is a client host name (the attacker's: it comes from a PTR record, up to 253
characters), a NUL, then a table (the administrator's). Checked: parsing raises nothing
but `HostsSyntaxError`; deciding raises nothing but `NameNeeded` before the name is
known; the cost of a decision stays bounded (inputs slower than `SLOW` are written to
``slow-<sha256>``). ``/file`` patterns are not read: which files a table names is the
administrator's choice, not input.
"""

from __future__ import annotations

import time

import atheris
from common import keep_if_slow, run

with atheris.instrument_imports():
    from netserver.tcpd import parse
    from netserver.tcpd.access import HostsAccess
    from netserver.tcpd.match import HostInfo, NameNeeded, Request

SLOW = 0.2  # seconds for one decision, instrumented


def _no_files(rules: object, warnings: object) -> dict[str, tuple[str, ...]]:
    return {}


parse.pattern_files = _no_files


def one_input(data: bytes) -> None:
    raw_name, _, raw_table = data.partition(b"\0")
    name = raw_name[:253].decode("utf-8", "replace")
    addr = ("192.0.2.7", "::1", "10.1.2.3")[len(raw_name) % 3]
    text = raw_table.decode("utf-8", "replace")
    try:
        allow = parse.parse_table("hosts.allow", text)
    except parse.HostsSyntaxError:
        return
    access = HostsAccess(allow, parse.parse_table("hosts.deny", ""))
    request = Request("smtpd", HostInfo("client", addr, 25), HostInfo("server", "127.0.0.1", 25))
    started = time.process_time()
    try:
        access.decide(request)
    except NameNeeded as need:
        host = request.client if need.role == "client" else request.server
        host.resolved = name if need.role == "client" else "mx.example"
        try:
            access.decide(request)
        except NameNeeded as again:
            host = request.client if again.role == "client" else request.server
            host.resolved = name if again.role == "client" else "mx.example"
            access.decide(request)
    keep_if_slow(data, time.process_time() - started, SLOW)


if __name__ == "__main__":
    run(one_input)
