"""The real HAProxy in front of leafmail nodes, as a child of the test, all on loopback.

`Balancer` writes a config like contrib/haproxy/haproxy.cfg (mode tcp, send-proxy-v2,
option smtpchk), hands HAProxy a listening socket the test bound to port 0 (``bind
fd@N``: no port race), and runs it in the foreground. The balancer connects to the
nodes from its own address (`BALANCER_IP`), so a node can trust exactly that address
with ``proxy_from`` and still see direct clients from 127.0.0.1 as themselves.

Readiness and node state come from HAProxy itself: its admin socket's ``show stat``
says which servers its health checks see UP; `wait_state` asks it in a loop bounded in
time, never a fixed sleep.
"""

from __future__ import annotations

import csv
import io
import shutil
import socket
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

import pytest

BALANCER_IP = "127.0.0.9"
STATE_TIMEOUT = 15.0
HAPROXY = shutil.which("haproxy") or "/usr/sbin/haproxy"


def need_haproxy() -> None:
    """Skip when HAProxy is not installed (.ci/run installs Debian's)."""
    if not Path(HAPROXY).exists():
        pytest.skip("haproxy is not installed (apt-get install haproxy)")


def config_text(
    nodes: Sequence[tuple[str, int]], listen_fd: int, admin: Path, *, smtpchk: bool = True
) -> str:
    """HAProxy's config for `nodes` ("a", "b", ...), as the contrib file has it.

    Without `smtpchk` (an implicit-TLS port, where EHLO in clear would fail) the health
    check only connects. Checks run every 100 ms and one failure marks a node DOWN, so a
    node that is gone (its port refuses) is seen at once; but a check may wait for the
    greeting and the EHLO reply for `timeout check`: without it the whole check had
    `inter`, 100 ms, and a node slow to answer on a loaded machine was marked DOWN and
    HAProxy closed the client's connection (a stress run saw "Connection unexpectedly
    closed" for the first client of the per-source test).
    """
    check = "    option smtpchk EHLO balancer.test\n" if smtpchk else ""
    servers = "\n".join(
        f"    server {chr(ord('a') + i)} {host}:{port} send-proxy-v2 check check-send-proxy"
        f" source {BALANCER_IP}"
        for i, (host, port) in enumerate(nodes)
    )
    return f"""\
global
    maxconn 1000
    stats socket {admin} mode 600 level admin

defaults
    mode tcp
    timeout connect 2s
    timeout check 5s
    timeout client 60s
    timeout server 60s
    retries 3
    option redispatch

frontend smtp
    bind fd@{listen_fd}
    default_backend nodes

backend nodes
    balance roundrobin
{check}    default-server inter 100ms fall 1 rise 1
{servers}
"""


class Balancer:
    """A running HAProxy, the address clients connect to, and its admin socket."""

    def __init__(
        self, tmp_path: Path, nodes: Sequence[tuple[str, int]], *, smtpchk: bool = True
    ) -> None:
        need_haproxy()
        self.nodes = list(nodes)
        self.admin = tmp_path / "haproxy-admin.sock"
        self.listener = socket.create_server(("127.0.0.1", 0), backlog=128)
        self.address: tuple[str, int] = self.listener.getsockname()[:2]
        fd = self.listener.fileno()
        self.config = tmp_path / "haproxy.cfg"
        self.config.write_text(config_text(nodes, fd, self.admin, smtpchk=smtpchk))
        self.log_path = tmp_path / "haproxy.log"
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [HAPROXY, "-db", "-f", str(self.config)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                pass_fds=(fd,),
            )
        self.listener.close()  # HAProxy has its own copy now
        self.wait_state({name: "UP" for name in self.names})

    @property
    def names(self) -> list[str]:
        return [chr(ord("a") + i) for i in range(len(self.nodes))]

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def states(self) -> dict[str, str]:
        """Each server's status as HAProxy's checks see it ("UP", "DOWN", ...)."""
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(2.0)
            sock.connect(str(self.admin))
            sock.sendall(b"show stat\n")
            data = b""
            while chunk := sock.recv(65536):
                data += chunk
        rows = csv.DictReader(io.StringIO(data.decode().lstrip("# ")))
        return {
            row["svname"]: row["status"].split()[0]
            for row in rows
            if row["pxname"] == "nodes" and row["svname"] in self.names
        }

    def wait_state(self, want: dict[str, str], timeout: float = STATE_TIMEOUT) -> None:
        """Until HAProxy reports every server of `want` in that state (bounded)."""
        deadline = time.monotonic() + timeout
        seen: dict[str, str] = {}
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"haproxy exited {self.proc.returncode}: {self.log()}")
            try:
                seen = self.states()
            except OSError:  # the admin socket is not there yet
                seen = {}
            if all(seen.get(name) == state for name, state in want.items()):
                return
            time.sleep(0.02)
        raise AssertionError(f"haproxy servers {seen}, want {want}: {self.log()}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
