"""Running the load generators as processes, and checking a server answers before timing it.

The load generators run outside the orchestrating process so that nothing else shares
their event loop, and several of them can run at once. Each prints one JSON object.
"""

from __future__ import annotations

import json
import socket
import subprocess
import time
from dataclasses import dataclass
from typing import Any

from .procs import ROOT

PROBE_TIMEOUT = 5.0


@dataclass(frozen=True)
class Sample:
    """One measurement of one server: throughput and what it cost.

    `rate` is operations (requests or connections) per second. `server_us` is the
    server's CPU microseconds per operation, its children included (None if it could
    not be read). The `*_util` fields are CPU seconds per second of wall time, so 1.0 is
    one core fully busy: the server, the load generator(s), every *other* process on
    the machine in the same window, and time stolen by the hypervisor.
    """

    rate: float
    server_us: float | None
    server_util: float | None
    client_util: float
    other_util: float
    steal_util: float
    errors: int


def run_load(argvs: list[list[str]], timeout: float) -> list[dict[str, Any]]:
    """Start every load process at once, wait (at most `timeout` s), return their JSON."""
    procs = [
        subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for argv in argvs
    ]
    results: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=max(0.1, deadline - time.monotonic()))
            if proc.returncode != 0:
                raise RuntimeError(
                    f"load generator failed ({proc.returncode}): {err.decode()[-2000:]}"
                )
            results.append(json.loads(out))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return results


def combine(results: list[dict[str, Any]]) -> Sample:
    """Add the load processes' reports (`bench.cpu.Measured` as JSON) into one `Sample`.

    The server's and the machine's CPU come from the first report: every load process
    watched the same server over (nearly) the same window.
    """
    first = results[0]
    elapsed = max(r["elapsed"] for r in results)
    ops = sum(r["ops"] for r in results)
    server_cpu: float | None = first["server_cpu"]
    client_cpu = sum(r["client_cpu"] for r in results)
    other = first["machine_busy"] - client_cpu - (server_cpu or 0.0)
    return Sample(
        rate=ops / elapsed,
        server_us=None if server_cpu is None or ops == 0 else server_cpu / ops * 1e6,
        server_util=None if server_cpu is None else server_cpu / elapsed,
        client_util=client_cpu / elapsed,
        other_util=max(0.0, other / elapsed),
        steal_util=first["steal"] / elapsed,
        errors=sum(r["errors"] for r in results),
    )


def probe_echo(port: int) -> None:
    """One line must come back unchanged; RuntimeError otherwise."""
    with socket.create_connection(("127.0.0.1", port), timeout=PROBE_TIMEOUT) as sock:
        sock.sendall(b"probe\n")
        got = b""
        while not got.endswith(b"\n"):
            chunk = sock.recv(4096)
            if not chunk:
                break
            got += chunk
    if got != b"probe\n":
        raise RuntimeError(f"echo probe on port {port} got {got!r}")


def probe_read_all(port: int, expect: bytes) -> None:
    """The server must send exactly `expect` and close; RuntimeError otherwise."""
    with socket.create_connection(("127.0.0.1", port), timeout=PROBE_TIMEOUT) as sock:
        got = b""
        while chunk := sock.recv(4096):
            got += chunk
    if got != expect:
        raise RuntimeError(f"probe on port {port} got {got!r}, expected {expect!r}")
