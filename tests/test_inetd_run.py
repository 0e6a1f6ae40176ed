"""`netserver run CONFIG.toml`: many services in one supervisor, real processes and sockets.

Each test starts the real supervisor and waits for its READY line (written once every
service listens). Services run as the current user (`user = <us>`; for root that is the
explicit `user = "root"` the supervisor demands).
"""

from __future__ import annotations

import os
import select
import signal
import socket
import time
from pathlib import Path

import pytest
from inetd_support import current_user, run_fails, service_pid, start_run, write_config
from netclient import Client, exchange

from netserver.errors import EX_CONFIG

ME = current_user()


def service(name: str, body: str, listen: str = "127.0.0.1:0") -> str:
    return f'[[service]]\nname = "{name}"\nlisten = ["{listen}"]\nuser = "{ME}"\n{body}\n'


ECHO = 'handler = "examples.echo:main"'


def refusal(address: str) -> bytes:
    """What a refused client reads; it sends nothing, so the close is clean (no RST race)."""
    with Client(address) as client:
        return client.read_all()


def test_two_services_serve_at_once_and_env_reaches_the_command(tmp_path: Path) -> None:
    config = write_config(
        tmp_path,
        service("echo", ECHO)
        + service(
            "greet",
            'command = ["/bin/sh", "-c", "echo hello $GREETING"]\nenv = { GREETING = "world" }',
        ),
    )
    server = start_run(config, tmp_path)
    try:
        echo_addr, greet_addr = server.addresses
        with Client(echo_addr) as echo:  # held open while the other service answers
            assert exchange(greet_addr) == b"hello world\n"
            echo.send(b"ping\n")
            assert echo.read_line() == b"ping\n"
    finally:
        assert server.stop() == 0
    assert "all services started" in server.log()


