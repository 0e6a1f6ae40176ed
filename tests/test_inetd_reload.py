"""`netserver run`: SIGHUP re-reads CONFIG.toml, as xinetd does.

The real supervisor runs as a subprocess. It is ready when its READY line comes on
--ready-fd; a reload is done when it sends ``READY=1`` after ``RELOADING=1`` on the
systemd notify socket the test listens on (``Type=notify-reload``'s protocol), so the
test never sleeps or polls.
"""

from __future__ import annotations

import asyncio
import os
import select
import signal
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import RunningServer
from inetd_support import current_user, service_pid, start_run, write_config
from netclient import Client, exchange

ME = current_user()
NOTIFY_TIMEOUT = 20.0


def service(name: str, body: str, listen: str = "127.0.0.1:0") -> str:
    return f'[[service]]\nname = "{name}"\nlisten = ["{listen}"]\nuser = "{ME}"\n{body}\n\n'


ECHO = 'handler = "examples.echo:main"'


def says(text: str) -> str:
    return f'command = ["/bin/echo", "{text}"]'


class Notify:
    """A systemd-style notify socket: the supervisor's state messages, in order."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(NOTIFY_TIMEOUT)

    def next(self) -> set[str]:
        return set(self.sock.recv(4096).decode().splitlines())

    def wait_for(self, state: str) -> list[set[str]]:
        """Every message up to and including the one that says `state`."""
        seen = [self.next()]
        while state not in seen[-1]:
            seen.append(self.next())
        return seen


@pytest.fixture
def notify() -> Iterator[Notify]:
    with tempfile.TemporaryDirectory(prefix="ns-") as short:  # unix paths are short
        socket_ = Notify(Path(short) / "notify")
        try:
            yield socket_
        finally:
            socket_.sock.close()


def start(config: Path, tmp_path: Path, notify: Notify) -> RunningServer:
    server = start_run(config, tmp_path, env={"NOTIFY_SOCKET": str(notify.path)})
    notify.wait_for("READY=1")
    return server


def reload(server: RunningServer, notify: Notify) -> None:
    """SIGHUP, then wait until the supervisor says the reload is done."""
    server.signal(signal.SIGHUP)
    seen = notify.wait_for("READY=1")
    assert any("RELOADING=1" in message for message in seen), seen


def refused(address: str) -> bool:
    try:
        with Client(address):
            return False
    except ConnectionRefusedError:
        return True


def test_reload_adds_removes_and_changes_services(
    tmp_path: Path, notify: Notify, short_dir: Path
) -> None:
    config = write_config(
        tmp_path, service("keep", ECHO) + service("change", says("v1")) + service("gone", ECHO)
    )
    server = start(config, tmp_path, notify)
    try:
        keep_addr, change_addr, gone_addr = server.addresses
        keep_pid, gone_pid = service_pid(server.log(), "keep"), service_pid(server.log(), "gone")
        assert exchange(change_addr) == b"v1\n"
        with Client(keep_addr) as kept, Client(gone_addr) as leaving:
            kept.send(b"before\n")
            assert kept.read_line() == b"before\n"
            leaving.send(b"before\n")
            assert leaving.read_line() == b"before\n"
            new_addr = f"unix:{short_dir / 'new.sock'}"
            config.write_text(
                service("new", says("new"), new_addr)
                + service("change", says("v2"))
                + service("keep", ECHO)
            )
            reload(server, notify)
            # Changed: the same socket (the kernel's port 0 stays), the new command.
            assert exchange(change_addr) == b"v2\n"
            assert exchange(new_addr) == b"new\n"
            assert refused(gone_addr)
            # Open connections go on: the unchanged service's and the removed one's.
            kept.send(b"after\n")
            assert kept.read_line() == b"after\n"
            leaving.send(b"after\n")
            assert leaving.read_line() == b"after\n"
            gone = os.pidfd_open(gone_pid)
        # Its last connection over, the retired process ends by itself.
        assert select.select([gone], [], [], NOTIFY_TIMEOUT)[0] == [gone]
        os.close(gone)
        assert service_pid(server.log(), "keep") == keep_pid
    finally:
        assert server.stop() == 0
    log = server.log()
    assert "reload kept=keep started=new,change retired=change,gone" in log
    assert '"retired service stopped" service=gone status=0' in log
    assert "status=terminated" not in log


def test_a_config_that_does_not_load_changes_nothing(tmp_path: Path, notify: Notify) -> None:
    config = write_config(tmp_path, service("one", says("one")))
    server = start(config, tmp_path, notify)
    try:
        (address,) = server.addresses
        good = config.read_text()
        for bad in ('[[service]]\nname = "one"\nlisten = [1,,]\n', good + "per_sourse = 5\n"):
            config.write_text(bad)
            reload(server, notify)
            assert exchange(address) == b"one\n"
            assert server.log().count("reload failed, the services run as before") >= 1
        assert "retired" not in server.log()
    finally:
        assert server.stop() == 0
    assert server.log().count("reload failed") == 2


def test_reload_retries_a_service_that_could_not_bind(tmp_path: Path, notify: Notify) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        busy = service("busy", says("busy"), f"127.0.0.1:{port}")
        config = write_config(tmp_path, busy + service("up", says("up")))
        server = start(config, tmp_path, notify)
    try:
        reload(server, notify)  # the same file: the port is free now
        assert exchange(f"127.0.0.1:{port}") == b"busy\n"
    finally:
        assert server.stop() == 0
    assert "reload kept=up started=busy retired=busy" in server.log()


def test_a_service_may_take_the_port_a_retired_one_held(tmp_path: Path, notify: Notify) -> None:
    """The same port in another spelling: the retired socket is closed before the bind."""
    config = write_config(tmp_path, service("old", ECHO))
    server = start(config, tmp_path, notify)
    try:
        (address,) = server.addresses
        with Client(address) as held:  # its process keeps running, with the socket
            held.send(b"accepted\n")  # not just waiting in the backlog: that would be reset
            assert held.read_line() == b"accepted\n"
            config.write_text(service("new", says("new"), address))
            reload(server, notify)
            assert exchange(address) == b"new\n"
            held.send(b"still\n")
            assert held.read_line() == b"still\n"
    finally:
        assert server.stop() == 0
    assert "service not started" not in server.log()


@pytest.fixture
def short_dir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="ns-") as name:
        yield Path(name)


def test_accept_stops_watching_a_listener_shut_down_under_it() -> None:
    """A retired service's process sees EINVAL from accept: it must not spin on it."""
    from netserver.connlog import ServerLog
    from netserver.listen.accept import AcceptLoop
    from netserver.listen.listeners import open_listeners, parse_listen

    (listener,) = open_listeners([parse_listen("127.0.0.1:0")])
    accepted: list[object] = []
    loop = asyncio.new_event_loop()
    try:
        acceptor = AcceptLoop(loop, [listener], lambda *a: accepted.append(a), ServerLog())
        acceptor.resume()
        listener.sock.shutdown(socket.SHUT_RDWR)  # what the supervisor does on a reload
        for _ in range(100):  # loop turns, not time: readiness is immediate
            if listener not in acceptor.listeners:
                break
            loop.run_until_complete(asyncio.sleep(0))
        assert listener not in acceptor.listeners
        assert not loop.remove_reader(listener.sock.fileno())  # no longer watched
        assert accepted == []
    finally:
        listener.close()
        loop.close()
