"""Socket activation: the server adopts listeners passed as systemd does (LISTEN_FDS...).

A launcher (sd_launch.py) puts sockets this test bound on descriptors 3.. and sets
LISTEN_FDS, LISTEN_PID (its own pid, which exec keeps) and LISTEN_FDNAMES, then execs
the server; the READY line must name exactly the sockets the test bound.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import ROOT, RunningServer, launch_with_ready_fd
from inetd_support import current_user, write_config
from netclient import exchange

LAUNCH = str(Path(__file__).with_name("sd_launch.py"))
NETSERVER = [sys.executable, "-m", "netserver.cli"]


@pytest.fixture
def listeners() -> Iterator[list[socket.socket]]:
    socks = []
    for _ in range(2):
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        socks.append(sock)
    yield socks
    for sock in socks:
        sock.close()


def _address(sock: socket.socket) -> str:
    host, port = sock.getsockname()
    return f"{host}:{port}"


def activate(
    tmp_path: Path, socks: list[socket.socket], names: str, args: list[str]
) -> RunningServer:
    """Run NETSERVER ARGS ({ready} = the ready fd) under the launcher with `socks`."""
    fds = [str(s.fileno()) for s in socks]
    proc, addresses = launch_with_ready_fd(
        lambda fd: [sys.executable, LAUNCH, str(fd), names, *fds, "--", *NETSERVER, *args],
        tmp_path / "activated.log",
        dict(os.environ),
        pass_fds=tuple(s.fileno() for s in socks),
    )
    return RunningServer(proc, addresses, tmp_path / "activated.log")


def test_run_picks_each_services_socket_by_name(
    tmp_path: Path, listeners: list[socket.socket]
) -> None:
    me = current_user()
    config = write_config(
        tmp_path,
        f'[[service]]\nname = "greet"\nlisten = ["systemd:greet"]\nuser = "{me}"\n'
        'command = ["/bin/echo", "hello"]\n'
        f'[[service]]\nname = "echo"\nlisten = ["systemd:echo"]\nuser = "{me}"\n'
        'handler = "examples.echo:main"\n',
    )
    echo_sock, greet_sock = listeners
    server = activate(
        tmp_path, listeners, "echo:greet", ["run", "--ready-fd", "{ready}", str(config)]
    )
    try:
        assert server.addresses == [_address(greet_sock), _address(echo_sock)]
        assert exchange(_address(greet_sock)) == b"hello\n"
        assert exchange(_address(echo_sock), b"ping\n") == b"ping\n"
    finally:
        assert server.stop() == 0


def test_serve_takes_every_inherited_socket(tmp_path: Path, listeners: list[socket.socket]) -> None:
    args = ["serve", "--ready-fd", "{ready}", "--listen", "systemd", "--", "/bin/echo", "hi"]
    server = activate(tmp_path, listeners, "-", args)
    try:
        assert server.addresses == [_address(s) for s in listeners]
        for sock in listeners:
            assert exchange(_address(sock)) == b"hi\n"
    finally:
        server.stop()


def test_unknown_name_is_a_config_error(listeners: list[socket.socket]) -> None:
    fds = [str(s.fileno()) for s in listeners]
    serve = ["serve", "--listen", "systemd:nosuch", "--", "/bin/true"]
    result = subprocess.run(
        [sys.executable, LAUNCH, "0", "a:b", *fds, "--", *NETSERVER, *serve],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=20,
        pass_fds=tuple(int(f) for f in fds),
        check=False,
    )
    assert result.returncode == 78, result.stderr
    assert "nosuch" in result.stderr and "a, b" in result.stderr


def test_variables_for_another_process_are_ignored(
    tmp_path: Path, listeners: list[socket.socket]
) -> None:
    """LISTEN_PID naming someone else: the descriptors are not ours to take."""
    result = subprocess.run(
        [*NETSERVER, "serve", "--listen", "systemd", "--", "/bin/true"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=20,
        env={**os.environ, "LISTEN_FDS": "1", "LISTEN_PID": "1"},
        check=False,
    )
    assert result.returncode == 78
    assert "LISTEN_FDS" in result.stderr