def test_a_service_that_cannot_bind_does_not_stop_the_others(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = write_config(
            tmp_path, service("busy", ECHO, f"127.0.0.1:{port}") + service("echo", ECHO)
        )
        server = start_run(config, tmp_path)
        try:
            assert len(server.addresses) == 1
            assert exchange(server.addresses[0], b"still here\n") == b"still here\n"
        finally:
            server.stop()
    log = server.log()
    assert "service not started" in log and "service=busy" in log


def _wait_gone(pid: int) -> None:
    """Block until process `pid` has ended (a pidfd becomes readable), not by sleeping."""
    fd = os.pidfd_open(pid)
    try:
        os.kill(pid, signal.SIGKILL)
        ready, _, _ = select.select([fd], [], [], 10)
        assert ready, f"pid {pid} did not die"
    finally:
        os.close(fd)


def test_a_crashed_service_is_restarted_on_the_same_socket(tmp_path: Path) -> None:
    config = write_config(tmp_path, service("echo", ECHO))
    server = start_run(config, tmp_path)
    try:
        first = service_pid(server.log(), "echo")
        _wait_gone(first)
        # The supervisor kept the listening socket: this waits in the backlog for the
        # restarted service instead of being refused.
        assert exchange(server.addresses[0], b"again\n") == b"again\n"
        assert service_pid(server.log(), "echo") != first
    finally:
        server.stop()
    assert "service exited, restarting" in server.log()


def test_per_source_limit_sends_the_banner(tmp_path: Path) -> None:
    body = f'{ECHO}\nper_source = 1\nbanner = "busy, try later"'
    server = start_run(write_config(tmp_path, service("echo", body)), tmp_path)
    try:
        with Client(server.addresses[0]) as first:
            first.send(b"one\n")
            assert first.read_line() == b"one\n"
            assert refusal(server.addresses[0]) == b"busy, try later\r\n"
    finally:
        server.stop()


def test_each_cause_gets_its_banner_and_the_rest_the_common_one(tmp_path: Path) -> None:
    """banner_limit and banner_access beat banner for their cause (netserver.refusals)."""
    body = f'{ECHO}\nper_source = 1\nbanner = "go away"\nbanner_limit = "421 busy"'
    denied = f'{ECHO}\ndeny = ["127.0.0.1"]\nbanner = "go away"\nbanner_access = "554 denied"'
    error = f'{ECHO}\ndeny = ["127.0.0.1"]\nbanner = "go away"\nbanner_error = "421 error"'
    config = service("busy", body) + service("denied", denied) + service("other", error)
    server = start_run(write_config(tmp_path, config), tmp_path)
    try:
        busy, refusing, other = server.addresses
        with Client(busy) as first:
            first.send(b"one\n")
            assert first.read_line() == b"one\n"
            assert refusal(busy) == b"421 busy\r\n"
        assert refusal(refusing) == b"554 denied\r\n"
        assert refusal(other) == b"go away\r\n"  # a rule's refusal: banner_error is not its
    finally:
        server.stop()


def test_an_empty_banner_for_a_cause_is_a_config_error(tmp_path: Path) -> None:
    config = write_config(tmp_path, service("echo", f'{ECHO}\nbanner_limit = ""'))
    done = run_fails(config)
    assert done.returncode == EX_CONFIG
    assert "banner_limit: must be a non-empty string" in done.stderr


def test_a_banner_that_cannot_be_sent_is_a_config_error(tmp_path: Path) -> None:
    """As --refuse-*: over refusals.MAX_LINE_OCTETS, or a control character."""
    config = write_config(tmp_path, service("echo", f'{ECHO}\nbanner_access = "{"x" * 1001}"'))
    done = run_fails(config)
    assert done.returncode == EX_CONFIG
    assert "banner_access: 1001 octets, more than 1000" in done.stderr
    (tmp_path / "banner.txt").write_text("554 a\x07b\n")
    body = f"{ECHO}\nbanner_file = '{tmp_path / 'banner.txt'}'"
    done = run_fails(write_config(tmp_path, service("echo", body)))
    assert done.returncode == EX_CONFIG
    assert "banner_file: holds a control character" in done.stderr


def test_instances_caps_concurrent_connections(tmp_path: Path) -> None:
    body = f"{ECHO}\ninstances = 1"
    server = start_run(write_config(tmp_path, service("echo", body)), tmp_path)
    try:
        first = Client(server.addresses[0])
        first.send(b"one\n")
        assert first.read_line() == b"one\n"
        with Client(server.addresses[0]) as second:
            second.send(b"two\n")
            second.sock.settimeout(0.5)
            with pytest.raises(TimeoutError):  # waiting in the backlog, not served
                second.sock.recv(10)
            first.close()
            second.sock.settimeout(5)
            assert second.read_line() == b"two\n"
    finally:
        server.stop()


def test_cps_pauses_the_service_after_a_burst(tmp_path: Path) -> None:
    # A command that needs no input: the client only reads, so a refusal is a clean close.
    body = 'command = ["/bin/echo", "ok"]\ncps = "2 30"\nbanner = "slow down"'
    server = start_run(write_config(tmp_path, service("ok", body)), tmp_path)
    try:
        replies = []
        for _ in range(4):
            with Client(server.addresses[0]) as client:
                replies.append(client.read_all())
    finally:
        server.stop()
    assert replies[:2] == [b"ok\n", b"ok\n"]
    assert replies[2:] == [b"slow down\r\n", b"slow down\r\n"]


def test_denied_client_gets_the_banner_file(tmp_path: Path) -> None:
    (tmp_path / "banner.txt").write_text("no entry\n")
    body = f'{ECHO}\ndeny = ["127.0.0.1"]\nbanner_file = "banner.txt"'
    server = start_run(write_config(tmp_path, service("echo", body)), tmp_path)
    try:
        assert refusal(server.addresses[0]) == b"no entry\r\n"
    finally:
        server.stop()


def test_sighup_is_forwarded_and_services_stay_up(tmp_path: Path) -> None:
    rules = tmp_path / "hosts.deny"
    rules.write_text("")
    body = f'{ECHO}\nhosts_deny = "hosts.deny"\nbanner = "denied"'
    server = start_run(write_config(tmp_path, service("echo", body)), tmp_path)
    try:
        assert exchange(server.addresses[0], b"a\n") == b"a\n"
        rules.write_text("echo: ALL\n")
        pid = service_pid(server.log(), "echo")
        server.signal(signal.SIGHUP)
        # The reload is logged by the service; read the log until it appears (20 s at
        # most: it comes at once on a quiet machine, 10 s was the bound under load).
        reply = b"a\n"
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if "reloaded" in server.log():
                reply = refusal(server.addresses[0])
                break
            select.select([], [], [], 0.05)
        assert reply == b"denied\r\n"
        assert service_pid(server.log(), "echo") == pid
    finally:
        assert server.stop() == 0


# -- bad configurations: one line, file + service + key, exit 78 -----------------------------
BAD = [
    ("unknown key", f"{ECHO}\nper_sourse = 5", "per_sourse", 6),
    ("bad address", ECHO, "listen", 3),
    ("missing file", f'{ECHO}\nhosts_allow = "nowhere.allow"', "hosts_allow", 6),
    ("missing cert", f'{ECHO}\ntls_cert = "nowhere.pem"', "tls_cert", 6),
    ("bad cps", f'{ECHO}\ncps = "fast"', "cps", 6),
    ("quiet not a boolean", f"{ECHO}\nquiet = 1", "quiet", 6),
    ("unknown user", 'handler = "examples.echo:main"\nuser = "no-such-user-x"', "user", 5),
    ("bad handler", 'handler = "no_such_module_x:main"', "handler", 5),
]


@pytest.mark.parametrize(("case", "body", "key", "line"), BAD, ids=[b[0] for b in BAD])
def test_bad_config_is_one_line_naming_file_service_key(
    tmp_path: Path, case: str, body: str, key: str, line: int
) -> None:
    listen = "127.0.0.1:99999" if case == "bad address" else "127.0.0.1:0"
    text = f'[[service]]\nname = "svc"\nlisten = ["{listen}"]\n'
    text += body if "user" in body else f'user = "{ME}"\n{body}'
    config = write_config(tmp_path, text + "\n")
    result = run_fails(config)
    assert result.returncode == EX_CONFIG, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert str(config) in lines[0] and "'svc'" in lines[0] and key in lines[0]
    if line:
        assert f"{config}:{line}:" in lines[0]


def test_toml_syntax_error_names_the_line(tmp_path: Path) -> None:
    config = write_config(tmp_path, '[[service]]\nname = "x"\nlisten = [1,,]\nmode = "fork"\n')
    result = run_fails(config)
    assert result.returncode == EX_CONFIG
    assert str(config) in result.stderr and "line" in result.stderr
    assert len(result.stderr.splitlines()) == 1


def test_unknown_top_level_key(tmp_path: Path) -> None:
    result = run_fails(write_config(tmp_path, 'services = 1\n[[service]]\nname = "x"\n'))
    assert result.returncode == EX_CONFIG
    assert "'services'" in result.stderr


def test_cps_window_and_pause_with_a_fake_clock() -> None:
    """xinetd cps: a 3rd connection within a second pauses the service for WAIT seconds."""
    from netserver.admit.limits import Admission
    from netserver.endpoint import Endpoint
    from netserver.limits import Limits

    now = [100.0]
    admission = Admission(Limits(service_rate=2, service_pause=10), lambda: now[0])
    peer = Endpoint.from_sockaddr(socket.AF_INET, ("192.0.2.1", 1000))
    assert admission.admit(peer) is None and admission.admit(peer) is None
    assert "paused for 10s" in (admission.admit(peer) or "")
    now[0] += 9.9
    assert admission.admit(peer) is not None
    now[0] += 0.2
    assert admission.admit(peer) is None


def test_netserver_run_serves_with_durations_written_with_units(tmp_path: Path) -> None:
    """The real supervisor: "5m" starts a service, and a "1s" idle timeout closes."""
    config = write_config(
        tmp_path,
        f'[[service]]\nname = "slow"\nlisten = ["127.0.0.1:0"]\nuser = "{ME}"\n{ECHO}\n'
        'timeout = "5m"\ncps = 100\ncps_wait = "30s"\n'
        f'[[service]]\nname = "quick"\nlisten = ["127.0.0.1:0"]\nuser = "{ME}"\n{ECHO}\n'
        'timeout = "1s"\n',
    )
    server = start_run(config, tmp_path)
    try:
        slow, quick = server.addresses
        assert exchange(slow, b"five minutes\n") == b"five minutes\n"
        with Client(quick) as idle:  # says nothing: closed by the 1 s idle timeout
            assert idle.read_all() == b""
    finally:
        assert server.stop() == 0


GREET = 'command = ["/bin/echo", "hi"]'


def conn_lines(log: str, address: str) -> int:
    """How many connection lines name `address` as the local end."""
    return sum(
        1 for line in log.splitlines() if "netserver: conn " in line and f"local={address} " in line
    )


def test_a_quiet_service_writes_no_connection_lines(tmp_path: Path) -> None:
    """``quiet = true``: that service's served connections are not logged, the other
    service's are. Lines are counted after the stop, so every line a process would have
    written is there."""
    config = write_config(
        tmp_path, service("loud", GREET) + service("hush", f"{GREET}\nquiet = true")
    )
    server = start_run(config, tmp_path)
    try:
        loud, hush = server.addresses
        for address in (loud, loud, hush, hush):
            assert exchange(address) == b"hi\n"
    finally:
        assert server.stop() == 0
    log = server.log()
    assert conn_lines(log, loud) == 2, log
    assert conn_lines(log, hush) == 0, log


def test_run_quiet_drops_every_services_connection_lines(tmp_path: Path) -> None:
    """``netserver run --quiet``: no connection line for any service; a refusal is still
    logged (one client over a ``per_source = 1`` service's limit)."""
    body = f'{ECHO}\nper_source = 1\nbanner = "busy"'
    config = write_config(tmp_path, service("one", GREET) + service("two", body))
    server = start_run(config, tmp_path, args=("--quiet",))
    try:
        one, two = server.addresses
        assert exchange(one) == b"hi\n"
        with Client(two) as first:
            first.send(b"ping\n")
            assert first.read_line() == b"ping\n"
            assert refusal(two) == b"busy\r\n"
    finally:
        assert server.stop() == 0
    log = server.log()
    assert "netserver: conn " not in log, log
    assert "more than 1 connections from 127.0.0.1" in log, log
