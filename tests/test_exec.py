"""A command per connection: its environment, descriptors, signals, stderr and log line."""

from __future__ import annotations

import json
import os
import signal
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import RunningServer, ServerFactory, start_server
from netclient import Client, exchange, split_address

ENV_COMMAND = ["--", "env"]
LIST_FDS = ["--", "sh", "-c", "ls /proc/$$/fd"]  # the shell's own fds, while ls runs


def parse_env(output: bytes) -> dict[str, str]:
    pairs = (line.partition("=") for line in output.decode().splitlines())
    return {key: value for key, _, value in pairs}


def conn_lines(log: str) -> list[str]:
    return [line for line in log.splitlines() if line.startswith("netserver: conn ")]


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A directory with a short path: unix socket paths are limited to ~107 bytes."""
    with tempfile.TemporaryDirectory(prefix="ns-") as name:
        yield Path(name)


# -- the ucspi-tcp environment -------------------------------------------------------


@pytest.mark.parametrize(("listen", "proto"), [("127.0.0.1:0", "TCP"), ("[::1]:0", "TCP6")])
def test_tcp_environment_matches_real_addresses(
    netserver_proc: ServerFactory, listen: str, proto: str
) -> None:
    server = netserver_proc(["--listen", listen, *ENV_COMMAND])
    with Client(server.addresses[0]) as client:
        local_ip, local_port = client.sock.getpeername()[:2]
        remote_ip, remote_port = client.sock.getsockname()[:2]
        client.shut_write()
        env = parse_env(client.read_all())
    assert env["PROTO"] == proto
    assert (env["TCPLOCALIP"], env["TCPLOCALPORT"]) == (local_ip, str(local_port))
    assert (env["TCPREMOTEIP"], env["TCPREMOTEPORT"]) == (remote_ip, str(remote_port))
    assert (env["TCPLOCALIP"], int(env["TCPLOCALPORT"])) == split_address(server.addresses[0])
    assert not any(key.startswith("UNIX") for key in env)


def test_dual_stack_environment_shows_plain_ipv4(netserver_proc: ServerFactory) -> None:
    server = netserver_proc(["--listen", ":0", *ENV_COMMAND])
    with Client(server.addresses[0], host="127.0.0.1") as client:
        remote_port = client.sock.getsockname()[1]
        client.shut_write()
        env = parse_env(client.read_all())
    assert env["PROTO"] == "TCP"
    assert env["TCPREMOTEIP"] == "127.0.0.1"
    assert env["TCPREMOTEPORT"] == str(remote_port)
    assert env["TCPLOCALIP"] == "127.0.0.1"


def test_unix_environment(netserver_proc: ServerFactory, short_dir: Path) -> None:
    path = short_dir / "env.sock"
    server = netserver_proc(["--listen", f"unix:{path}", *ENV_COMMAND])
    env = parse_env(exchange(server.addresses[0]))
    assert env["PROTO"] == "UNIX"
    assert env["UNIXLOCALPATH"] == str(path)
    assert env["UNIXREMOTEPID"] == str(os.getpid())
    assert env["UNIXREMOTEUID"] == str(os.getuid())
    assert env["UNIXREMOTEGID"] == str(os.getgid())
    assert not any(key.startswith("TCP") for key in env)


def test_stale_remote_names_are_not_passed_on(netserver_proc: ServerFactory) -> None:
    """A server started under tcpserver must not hand its own client's name to ours."""
    stale = {"TCPREMOTEHOST": "evil.example", "TCPREMOTEINFO": "mallory"}
    server = netserver_proc(["--listen", "127.0.0.1:0", *ENV_COMMAND], env=stale)
    env = parse_env(exchange(server.addresses[0]))
    assert "TCPREMOTEHOST" not in env
    assert "TCPREMOTEINFO" not in env
    assert env["TCPREMOTEIP"] == "127.0.0.1"


def test_no_stale_ucspi_variables_of_the_other_family(
    netserver_proc: ServerFactory, short_dir: Path
) -> None:
    stale = {
        "TCPREMOTEIP": "192.0.2.66",
        "TCPREMOTEPORT": "6666",
        "TCPLOCALIP": "192.0.2.1",
        "TCPLOCALPORT": "25",
        "UNIXLOCALPATH": "/stale.sock",
        "UNIXREMOTEGID": "4242",
    }
    path = short_dir / "env.sock"
    server = netserver_proc(
        ["--listen", f"unix:{path}", "--listen", "127.0.0.1:0", *ENV_COMMAND], env=stale
    )
    unix_env = parse_env(exchange(server.addresses[0]))
    tcp_env = parse_env(exchange(server.addresses[1]))
    assert unix_env["PROTO"] == "UNIX" and tcp_env["PROTO"] == "TCP"
    assert not any(key.startswith("TCP") for key in unix_env)
    assert not any(key.startswith("UNIX") for key in tcp_env)


# -- descriptors and signals -----------------------------------------------------------


def start_leaking_fd(args: list[str], tmp_path: Path) -> tuple[RunningServer, int]:
    """Like conftest.start_server, but the server also inherits an open pipe.

    A parent that leaks a descriptor to the server must not leak it through to every
    command the server runs.
    """
    leak_r, leak_w = os.pipe()
    try:
        return start_server(args, tmp_path, pass_fds=(leak_r,)), leak_r
    finally:
        os.close(leak_r)
        os.close(leak_w)


@pytest.mark.parametrize("loop", ("asyncio", "uvloop"))
def test_command_gets_only_fds_0_1_2(tmp_path: Path, loop: str) -> None:
    server, leaked = start_leaking_fd(
        ["--listen", "127.0.0.1:0", "--loop", loop, *LIST_FDS], tmp_path
    )
    try:
        assert str(leaked) in os.listdir(f"/proc/{server.proc.pid}/fd")  # the leak is real
        # A second client open meanwhile: its socket must not reach the first's command.
        with Client(server.addresses[0]) as other:
            fds = exchange(server.addresses[0]).split()
            other.shut_write()
            assert sorted(other.read_all().split()) == [b"0", b"1", b"2"]
        assert sorted(fds) == [b"0", b"1", b"2"]
    finally:
        assert server.stop() == 0


@pytest.mark.parametrize("mode", ("fork", "thread", "async"))
def test_command_has_default_signals(netserver_proc: ServerFactory, mode: str) -> None:
    """Python ignores SIGPIPE and SIGXFSZ; a command must not inherit that, nor a mask."""
    server = netserver_proc(
        [
            "--listen",
            "127.0.0.1:0",
            "--mode",
            mode,
            "--",
            "grep",
            "-E",
            "^Sig(Ign|Blk):",
            "/proc/self/status",
        ]
    )
    lines = exchange(server.addresses[0]).decode().splitlines()
    status = {key: int(value, 16) for key, _, value in (line.partition(":") for line in lines)}
    for sig in (signal.SIGPIPE, signal.SIGXFSZ):
        assert not status["SigIgn"] & (1 << (sig - 1)), f"{sig.name} ignored"
    assert status["SigBlk"] == 0


# -- stderr and the log line -------------------------------------------------------------


def test_command_stderr_goes_to_the_log(netserver_proc: ServerFactory) -> None:
    server = netserver_proc(
        ["--listen", "127.0.0.1:0", "--", "sh", "-c", "echo to-stderr >&2; echo to-client"]
    )
    assert exchange(server.addresses[0]) == b"to-client\n"
    assert server.stop() == 0
    assert "to-stderr\n" in server.log()


def test_text_log_line(netserver_proc: ServerFactory) -> None:
    server = netserver_proc(["--listen", "127.0.0.1:0", "--mode", "thread", "--", "cat"])
    with Client(server.addresses[0]) as client:
        client_port = client.sock.getsockname()[1]
        client.send(b"hello\n")
        client.shut_write()
        assert client.read_all() == b"hello\n"
    assert server.stop() == 0
    (line,) = conn_lines(server.log())
    fields = dict(part.split("=", 1) for part in line.split()[2:])
    assert fields["peer"] == f"127.0.0.1:{client_port}"
    assert fields["local"] == server.addresses[0]
    assert fields["mode"] == "thread"
    assert 0 <= float(fields["duration"]) < 5
    assert (fields["in"], fields["out"], fields["status"]) == ("6", "6", "ok")


@pytest.mark.parametrize(
    ("script", "status"),
    [("exit 3", "exit-3"), ("kill -KILL $$", "signal-9"), ("exit 0", "ok")],
)
def test_log_status_of_command_exit(
    netserver_proc: ServerFactory, script: str, status: str
) -> None:
    server = netserver_proc(["--listen", "127.0.0.1:0", "--", "sh", "-c", script])
    assert exchange(server.addresses[0]) == b""
    assert server.stop() == 0
    (line,) = conn_lines(server.log())
    assert line.endswith(f"status={status}")


def test_json_log(netserver_proc: ServerFactory) -> None:
    server = netserver_proc(
        ["--listen", "127.0.0.1:0", "--log-format", "json", "--", "sh", "-c", "cat; echo oops >&2"]
    )
    with Client(server.addresses[0]) as client:
        client_port = client.sock.getsockname()[1]
        client.send(b"four")
        client.shut_write()
        assert client.read_all() == b"four"
    assert server.stop() == 0
    records = []
    for line in server.log().splitlines():
        if line == "oops":  # the command's own stderr, passed through unchanged
            continue
        records.append(json.loads(line))
    (conn,) = [r for r in records if r["event"] == "conn"]
    assert conn["peer"] == f"127.0.0.1:{client_port}"
    assert conn["local"] == server.addresses[0]
    assert conn["mode"] == "fork"
    assert isinstance(conn["duration"], float)
    assert (conn["in"], conn["out"], conn["status"]) == (4, 4, "ok")
    assert {r["event"] for r in records} >= {"info", "conn"}
